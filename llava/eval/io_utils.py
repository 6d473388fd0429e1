"""Small file helpers shared by the scorers, converters and answer generators.

Nothing here imports torch, so the scorers stay light-weight CLIs.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

EVAL_DOC_HINT = "see EVAL.md for where to download it and the expected folder layout"


def require_path(path: str | os.PathLike, what: str, *, is_dir: bool = False) -> Path:
    """Return `path` as a Path, or raise FileNotFoundError naming it and pointing at EVAL.md."""
    p = Path(path)
    ok = p.is_dir() if is_dir else p.is_file()
    if not ok:
        kind = "folder" if is_dir else "file"
        raise FileNotFoundError(f"{what}: {kind} not found: {p} ({EVAL_DOC_HINT})")
    return p


def read_jsonl(path: str | os.PathLike, what: str = "jsonl file") -> list[dict]:
    """Read one JSON object per non-empty line; a malformed line raises ValueError naming file and line."""
    p = require_path(path, what)
    rows: list[dict] = []
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{what}: {p} line {lineno} is not valid JSON ({e.msg})") from None
    return rows


def read_json(path: str | os.PathLike, what: str = "json file") -> Any:
    p = require_path(path, what)
    with open(p, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{what}: {p} is not valid JSON ({e.msg})") from None


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to a temporary file next to `path` and rename it into place."""
    p = Path(path)
    if p.parent and not p.parent.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def maybe_write_metrics(json_path: str | None, metrics: dict) -> None:
    """Write the scorer's metrics to `--json PATH` when given."""
    if json_path:
        atomic_write_json(json_path, metrics)

"""Small file helpers shared by the scorers, converters and answer generators.

Nothing here imports torch, so the scorers stay light-weight CLIs.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import sys
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


def read_jsonl_lines(path: str | os.PathLike, what: str = "jsonl file") -> list[tuple[int, Any]]:
    """(line number, JSON value) of every non-empty line; a malformed line raises ValueError naming file and line."""
    p = require_path(path, what)
    rows: list[tuple[int, Any]] = []
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{what}: {p} line {lineno} is not valid JSON ({e.msg})") from None
    return rows


def read_jsonl(path: str | os.PathLike, what: str = "jsonl file") -> list[dict]:
    """Read one JSON object per non-empty line; a malformed line raises ValueError naming file and line."""
    return [row for _, row in read_jsonl_lines(path, what)]


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


class FileLockedError(RuntimeError):
    """Another process holds the lock of a file (see `FileLock`)."""


class FileLock:
    """Exclusive advisory lock (fcntl.flock) on `<path>.lock`, the file beside `path`.

    The lock file records its holder (pid, host, start time, command) so that a refused writer can name it.
    The kernel releases the lock when the holder exits, however it dies, so a leftover lock file is harmless.
    `blocking=False` raises FileLockedError naming the holder; `blocking=True` waits for it.
    flock works between processes of one machine; on network file systems it may not lock across hosts.
    """

    def __init__(self, path: str | os.PathLike, what: str = "file"):
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.what = what
        self._fd: int | None = None

    def holder(self) -> str:
        """The holder recorded in the lock file, as words."""
        try:
            info = json.loads(self.lock_path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            info = {}
        if not info:
            return "an unknown process"
        return (f"pid {info.get('pid')} on host {info.get('host')}, since {info.get('started')} "
                f"({info.get('command', '')})")

    def acquire(self, blocking: bool = False) -> "FileLock":
        import fcntl

        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            raise FileLockedError(
                f"{self.what} {self.path} is being written by another process: {self.holder()} "
                f"(lock file {self.lock_path}). Wait for that run to end or stop it; two writers on one file "
                "would write every answer twice") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "command": " ".join(sys.argv)[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        import fcntl

        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)  # no stale holder after a clean exit
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "FileLock":
        return self.acquire() if self._fd is None else self

    def __exit__(self, *exc: Any) -> None:
        self.release()

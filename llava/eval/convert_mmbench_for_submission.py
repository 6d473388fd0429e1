"""MMBench / MMBench-CN: submission xlsx (the tsv's rows plus a `prediction` column).

Usage:
    python -m llava.eval.convert_mmbench_for_submission --annotation-file mmbench/mmbench_dev_20230712.tsv \
        --result-file merge.jsonl --out mmbench/answers_upload/<experiment>.xlsx [--json metrics.json]

The base64 `image` column and the bookkeeping columns are dropped. When the tsv has an `answer` column
(dev split), a local single-pass accuracy is also printed: the predicted letter is parsed like ScienceQA's
(bare letter, "X. ..." or "The answer is X."). The official score is CircularEval on the server.
"""
from __future__ import annotations

import argparse
import io
import os
import tempfile
from pathlib import Path

from llava.eval.eval_science_qa import parse_letter
from llava.eval.io_utils import maybe_write_metrics, read_jsonl, require_path

DROPPED_COLUMNS = ("hint", "category", "source", "image", "comment", "l2-category")
LETTERS = ("A", "B", "C", "D")


def build_table(annotation_file: str, result_file: str):
    """pandas DataFrame of the tsv rows (round 0 answers) with a `prediction` column."""
    import pandas as pd

    df = pd.read_csv(require_path(annotation_file, "MMBench tsv (--annotation-file)"), sep="\t")
    if "index" not in df.columns:
        raise ValueError(f"--annotation-file {annotation_file}: expected an 'index' column")
    preds: dict[int, str] = {}
    for a in read_jsonl(result_file, "MMBench answers (--result-file)"):
        if int(a.get("round_id", 0)) == 0:
            preds[int(a["question_id"])] = a["text"]
    unknown = set(preds) - set(int(i) for i in df["index"])
    if unknown:
        raise ValueError(f"--result-file: question_ids not in the tsv: {sorted(unknown)[:5]}")
    out = df.drop(columns=[c for c in DROPPED_COLUMNS if c in df.columns])
    out["prediction"] = [_xlsx_safe(preds.get(int(i))) for i in df["index"]]
    return out


def _xlsx_safe(text: str | None) -> str | None:
    """Drop the control characters an xlsx cell cannot hold (openpyxl rejects them)."""
    if text is None:
        return None
    from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE

    return ILLEGAL_CHARACTERS_RE.sub("", text)


def local_accuracy(table) -> float | None:
    """Single-pass accuracy (percent) over answered rows with a ground-truth letter; None without answers."""
    if "answer" not in table.columns:
        return None
    rows = table[table["prediction"].notna() & table["answer"].isin(LETTERS)]
    if len(rows) == 0:
        return None
    hits = sum(parse_letter(str(p).strip(), LETTERS) == a for p, a in zip(rows["prediction"], rows["answer"]))
    return 100.0 * hits / len(rows)


def write_xlsx(table, out_path: str) -> None:
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    table.to_excel(buf, index=False, engine="openpyxl")
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(buf.getvalue())
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--annotation-file", required=True)
    ap.add_argument("--result-file", required=True)
    ap.add_argument("--out", required=True, help="xlsx to write")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    table = build_table(args.annotation_file, args.result_file)
    write_xlsx(table, args.out)
    answered = int(table["prediction"].notna().sum())
    print(f"wrote {len(table)} rows ({answered} answered) to {args.out}")
    acc = local_accuracy(table)
    metrics = {"accuracy_local": acc} if acc is not None else {}
    maybe_write_metrics(args.json, metrics)
    if acc is not None:
        print(f"MMBench local single-pass accuracy: {acc:.2f}")
    return metrics


if __name__ == "__main__":
    main()

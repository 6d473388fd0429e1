"""MMBench / MMBench-CN: submission xlsx (the tsv's rows plus a `prediction` column).

Usage:
    python -m llava.eval.convert_mmbench_for_submission --annotation-file mmbench/mmbench_dev_20230712.tsv \
        --result-file merge.jsonl --out mmbench/answers_upload/<experiment>.xlsx [--json metrics.json]

The base64 `image` column and the bookkeeping columns are dropped and `prediction` is inserted where LLaVA's
converter puts it. Every tsv row needs exactly one round-0 answer (llava.eval.coverage; `--allow-subset` to
convert the answered rows on purpose). When the tsv has an `answer` column
(dev split), a local single-pass accuracy is also printed: the predicted letter is parsed like ScienceQA's
(bare letter, "X. ..." or "The answer is X."). The official score is CircularEval on the server.
"""
from __future__ import annotations

import argparse
import io
import os
import tempfile
from pathlib import Path

from llava.eval.coverage import add_subset_argument, check_coverage, summary_line
from llava.eval.eval_science_qa import parse_letter
from llava.eval.io_utils import maybe_write_metrics, read_jsonl, require_path

DROPPED_COLUMNS = ("hint", "category", "source", "image", "comment", "l2-category")
LETTERS = ("A", "B", "C", "D")
PREDICTION_POSITION = 6   # where LLaVA's converter inserts `prediction` (0-based), after dropping DROPPED_COLUMNS


def build_table(annotation_file: str, result_file: str, allow_subset: bool = False):
    """(pandas DataFrame of the tsv rows with a `prediction` column, coverage of the tsv by round-0 answers).

    The columns are LLaVA's: the tsv's minus `DROPPED_COLUMNS`, with `prediction` inserted at position
    `PREDICTION_POSITION` (0-based), so the file diffs cleanly with LLaVA's. Unanswered rows (only with
    `allow_subset`) get an empty prediction.
    """
    import pandas as pd

    df = pd.read_csv(require_path(annotation_file, "MMBench tsv (--annotation-file)"), sep="\t")
    if "index" not in df.columns:
        raise ValueError(f"--annotation-file {annotation_file}: expected an 'index' column")
    answers = [a for a in read_jsonl(result_file, "MMBench answers (--result-file)") if int(a.get("round_id", 0)) == 0]
    cov = check_coverage([int(i) for i in df["index"]], [int(a["question_id"]) for a in answers],
                         answers=f"--result-file {result_file}", questions=f"--annotation-file {annotation_file}",
                         allow_subset=allow_subset)
    preds = {int(a["question_id"]): a["text"] for a in answers}
    out = df.drop(columns=[c for c in DROPPED_COLUMNS if c in df.columns])
    predictions = [_xlsx_safe(preds.get(int(i))) for i in df["index"]]
    out.insert(min(PREDICTION_POSITION, len(out.columns)), "prediction", predictions)
    return out, cov


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
    add_subset_argument(ap)
    args = ap.parse_args(argv)
    table, cov = build_table(args.annotation_file, args.result_file, args.allow_subset)
    write_xlsx(table, args.out)
    print(f"wrote {len(table)} rows ({cov.answered} answered) to {args.out}")
    acc = local_accuracy(table)
    metrics = {"accuracy_local": acc} if acc is not None else {}
    metrics.update(cov.fields())
    maybe_write_metrics(args.json, metrics)
    print(summary_line(metrics))
    if acc is not None:
        print(f"MMBench local single-pass accuracy: {acc:.2f}")
    return metrics


if __name__ == "__main__":
    main()

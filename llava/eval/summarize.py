"""results/summary.csv -> the paper's table layout (Tables 2, 3, 5).

Usage:
    python -m llava.eval.summarize [--csv results/summary.csv] [--out table.md] [--reference-budget 576]
    python -m llava.eval.summarize add --benchmark vqav2 --checkpoint llava-v1.5-7b --method script \
        --budget 64 --metric accuracy --value 75.08      # e.g. a score returned by an evaluation server

summary.csv columns: benchmark, checkpoint, method, budget, metric, value, date (one row per scorer run;
the eval scripts append them). For each (checkpoint, method, budget) the latest value of each benchmark's
headline metric is shown. Acc. = mean over the shown benchmarks with MME divided by 20 (its perception
maximum is 2000); Relative = Acc. / Acc. of the reference row x 100, both over the benchmarks the two rows
share. The reference row of a checkpoint is the one with the largest budget (the unpruned model: 576 for
LLaVA-1.5, 2880 for LLaVA-NeXT) unless --reference-budget is given.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
from dataclasses import dataclass
from pathlib import Path

from llava.eval.io_utils import atomic_write_text, require_path

FIELDS = ("benchmark", "checkpoint", "method", "budget", "metric", "value", "date")
# (csv benchmark name, column title, headline metrics in order of preference)
COLUMNS = (
    ("gqa", "GQA", ("accuracy",)),
    ("mmbench", "MMB", ("accuracy", "accuracy_local")),
    ("mmbench_cn", "MMB-CN", ("accuracy", "accuracy_local")),
    ("mme", "MME", ("perception",)),
    ("pope", "POPE", ("average_f1",)),
    ("sqa", "SQA-IMG", ("img_accuracy",)),
    ("vqav2", "VQAv2", ("accuracy",)),
    ("textvqa", "VQA-Text", ("accuracy",)),
    ("vizwiz", "VizWiz", ("accuracy",)),
    ("mmvet", "MM-Vet", ("accuracy",)),
)
MME_SCALE = 20.0


@dataclass(frozen=True)
class RowKey:
    checkpoint: str
    method: str
    budget: int


def append_row(csv_path: str, benchmark: str, checkpoint: str, method: str, budget: int, metric: str,
               value: float | str, date: str | None = None) -> None:
    """Append one result row (header written when the file is new)."""
    if benchmark not in {c[0] for c in COLUMNS}:
        raise ValueError(f"benchmark: expected one of {[c[0] for c in COLUMNS]}, got {benchmark!r}")
    path = Path(csv_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    date = date or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    with open(path, "a", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        if new:
            w.writerow(FIELDS)
        w.writerow([benchmark, checkpoint, method, int(budget), metric, value, date])
        f.flush()
        os.fsync(f.fileno())


def read_scores(csv_path: str) -> dict[RowKey, dict[str, float]]:
    """(checkpoint, method, budget) -> {benchmark: headline value}; later rows win."""
    with open(require_path(csv_path, "results summary (--csv)"), newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    latest: dict[tuple[RowKey, str, str], float] = {}
    for r in rows:
        try:
            value = float(r["value"])
        except (TypeError, ValueError):
            continue  # e.g. a submission-file row of a server-scored benchmark
        latest[(RowKey(r["checkpoint"], r["method"], int(r["budget"])), r["benchmark"], r["metric"])] = value
    table: dict[RowKey, dict[str, float]] = {}
    keys = {k for k, _, _ in latest}
    for key in keys:
        scores = {}
        for bench, _title, metrics in COLUMNS:
            for m in metrics:
                if (key, bench, m) in latest:
                    scores[bench] = latest[(key, bench, m)]
                    break
        if scores:
            table[key] = scores
    return table


def average_accuracy(scores: dict[str, float], benchmarks: list[str] | None = None) -> float:
    """Mean over `benchmarks` (default: all in `scores`) with MME / 20."""
    names = benchmarks if benchmarks is not None else list(scores)
    if not names:
        raise ValueError("scores: no benchmark to average")
    vals = [scores[b] / MME_SCALE if b == "mme" else scores[b] for b in names]
    return sum(vals) / len(vals)


def relative(scores: dict[str, float], reference: dict[str, float]) -> float:
    """Acc. / reference Acc. x 100 over the benchmarks both rows have."""
    shared = [b for b in scores if b in reference]
    if not shared:
        raise ValueError("reference: shares no benchmark with the row")
    return 100.0 * average_accuracy(scores, shared) / average_accuracy(reference, shared)


def build_table(table: dict[RowKey, dict[str, float]], reference_budget: int | None = None) -> list[list[str]]:
    header = ["Checkpoint", "Method", "Budget"] + [t for _, t, _ in COLUMNS] + ["Acc.", "Relative"]
    out = [header]
    for ckpt in sorted({k.checkpoint for k in table}):
        keys = sorted((k for k in table if k.checkpoint == ckpt), key=lambda k: (-k.budget, k.method))
        ref_budget = reference_budget if reference_budget is not None else keys[0].budget
        ref_keys = [k for k in keys if k.budget == ref_budget]
        reference = table[ref_keys[0]] if ref_keys else None
        for k in keys:
            s = table[k]
            cells = [f"{s[b]:.2f}" if b in s else "-" for b, _, _ in COLUMNS]
            rel = f"{relative(s, reference):.2f}%" if reference else "-"
            out.append([ckpt, k.method, str(k.budget)] + cells + [f"{average_accuracy(s):.2f}", rel])
    return out


def format_markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[list[str]] | None:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "add":
        ap = argparse.ArgumentParser(prog="llava.eval.summarize add", description="append one result row")
        ap.add_argument("--csv", default="results/summary.csv")
        for name in ("benchmark", "checkpoint", "method", "metric", "value"):
            ap.add_argument(f"--{name}", required=True)
        ap.add_argument("--budget", type=int, required=True)
        a = ap.parse_args(argv[1:])
        append_row(a.csv, a.benchmark, a.checkpoint, a.method, a.budget, a.metric, a.value)
        print(f"appended {a.benchmark} {a.metric}={a.value} to {a.csv}")
        return None
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", default="results/summary.csv")
    ap.add_argument("--out", default=None, help="also write the table as markdown here")
    ap.add_argument("--reference-budget", type=int, default=None)
    a = ap.parse_args(argv)
    rows = build_table(read_scores(a.csv), a.reference_budget)
    text = format_markdown(rows)
    if a.out:
        atomic_write_text(a.out, text)
    print(text, end="")
    return rows


if __name__ == "__main__":
    main()

"""results/summary.csv -> the paper's table layout (Tables 2, 3, 5).

Usage:
    python -m llava.eval.summarize [--csv results/summary.csv] [--out table.md] [--reference-budget 576]
    python -m llava.eval.summarize add --benchmark vqav2 --checkpoint llava-v1.5-7b --method script \
        --budget 64 --metric accuracy --value 75.08 [--answers-file merge.jsonl] [--metrics-json m.json] [--run TAG]

summary.csv columns: benchmark, checkpoint, method, budget, metric, value, date, run, fingerprint, subset,
errors. The eval scripts add one row per scorer run. `--answers-file` reads the run fingerprint shared by
all answers (a row with the same benchmark, metric and fingerprint is replaced: a rerun never adds a
duplicate row) and counts the answers recorded as errors (`--on-image-error record`); `--metrics-json`
reads the scorer's `answered` / `questions` / `subset` (a subset is marked); `--run` is the RUN_TAG of a
run with non-default settings (its own table row).

For each (checkpoint, method, budget, run) the latest value of each benchmark's headline metric is shown;
a value scored on a subset of the questions is marked `*`, one with answers recorded as errors `!`, and the
notes under the table list them. Acc. = mean over the shown benchmarks with MME divided by 20 (its
perception maximum is 2000); Relative = Acc. / Acc. of the reference row x 100, both over the benchmarks
the two rows share ("-" when they share none). The reference row of a checkpoint is the one with the
largest budget (the unpruned model: 576 for LLaVA-1.5, 2880 for LLaVA-NeXT) unless --reference-budget is
given. A row of the csv with a missing or unreadable field (a partly written file) is skipped with a
warning; a missing value shows as "-".
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import io
import sys
from dataclasses import dataclass
from pathlib import Path

from llava.eval.io_utils import FileLock, atomic_write_text, read_json, require_path

FIELDS = ("benchmark", "checkpoint", "method", "budget", "metric", "value", "date", "run", "fingerprint", "subset",
          "errors")
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
# benchmarks recorded from lmms-eval runs (llava.lmms.table, metric "lmms_eval"): not columns of this table (their
# rows, and those of textvqa / mme / mmbench under metric "lmms_eval", are left out of it); llava.lmms.table shows them
LMMS_BENCHMARKS = ("mlvu", "mvbench", "longvideobench", "videomme", "ai2d", "chartqa", "ocrbench", "hallusionbench")


@dataclass(frozen=True)
class RowKey:
    checkpoint: str
    method: str
    budget: int
    run: str = ""  # RUN_TAG of a run with non-default settings


def answers_run_info(answers_file: str) -> tuple[str, int]:
    """(run fingerprint shared by every answer, number of answers recorded as errors) of a merged answers file."""
    from llava.eval.io_utils import read_jsonl_lines

    fingerprints, errors = set(), 0
    for _, row in read_jsonl_lines(answers_file, "answers file (--answers-file)"):
        fingerprints.add((row.get("metadata") or {}).get("fingerprint") or "")
        errors += "error" in row
    if len(fingerprints) > 1:
        raise ValueError(f"--answers-file {answers_file}: answers of {len(fingerprints)} different runs "
                         f"{sorted(fingerprints)}; one summary row describes one run")
    return (fingerprints.pop() if fingerprints else ""), errors


def subset_mark(metrics_json: str | None) -> str:
    """"answered/questions" when the scorer's metrics say it scored a subset on purpose, else ""."""
    if not metrics_json:
        return ""
    m = read_json(metrics_json, "scorer metrics (--metrics-json)")
    if not m.get("subset"):
        return ""
    return f"{m.get('answered', '?')}/{m.get('questions', '?')}"


def _read_rows(path: Path) -> list[dict]:
    if not path.exists() or path.stat().st_size == 0:
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def append_row(csv_path: str, benchmark: str, checkpoint: str, method: str, budget: int, metric: str,
               value: float | str, date: str | None = None, *, run: str = "", fingerprint: str = "",
               subset: str = "", errors: int = 0) -> None:
    """Add one result row, replacing the row of the same benchmark, metric and run fingerprint when there is one.

    The file is rewritten whole (atomically, under a lock beside it: parallel scripts may add rows at once),
    with the current header; rows of an older file without the newer columns keep them empty.
    """
    known = [c[0] for c in COLUMNS] + list(LMMS_BENCHMARKS)
    if benchmark not in known:
        raise ValueError(f"benchmark: expected one of {known}, got {benchmark!r}")
    path = Path(csv_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    date = date or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    new = dict(zip(FIELDS, [benchmark, checkpoint, method, int(budget), metric, value, date, run, fingerprint,
                            subset, int(errors) or ""]))
    lock = FileLock(path, "results summary").acquire(blocking=True)
    try:
        rows = _read_rows(path)
        if fingerprint:
            rows = [r for r in rows if (r.get("benchmark"), r.get("metric"), r.get("fingerprint"))
                    != (benchmark, metric, fingerprint)]
        out = io.StringIO()
        w = csv.DictWriter(out, fieldnames=FIELDS, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in rows + [new]:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in FIELDS})
        atomic_write_text(path, out.getvalue())
    finally:
        lock.release()


@dataclass(frozen=True)
class Mark:
    subset: str = ""   # "answered/questions" when scored on a subset
    errors: int = 0    # answers recorded as errors


def _latest(csv_path: str) -> dict[tuple[RowKey, str, str], tuple[float, Mark]]:
    """(row key, benchmark, metric) -> (value, mark) of the latest readable numeric row."""
    with open(require_path(csv_path, "results summary (--csv)"), newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    latest: dict[tuple[RowKey, str, str], tuple[float, Mark]] = {}
    for lineno, r in enumerate(rows, 2):
        try:
            value = float(r["value"])
        except (TypeError, ValueError, KeyError):
            continue  # e.g. a submission-file row of a server-scored benchmark
        try:
            key = RowKey(r["checkpoint"], r["method"], int(r["budget"]), r.get("run") or "")
            mark = Mark(r.get("subset") or "", int(r.get("errors") or 0))
        except (TypeError, ValueError, KeyError):
            print(f"warning: {csv_path} line {lineno} is incomplete or malformed, skipped: {r}", file=sys.stderr)
            continue
        latest[(key, r["benchmark"], r["metric"])] = (value, mark)
    return latest


def _headline(latest: dict) -> dict[RowKey, dict[str, tuple[float, Mark]]]:
    table: dict[RowKey, dict[str, tuple[float, Mark]]] = {}
    for key in {k for k, _, _ in latest}:
        scores = {}
        for bench, _title, metrics in COLUMNS:
            for m in metrics:
                if (key, bench, m) in latest:
                    scores[bench] = latest[(key, bench, m)]
                    break
        if scores:
            table[key] = scores
    return table


def read_scores(csv_path: str) -> dict[RowKey, dict[str, float]]:
    """(checkpoint, method, budget, run) -> {benchmark: headline value}; later rows win."""
    return {k: {b: v for b, (v, _) in s.items()} for k, s in _headline(_latest(csv_path)).items()}


def read_marks(csv_path: str) -> dict[RowKey, dict[str, Mark]]:
    """Like read_scores, but the subset / error marks of the values shown (only the marked ones)."""
    out: dict[RowKey, dict[str, Mark]] = {}
    for k, s in _headline(_latest(csv_path)).items():
        marked = {b: m for b, (_, m) in s.items() if m != Mark()}
        if marked:
            out[k] = marked
    return out


def average_accuracy(scores: dict[str, float], benchmarks: list[str] | None = None) -> float:
    """Mean over `benchmarks` (default: all in `scores`) with MME / 20."""
    names = benchmarks if benchmarks is not None else list(scores)
    if not names:
        raise ValueError("scores: no benchmark to average")
    vals = [scores[b] / MME_SCALE if b == "mme" else scores[b] for b in names]
    return sum(vals) / len(vals)


def relative(scores: dict[str, float], reference: dict[str, float]) -> float | None:
    """Acc. / reference Acc. x 100 over the benchmarks both rows have; None when they share none."""
    shared = [b for b in scores if b in reference]
    if not shared:
        return None
    return 100.0 * average_accuracy(scores, shared) / average_accuracy(reference, shared)


def _cell(value: float, mark: Mark | None) -> str:
    text = f"{value:.2f}"
    if mark is not None:
        text += ("*" if mark.subset else "") + ("!" if mark.errors else "")
    return text


def build_table(table: dict[RowKey, dict[str, float]], reference_budget: int | None = None,
                marks: dict[RowKey, dict[str, Mark]] | None = None) -> list[list[str]]:
    header = ["Checkpoint", "Method", "Budget"] + [t for _, t, _ in COLUMNS] + ["Acc.", "Relative"]
    marks = marks or {}
    out = [header]
    for ckpt in sorted({k.checkpoint for k in table}):
        keys = sorted((k for k in table if k.checkpoint == ckpt), key=lambda k: (-k.budget, k.method, k.run))
        ref_budget = reference_budget if reference_budget is not None else keys[0].budget
        ref_keys = [k for k in keys if k.budget == ref_budget]
        reference = table[ref_keys[0]] if ref_keys else None
        for k in keys:
            s = table[k]
            cells = [_cell(s[b], marks.get(k, {}).get(b)) if b in s else "-" for b, _, _ in COLUMNS]
            rel = relative(s, reference) if reference else None
            method = f"{k.method} ({k.run})" if k.run else k.method
            out.append([ckpt, method, str(k.budget)] + cells
                       + [f"{average_accuracy(s):.2f}", "-" if rel is None else f"{rel:.2f}%"])
    return out


def format_notes(marks: dict[RowKey, dict[str, Mark]]) -> str:
    """One line per marked value: scored on a subset (*) and/or with answers recorded as errors (!)."""
    lines = []
    for k in sorted(marks, key=lambda k: (k.checkpoint, -k.budget, k.method, k.run)):
        for bench, m in sorted(marks[k].items()):
            what = []
            if m.subset:
                what.append(f"* scored on a subset: {m.subset} questions answered")
            if m.errors:
                what.append(f"! {m.errors} answer(s) recorded as errors (unreadable image), counted wrong")
            run = f" ({k.run})" if k.run else ""
            lines.append(f"- {k.checkpoint} {k.method}{run} {k.budget} {bench}: " + "; ".join(what))
    return "\n".join(lines) + "\n" if lines else ""


def format_markdown(rows: list[list[str]], notes: str = "") -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines) + "\n" + (f"\n{notes}" if notes else "")


def main(argv: list[str] | None = None) -> list[list[str]] | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "add":
        ap = argparse.ArgumentParser(prog="llava.eval.summarize add", description="add one result row")
        ap.add_argument("--csv", default="results/summary.csv")
        for name in ("benchmark", "checkpoint", "method", "metric", "value"):
            ap.add_argument(f"--{name}", required=True)
        ap.add_argument("--budget", type=int, required=True)
        ap.add_argument("--answers-file", default=None,
                        help="merged answers: their run fingerprint keys the row (a rerun replaces it)")
        ap.add_argument("--metrics-json", default=None, help="the scorer's metrics (answered / questions / subset)")
        ap.add_argument("--run", default="", help="RUN_TAG of a run with non-default settings (its own table row)")
        a = ap.parse_args(argv[1:])
        fingerprint, errors = answers_run_info(a.answers_file) if a.answers_file else ("", 0)
        subset = subset_mark(a.metrics_json)
        append_row(a.csv, a.benchmark, a.checkpoint, a.method, a.budget, a.metric, a.value, run=a.run,
                   fingerprint=fingerprint, subset=subset, errors=errors)
        notes = (f" (subset {subset})" if subset else "") + (f" ({errors} answers recorded as errors)" if errors else "")
        print(f"recorded {a.benchmark} {a.metric}={a.value}{notes} in {a.csv}")
        return None
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", default="results/summary.csv")
    ap.add_argument("--out", default=None, help="also write the table as markdown here")
    ap.add_argument("--reference-budget", type=int, default=None)
    a = ap.parse_args(argv)
    marks = read_marks(a.csv)
    rows = build_table(read_scores(a.csv), a.reference_budget, marks)
    text = format_markdown(rows, format_notes(marks))
    if a.out:
        atomic_write_text(a.out, text)
    print(text, end="")
    return rows


if __name__ == "__main__":
    main()

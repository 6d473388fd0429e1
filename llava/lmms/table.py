"""lmms-eval result JSONs -> the paper's Table 4 (LLaVA-Video-7B) / Table 10 (InternVL3-8B) layout.

Usage:
    python -m llava.lmms.table --suite video --run "script 32=results/lmms/video/script_32" \
        [--run "none 169=results/lmms/video/none_169"] [--reference "none 169"] [--out table.md] \
        [--csv results/summary.csv --checkpoint LLaVA-Video-7B]

Each ``--run "METHOD BUDGET=DIR"`` is one lmms-eval output folder (``--output_path``); the newest
``*_results.json`` holding a task gives that task's numbers (reruns and resumed runs write new files), and
Video-MME's short / medium / long and LongVideoBench's perception / relation come from the logged samples
(``*_samples_<task>.jsonl``, ``--log_samples``): lmms-eval's results files hold only their overall scores.

Acc. = mean of the columns marked ``in_acc`` on a 0-100 scale (OCRBench / 10, MME / 28, its maximum being
2800); Relative = Acc. / Acc. of the reference row x 100 over the columns both rows have. The reference row
is ``--reference`` when given, else the paper's unpruned row (shown as the first row, "paper"). A missing
value shows "-". ``--csv`` adds one summary row per benchmark (llava.eval.summarize), keyed by a fingerprint
of the run's lmms-eval model_args and task, so a rerun replaces its rows.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from dataclasses import dataclass, field
from pathlib import Path

from llava.eval.io_utils import atomic_write_text, read_json, read_jsonl, require_path


@dataclass(frozen=True)
class Subset:
    """A column read from a task's logged samples: the records whose ``field`` is one of ``values``; a record whose
    ``field`` is outside ``known`` (when given) is an error, not silently dropped."""

    field: str
    values: frozenset[str]
    known: frozenset[str] = frozenset()


# LongVideoBench's 17 question categories in its two levels (Wu et al. 2024, "LongVideoBench", Sec. 3): perception
# asks about one referred moment, relation about several (their order, or a change between them)
LVB_PERCEPTION = frozenset({"S2E", "S2O", "S2A", "E2O", "O2E", "T2E", "T2O", "T2A"})
LVB_RELATION = frozenset({"E3E", "O3O", "SSS", "SOS", "SAA", "T3E", "T3O", "TOS", "TAA"})


@dataclass(frozen=True)
class Column:
    """One table column: ``metrics`` of ``task`` summed (first present name of each alternative tuple), times
    ``scale``; ``tasks_prefix`` averages the metric over every task starting with it (MVBench's 20 subtasks);
    ``subset`` reads the accuracy of the task's logged samples in that subset instead (Video-MME's durations,
    LongVideoBench's levels). ``acc_divisor`` maps it to 0-100."""

    title: str
    task: str
    metrics: tuple[tuple[str, ...], ...]
    scale: float = 1.0
    acc_divisor: float = 1.0
    in_acc: bool = True
    tasks_prefix: bool = False
    subset: Subset | None = None
    csv_name: str = ""  # summary.csv benchmark name ("" = not recorded)


VIDEOMME = ("videomme_perception_score", "videomme_percetion_score")


def duration(name: str) -> Subset:
    return Subset("duration", frozenset({name}))


def lvb_level(level: frozenset[str]) -> Subset:
    return Subset("question_category", level, LVB_PERCEPTION | LVB_RELATION)


SUITES: dict[str, tuple[Column, ...]] = {
    # Table 4: LLaVA-Video-7B, 64 frames
    "video": (
        Column("MLVU m-avg", "mlvu_dev", (("mlvu_percetion_score", "mlvu_perception_score"),), csv_name="mlvu"),
        Column("MVBench", "mvbench_", (("mvbench_accuracy",),), tasks_prefix=True, csv_name="mvbench"),
        Column("LongVideoBench val", "longvideobench_val_v", (("lvb_acc",),), scale=100.0, csv_name="longvideobench"),
        Column("perception", "longvideobench_val_v", (("lvb_acc",),), in_acc=False, subset=lvb_level(LVB_PERCEPTION)),
        Column("relation", "longvideobench_val_v", (("lvb_acc",),), in_acc=False, subset=lvb_level(LVB_RELATION)),
        Column("Video-MME w/o sub", "videomme", (VIDEOMME,), csv_name="videomme"),
        Column("short", "videomme", (VIDEOMME,), in_acc=False, subset=duration("short")),
        Column("medium", "videomme", (VIDEOMME,), in_acc=False, subset=duration("medium")),
        Column("long", "videomme", (VIDEOMME,), in_acc=False, subset=duration("long")),
    ),
    # Table 10: InternVL3-8B
    "internvl3": (
        Column("AI2D", "ai2d", (("exact_match",),), scale=100.0, csv_name="ai2d"),
        Column("TextVQA", "textvqa_val", (("exact_match",),), scale=100.0, csv_name="textvqa"),
        Column("ChartQA", "chartqa", (("relaxed_overall",),), scale=100.0, csv_name="chartqa"),
        Column("OCRBench", "ocrbench", (("ocrbench_accuracy",),), scale=1000.0, acc_divisor=10.0, csv_name="ocrbench"),
        Column("HallBench", "hallusion_bench_image", (("aAcc",),), csv_name="hallusionbench"),
        Column("MME", "mme", (("mme_perception_score",), ("mme_cognition_score",)), acc_divisor=28.0, csv_name="mme"),
        Column("MMB-EN", "mmbench_en_dev", (("gpt_eval_score",),), csv_name="mmbench"),
        Column("MMB-CN", "mmbench_cn_dev", (("gpt_eval_score",),), csv_name="mmbench_cn"),
    ),
}
# The paper's unpruned rows (Table 4 / Table 10), in the columns' order
PAPER_UNPRUNED: dict[str, tuple[float, ...]] = {
    "video": (67.75, 58.15, 59.07, 65.03, 53.64, 63.66, 76.46, 61.21, 53.19),
    "internvl3": (85.28, 81.51, 85.07, 853.0, 50.02, 2393.22, 83.82, 82.54),
}
PAPER = "paper"


@dataclass
class RunResults:
    """A run's lmms-eval numbers: task -> {metric name: value}, the samples files, and its model_args."""

    results: dict[str, dict[str, object]] = field(default_factory=dict)
    samples: dict[str, Path] = field(default_factory=dict)
    model_args: str = ""


def read_run(folder: str | Path) -> RunResults:
    """Every ``*_results.json`` under ``folder``, oldest first, so the newest file of a task wins."""
    root = require_path(folder, "lmms-eval output folder (--run)", is_dir=True)
    files = sorted(root.rglob("*_results.json"), key=lambda p: (p.name, str(p)))  # names start with a timestamp
    if not files:
        raise FileNotFoundError(f"no lmms-eval *_results.json under {root} (did the run finish?)")
    run = RunResults()
    for path in files:
        data = read_json(path, "lmms-eval results")
        if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
            raise ValueError(f"{path}: not an lmms-eval results file (no 'results' object)")
        for task, values in data["results"].items():
            run.results[task] = {key.split(",")[0]: value for key, value in values.items()}
        run.model_args = str((data.get("config") or {}).get("model_args", run.model_args))
    for path in sorted(root.rglob("*_samples_*.jsonl"), key=lambda p: (p.name, str(p))):
        run.samples[path.stem.split("_samples_", 1)[1]] = path
    return run


def _metric(values: dict[str, object], names: tuple[str, ...]) -> float | None:
    for name in names:
        value = values.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def subset_accuracy(samples: Path, metric_names: tuple[str, ...], subset: Subset) -> float | None:
    """Accuracy (%) of a task's logged samples in ``subset``: their ``score`` 0 / 1, else the prediction
    (Video-MME ``pred_answer``, LongVideoBench ``parsed_pred``) equal to ``answer``."""
    correct = total = 0
    for number, row in enumerate(read_jsonl(samples, "lmms-eval samples"), start=1):
        record = next((row[n] for n in metric_names if isinstance(row.get(n), dict)), None)
        if record is None:
            continue
        value = record.get(subset.field)
        if subset.known and value not in subset.known:
            raise ValueError(f"{samples} line {number}: {subset.field} {value!r} is none of {sorted(subset.known)}")
        if value not in subset.values:
            continue
        score = record.get("score")
        if score is None:
            score = record.get("pred_answer", record.get("parsed_pred")) == record.get("answer")
        correct += float(score)
        total += 1
    return 100.0 * correct / total if total else None


def column_value(run: RunResults, column: Column) -> float | None:
    """The column's number for this run, or None when the run lacks it."""
    if column.subset is not None:
        path = run.samples.get(column.task)
        return subset_accuracy(path, column.metrics[0], column.subset) if path else None
    if column.tasks_prefix:
        parts = [_metric(v, column.metrics[0]) for t, v in sorted(run.results.items()) if t.startswith(column.task)]
        parts = [p for p in parts if p is not None]
        return column.scale * sum(parts) / len(parts) if parts else None
    values = run.results.get(column.task)
    if values is None:
        return None
    parts = [_metric(values, names) for names in column.metrics]
    return None if any(p is None for p in parts) else column.scale * sum(parts)


def accuracy(columns: tuple[Column, ...], row: list[float | None], among: set[int] | None = None) -> float | None:
    """Mean of the ``in_acc`` columns on a 0-100 scale (those in ``among`` when given); None when none is there."""
    picked = [v / c.acc_divisor for i, (c, v) in enumerate(zip(columns, row))
              if c.in_acc and v is not None and (among is None or i in among)]
    return sum(picked) / len(picked) if picked else None


def relative(columns: tuple[Column, ...], row: list[float | None], reference: list[float | None]) -> float | None:
    """Acc. / reference Acc. x 100 over the ``in_acc`` columns both rows have."""
    shared = {i for i, (a, b) in enumerate(zip(row, reference)) if a is not None and b is not None}
    ours, ref = accuracy(columns, row, shared), accuracy(columns, reference, shared)
    return None if ours is None or not ref else 100.0 * ours / ref


def build_rows(suite: str, runs: dict[str, RunResults], reference: str | None = None) -> list[list[str]]:
    """Header + the paper's unpruned row + one row per run: values, Acc., Relative."""
    if suite not in SUITES:
        raise ValueError(f"--suite: expected one of {sorted(SUITES)}, got {suite!r}")
    columns = SUITES[suite]
    values = {PAPER: list(PAPER_UNPRUNED[suite])}
    values.update({label: [column_value(run, c) for c in columns] for label, run in runs.items()})
    ref_label = reference or PAPER
    if ref_label not in values:
        raise ValueError(f"--reference {ref_label!r} is not one of the runs {sorted(runs)}")
    out = [["Method"] + [c.title for c in columns] + ["Acc.", "Relative"]]
    for label, row in values.items():
        acc, rel = accuracy(columns, row), relative(columns, row, values[ref_label])
        cells = ["-" if v is None else (f"{v:.0f}" if c.scale == 1000.0 else f"{v:.2f}") for c, v in zip(columns, row)]
        out.append([label] + cells + ["-" if acc is None else f"{acc:.2f}", "-" if rel is None else f"{rel:.2f}%"])
    return out


def record_rows(csv_path: str, suite: str, checkpoint: str, label: str, run: RunResults) -> int:
    """One summary.csv row per recorded benchmark of the run; returns how many were written."""
    from llava.eval.summarize import append_row

    method, budget = parse_label(label)
    written = 0
    for column in SUITES[suite]:
        value = column_value(run, column) if column.csv_name else None
        if value is None:
            continue
        fingerprint = hashlib.sha256(f"lmms-eval|{run.model_args}|{column.task}".encode()).hexdigest()[:16]
        append_row(csv_path, column.csv_name, checkpoint, method, budget, "lmms_eval", round(value, 4),
                   fingerprint=fingerprint)
        written += 1
    return written


def parse_label(label: str) -> tuple[str, int]:
    """"METHOD BUDGET" -> (method, budget)."""
    parts = label.split()
    if len(parts) != 2 or not parts[1].isdigit():
        raise ValueError(f"--run label must be 'METHOD BUDGET' (e.g. 'script 32'), got {label!r}")
    return parts[0], int(parts[1])


def format_markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows[1:]]) + "\n"


def main(argv: list[str] | None = None) -> list[list[str]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", required=True, choices=sorted(SUITES))
    ap.add_argument("--run", action="append", default=[], required=True, help='"METHOD BUDGET=DIR" (repeatable)')
    ap.add_argument("--reference", default=None, help='the run label whose Acc. is 100%% (default: the paper row)')
    ap.add_argument("--out", default=None, help="also write the table as markdown here")
    ap.add_argument("--csv", default=None, help="add the runs' rows to this summary.csv")
    ap.add_argument("--checkpoint", default=None, help="checkpoint name of the summary rows (with --csv)")
    a = ap.parse_args(argv)
    runs: dict[str, RunResults] = {}
    for spec in a.run:
        label, sep, folder = spec.partition("=")
        if not sep:
            raise SystemExit(f'--run: expected "METHOD BUDGET=DIR", got {spec!r}')
        parse_label(label)
        runs[label] = read_run(folder)
    rows = build_rows(a.suite, runs, a.reference)
    text = format_markdown(rows)
    if a.out:
        atomic_write_text(a.out, text)
    if a.csv:
        if not a.checkpoint:
            raise SystemExit("--csv needs --checkpoint")
        for label, run in runs.items():
            n = record_rows(a.csv, a.suite, a.checkpoint, label, run)
            print(f"recorded {n} {a.suite} rows of {label} in {a.csv}", file=sys.stderr)
    print(text, end="")
    return rows


if __name__ == "__main__":
    main()

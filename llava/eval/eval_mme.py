"""MME scorer: per-subtask score = 100 * accuracy + 100 * accuracy+ (both questions of an image right).

Usage:
    python -m llava.eval.eval_mme --answers-file merge.jsonl --gt-dir MME/MME_Benchmark_release_version \
        --results-dir MME/eval_tool/answers/<experiment> [--json metrics.json] [--allow-subset]
    # or score result files written earlier (by convert_mme or LLaVA's converter):
    python -m llava.eval.eval_mme --gt-dir MME/MME_Benchmark_release_version --results-dir <folder>

The rules are those of MME's own `eval_tool/calculation.py`: a prediction is lower-cased; equal to "yes" or
"no" it is that answer, else "yes" / "no" inside its first 4 characters decides (yes first), else it is
"other" (always wrong); acc is the share of right answers, acc+ the share of images whose two questions are
both right. Perception = the sum of the 10 perception subtasks (max 2000), cognition = the sum of the 4
cognition subtasks (max 800). Lines are grouped by image name, not paired by position (calculation.py takes
consecutive lines, which equals this when, as in MME, each image has two questions written next to each
other). Every ground-truth question must be answered exactly once (llava.eval.coverage).
"""
from __future__ import annotations

import argparse
from collections import OrderedDict
from pathlib import Path

from llava.eval.convert_mme import convert_answers, load_ground_truth, result_key, write_results
from llava.eval.coverage import add_subset_argument, check_coverage, summary_line
from llava.eval.io_utils import maybe_write_metrics, require_path

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
ResultLine = tuple  # (image, question, gt, prediction)


def parse_mme_answer(text: str) -> str:
    """Lower-cased answer equal to yes/no -> itself; else "yes"/"no" inside its first 4 characters; else "other"."""
    t = text.lower()
    if t in ("yes", "no"):
        return t
    prefix = t[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def score_subtask(lines: list[ResultLine]) -> dict[str, float]:
    """lines: (image, question, gt, prediction). Returns acc, acc_plus (percent) and score = acc + acc_plus."""
    if not lines:
        raise ValueError("lines: expected at least one MME result line")
    per_image: "OrderedDict[str, list[bool]]" = OrderedDict()
    for image, question, gt, pred in lines:
        gt = gt.lower()
        if gt not in ("yes", "no"):
            raise ValueError(f"MME ground truth for {image!r} / {question!r}: expected yes or no, got {gt!r}")
        per_image.setdefault(image, []).append(parse_mme_answer(pred) == gt)
    correct = [c for cs in per_image.values() for c in cs]
    acc = 100.0 * sum(correct) / len(correct)
    acc_plus = 100.0 * sum(all(cs) for cs in per_image.values()) / len(per_image)
    return {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}


def _split_line(line: str, where: str) -> ResultLine:
    parts = line.split("\t")
    if len(parts) != 4:
        raise ValueError(f"MME result {where}: expected 4 tab-separated fields, got {len(parts)}")
    return tuple(parts)


def read_results_dir(results_dir: str) -> dict[str, list[ResultLine]]:
    """subtask -> result lines of `<results-dir>/<subtask>.txt`; a file of no MME subtask is an error."""
    root = require_path(results_dir, "MME results folder (--results-dir)", is_dir=True)
    unknown = sorted(p.stem for p in root.glob("*.txt") if p.stem not in PERCEPTION + COGNITION)
    if unknown:
        raise ValueError(f"--results-dir: unknown MME subtask files {unknown}; expected names in {PERCEPTION + COGNITION}")
    per_task = {}
    for name in PERCEPTION + COGNITION:
        path = root / f"{name}.txt"
        if path.is_file():
            per_task[name] = [_split_line(line, f"{path} line {i}")
                              for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    return per_task


def score_lines(per_task: dict[str, list[ResultLine]]) -> dict:
    """{"perception", "cognition", "subtasks": {name: score}} from result lines per subtask."""
    unknown = sorted(set(per_task) - set(PERCEPTION + COGNITION))
    if unknown:
        raise ValueError(f"MME results: unknown subtasks {unknown}; expected names in {PERCEPTION + COGNITION}")
    subtasks = {name: score_subtask(per_task[name])["score"] for name in PERCEPTION + COGNITION if per_task.get(name)}
    return {
        "perception": sum(v for k, v in subtasks.items() if k in PERCEPTION),
        "cognition": sum(v for k, v in subtasks.items() if k in COGNITION),
        "subtasks": subtasks,
    }


def score_results_dir(results_dir: str, gt_dir: str, allow_subset: bool = False) -> dict:
    """Score result files after checking their lines against the ground truth (coverage fields included)."""
    per_task = read_results_dir(results_dir)
    keys = [result_key(task, image, question) for task, lines in per_task.items() for image, question, _, _ in lines]
    cov = check_coverage(list(load_ground_truth(gt_dir)), keys, answers=f"--results-dir {results_dir}",
                         questions=f"--gt-dir {gt_dir}", allow_subset=allow_subset)
    return {**score_lines(per_task), **cov.fields()}


def score_answers(answers_file: str, gt_dir: str, results_dir: str, allow_subset: bool = False) -> dict:
    """Convert LLaVA answers (writing the result files) and score them."""
    per_task, cov = convert_answers(answers_file, gt_dir, allow_subset)
    write_results(per_task, results_dir)
    lines = {task: [_split_line(line, f"{task}: {line!r}") for line in rows] for task, rows in per_task.items()}
    return {**score_lines(lines), **cov.fields()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results-dir", required=True, help="per-subtask result files (written here when converting)")
    ap.add_argument("--gt-dir", required=True, help="MME_Benchmark_release_version (the questions and answers)")
    ap.add_argument("--answers-file", default=None, help="LLaVA answers jsonl; converted first when given")
    ap.add_argument("--json", default=None)
    add_subset_argument(ap)
    args = ap.parse_args(argv)
    if args.answers_file:
        metrics = score_answers(args.answers_file, args.gt_dir, args.results_dir, args.allow_subset)
    else:
        metrics = score_results_dir(args.results_dir, args.gt_dir, args.allow_subset)
    for name, score in metrics["subtasks"].items():
        print(f"{name:24s} {score:.2f}")
    absent = [n for n in PERCEPTION + COGNITION if n not in metrics["subtasks"]]
    if absent:
        print(f"note: subtasks without questions in --gt-dir (not in the totals): {', '.join(absent)}")
    maybe_write_metrics(args.json, metrics)
    print(summary_line(metrics))
    print(f"MME cognition: {metrics['cognition']:.2f}")
    print(f"MME perception: {metrics['perception']:.2f}")
    return metrics


if __name__ == "__main__":
    main()

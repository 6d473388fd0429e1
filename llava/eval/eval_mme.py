"""MME scorer: per-subtask score = 100 * accuracy + 100 * accuracy+ (both questions of an image right).

Usage:
    python -m llava.eval.eval_mme --results-dir MME/eval_tool/answers/<experiment> [--json metrics.json]
    # or convert and score in one go:
    python -m llava.eval.eval_mme --answers-file merge.jsonl --gt-dir MME/MME_Benchmark_release_version \
        --results-dir MME/eval_tool/answers/<experiment>

Perception = sum of the 10 perception subtasks (max 2000), cognition = sum of the 4 cognition subtasks
(max 800). A subtask missing from the results folder contributes nothing and is reported.
"""
from __future__ import annotations

import argparse
from collections import OrderedDict
from pathlib import Path

from llava.eval.convert_mme import convert_answers, write_results
from llava.eval.io_utils import maybe_write_metrics, require_path

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


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


def score_subtask(lines: list[tuple[str, str, str, str]]) -> dict[str, float]:
    """lines: (image, question, gt, prediction). Returns acc, acc_plus (percent) and score = acc + acc_plus."""
    if not lines:
        raise ValueError("lines: expected at least one MME result line")
    per_image: "OrderedDict[str, list[bool]]" = OrderedDict()
    for image, _question, gt, pred in lines:
        per_image.setdefault(image, []).append(parse_mme_answer(pred) == gt.strip().lower())
    correct = [c for cs in per_image.values() for c in cs]
    acc = 100.0 * sum(correct) / len(correct)
    acc_plus = 100.0 * sum(all(cs) for cs in per_image.values()) / len(per_image)
    return {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}


def _read_result_file(path: Path) -> list[tuple[str, str, str, str]]:
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 4:
            raise ValueError(f"MME result {path} line {lineno}: expected 4 tab-separated fields, got {len(parts)}")
        rows.append(tuple(parts))
    return rows


def score_results_dir(results_dir: str) -> dict:
    root = require_path(results_dir, "MME results folder (--results-dir)", is_dir=True)
    subtasks: dict[str, float] = {}
    for name in PERCEPTION + COGNITION:
        path = root / f"{name}.txt"
        if path.is_file():
            subtasks[name] = score_subtask(_read_result_file(path))["score"]
    unknown = sorted(p.stem for p in root.glob("*.txt") if p.stem not in PERCEPTION + COGNITION)
    if unknown:
        raise ValueError(f"--results-dir: unknown MME subtask files {unknown}; expected names in {PERCEPTION + COGNITION}")
    if not subtasks:
        raise FileNotFoundError(f"MME results folder (--results-dir): no <subtask>.txt files in {root}")
    return {
        "perception": sum(v for k, v in subtasks.items() if k in PERCEPTION),
        "cognition": sum(v for k, v in subtasks.items() if k in COGNITION),
        "subtasks": subtasks,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results-dir", required=True, help="per-subtask result files (written here when converting)")
    ap.add_argument("--answers-file", default=None, help="LLaVA answers jsonl; converted first when given")
    ap.add_argument("--gt-dir", default=None, help="MME_Benchmark_release_version (needed with --answers-file)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.answers_file:
        if not args.gt_dir:
            raise ValueError("--gt-dir: required together with --answers-file")
        write_results(convert_answers(args.answers_file, args.gt_dir), args.results_dir)
    metrics = score_results_dir(args.results_dir)
    missing = [n for n in PERCEPTION + COGNITION if n not in metrics["subtasks"]]
    for name, score in metrics["subtasks"].items():
        print(f"{name:24s} {score:.2f}")
    if missing:
        print(f"note: subtasks without results (counted as 0): {', '.join(missing)}")
    maybe_write_metrics(args.json, metrics)
    print(f"MME cognition: {metrics['cognition']:.2f}")
    print(f"MME perception: {metrics['perception']:.2f}")
    return metrics


if __name__ == "__main__":
    main()

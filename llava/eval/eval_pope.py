"""POPE scorer: accuracy, precision, recall, F1 and yes-ratio per category, plus the average F1.

Usage:
    python -m llava.eval.eval_pope --annotation-dir pope/coco --question-file pope/llava_pope_test.jsonl \
        --result-file answers.jsonl [--json metrics.json]

Answers are paired with the labels of `coco_pope_<category>.json` (one `{"label": "yes"|"no"}` per line)
by order within each category (the category comes from the question file), so answers must be in
question order.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from llava.eval.io_utils import maybe_write_metrics, read_jsonl, require_path

CATEGORIES = ("adversarial", "popular", "random")


def parse_yes_no(text: str) -> str:
    """LLaVA's POPE rule: first sentence, commas removed, split on spaces; "No"/"not"/"no" -> "no", else "yes"."""
    first_sentence = text.split(".")[0] if "." in text else text
    words = first_sentence.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def binary_metrics(preds: list[str], labels: list[str]) -> dict[str, float]:
    """Metrics in percent for yes = positive. Undefined ratios (0/0) are reported as 0."""
    if len(preds) != len(labels):
        raise ValueError(f"preds/labels: expected equal lengths, got {len(preds)} answers for {len(labels)} labels")
    if not preds:
        raise ValueError("preds: expected at least one answer")
    tp = sum(p == "yes" and l == "yes" for p, l in zip(preds, labels))
    tn = sum(p == "no" and l == "no" for p, l in zip(preds, labels))
    fp = sum(p == "yes" and l == "no" for p, l in zip(preds, labels))
    fn = sum(p == "no" and l == "yes" for p, l in zip(preds, labels))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": 100.0 * (tp + tn) / len(preds),
        "precision": 100.0 * precision,
        "recall": 100.0 * recall,
        "f1": 100.0 * f1,
        "yes_ratio": 100.0 * sum(p == "yes" for p in preds) / len(preds),
    }


def _read_labels(path: Path) -> list[str]:
    labels = []
    for row in read_jsonl(path, "POPE annotation"):
        label = str(row.get("label", "")).strip().lower()
        if label not in ("yes", "no"):
            raise ValueError(f"POPE annotation {path}: expected label 'yes' or 'no', got {row.get('label')!r}")
        labels.append(label)
    return labels


def score_pope(annotation_dir: str, question_file: str, result_file: str) -> dict:
    ann_dir = require_path(annotation_dir, "POPE annotation dir (--annotation-dir)", is_dir=True)
    questions = {q["question_id"]: q for q in read_jsonl(question_file, "POPE question file (--question-file)")}
    answers = read_jsonl(result_file, "POPE answers (--result-file)")
    metrics: dict = {}
    for category in CATEGORIES:
        labels = _read_labels(require_path(ann_dir / f"coco_pope_{category}.json", "POPE annotation"))
        cat_answers = []
        for a in answers:
            q = questions.get(a["question_id"])
            if q is None:
                raise ValueError(f"--result-file: question_id {a['question_id']!r} is not in the question file")
            if q.get("category") == category:
                cat_answers.append(a)
        preds = [parse_yes_no(a["text"]) for a in cat_answers]
        metrics[category] = binary_metrics(preds, labels)
    metrics["average_f1"] = sum(metrics[c]["f1"] for c in CATEGORIES) / len(CATEGORIES)
    return metrics


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--annotation-dir", required=True)
    ap.add_argument("--question-file", required=True)
    ap.add_argument("--result-file", required=True)
    ap.add_argument("--json", default=None, help="write the metrics here")
    args = ap.parse_args(argv)
    metrics = score_pope(args.annotation_dir, args.question_file, args.result_file)
    for category in CATEGORIES:
        m = metrics[category]
        print(f"{category:12s} " + "  ".join(f"{k}={v:.2f}" for k, v in m.items()))
    maybe_write_metrics(args.json, metrics)
    print(f"POPE average F1: {metrics['average_f1']:.2f}")
    return metrics


if __name__ == "__main__":
    main()

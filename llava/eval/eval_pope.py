"""POPE scorer: accuracy, precision, recall, F1 and yes-ratio per category, plus the average F1.

Usage:
    python -m llava.eval.eval_pope --annotation-dir pope/coco --question-file pope/llava_pope_test.jsonl \
        --result-file answers.jsonl [--json metrics.json] [--allow-subset]

Answers are matched to questions by `question_id` (every question answered exactly once, see
llava.eval.coverage), and questions to the labels of `coco_pope_<category>.json` by (image, question text):
the label lines carry `question_id, image, text, label`, but their ids restart at 1 in each file while
LLaVA's question file offsets them per category (adversarial 1.., random 10000001.., popular 20000001..).
Nothing is paired by position, so the order of the answers does not matter. Every question of a category
must have exactly one label line and every label line a question (LLaVA-1.5 used the POPE files of commit
e3e39262, whose random split has 2,910 questions). Questions of other categories are not scored.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from llava.eval.coverage import add_subset_argument, check_coverage, summary_line, unique_keys
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


def prediction(answer: dict, label: str) -> str:
    """The yes/no prediction of one answer line. An answer flagged as a failure (``"error"``, written by
    ``--on-image-error record``) counts as wrong: the opposite of its label, never LLaVA's "yes" of an empty text."""
    if answer.get("error"):
        return "no" if label == "yes" else "yes"
    return parse_yes_no(answer["text"])


def question_text(text: str) -> str:
    """The question itself: the first line of a question file's or label file's `text`."""
    return text.split("\n")[0].strip()


def _label_key(row: dict) -> tuple[str, str]:
    return (str(row["image"]), question_text(row["text"]))


def read_labels(path: Path) -> dict[tuple[str, str], str]:
    """(image, question) -> "yes" / "no" of one POPE label file; a repeated question is an error."""
    rows = read_jsonl(path, "POPE annotation")
    for row in rows:
        if not {"image", "text", "label"} <= set(row):
            raise ValueError(f"POPE annotation {path}: expected lines with 'image', 'text' and 'label' "
                             f"(POPE's coco_pope_<category>.json), got keys {sorted(row)}")
        if str(row["label"]).strip().lower() not in ("yes", "no"):
            raise ValueError(f"POPE annotation {path}: expected label 'yes' or 'no', got {row['label']!r}")
    keys = unique_keys([_label_key(r) for r in rows], f"POPE annotation {path}")
    return {k: str(r["label"]).strip().lower() for k, r in zip(keys, rows)}


def labels_for(questions: list[dict], labels: dict[tuple[str, str], str], path: Path) -> dict:
    """question_id -> label for one category; every question needs a label line and every label line a question."""
    keys = {q["question_id"]: _label_key(q) for q in questions}
    unlabelled = [qid for qid, k in keys.items() if k not in labels]
    unasked = sorted(set(labels) - set(keys.values()))
    if unlabelled or unasked:
        raise ValueError(
            f"POPE annotation {path} and --question-file disagree: {len(unlabelled)} questions have no label line "
            f"(first: {unlabelled[:3]}), {len(unasked)} label lines have no question (first: {unasked[:3]}); "
            "use the POPE files LLaVA's question file was built from (see EVAL.md)"
        )
    return {qid: labels[k] for qid, k in keys.items()}


def score_pope(annotation_dir: str, question_file: str, result_file: str, allow_subset: bool = False) -> dict:
    """Per-category metrics, the average F1 and the coverage fields; CoverageError before any scoring."""
    ann_dir = require_path(annotation_dir, "POPE annotation dir (--annotation-dir)", is_dir=True)
    questions = read_jsonl(question_file, "POPE question file (--question-file)")
    qids = [q["question_id"] for q in questions]
    answers = read_jsonl(result_file, "POPE answers (--result-file)")
    cov = check_coverage(qids, [a["question_id"] for a in answers], answers=f"--result-file {result_file}",
                         questions=f"--question-file {question_file}", allow_subset=allow_subset)
    by_id = {a["question_id"]: a for a in answers}
    metrics: dict = {}
    for category in CATEGORIES:
        path = require_path(ann_dir / f"coco_pope_{category}.json", "POPE annotation")
        gold = labels_for([q for q in questions if q.get("category") == category], read_labels(path), path)
        answered = [qid for qid in gold if qid in by_id]
        if not answered:
            raise ValueError(f"--result-file {result_file}: no answers in POPE category {category!r}")
        metrics[category] = binary_metrics([prediction(by_id[qid], gold[qid]) for qid in answered],
                                           [gold[qid] for qid in answered])
    metrics["average_f1"] = sum(metrics[c]["f1"] for c in CATEGORIES) / len(CATEGORIES)
    return {**metrics, **cov.fields()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--annotation-dir", required=True)
    ap.add_argument("--question-file", required=True)
    ap.add_argument("--result-file", required=True)
    ap.add_argument("--json", default=None, help="write the metrics here")
    add_subset_argument(ap)
    args = ap.parse_args(argv)
    metrics = score_pope(args.annotation_dir, args.question_file, args.result_file, args.allow_subset)
    for category in CATEGORIES:
        m = metrics[category]
        print(f"{category:12s} " + "  ".join(f"{k}={v:.2f}" for k, v in m.items()))
    maybe_write_metrics(args.json, metrics)
    print(summary_line(metrics))
    print(f"POPE average F1: {metrics['average_f1']:.2f}")
    return metrics


if __name__ == "__main__":
    main()

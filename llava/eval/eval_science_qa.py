"""ScienceQA scorer: accuracy over the split and IMG-accuracy over its questions with an image.

Usage:
    python -m llava.eval.eval_science_qa --base-dir scienceqa --result-file answers.jsonl \
        [--split test] [--output-file out.jsonl] [--output-result result.json] [--json metrics.json]

`--base-dir` holds `problems.json` and `pid_splits.json`. The predicted letter is: the whole answer if it is
one of the option letters; else its first letter if the answer starts with "X. "; else the X of the
pattern "The answer is X." when it occurs exactly once ("." matching any character, as in LLaVA);
otherwise the question counts as failed. A letter beyond the number of choices is wrong.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from llava.eval.io_utils import atomic_write_json, atomic_write_jsonl, maybe_write_metrics, read_json, read_jsonl

OPTIONS = ("A", "B", "C", "D", "E")
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def parse_letter(text: str, options: tuple[str, ...] = OPTIONS) -> str:
    """The predicted option letter, or "FAILED"."""
    if text in options:
        return text
    if len(text) >= 3 and text[0] in options and text[1:3] == ". ":
        return text[0]
    found = _ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else "FAILED"


def letter_to_index(letter: str, num_choices: int, options: tuple[str, ...] = OPTIONS) -> int:
    """0-based choice index of `letter`, or -1 when it is not one of the first `num_choices` options."""
    return options.index(letter) if letter in options[:num_choices] else -1


def score_science_qa(base_dir: str, result_file: str, split: str = "test") -> tuple[dict, list[dict]]:
    base = Path(base_dir)
    splits = read_json(base / "pid_splits.json", "ScienceQA pid_splits.json (--base-dir)")
    if split not in splits:
        raise ValueError(f"--split: {split!r} not in pid_splits.json (has {sorted(splits)})")
    problems = read_json(base / "problems.json", "ScienceQA problems.json (--base-dir)")
    predictions = {str(p["question_id"]): p for p in read_jsonl(result_file, "ScienceQA answers (--result-file)")}
    rows = []
    for pid in splits[split]:
        prob = problems[str(pid)]
        pred = predictions.get(str(pid))
        text = pred["text"] if pred is not None else "FAILED"
        letter = parse_letter(text)
        pred_idx = letter_to_index(letter, len(prob["choices"]))
        rows.append({
            "question_id": str(pid), "parsed_ans": letter, "pred_idx": pred_idx, "ground_truth": prob["answer"],
            "correct": pred_idx == prob["answer"], "is_multimodal": bool(prob.get("image")), "text": text,
        })
    if not rows:
        raise ValueError(f"--split {split!r}: no questions")
    img_rows = [r for r in rows if r["is_multimodal"]]
    metrics = {
        "accuracy": 100.0 * sum(r["correct"] for r in rows) / len(rows),
        "img_accuracy": 100.0 * sum(r["correct"] for r in img_rows) / len(img_rows) if img_rows else 0.0,
        "total": len(rows),
        "correct": sum(r["correct"] for r in rows),
        "img_total": len(img_rows),
        "missing": sum(str(pid) not in predictions for pid in splits[split]),
    }
    return metrics, rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-dir", required=True)
    ap.add_argument("--result-file", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--output-file", default=None, help="per-question analysis jsonl")
    ap.add_argument("--output-result", default=None, help="metrics + parsed letters json")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    metrics, rows = score_science_qa(args.base_dir, args.result_file, args.split)
    if args.output_file:
        atomic_write_jsonl(args.output_file, rows)
    if args.output_result:
        atomic_write_json(args.output_result, {**metrics, "results": {r["question_id"]: r["pred_idx"] for r in rows}})
    maybe_write_metrics(args.json, {"accuracy": metrics["accuracy"], "img_accuracy": metrics["img_accuracy"]})
    print(f"Total: {metrics['total']}, Correct: {metrics['correct']}, Missing: {metrics['missing']}")
    print(f"Accuracy: {metrics['accuracy']:.2f}")
    print(f"IMG-Accuracy: {metrics['img_accuracy']:.2f}")
    return metrics


if __name__ == "__main__":
    main()

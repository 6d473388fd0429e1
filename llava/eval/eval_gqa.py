"""GQA: write the predictions file for the official `eval.py` and compute testdev-balanced accuracy.

Usage:
    python -m llava.eval.eval_gqa --answers-file merge.jsonl \
        --predictions-out gqa/data/testdev_balanced_predictions.json \
        [--questions-file gqa/data/testdev_balanced_questions.json] [--json metrics.json]

Prediction = answer text with trailing periods removed, lower-cased (LLaVA's convention). The accuracy is
exact match against each question's `answer` in the official questions json (questions marked
`isBalanced: false` are skipped), so the official script need not be patched to read LLaVA's output.
"""
from __future__ import annotations

import argparse

from llava.eval.io_utils import atomic_write_json, maybe_write_metrics, read_json, read_jsonl


def to_prediction(text: str) -> str:
    return text.rstrip(".").lower()


def convert_answers(answers_file: str) -> list[dict]:
    """`[{"questionId": id, "prediction": text}]` in answer order."""
    return [
        {"questionId": a["question_id"], "prediction": to_prediction(a["text"])}
        for a in read_jsonl(answers_file, "GQA answers (--answers-file)")
    ]


def gqa_accuracy(predictions: list[dict], questions_file: str) -> dict:
    questions = read_json(questions_file, "GQA questions json (--questions-file)")
    if not isinstance(questions, dict):
        raise ValueError(f"--questions-file {questions_file}: expected a JSON object keyed by question id")
    pred = {str(p["questionId"]): p["prediction"] for p in predictions}
    scored = {qid: q for qid, q in questions.items() if q.get("isBalanced", True)}
    missing = [qid for qid in scored if qid not in pred]
    if missing:
        raise ValueError(
            f"--answers-file: {len(missing)} of {len(scored)} balanced questions have no answer (first: {missing[0]!r})"
        )
    if not scored:
        raise ValueError(f"--questions-file {questions_file}: no balanced questions")
    correct = sum(pred[qid] == str(q["answer"]).lower() for qid, q in scored.items())
    return {"accuracy": 100.0 * correct / len(scored), "num_questions": len(scored)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--answers-file", required=True)
    ap.add_argument("--predictions-out", required=True, help="official predictions json to write")
    ap.add_argument("--questions-file", default=None, help="testdev_balanced_questions.json; enables the accuracy")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    predictions = convert_answers(args.answers_file)
    atomic_write_json(args.predictions_out, predictions, indent=None)
    print(f"wrote {len(predictions)} predictions to {args.predictions_out}")
    if not args.questions_file:
        return {}
    metrics = gqa_accuracy(predictions, args.questions_file)
    maybe_write_metrics(args.json, {"accuracy": metrics["accuracy"]})
    print(f"GQA accuracy: {metrics['accuracy']:.2f}")
    return metrics


if __name__ == "__main__":
    main()

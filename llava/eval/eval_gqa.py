"""GQA: write the predictions file for the official `eval.py` and compute testdev-balanced accuracy.

Usage:
    python -m llava.eval.eval_gqa --answers-file merge.jsonl \
        --predictions-out gqa/data/testdev_balanced_predictions.json \
        [--questions-file gqa/data/testdev_balanced_questions.json] [--json metrics.json]

Prediction = answer text with trailing periods removed, lower-cased (LLaVA's convention). The accuracy is
exact match against each question's `answer` in the official questions json (questions marked
`isBalanced: false` are skipped), so the official script need not be patched to read LLaVA's output. Every
balanced question must be answered exactly once (llava.eval.coverage; `--allow-subset` to score the answered
ones on purpose); a question answered twice is an error even without `--questions-file`.
"""
from __future__ import annotations

import argparse

from llava.eval.coverage import add_subset_argument, check_coverage, summary_line, unique_keys
from llava.eval.io_utils import atomic_write_json, maybe_write_metrics, read_json, read_jsonl


def to_prediction(text: str) -> str:
    return text.rstrip(".").lower()


def convert_answers(answers_file: str) -> list[dict]:
    """`[{"questionId": id, "prediction": text}]` in answer order."""
    return [
        {"questionId": a["question_id"], "prediction": to_prediction(a["text"])}
        for a in read_jsonl(answers_file, "GQA answers (--answers-file)")
    ]


def gqa_accuracy(predictions: list[dict], questions_file: str, allow_subset: bool = False) -> dict:
    """Exact-match accuracy over the balanced questions plus the coverage fields (CoverageError first)."""
    questions = read_json(questions_file, "GQA questions json (--questions-file)")
    if not isinstance(questions, dict):
        raise ValueError(f"--questions-file {questions_file}: expected a JSON object keyed by question id")
    scored = {qid: q for qid, q in questions.items() if q.get("isBalanced", True)}
    if not scored:
        raise ValueError(f"--questions-file {questions_file}: no balanced questions")
    cov = check_coverage(list(scored), [str(p["questionId"]) for p in predictions], answers="--answers-file",
                         questions=f"the balanced questions of --questions-file {questions_file}",
                         allow_subset=allow_subset)
    pred = {str(p["questionId"]): p["prediction"] for p in predictions}
    correct = sum(pred[qid] == str(q["answer"]).lower() for qid, q in scored.items() if qid in pred)
    return {"accuracy": 100.0 * correct / cov.answered, "num_questions": cov.answered, **cov.fields()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--answers-file", required=True)
    ap.add_argument("--predictions-out", required=True, help="official predictions json to write")
    ap.add_argument("--questions-file", default=None, help="testdev_balanced_questions.json; enables the accuracy")
    ap.add_argument("--json", default=None)
    add_subset_argument(ap)
    args = ap.parse_args(argv)
    predictions = convert_answers(args.answers_file)
    unique_keys([str(p["questionId"]) for p in predictions], f"--answers-file {args.answers_file}")
    atomic_write_json(args.predictions_out, predictions, indent=None)
    print(f"wrote {len(predictions)} predictions to {args.predictions_out}")
    if not args.questions_file:
        return {}
    metrics = gqa_accuracy(predictions, args.questions_file, args.allow_subset)
    maybe_write_metrics(args.json, {k: v for k, v in metrics.items() if k != "num_questions"})
    print(summary_line(metrics))
    print(f"GQA accuracy: {metrics['accuracy']:.2f}")
    return metrics


if __name__ == "__main__":
    main()

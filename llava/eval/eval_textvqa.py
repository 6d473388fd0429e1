"""TextVQA scorer: VQA soft accuracy over the 10 human answers with EvalAI normalisation.

Usage:
    python -m llava.eval.eval_textvqa --annotation-file textvqa/TextVQA_0.5.1_val.json \
        --result-file answers.jsonl [--json metrics.json]

Each answer is matched to its annotation by (image_id, question): LLaVA's TextVQA question file uses the
image id as `question_id`, and the question is the first line of the prompt (OCR-token and short-answer
lines removed), lower-cased. Matching by the annotation's own `question_id` is used as a fallback.
"""
from __future__ import annotations

import argparse

from llava.eval.io_utils import maybe_write_metrics, read_json, read_jsonl
from llava.eval.vqa_normalize import soft_accuracy

SHORT_ANSWER_LINE = "Answer the question using a single word or phrase."
OCR_PREFIXES = ("Reference OCR token:", "OCR tokens:")


def question_from_prompt(prompt: str) -> str:
    """The question line of a TextVQA prompt, lower-cased."""
    lines = [
        ln.strip() for ln in prompt.replace("<image>", "").split("\n")
        if ln.strip() and ln.strip() != SHORT_ANSWER_LINE and not ln.strip().startswith(OCR_PREFIXES)
    ]
    if not lines:
        raise ValueError(f"prompt: no question line found in {prompt!r}")
    return lines[0].lower()


def score_textvqa(annotation_file: str, result_file: str) -> dict:
    data = read_json(annotation_file, "TextVQA annotation (--annotation-file)")
    if not isinstance(data, dict) or "data" not in data:
        raise ValueError(f"--annotation-file {annotation_file}: expected a JSON object with a 'data' list")
    by_image_question = {(str(a["image_id"]), a["question"].strip().lower()): a for a in data["data"]}
    by_question_id = {str(a["question_id"]): a for a in data["data"]}
    results = read_jsonl(result_file, "TextVQA answers (--result-file)")
    if not results:
        raise ValueError(f"--result-file {result_file}: no answers")
    scores = []
    for r in results:
        qid = str(r["question_id"])
        ann = by_image_question.get((qid, question_from_prompt(r["prompt"]))) or by_question_id.get(qid)
        if ann is None:
            raise ValueError(f"--result-file: no TextVQA annotation for question_id {qid!r}")
        scores.append(soft_accuracy(r["text"], ann["answers"]))
    return {"accuracy": 100.0 * sum(scores) / len(scores), "num_questions": len(scores)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--annotation-file", required=True)
    ap.add_argument("--result-file", required=True)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    metrics = score_textvqa(args.annotation_file, args.result_file)
    maybe_write_metrics(args.json, {"accuracy": metrics["accuracy"]})
    print(f"Samples: {metrics['num_questions']}")
    print(f"TextVQA accuracy: {metrics['accuracy']:.2f}")
    return metrics


if __name__ == "__main__":
    main()

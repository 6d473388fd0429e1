"""TextVQA scorer: VQA soft accuracy over the 10 human answers with EvalAI normalisation.

Usage:
    python -m llava.eval.eval_textvqa --annotation-file textvqa/TextVQA_0.5.1_val.json \
        --result-file answers.jsonl [--json metrics.json] [--allow-subset]

As in LLaVA's scorer, each answer is matched to its annotation by (image id, question): LLaVA's TextVQA
question file uses the image id as `question_id`, and the question is read out of the stored prompt
(`question_from_prompt`) and lower-cased. Every annotation must be answered exactly once (llava.eval.coverage);
`--allow-subset` scores the answered ones on purpose.
"""
from __future__ import annotations

import argparse
import re

from llava.eval.coverage import add_subset_argument, check_coverage, summary_line, unique_keys
from llava.eval.io_utils import maybe_write_metrics, read_json, read_jsonl
from llava.eval.vqa_normalize import soft_accuracy

REFERENCE_OCR = "Reference OCR token: "
OLD_STYLE_PREFIX = "OCR tokens: "           # LLaVA-1.0: "OCR tokens: ... Question: ... Short answer:"
_OLD_STYLE_QUESTION = re.compile(r"Question: (.*?) Short answer:", re.DOTALL)
QUESTION_PREFIX = "Question: "


def _question_line(prompt: str) -> str:
    """The raw question of a prompt, by LLaVA's cases (line counts split on "\\n")."""
    lines = prompt.split("\n")
    if prompt.startswith(OLD_STYLE_PREFIX):
        match = _OLD_STYLE_QUESTION.search(prompt)
        if match is None:
            raise ValueError(f"prompt: LLaVA-1.0 style prompt without 'Question: ... Short answer:': {prompt!r}")
        return match.group(1)
    if REFERENCE_OCR in prompt and len(lines) == 3:
        return lines[1] if prompt.startswith(REFERENCE_OCR.strip()) else lines[0]
    if REFERENCE_OCR in prompt and len(lines) == 2:
        return lines[1].replace(QUESTION_PREFIX, "")
    if len(lines) == 2:
        return lines[0]
    raise ValueError(
        f"prompt: not a TextVQA prompt LLaVA's scorer reads ('<question>[\\nReference OCR token: ...]\\n<instruction>' "
        f"or 'OCR tokens: ... Question: ... Short answer:'): {prompt!r}"
    )


def question_from_prompt(prompt: str) -> str:
    """The question of a TextVQA prompt (LLaVA-1.5 or LLaVA-1.0 style), "Question: " removed, lower-cased."""
    question = _question_line(prompt)
    if question.startswith(QUESTION_PREFIX):
        question = question.replace(QUESTION_PREFIX, "")
    return question.lower()


def load_annotations(annotation_file: str) -> dict[tuple[str, str], list[str]]:
    """(image id, lower-cased question) -> the human answers; a repeated key is an error."""
    data = read_json(annotation_file, "TextVQA annotation (--annotation-file)")
    if not isinstance(data, dict) or "data" not in data:
        raise ValueError(f"--annotation-file {annotation_file}: expected a JSON object with a 'data' list")
    keys = unique_keys([(str(a["image_id"]), a["question"].lower()) for a in data["data"]],
                       f"--annotation-file {annotation_file}")
    return {k: a["answers"] for k, a in zip(keys, data["data"])}


def score_textvqa(annotation_file: str, result_file: str, allow_subset: bool = False) -> dict:
    """Accuracy (percent) plus the coverage fields; raises CoverageError before scoring an incomplete file."""
    annotations = load_annotations(annotation_file)
    results = read_jsonl(result_file, "TextVQA answers (--result-file)")
    keys = [(str(r["question_id"]), question_from_prompt(r["prompt"])) for r in results]
    cov = check_coverage(list(annotations), keys, answers=f"--result-file {result_file}",
                         questions=f"--annotation-file {annotation_file}", allow_subset=allow_subset)
    scores = [soft_accuracy(r["text"], annotations[k]) for r, k in zip(results, keys)]
    return {"accuracy": 100.0 * sum(scores) / len(scores), "num_questions": len(scores), **cov.fields()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--annotation-file", required=True)
    ap.add_argument("--result-file", required=True)
    ap.add_argument("--json", default=None)
    add_subset_argument(ap)
    args = ap.parse_args(argv)
    metrics = score_textvqa(args.annotation_file, args.result_file, args.allow_subset)
    maybe_write_metrics(args.json, {k: v for k, v in metrics.items() if k != "num_questions"})
    print(f"Samples: {metrics['num_questions']}")
    print(summary_line(metrics))
    print(f"TextVQA accuracy: {metrics['accuracy']:.2f}")
    return metrics


if __name__ == "__main__":
    main()

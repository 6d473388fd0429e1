"""VizWiz: EvalAI submission json `[{"image": file name, "answer": str}]` with normalised answers.

Usage:
    python -m llava.eval.convert_vizwiz_for_submission --question-file vizwiz/llava_test.jsonl \
        --answers-file merge.jsonl --out vizwiz/answers_upload/<experiment>.json [--json metrics.json] [--allow-subset]

Every question must be answered exactly once (llava.eval.coverage). With `--allow-subset` an unanswered
question gets "" (as LLaVA's converter writes it) and the result says SUBSET.
"""
from __future__ import annotations

import argparse
import os

from llava.eval.coverage import Coverage, add_subset_argument, check_coverage, summary_line
from llava.eval.io_utils import atomic_write_json, maybe_write_metrics, read_jsonl
from llava.eval.vqa_normalize import normalize_answer


def build_submission(question_file: str, answers_file: str, allow_subset: bool = False) -> tuple[list[dict], Coverage]:
    """(submission rows in question-file order, coverage)."""
    questions = read_jsonl(question_file, "VizWiz question file (--question-file)")
    answers = read_jsonl(answers_file, "VizWiz answers (--answers-file)")
    cov = check_coverage([q["question_id"] for q in questions], [a["question_id"] for a in answers],
                         answers=f"--answers-file {answers_file}", questions=f"--question-file {question_file}",
                         allow_subset=allow_subset)
    text = {a["question_id"]: a["text"] for a in answers}
    rows = [{"image": os.path.basename(q["image"]),
             "answer": normalize_answer(text[q["question_id"]]) if q["question_id"] in text else ""} for q in questions]
    return rows, cov


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--question-file", required=True)
    ap.add_argument("--answers-file", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--json", default=None, help="write the coverage fields here")
    add_subset_argument(ap)
    args = ap.parse_args(argv)
    rows, cov = build_submission(args.question_file, args.answers_file, args.allow_subset)
    atomic_write_json(args.out, rows, indent=None)
    maybe_write_metrics(args.json, cov.fields())
    print(summary_line(cov.fields()))
    print(f"wrote {len(rows)} answers to {args.out}")
    return cov.fields()


if __name__ == "__main__":
    main()

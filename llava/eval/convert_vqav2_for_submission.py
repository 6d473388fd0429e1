"""VQAv2: EvalAI submission json `[{"question_id": int, "answer": str}]` with normalised answers.

Usage:
    python -m llava.eval.convert_vqav2_for_submission --answers-file merge.jsonl \
        --question-file vqav2/llava_vqav2_mscoco_test-dev2015.jsonl \
        --test-file vqav2/llava_vqav2_mscoco_test2015.jsonl --out vqav2/answers_upload/<experiment>.json \
        [--json metrics.json] [--allow-subset]

Every question of `--question-file` (the test-dev questions the run answered) must be answered exactly once
(llava.eval.coverage). The upload lists every question of the full `--test-file` once, in its order, as LLaVA's
converter does: the test-dev answers normalised, the other test2015 questions with "" (EvalAI expects the
full list). With `--allow-subset`, unanswered test-dev questions also get "" and the result says SUBSET.
"""
from __future__ import annotations

import argparse

from llava.eval.coverage import Coverage, add_subset_argument, check_coverage, summary_line, unique_keys
from llava.eval.io_utils import atomic_write_json, maybe_write_metrics, read_jsonl
from llava.eval.vqa_normalize import normalize_answer


def build_submission(answers_file: str, test_file: str, question_file: str,
                     allow_subset: bool = False) -> tuple[list[dict], Coverage]:
    """(submission rows over the full test list, coverage of the answered question file)."""
    qids = [q["question_id"] for q in read_jsonl(question_file, "VQAv2 question file (--question-file)")]
    answers = read_jsonl(answers_file, "VQAv2 answers (--answers-file)")
    cov = check_coverage(qids, [a["question_id"] for a in answers], answers=f"--answers-file {answers_file}",
                         questions=f"--question-file {question_file}", allow_subset=allow_subset)
    test = read_jsonl(test_file, "VQAv2 full test question file (--test-file)")
    test_ids = unique_keys([q["question_id"] for q in test], f"--test-file {test_file}")
    outside = sorted(set(qids) - set(test_ids), key=str)
    if outside:
        raise ValueError(f"--question-file {question_file}: {len(outside)} questions are not in "
                         f"--test-file {test_file} (first: {outside[:5]})")
    text = {a["question_id"]: a["text"] for a in answers}
    rows = [{"question_id": qid, "answer": normalize_answer(text[qid]) if qid in text else ""} for qid in test_ids]
    return rows, cov


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--answers-file", required=True)
    ap.add_argument("--question-file", required=True, help="the test-dev question file the answers were generated from")
    ap.add_argument("--test-file", required=True, help="the full test2015 question list (the upload covers it)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--json", default=None, help="write the coverage fields here")
    add_subset_argument(ap)
    args = ap.parse_args(argv)
    rows, cov = build_submission(args.answers_file, args.test_file, args.question_file, args.allow_subset)
    atomic_write_json(args.out, rows, indent=None)
    maybe_write_metrics(args.json, cov.fields())
    print(summary_line(cov.fields()))
    print(f"wrote {len(rows)} answers ({cov.answered} answered, {len(rows) - cov.answered} outside the answered "
          f"questions filled with \"\") to {args.out}")
    return cov.fields()


if __name__ == "__main__":
    main()

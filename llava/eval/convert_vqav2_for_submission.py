"""VQAv2: EvalAI submission json `[{"question_id": int, "answer": str}]` with normalised answers.

Usage:
    python -m llava.eval.convert_vqav2_for_submission --answers-file merge.jsonl \
        --test-file vqav2/llava_vqav2_mscoco_test2015.jsonl --out vqav2/answers_upload/<experiment>.json

Every question of the full test file appears once in test-file order; questions without an answer (the
test-dev run answers a subset) get "" as EvalAI expects.
"""
from __future__ import annotations

import argparse

from llava.eval.io_utils import atomic_write_json, read_jsonl
from llava.eval.vqa_normalize import normalize_answer


def build_submission(answers_file: str, test_file: str) -> tuple[list[dict], int]:
    """(submission rows, number of questions filled with "")."""
    answers = {a["question_id"]: a["text"] for a in read_jsonl(answers_file, "VQAv2 answers (--answers-file)")}
    rows, filled = [], 0
    for q in read_jsonl(test_file, "VQAv2 full test question file (--test-file)"):
        qid = q["question_id"]
        if qid in answers:
            rows.append({"question_id": qid, "answer": normalize_answer(answers[qid])})
        else:
            rows.append({"question_id": qid, "answer": ""})
            filled += 1
    unknown = set(answers) - {r["question_id"] for r in rows}
    if unknown:
        raise ValueError(f"--answers-file: {len(unknown)} question_ids are not in --test-file (e.g. {sorted(map(str, unknown))[0]})")
    return rows, filled


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--answers-file", required=True)
    ap.add_argument("--test-file", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    rows, filled = build_submission(args.answers_file, args.test_file)
    atomic_write_json(args.out, rows, indent=None)
    print(f"wrote {len(rows)} answers ({filled} unanswered filled with \"\") to {args.out}")


if __name__ == "__main__":
    main()

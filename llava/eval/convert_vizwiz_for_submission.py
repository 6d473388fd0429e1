"""VizWiz: EvalAI submission json `[{"image": file name, "answer": str}]` with normalised answers.

Usage:
    python -m llava.eval.convert_vizwiz_for_submission --question-file vizwiz/llava_test.jsonl \
        --answers-file merge.jsonl --out vizwiz/answers_upload/<experiment>.json
"""
from __future__ import annotations

import argparse
import os

from llava.eval.io_utils import atomic_write_json, read_jsonl
from llava.eval.vqa_normalize import normalize_answer


def build_submission(question_file: str, answers_file: str) -> list[dict]:
    answers = {a["question_id"]: a["text"] for a in read_jsonl(answers_file, "VizWiz answers (--answers-file)")}
    rows = []
    for q in read_jsonl(question_file, "VizWiz question file (--question-file)"):
        if q["question_id"] not in answers:
            raise ValueError(f"--answers-file: no answer for question_id {q['question_id']!r} (the run is incomplete)")
        rows.append({"image": os.path.basename(q["image"]), "answer": normalize_answer(answers[q["question_id"]])})
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--question-file", required=True)
    ap.add_argument("--answers-file", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    rows = build_submission(args.question_file, args.answers_file)
    atomic_write_json(args.out, rows, indent=None)
    print(f"wrote {len(rows)} answers to {args.out}")


if __name__ == "__main__":
    main()

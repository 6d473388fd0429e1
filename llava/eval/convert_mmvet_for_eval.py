"""MM-Vet: results json `{"v1_<question_id>": answer}` for the official grader (GPT-4 based).

Usage:
    python -m llava.eval.convert_mmvet_for_eval --src merge.jsonl --question-file mm-vet/llava-mm-vet.jsonl \
        --dst mm-vet/results/<experiment>.json [--json metrics.json] [--allow-subset]

Every question must be answered exactly once (llava.eval.coverage); `--allow-subset` converts the answered
ones on purpose (the grader then scores a subset: the result says SUBSET).
"""
from __future__ import annotations

import argparse

from llava.eval.coverage import Coverage, add_subset_argument, check_coverage, summary_line
from llava.eval.io_utils import atomic_write_json, maybe_write_metrics, read_jsonl


def build_results(src: str, question_file: str, allow_subset: bool = False) -> tuple[dict[str, str], Coverage]:
    """({"v1_<question_id>": answer} in answer order, coverage)."""
    answers = read_jsonl(src, "MM-Vet answers (--src)")
    questions = read_jsonl(question_file, "MM-Vet question file (--question-file)")
    cov = check_coverage([q["question_id"] for q in questions], [a["question_id"] for a in answers],
                         answers=f"--src {src}", questions=f"--question-file {question_file}",
                         allow_subset=allow_subset)
    return {f"v1_{a['question_id']}": a["text"] for a in answers}, cov


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", required=True)
    ap.add_argument("--question-file", required=True)
    ap.add_argument("--dst", required=True)
    ap.add_argument("--json", default=None, help="write the coverage fields here")
    add_subset_argument(ap)
    args = ap.parse_args(argv)
    results, cov = build_results(args.src, args.question_file, args.allow_subset)
    atomic_write_json(args.dst, results)
    maybe_write_metrics(args.json, cov.fields())
    print(summary_line(cov.fields()))
    print(f"wrote {len(results)} answers to {args.dst}")
    return cov.fields()


if __name__ == "__main__":
    main()

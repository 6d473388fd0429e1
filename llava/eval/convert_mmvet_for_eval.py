"""MM-Vet: results json `{"v1_<question_id>": answer}` for the official grader (GPT-4 based).

Usage:
    python -m llava.eval.convert_mmvet_for_eval --src merge.jsonl --dst mm-vet/results/<experiment>.json
"""
from __future__ import annotations

import argparse

from llava.eval.io_utils import atomic_write_json, read_jsonl


def build_results(src: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for a in read_jsonl(src, "MM-Vet answers (--src)"):
        key = f"v1_{a['question_id']}"
        if key in out:
            raise ValueError(f"--src: duplicate answer for question_id {a['question_id']!r}")
        out[key] = a["text"]
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", required=True)
    ap.add_argument("--dst", required=True)
    args = ap.parse_args(argv)
    results = build_results(args.src)
    atomic_write_json(args.dst, results)
    print(f"wrote {len(results)} answers to {args.dst}")


if __name__ == "__main__":
    main()

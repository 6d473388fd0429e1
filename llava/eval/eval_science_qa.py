"""ScienceQA scorer: accuracy over the split and IMG-accuracy over its image questions, by LLaVA's rules.

Usage:
    python -m llava.eval.eval_science_qa --base-dir scienceqa --result-file answers.jsonl \
        [--split test] [--output-file out.jsonl] [--output-result result.json] [--json metrics.json] [--allow-subset]

`--base-dir` holds `problems.json` and `pid_splits.json`. The predicted letter is: the whole answer if it is
one of the option letters; else its first letter if the answer starts with "X. "; else the X of the
pattern "The answer is X." when it occurs exactly once ("." matching any character, as in LLaVA);
otherwise the question counts as failed. A letter beyond the number of choices is wrong.

IMG-accuracy follows LLaVA's rule: a question is an image question when the prompt stored with its answer
holds "<image>" (problems.json's `image` field is not consulted). Every question of the split must be
answered exactly once (llava.eval.coverage). With `--allow-subset` a missing answer counts as LLaVA counts
it: a failed question in the accuracy, and (its prompt being unknown) not an image question.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from llava.eval.coverage import COVERAGE_KEYS, add_subset_argument, check_coverage, summary_line
from llava.eval.io_utils import atomic_write_json, atomic_write_jsonl, maybe_write_metrics, read_json, read_jsonl

OPTIONS = ("A", "B", "C", "D", "E")
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def parse_letter(text: str, options: tuple[str, ...] = OPTIONS) -> str:
    """The predicted option letter, or "FAILED"."""
    if text in options:
        return text
    if len(text) >= 3 and text[0] in options and text[1:3] == ". ":
        return text[0]
    found = _ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else "FAILED"


def letter_to_index(letter: str, num_choices: int, options: tuple[str, ...] = OPTIONS) -> int:
    """0-based choice index of `letter`, or -1 when it is not one of the first `num_choices` options."""
    return options.index(letter) if letter in options[:num_choices] else -1


MISSING_PROMPT = "Unknown"     # LLaVA's stand-in prompt for a question without an answer


def _answer_prompt(answer: dict) -> str:
    if "prompt" not in answer:
        raise ValueError(f"--result-file: the answer to question_id {answer.get('question_id')!r} has no 'prompt' "
                         "(IMG-accuracy reads '<image>' from it)")
    return answer["prompt"]


def score_science_qa(base_dir: str, result_file: str, split: str = "test",
                     allow_subset: bool = False) -> tuple[dict, list[dict]]:
    """(metrics, per-question rows); raises CoverageError before scoring an incomplete answers file."""
    base = Path(base_dir)
    splits = read_json(base / "pid_splits.json", "ScienceQA pid_splits.json (--base-dir)")
    if split not in splits:
        raise ValueError(f"--split: {split!r} not in pid_splits.json (has {sorted(splits)})")
    problems = read_json(base / "problems.json", "ScienceQA problems.json (--base-dir)")
    pids = [str(pid) for pid in splits[split]]
    if not pids:
        raise ValueError(f"--split {split!r}: no questions")
    unknown_problems = [pid for pid in pids if pid not in problems]
    if unknown_problems:
        raise ValueError(f"--base-dir {base}: {len(unknown_problems)} ids of split {split!r} are not in problems.json "
                         f"(first: {unknown_problems[0]!r})")
    answers = read_jsonl(result_file, "ScienceQA answers (--result-file)")
    cov = check_coverage(pids, [str(a["question_id"]) for a in answers], answers=f"--result-file {result_file}",
                         questions=f"split {split!r} of {base / 'pid_splits.json'}", allow_subset=allow_subset)
    predictions = {str(a["question_id"]): a for a in answers}
    rows = []
    for pid in pids:
        prob = problems[pid]
        pred = predictions.get(pid)
        text = pred["text"] if pred is not None else "FAILED"
        prompt = _answer_prompt(pred) if pred is not None else MISSING_PROMPT
        letter = parse_letter(text)
        pred_idx = letter_to_index(letter, len(prob["choices"]))
        rows.append({
            "question_id": pid, "parsed_ans": letter, "pred_idx": pred_idx, "ground_truth": prob["answer"],
            "correct": pred_idx == prob["answer"], "is_multimodal": "<image>" in prompt, "text": text,
        })
    img_rows = [r for r in rows if r["is_multimodal"]]
    if not img_rows:
        raise ValueError(f"--result-file {result_file}: no answered image questions (no stored prompt holds '<image>'), "
                         "so IMG-accuracy is undefined")
    metrics = {
        "accuracy": 100.0 * sum(r["correct"] for r in rows) / len(rows),
        "img_accuracy": 100.0 * sum(r["correct"] for r in img_rows) / len(img_rows),
        "total": len(rows),
        "correct": sum(r["correct"] for r in rows),
        "img_total": len(img_rows),
        "missing": len(cov.missing),
        **cov.fields(),
    }
    return metrics, rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-dir", required=True)
    ap.add_argument("--result-file", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--output-file", default=None, help="per-question analysis jsonl")
    ap.add_argument("--output-result", default=None, help="metrics + parsed letters json")
    ap.add_argument("--json", default=None)
    add_subset_argument(ap)
    args = ap.parse_args(argv)
    metrics, rows = score_science_qa(args.base_dir, args.result_file, args.split, args.allow_subset)
    if args.output_file:
        atomic_write_jsonl(args.output_file, rows)
    if args.output_result:
        atomic_write_json(args.output_result, {**metrics, "results": {r["question_id"]: r["pred_idx"] for r in rows}})
    maybe_write_metrics(args.json, {k: metrics[k] for k in ("accuracy", "img_accuracy", *COVERAGE_KEYS)})
    print(f"Total: {metrics['total']}, Correct: {metrics['correct']}, Missing: {metrics['missing']}")
    print(summary_line(metrics))
    print(f"Accuracy: {metrics['accuracy']:.2f}")
    print(f"IMG-Accuracy: {metrics['img_accuracy']:.2f}")
    return metrics


if __name__ == "__main__":
    main()

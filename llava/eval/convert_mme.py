"""Convert LLaVA answers on MME into the official per-subtask result files.

Usage:
    python -m llava.eval.convert_mme --answers-file merge.jsonl \
        --gt-dir MME/MME_Benchmark_release_version --out-dir MME/eval_tool/answers/<experiment>

Ground truth: `<gt-dir>/<subtask>/<image stem>.txt` (or `<subtask>/questions_answers_YN/<stem>.txt` for
artwork, celebrity, landmark, posters, scene), one `question<TAB>yes|no` line per question.
Each answer's `question_id` is `<subtask>/.../<image file>`. Output: `<out-dir>/<subtask>.txt` with
`image<TAB>question<TAB>gt<TAB>prediction` lines, the format of MME's `eval_tool`. Every ground-truth question
must be answered exactly once (llava.eval.coverage); `--allow-subset` converts the answered ones on purpose.
A prompt matches its ground-truth question with the short-answer line removed, " Please answer yes or no."
present and whitespace runs collapsed (LLaVA's converter tries one and two spaces before that sentence).
"""
from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path

from llava.eval.coverage import Coverage, add_subset_argument, check_coverage, summary_line, unique_keys
from llava.eval.io_utils import atomic_write_text, read_jsonl, require_path

SHORT_ANSWER_LINE = "Answer the question using a single word or phrase."
YES_NO_SUFFIX = "Please answer yes or no."


def normalize_question(question: str) -> str:
    """Question key: short-answer line removed, the yes/no instruction present, whitespace collapsed."""
    q = question.replace(SHORT_ANSWER_LINE, " ").replace("<image>", " ")
    q = re.sub(r"\s+", " ", q).strip()
    if YES_NO_SUFFIX not in q:
        q = f"{q} {YES_NO_SUFFIX}"
    return q


def _qa_folder(category_dir: Path) -> Path:
    yn = category_dir / "questions_answers_YN"
    return yn if yn.is_dir() else category_dir


GtKey = tuple  # (subtask, image stem, normalised question)


def load_ground_truth(gt_dir: str) -> dict[GtKey, tuple[str, str]]:
    """(subtask, image stem, normalised question) -> (original question, answer); a repeated key is an error."""
    root = require_path(gt_dir, "MME ground-truth folder (--gt-dir)", is_dir=True)
    entries: list[tuple[GtKey, tuple[str, str]]] = []
    for category_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for txt in sorted(_qa_folder(category_dir).glob("*.txt")):
            for lineno, line in enumerate(txt.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                parts = line.rstrip("\n").split("\t")
                if len(parts) != 2:
                    raise ValueError(f"MME ground truth {txt} line {lineno}: expected 'question<TAB>answer'")
                question, answer = parts
                entries.append(((category_dir.name, txt.stem, normalize_question(question)),
                                (question.strip(), answer.strip())))
    if not entries:
        raise FileNotFoundError(f"MME ground-truth folder (--gt-dir): no question files under {root}")
    keys = unique_keys([k for k, _ in entries], f"--gt-dir {root}")
    return dict(zip(keys, (v for _, v in entries)))


def result_key(subtask: str, image: str, question: str) -> GtKey:
    """The ground-truth key of an answer or of a result line (image file name, or LLaVA's `<stem>.txt`)."""
    return (subtask, Path(image).stem, normalize_question(question))


def _clean_field(text: str) -> str:
    """Tabs and line breaks would break the tab-separated line: each run becomes one space (nothing else changes)."""
    return re.sub(r"[\t\r\n]+", " ", text)


def _answer_key(ans: dict) -> GtKey:
    qid = str(ans["question_id"])
    parts = qid.split("/")
    if len(parts) < 2:
        raise ValueError(f"--answers-file: question_id {qid!r}: expected '<subtask>/<image file>'")
    return result_key(parts[0], parts[-1], ans["prompt"])


def convert_answers(answers_file: str, gt_dir: str,
                    allow_subset: bool = False) -> tuple[dict[str, list[str]], Coverage]:
    """(subtask -> result lines `image<TAB>question<TAB>gt<TAB>prediction` in answer order, coverage of the GT).

    Raises CoverageError (missing, duplicate or unknown answers against the ground truth) before writing anything.
    """
    gt = load_ground_truth(gt_dir)
    answers = read_jsonl(answers_file, "MME answers (--answers-file)")
    keys = [_answer_key(a) for a in answers]
    cov = check_coverage(list(gt), keys, answers=f"--answers-file {answers_file}", questions=f"--gt-dir {gt_dir}",
                         allow_subset=allow_subset)
    per_task: dict[str, list[str]] = defaultdict(list)
    for ans, key in zip(answers, keys):
        question, answer = gt[key]
        image_name = str(ans["question_id"]).split("/")[-1]
        per_task[key[0]].append("\t".join((image_name, question, answer, _clean_field(ans["text"]))))
    return dict(per_task), cov


def write_results(per_task: dict[str, list[str]], out_dir: str) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for category, lines in per_task.items():
        path = out / f"{category}.txt"
        atomic_write_text(path, "".join(line + "\n" for line in lines))
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--answers-file", required=True)
    ap.add_argument("--gt-dir", required=True)
    ap.add_argument("--out-dir", required=True)
    add_subset_argument(ap)
    args = ap.parse_args(argv)
    per_task, cov = convert_answers(args.answers_file, args.gt_dir, args.allow_subset)
    paths = write_results(per_task, args.out_dir)
    print(summary_line(cov.fields()))
    print(f"wrote {len(paths)} MME subtask files to {args.out_dir}")


if __name__ == "__main__":
    main()

"""Answer MMBench / MMBench-CN (a tsv with base64 images).

Usage:
    python -m llava.eval.model_vqa_mmbench --model-path liuhaotian/llava-v1.5-7b \
        --question-file mmbench/mmbench_dev_20230712.tsv --answers-file out.jsonl \
        --single-pred-prompt [--lang cn] [--all-rounds] --visual-token-num 64

Options are the columns A, B, C, D up to the first empty one. The question is the hint (when present),
the question and one "X. option" line per option; `--single-pred-prompt` appends the multiple-choice
instruction (Chinese with `--lang cn`). `--all-rounds` answers every rotation of the options
(CircularEval), one line per `round_id`.
"""
from __future__ import annotations

import argparse
import base64
import io
from dataclasses import dataclass

from llava.eval.common import EvalSample, add_generation_args, run_generation
from llava.eval.io_utils import require_path

ALL_OPTIONS = ("A", "B", "C", "D")


def is_none(value) -> bool:
    """Empty cell: None, NaN, or the strings 'nan' / 'none' (any case)."""
    if value is None:
        return True
    if isinstance(value, float) and value != value:
        return True
    return isinstance(value, str) and value.strip().lower() in ("nan", "none")


def row_options(row) -> list[str]:
    options = []
    for letter in ALL_OPTIONS:
        value = row.get(letter)
        if is_none(value):
            break
        options.append(str(value))
    return options


def build_question(question: str, hint, options: list[str]) -> str:
    text = question if is_none(hint) else f"{hint}\n{question}"
    for letter, option in zip(ALL_OPTIONS, options):
        text += f"\n{letter}. {option}"
    return text


@dataclass(frozen=True)
class Base64Image:
    """Picklable image source (DataLoader workers): a base64-encoded image cell, decoded as RGB."""

    data: str

    def __call__(self):
        from PIL import Image

        return Image.open(io.BytesIO(base64.b64decode(self.data))).convert("RGB")

    def __str__(self) -> str:
        return "(base64 cell of the tsv)"


def base64_image_loader(data: str) -> Base64Image:
    return Base64Image(str(data))


def resolve_image_cell(cell: str, images_by_index: dict[int, str]) -> str:
    """The base64 image of a tsv cell; newer MMBench tsvs store a repeated image as the index of its first row."""
    seen = set()
    while cell.strip().isdigit() and len(cell) < 16:
        ref = int(cell)
        if ref not in images_by_index or ref in seen:
            raise ValueError(f"--question-file: image cell refers to index {ref}, which has no image")
        seen.add(ref)
        cell = images_by_index[ref]
    return cell


def load_samples(question_file: str, single_pred_prompt: bool, lang: str, all_rounds: bool) -> list[EvalSample]:
    import pandas as pd

    from llava.constants import MULTIPLE_CHOICE_PROMPT, MULTIPLE_CHOICE_PROMPT_CN

    if lang not in ("en", "cn"):
        raise ValueError(f"--lang: expected 'en' or 'cn', got {lang!r}")
    df = pd.read_csv(require_path(question_file, "MMBench tsv (--question-file)"), sep="\t")
    missing = [c for c in ("index", "question", "image", "A", "B") if c not in df.columns]
    if missing:
        raise ValueError(f"--question-file {question_file}: missing MMBench columns {missing}")
    instruction = MULTIPLE_CHOICE_PROMPT_CN if lang == "cn" else MULTIPLE_CHOICE_PROMPT
    records = df.to_dict("records")
    images_by_index = {int(r["index"]): str(r["image"]) for r in records}
    samples = []
    for number, row in enumerate(records, 2):  # line 1 is the header
        image = resolve_image_cell(str(row["image"]), images_by_index)
        options = row_options(row)
        letters = list(ALL_OPTIONS[: len(options)])
        for round_id in range(len(options) if all_rounds else 1):
            text = build_question(str(row["question"]), row.get("hint"), options)
            question = text + "\n" + instruction if single_pred_prompt else text
            samples.append(EvalSample(
                question_id=int(row["index"]), question=question, prompt_field=text,
                load_image=base64_image_loader(image), query=text,
                extra={"round_id": round_id, "options": list(options), "option_char": list(letters)},
                origin=f"row {number} (index {row['index']})"))
            options = options[1:] + options[:1]
            letters = letters[1:] + letters[:1]
    return samples


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_generation_args(ap, max_new_tokens=128)
    ap.add_argument("--single-pred-prompt", action="store_true")
    ap.add_argument("--lang", default="en", choices=["en", "cn"])
    ap.add_argument("--all-rounds", action="store_true")
    args = ap.parse_args(argv)
    return run_generation(args, load_samples(args.question_file, args.single_pred_prompt, args.lang, args.all_rounds))


if __name__ == "__main__":
    main()

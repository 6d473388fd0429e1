"""Answer a jsonl question file `{question_id, image, text, category}` (GQA, POPE, MME, TextVQA, VQAv2, VizWiz).

Usage:
    python -m llava.eval.model_vqa_loader --model-path liuhaotian/llava-v1.5-7b \
        --question-file pope/llava_pope_test.jsonl --image-folder pope/val2014 --answers-file out.jsonl \
        --visual-token-num 64 [--pruning-method script] [--num-chunks 4 --chunk-idx 0] [--device cpu --dtype float32]

The question `text` is used as is (it already carries the benchmark's instruction line); the relevance
query is the text without the short-answer line. Images load in a DataLoader (`--num-workers`).
"""
from __future__ import annotations

import argparse

from llava.eval.common import EvalSample, add_generation_args, check_images_exist, image_file_loader, run_generation
from llava.eval.io_utils import read_jsonl_lines


def load_samples(question_file: str, image_folder: str) -> list[EvalSample]:
    from llava.mm_utils import strip_short_answer_prompt

    questions = read_jsonl_lines(question_file, "question file (--question-file)")
    check_images_exist(image_folder, [q["image"] for _, q in questions])
    return [
        EvalSample(question_id=q["question_id"], question=q["text"], prompt_field=q["text"],
                   load_image=image_file_loader(image_folder, q["image"]), query=strip_short_answer_prompt(q["text"]),
                   origin=f"line {lineno}")
        for lineno, q in questions
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_generation_args(ap, max_new_tokens=128)
    args = ap.parse_args(argv)
    return run_generation(args, load_samples(args.question_file, args.image_folder))


if __name__ == "__main__":
    main()

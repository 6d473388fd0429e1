"""Answer ScienceQA (`llava_test_CQM-A.json`: a JSON list of `{id, conversations, image?}`).

Usage:
    python -m llava.eval.model_vqa_science --model-path liuhaotian/llava-v1.5-7b \
        --question-file scienceqa/llava_test_CQM-A.json --image-folder scienceqa/images/test \
        --answers-file out.jsonl --single-pred-prompt --visual-token-num 64

The question is the first human turn without its `<image>` tag. Items without `image` run text-only
(no visual tokens, nothing to prune). The stored prompt starts with "<image>\\n" for image questions, as
LLaVA's; `--single-pred-prompt` appends the multiple-choice instruction.
"""
from __future__ import annotations

import argparse

from llava.eval.common import EvalSample, add_generation_args, check_images_exist, image_file_loader, run_generation
from llava.eval.io_utils import read_json


def load_samples(question_file: str, image_folder: str, single_pred_prompt: bool) -> list[EvalSample]:
    from llava.constants import DEFAULT_IMAGE_TOKEN, MULTIPLE_CHOICE_PROMPT
    from llava.mm_utils import strip_short_answer_prompt

    items = read_json(question_file, "ScienceQA question file (--question-file)")
    if not isinstance(items, list):
        raise ValueError(f"--question-file {question_file}: expected a JSON list of questions with 'conversations'")
    with_images = [it["image"] for it in items if it.get("image")]
    if with_images:
        check_images_exist(image_folder, with_images)
    samples = []
    for number, it in enumerate(items, 1):
        question = it["conversations"][0]["value"].replace(DEFAULT_IMAGE_TOKEN, "").strip()
        query = strip_short_answer_prompt(question, multiple_choice=True)
        has_image = bool(it.get("image"))
        prompt_field = (DEFAULT_IMAGE_TOKEN + "\n" + question) if has_image else question
        if single_pred_prompt:
            question = question + "\n" + MULTIPLE_CHOICE_PROMPT
            prompt_field = prompt_field + "\n" + MULTIPLE_CHOICE_PROMPT
        samples.append(EvalSample(
            question_id=it["id"], question=question, prompt_field=prompt_field,
            load_image=image_file_loader(image_folder, it["image"]) if has_image else None, query=query,
            origin=f"item {number} (id {it['id']!r})"))
    return samples


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_generation_args(ap, max_new_tokens=1024)
    ap.add_argument("--single-pred-prompt", action="store_true")
    args = ap.parse_args(argv)
    return run_generation(args, load_samples(args.question_file, args.image_folder, args.single_pred_prompt))


if __name__ == "__main__":
    main()

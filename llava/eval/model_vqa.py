"""Answer an open-ended jsonl question file `{question_id, image, text}` (MM-Vet).

Usage:
    python -m llava.eval.model_vqa --model-path liuhaotian/llava-v1.5-7b \
        --question-file mm-vet/llava-mm-vet.jsonl --image-folder mm-vet/images --answers-file out.jsonl \
        --visual-token-num 64 [--temperature 0] [--device cpu --dtype float32]

Same flags as model_vqa_loader; long answers (max_new_tokens 1024 by default).
"""
from __future__ import annotations

import argparse

from llava.eval.common import add_generation_args, run_generation
from llava.eval.model_vqa_loader import load_samples


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_generation_args(ap, max_new_tokens=1024)
    args = ap.parse_args(argv)
    return run_generation(args, load_samples(args.question_file, args.image_folder))


if __name__ == "__main__":
    main()

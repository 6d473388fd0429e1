"""Ask a LLaVA checkpoint one question about one (or more) images, optionally with visual-token pruning.

    python -m llava.eval.run_llava --model-path liuhaotian/llava-v1.5-7b --image-file view.jpg \\
        --query "What is in the picture?" --visual-token-num 64 --pruning-method script

Prints the answer, then the number of visual tokens that reached the LLM and the time to first token
(from the start of ``generate`` — vision tower, pruning and prefill — to the first token's logits).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from llava.constants import (
    DEFAULT_IM_END_TOKEN,
    DEFAULT_IM_START_TOKEN,
    DEFAULT_IMAGE_TOKEN,
    IMAGE_PLACEHOLDER,
    IMAGE_TOKEN_INDEX,
)
from llava.conversation import conv_mode_for_model, get_conv_template
from llava.eval.common import pruning_config_from_flags
from llava.mm_utils import get_model_name_from_path, load_image, process_images, tokenizer_image_token
from llava.model.builder import load_pretrained_model
from llava.model.pruning import PruningConfig


@dataclass
class RunResult:
    answer: str
    visual_tokens: int
    time_to_first_token_s: float
    conv_mode: str


class FirstTokenTimer(LogitsProcessor):
    """Records when the first token's logits arrive (the end of the prefill)."""

    def __init__(self) -> None:
        self.first: float | None = None

    def __call__(self, input_ids, scores):
        if self.first is None:
            if scores.is_cuda:
                torch.cuda.synchronize(scores.device)
            self.first = time.perf_counter()
        return scores


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-path", required=True)
    p.add_argument("--model-base", default=None)
    p.add_argument("--image-file", required=True, help="image path or URL; several joined by --sep")
    p.add_argument("--query", required=True)
    p.add_argument("--conv-mode", default=None, help="conversation template (default: inferred from the model name)")
    p.add_argument("--sep", default=",")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top_p", "--top-p", dest="top_p", type=float, default=None)
    p.add_argument("--num_beams", "--num-beams", dest="num_beams", type=int, default=1)
    p.add_argument("--max_new_tokens", "--max-new-tokens", dest="max_new_tokens", type=int, default=512)
    p.add_argument("--visual-token-num", type=int, default=None,
                   help="visual tokens kept per image row / NeXT crop (default: no pruning)")
    p.add_argument("--pruning-method", default=None, help="script_prune method (default 'script' when a budget is set)")
    p.add_argument("--pruning-param", action="append", default=[], metavar="KEY=VALUE",
                   help="method parameter (repeatable), e.g. --pruning-param gsp_ratio=0.3 or --pruning-param layer=2 (fastv)")
    p.add_argument("--no-negate-relevance", action="store_true", help="do not negate CLIP relevance")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float16 | bfloat16 | float32 (default: float16 on CUDA, else float32)")
    p.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    p.add_argument("--device-map", default=None, help="e.g. 'auto' to shard over several GPUs")
    return p


def pruning_from_args(args: argparse.Namespace) -> PruningConfig | None:
    if args.visual_token_num is None and args.pruning_method is None:
        if args.pruning_param:
            raise ValueError("--pruning-param: needs --pruning-method or --visual-token-num")
        return None
    return pruning_config_from_flags(args.pruning_method or "script",
                                     576 if args.visual_token_num is None else args.visual_token_num,
                                     args.pruning_param, args.no_negate_relevance)


def image_query(query: str, use_im_start_end: bool) -> str:
    """LLaVA's query text: <image-placeholder> replaced by the image token, or the image token prepended."""
    token = DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN if use_im_start_end else DEFAULT_IMAGE_TOKEN
    if IMAGE_PLACEHOLDER in query:
        return re.sub(re.escape(IMAGE_PLACEHOLDER), token, query)
    if DEFAULT_IMAGE_TOKEN in query:
        return query
    return token + "\n" + query


def run(args: argparse.Namespace) -> RunResult:
    images = [load_image(path) for path in args.image_file.split(args.sep)]
    tokenizer, model, image_processor, _ = load_pretrained_model(
        args.model_path, args.model_base, get_model_name_from_path(args.model_path), device=args.device,
        device_map=args.device_map, torch_dtype=args.dtype, attn_implementation=args.attn_implementation,
        pruning=pruning_from_args(args),
    )
    conv_mode = args.conv_mode or conv_mode_for_model(get_model_name_from_path(args.model_path))
    conv = get_conv_template(conv_mode)
    conv.append_message(conv.roles[0], image_query(args.query, getattr(model.config, "mm_use_im_start_end", False)))
    conv.append_message(conv.roles[1], None)
    input_ids = tokenizer_image_token(conv.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")
    device = model.device
    input_ids = input_ids.unsqueeze(0).to(device)
    pixels = process_images(images, image_processor, model.config)
    dtype = model.dtype
    pixels = [p.to(device, dtype) for p in pixels] if isinstance(pixels, list) else pixels.to(device, dtype)
    timer = FirstTokenTimer()
    sampling = dict(do_sample=True, temperature=args.temperature, top_p=args.top_p) if args.temperature > 0 else dict(do_sample=False)
    start = time.perf_counter()
    output = model.generate(
        input_ids, images=pixels, image_sizes=[img.size for img in images], texts=[args.query],
        num_beams=args.num_beams, max_new_tokens=args.max_new_tokens, use_cache=True,
        logits_processor=LogitsProcessorList([timer]), pad_token_id=tokenizer.pad_token_id, **sampling,
    )
    answer = tokenizer.batch_decode(output, skip_special_tokens=True)[0].strip()
    ttft = (timer.first if timer.first is not None else time.perf_counter()) - start
    return RunResult(answer, model.last_visual_token_counts[0], ttft, conv_mode)


def main(argv: list[str] | None = None) -> RunResult:
    args = build_parser().parse_args(argv)
    result = run(args)
    print(result.answer)
    print(f"visual tokens to LLM: {result.visual_tokens}")
    print(f"time to first token: {result.time_to_first_token_s * 1000:.1f} ms")
    sys.stdout.flush()
    return result


if __name__ == "__main__":
    main()

"""Throughput with and without pruning in vLLM: requests/s and time to first token (TTFT).

    python -m script_vllm.bench [--model PATH | --tiny qwen3_vl] [--requests 32] [--budget 0.25]
                                [--out results/vllm_bench.json]

Without ``--model`` a tiny random Qwen2.5-VL (``--tiny qwen3_vl``: Qwen3-VL) is built offline (numbers then
measure vLLM's overheads more than the model). Requests/s: one ``generate`` call over all requests (each its own
random image and question), ``--max-tokens`` greedy tokens each. TTFT: the median wall time of single requests with one output token.
Every request has an image no earlier request had (no encoder / prefix cache hits); a warm-up pass first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

#: --tiny choices: family -> name (script_vllm.tiny.build_<family>)
TINY = {"qwen2_5_vl": "Qwen2.5-VL", "qwen3_vl": "Qwen3-VL"}


def _requests(count: int, size: tuple[int, int], budget: float | int | None, seed: int = 0) -> list[dict]:
    """``count`` requests, each its own random image (seeds ``seed``...) and question; fresh seeds miss vLLM's
    encoder and prefix caches."""
    import numpy as np
    from PIL import Image

    words = ["what", "is", "the", "color", "of", "the", "dog", "in", "the", "left", "?"]
    out = []
    for i in range(count):
        rng = np.random.RandomState(seed + i)
        picture = Image.fromarray(rng.randint(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        question = " ".join(words[: 4 + i % 7])
        prompt = (f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n"
                  "<|im_start|>assistant\n")
        request = {"prompt": prompt, "multi_modal_data": {"image": picture}}
        if budget is not None:
            request["mm_processor_kwargs"] = {"script_budget": budget}
        out.append(request)
    return out


def measure(llm, count: int, size: tuple[int, int], budget, max_tokens: int) -> dict:
    from vllm import SamplingParams

    many = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    one = SamplingParams(temperature=0.0, max_tokens=1)
    llm.generate(_requests(count, size, budget, seed=10_000), many, use_tqdm=False)  # warm-up (shapes compiled)
    batch = _requests(count, size, budget, seed=20_000)
    start = time.perf_counter()
    outs = llm.generate(batch, many, use_tqdm=False)
    seconds = time.perf_counter() - start
    ttft = []
    for request in _requests(min(count, 16), size, budget, seed=30_000):  # uncached images
        start = time.perf_counter()
        llm.generate([request], one, use_tqdm=False)
        ttft.append(time.perf_counter() - start)
    return {"budget": budget, "requests": count, "requests_per_s": count / seconds,
            "ttft_median_ms": 1000 * statistics.median(ttft),
            "prompt_tokens_mean": statistics.mean(len(o.prompt_token_ids) for o in outs)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint (default: a tiny random model built offline)")
    parser.add_argument("--tiny", choices=sorted(TINY), default="qwen2_5_vl",
                        help="the tiny random family built offline when --model is not given")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--budget", type=float, default=0.25, help="script_budget of the pruned run")
    parser.add_argument("--size", type=int, nargs=2, default=(448, 336), metavar=("W", "H"))
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", default="results/vllm_bench.json")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.max_tokens < 1:
        parser.error("--requests and --max-tokens must be >= 1")
    budget = int(args.budget) if args.budget >= 1 else args.budget
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from . import tiny

            model = str(getattr(tiny, f"build_{args.tiny}")(Path(tmp) / "tiny"))
        llm = LLM(model=model, dtype=args.dtype, max_model_len=4096, seed=0, limit_mm_per_prompt={"image": 1})
        rows = [measure(llm, args.requests, tuple(args.size), b, args.max_tokens) for b in (None, budget)]
    result = {"model": args.model or f"tiny random {TINY[args.tiny]}", "image_size": list(args.size),
              "max_tokens": args.max_tokens, "dtype": args.dtype, "runs": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".tmp")
    tmp_out.write_text(json.dumps(result, indent=2))
    tmp_out.replace(out)  # never a half-written result file
    for row in rows:
        print(f"budget={row['budget']}: {row['requests_per_s']:.2f} requests/s, TTFT {row['ttft_median_ms']:.0f} ms "
              f"(median), prompt {row['prompt_tokens_mean']:.0f} tokens")
    return result


if __name__ == "__main__":
    main()

"""Batched answer generation throughput of the toy model (questions per second), per method and batch size.

    python -m llava.toy.throughput [--methods script,divprune,fastv] [--batch-sizes 1,8,32] [--questions 64]
        [--budget 16] [--max-new-tokens 8] [--device cpu|cuda] [--dtype float32|float16] [--threads N]
        [--repeats 1] [--json out.json]

The questions are the first ``--questions`` of the toy test split (``llava.toy.bench.ensure_test_split``,
written under ``--data`` if absent). They are prepared once (prompt ids, image pixels) with the answer
generators' own ``llava.eval.common.SampleDataset``; what is timed is the batched generation alone
(``llava.eval.common.generate_answers``: left-padded prompts, the pruning, greedy decoding), batches in
question order, after one warm-up batch, the best of ``--repeats`` passes. Image loading is not timed
(the generators load images in DataLoader workers, in parallel with generation, on a GPU).

Each row also says whether the answers equal those of batch 1 (``same_as_batch_1``; greedy decoding, so they
should; on a GPU in float16 a near-tie can flip, see EVAL.md) and the speedup over batch 1.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Sequence

from llava.toy.bench import DEFAULT_CHECKPOINT, ensure_test_split


def _int_list(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{name}: expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"{name}: expected integers >= 1, got {text!r}")
    return values


def prepare(model_path: str, data_dir: Path, n_questions: int, device: str | None, dtype: str | None):
    """(tokenizer, model, prepared questions) for the first ``n_questions`` of the toy test split."""
    from llava.eval import common
    from llava.eval.model_vqa_loader import load_samples

    split = ensure_test_split(data_dir)
    samples = load_samples(str(split / "questions.jsonl"), str(split / "images"))
    if n_questions > len(samples):
        raise ValueError(f"--questions: the toy test split has {len(samples)} questions, got {n_questions}")
    samples = samples[:n_questions]
    args = argparse.Namespace(model_path=str(model_path), model_base=None, device=device, dtype=dtype,
                              attn_implementation="sdpa", pruning_method="none", pruning_param=[],
                              negate_relevance=True, visual_token_num=1)
    tokenizer, model, image_processor, _ = common.load_model(args)
    dataset = common.SampleDataset(samples, tokenizer, image_processor, model.config, "vicuna_v1")
    return tokenizer, model, [dataset[i] for i in range(len(dataset))]


def timed_pass(model, tokenizer, items: Sequence, batch_size: int, gen_kwargs: dict) -> tuple[float, list[str]]:
    """Seconds to answer ``items`` in batches of ``batch_size`` (question order), and the answers."""
    import torch

    from llava.eval.common import generate_answers

    device = next(model.parameters()).device
    answers: list[str] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for i in range(0, len(items), batch_size):
        answers += [text for text, _ in generate_answers(model, tokenizer, items[i:i + batch_size], gen_kwargs)]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, answers


def measure(model, tokenizer, items: Sequence, methods: Sequence[str], batch_sizes: Sequence[int], budget: int,
            max_new_tokens: int, repeats: int) -> list[dict]:
    """One row per (method, batch size): questions/s (best of ``repeats``), speedup and answer equality vs batch 1."""
    import torch

    from llava.eval.common import pruning_config_from_flags

    gen_kwargs = {"max_new_tokens": max_new_tokens, "num_beams": 1, "do_sample": False, "use_cache": True}
    rows = []
    with torch.inference_mode():
        for method in methods:
            model.set_pruning(None if method == "none" else pruning_config_from_flags(method, budget, [], False))
            reference: list[str] | None = None
            base_qps = None
            for bs in batch_sizes:
                timed_pass(model, tokenizer, items[:bs], bs, gen_kwargs)            # warm-up batch
                passes = [timed_pass(model, tokenizer, items, bs, gen_kwargs) for _ in range(repeats)]
                seconds, answers = min(passes, key=lambda p: p[0])
                qps = len(items) / seconds
                if bs == 1:
                    reference, base_qps = answers, qps
                row = {"method": method, "budget": budget, "batch_size": bs, "questions": len(items),
                       "seconds": round(seconds, 4), "questions_per_s": round(qps, 3),
                       "speedup_vs_batch_1": round(qps / base_qps, 3) if base_qps else None,
                       "same_as_batch_1": None if reference is None else answers == reference}
                rows.append(row)
                print(f"[throughput] {method:<10} batch {bs:>3}: {qps:8.2f} questions/s"
                      + (f"  (x{row['speedup_vs_batch_1']:.2f}, answers equal batch 1: {row['same_as_batch_1']})"
                         if base_qps else ""), flush=True)
    return rows


def format_table(rows: Sequence[dict]) -> str:
    """Markdown table: method, budget, batch, questions/s, x batch 1, same answers as batch 1."""
    lines = ["| method | budget | batch | questions/s | x batch 1 | answers = batch 1 |", "|---|---|---|---|---|---|"]
    for r in rows:
        speed = "–" if r["speedup_vs_batch_1"] is None else f"x{r['speedup_vs_batch_1']:.2f}"
        same = "–" if r["same_as_batch_1"] is None else ("yes" if r["same_as_batch_1"] else "**no**")
        lines.append(f"| {r['method']} | {r['budget']} | {r['batch_size']} | {r['questions_per_s']:.2f} | {speed} | {same} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    import script_prune as sp

    ap = argparse.ArgumentParser(prog="python -m llava.toy.throughput", description=__doc__.splitlines()[0])
    ap.add_argument("--model-path", default=str(DEFAULT_CHECKPOINT))
    ap.add_argument("--data", default="toy_bench/data", help="toy data folder (test split written there if absent)")
    ap.add_argument("--methods", default="script", help="comma-separated script_prune methods, or none")
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--questions", type=int, default=64, help="first N questions of the toy test split")
    ap.add_argument("--budget", type=int, default=16, help="visual tokens kept of the toy's 144")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=1, help="timed passes per row (the best is kept)")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--dtype", default=None, help="default: float16 on GPU, float32 on CPU")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--json", default=None, help="write the rows (and the settings) to this file")
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m != "none" and m not in sp.list_methods()]
    if not methods or unknown:
        raise ValueError(f"--methods: unknown {unknown or methods}; choose from {['none'] + sp.list_methods()}")
    batch_sizes = _int_list(args.batch_sizes, "--batch-sizes")
    if batch_sizes[0] != 1:
        batch_sizes = [1] + [b for b in batch_sizes if b != 1]   # batch 1 is the reference of every row
    for name in ("questions", "budget", "max_new_tokens", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected an int >= 1, got {getattr(args, name)}")
    import torch

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads: expected an int >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    tokenizer, model, items = prepare(args.model_path, Path(args.data), args.questions, args.device, args.dtype)
    param = next(model.parameters())
    rows = measure(model, tokenizer, items, methods, batch_sizes, args.budget, args.max_new_tokens, args.repeats)
    table = format_table(rows)
    print(table)
    if args.json:
        payload = {"device": str(param.device), "dtype": str(param.dtype).removeprefix("torch."),
                   "device_name": torch.cuda.get_device_name(param.device) if param.device.type == "cuda" else "cpu",
                   "threads": torch.get_num_threads(), "torch": torch.__version__, "model_path": args.model_path,
                   "load_average_after": os.getloadavg(),
                   "rows": rows, "table": table}
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(payload, indent=2))
        os.replace(tmp, path)
    return rows


if __name__ == "__main__":
    main()

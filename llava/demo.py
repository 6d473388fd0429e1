"""Answer questions about images with and without visual-token pruning, and draw the kept tokens.

    python -m llava.demo                                     # bundled toy checkpoint + scenes, CPU, no download
    python -m llava.demo --model-path liuhaotian/llava-v1.5-7b --image photo.jpg \
        --question "What is on the table?" --budgets 192,64 --device cuda

For every (image, question) it prints the answer of the unpruned model and of ``--method`` at each budget,
with the number of visual tokens that reached the LLM and the generation time, and writes one PNG per
question (``--out``) showing the image, the query relevance and the kept tokens of each budget
(``script_prune.visualize.pruning_figure``).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

TOY_DIR = Path(__file__).resolve().parent / "toy"
DEFAULT_MODEL = TOY_DIR / "checkpoint"
DEMO_SCENES = TOY_DIR / "demo_scenes"


@dataclass
class DemoItem:
    image: str           # path
    question: str        # as asked (may end with LLaVA's short-answer line)
    expected: str | None = None


@dataclass
class DemoAnswer:
    setting: str         # "unpruned" or "<method>@<budget>"
    answer: str
    visual_tokens: int
    seconds: float
    kept: torch.Tensor | None  # (k,) kept token indices of the image (None when unpruned)


def bundled_items() -> list[DemoItem]:
    """The bundled scenes and questions (``llava/toy/demo_scenes/questions.json``)."""
    spec = DEMO_SCENES / "questions.json"
    if not spec.is_file():
        raise FileNotFoundError(f"bundled demo questions not found: {spec}")
    rows = json.loads(spec.read_text())
    return [DemoItem(str(DEMO_SCENES / r["image"]), r["question"], r.get("answer")) for r in rows]


def build_input_ids(question: str, tokenizer, model_config, conv_mode: str) -> torch.Tensor:
    """LLaVA's single-turn prompt (image tag first, open assistant turn) -> (1, L) ids."""
    from llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN
    from llava.conversation import conv_templates
    from llava.mm_utils import tokenizer_image_token

    if conv_mode not in conv_templates:
        raise ValueError(f"conv_mode must be one of {sorted(conv_templates)}, got {conv_mode!r}")
    tag = DEFAULT_IMAGE_TOKEN
    if getattr(model_config, "mm_use_im_start_end", False):
        tag = DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN
    conv = conv_templates[conv_mode].copy()
    conv.append_message(conv.roles[0], tag + "\n" + question)
    conv.append_message(conv.roles[1], None)
    return tokenizer_image_token(conv.get_prompt(), tokenizer, return_tensors="pt")[None]


def answer(model, tokenizer, image_processor, item: DemoItem, image, conv_mode: str,
           max_new_tokens: int) -> tuple[str, int, float, torch.Tensor | None]:
    """(answer text, visual tokens, seconds, kept indices of the first row or None)."""
    from llava.mm_utils import process_images, strip_short_answer_prompt

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    input_ids = build_input_ids(item.question, tokenizer, model.config, conv_mode).to(device)
    pixels = process_images([image], image_processor, model.config)
    pixels = pixels.to(device=device, dtype=dtype) if torch.is_tensor(pixels) else [p.to(device, dtype) for p in pixels]
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model.generate(input_ids, images=pixels, image_sizes=[image.size],
                             texts=[strip_short_answer_prompt(item.question)], do_sample=False,
                             max_new_tokens=max_new_tokens, use_cache=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
    if out.shape[1] > input_ids.shape[1] and torch.equal(out[0, : input_ids.shape[1]].cpu(), input_ids[0].cpu()):
        out = out[:, input_ids.shape[1]:]         # some generate paths echo the prompt
    text = tokenizer.batch_decode(out, skip_special_tokens=True)[0].strip()
    counts = model.last_visual_token_counts
    kept = model.kept_tokens()  # the pruning layer's public record (script_prune.patch.kept); None unpruned
    return text, int(counts[0]) if counts else 0, seconds, (kept[0].cpu() if kept else None)


def parse_budgets(text: str) -> list[int]:
    try:
        budgets = [int(b) for b in text.split(",") if b.strip()]
    except ValueError as err:
        raise ValueError(f"--budgets: expected comma-separated integers, got {text!r}") from err
    if not budgets or min(budgets) < 1:
        raise ValueError(f"--budgets: expected integers >= 1, got {text!r}")
    return budgets


def draw(item: DemoItem, image, grid_side: int, answers: list[DemoAnswer], out_path: Path) -> Path:
    """PNG: the image and the kept tokens of every pruned setting."""
    from script_prune.visualize import pruning_figure

    kept = {f"{a.setting} -> {a.answer!r}": a.kept.numpy() for a in answers if a.kept is not None}
    query = item.question.split("\n")[0]
    pruning_figure(image, (grid_side, grid_side), kept, out_path, query=query, panel_px=252)
    return out_path


def run_demo(model_path: str, items: list[DemoItem], method: str, budgets: list[int], out_dir: Path,
             device: str, conv_mode: str = "vicuna_v1", max_new_tokens: int = 16, log=print) -> list[dict]:
    """Answer every item unpruned and at each budget; returns one summary dict per item."""
    from llava.mm_utils import load_image
    from llava.model.builder import load_pretrained_model
    from llava.model.pruning import PruningConfig

    t0 = time.perf_counter()
    tokenizer, model, image_processor, _ = load_pretrained_model(model_path, device=device)
    grid_side = model.num_patches_per_side
    log(f"loaded {model_path} on {device} in {time.perf_counter() - t0:.1f}s; "
        f"{grid_side * grid_side} visual tokens per image; method {method}")
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries = []
    for k, item in enumerate(items):
        image = load_image(item.image)
        answers = []
        settings = [("unpruned", None)] + [(f"{method}@{b}", b) for b in budgets]
        for name, budget in settings:
            model.set_pruning(None if budget is None else PruningConfig(method=method, visual_token_num=budget))
            text, n_vis, secs, kept = answer(model, tokenizer, image_processor, item, image, conv_mode, max_new_tokens)
            answers.append(DemoAnswer(name, text, n_vis, secs, kept if budget is not None else None))
        model.set_pruning(None)
        expected = f"  (expected: {item.expected})" if item.expected else ""
        log(f"\n[{k + 1}] {Path(item.image).name}: {item.question.splitlines()[0]}{expected}")
        for a in answers:
            log(f"    {a.setting:<14} visual tokens {a.visual_tokens:>4}   {1000 * a.seconds:7.1f} ms   -> {a.answer}")
        picture = draw(item, image, grid_side, answers, out_dir / f"demo_{k + 1}_{Path(item.image).stem}.png")
        log(f"    kept tokens: {picture}")
        summaries.append({"image": item.image, "question": item.question, "expected": item.expected,
                          "picture": str(picture),
                          "answers": [{"setting": a.setting, "answer": a.answer, "visual_tokens": a.visual_tokens,
                                       "seconds": a.seconds} for a in answers]})
    return summaries


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description="LLaVA answers with and without visual-token pruning (+ kept-token picture).")
    ap.add_argument("--model-path", default=str(DEFAULT_MODEL), help="LLaVA checkpoint (default: the bundled toy model)")
    ap.add_argument("--image", default=None, help="image file (default: the bundled toy scenes)")
    ap.add_argument("--question", default=None, help="question about --image")
    ap.add_argument("--method", default="script", help="script_prune method")
    ap.add_argument("--budgets", default="48,16,8", help="visual tokens kept, comma-separated")
    ap.add_argument("--out", default="demo_out", help="folder for the kept-token pictures")
    ap.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    ap.add_argument("--conv-mode", default="vicuna_v1")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--json", default=None, help="also write the answers to this JSON file")
    args = ap.parse_args(argv)

    import script_prune as sp

    if args.method not in sp.list_methods():
        raise ValueError(f"--method must be one of {sp.list_methods()}, got {args.method!r}")
    if (args.image is None) != (args.question is None):
        raise ValueError("--image and --question go together (give both, or neither for the bundled scenes)")
    if args.image is not None:
        items = [DemoItem(args.image, args.question)]
    else:
        items = bundled_items()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1" if Path(args.model_path).is_dir() else os.environ.get("HF_HUB_OFFLINE", "0"))
    summaries = run_demo(args.model_path, items, args.method, parse_budgets(args.budgets), Path(args.out), device,
                         args.conv_mode, args.max_new_tokens)
    if args.json:
        tmp = Path(args.json + ".tmp")
        tmp.write_text(json.dumps(summaries, indent=2))
        os.replace(tmp, args.json)
    return summaries


if __name__ == "__main__":
    main()

"""Shared machinery of the answer generators (model_vqa_loader, model_vqa, model_vqa_science, model_vqa_mmbench).

- `add_generation_args`: LLaVA's flags plus `--visual-token-num` (alias `--visual_token_num`),
  `--pruning-method` (a `script_prune` method or "none"), `--pruning-param key=value` (repeatable; the
  value is read as JSON when it parses, e.g. `tau=0.1`, `negate=false`, else kept as a string),
  `--device`, `--dtype`, `--num-workers`, `--attn-implementation`.
- `split_list` / `get_chunk`: contiguous chunks of ceil(len / n) items (LLaVA's sharding).
- `ResumableJsonlWriter`: appends answer lines; on open it drops a partial last line left by a killed
  run and remembers the keys already written, so a rerun skips them and never duplicates a line.
- `run_generation`: tokenises the prompts, loads images in a DataLoader, generates greedily (by default)
  and writes `{question_id, prompt, text, answer_id, model_id, metadata}` lines with a tqdm bar that
  shows the visual token count reaching the LLM.

Testing hook: with the environment variable LLAVA_EVAL_CRASH_AFTER=N a run writes N answers, then half
of the next line, and exits with status 75 without cleanup (what a kill mid-write leaves behind).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from llava.eval.io_utils import require_path

CRASH_ENV = "LLAVA_EVAL_CRASH_AFTER"
CRASH_EXIT_CODE = 75
DTYPES = ("float16", "bfloat16", "float32")


# ----------------------------------------------------------------------------- sharding
def split_list(items: Sequence, n: int) -> list[list]:
    """Contiguous chunks of ceil(len(items) / n) items (fewer than n chunks when items are few)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"num_chunks: expected an int >= 1, got {n!r}")
    size = max(1, math.ceil(len(items) / n))
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def get_chunk(items: Sequence, n: int, k: int) -> list:
    """Chunk `k` of `split_list(items, n)`; empty when that chunk does not exist."""
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < n:
        raise ValueError(f"chunk_idx: expected an int in [0, {n}), got {k!r}")
    chunks = split_list(items, n)
    return chunks[k] if k < len(chunks) else []


# ----------------------------------------------------------------------------- resumable answers file
def answer_key(row: dict) -> str:
    """Identity of an answer line: question_id, round_id (MMBench) and prompt.

    The prompt is part of the key because some question files reuse a question_id for several questions
    (LLaVA's TextVQA file uses the image id as question_id).
    """
    return json.dumps([row["question_id"], row.get("round_id", 0), row.get("prompt", "")], ensure_ascii=False)


def run_settings(metadata: dict) -> str:
    """The part of an answer's metadata that must match for a resumed run: method, budget, params."""
    return json.dumps([metadata.get("method"), metadata.get("budget"), metadata.get("params", {})], sort_keys=True)


class ResumableJsonlWriter:
    """Append-only jsonl writer that resumes an interrupted file.

    Opening repairs the file: every complete, valid line is kept; a trailing partial or invalid line
    (a run killed mid-write) is cut off. `done` holds the keys already present.
    """

    def __init__(self, path: str | os.PathLike, key: Callable[[dict], str] = answer_key):
        self.path = Path(path)
        self.key = key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done: set[str] = set()
        self.settings: set[str] = set()  # run_settings() of the lines already in the file
        self.repaired = self._repair()
        self._f = open(self.path, "a", encoding="utf-8")

    def _repair(self) -> bool:
        if not self.path.exists():
            return False
        data = self.path.read_bytes()
        good_end = 0
        pos = 0
        while pos < len(data):
            nl = data.find(b"\n", pos)
            if nl < 0:
                break  # no newline: a partial last line
            line = data[pos:nl].strip()
            if line:
                try:
                    row = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    break
                self.done.add(self.key(row))
                self.settings.add(run_settings(row.get("metadata") or {}))
            good_end = nl + 1
            pos = nl + 1
        if good_end < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(good_end)
            return True
        return False

    def __contains__(self, row_or_key: dict | str) -> bool:
        k = row_or_key if isinstance(row_or_key, str) else self.key(row_or_key)
        return k in self.done

    def write(self, row: dict) -> None:
        k = self.key(row)
        if k in self.done:
            return
        self._f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._f.flush()
        self.done.add(k)

    def write_partial_and_die(self, row: dict) -> None:
        """Testing hook: write half of `row`'s line and exit at once (like a kill mid-write)."""
        text = json.dumps(row, ensure_ascii=False)
        self._f.write(text[: max(1, len(text) // 2)])
        self._f.flush()
        os._exit(CRASH_EXIT_CODE)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "ResumableJsonlWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ----------------------------------------------------------------------------- arguments
def parse_pruning_params(items: Sequence[str] | None) -> dict[str, Any]:
    """`["tau=0.1", "negate=false", "kernel=cos"]` -> `{"tau": 0.1, "negate": False, "kernel": "cos"}`."""
    params: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--pruning-param: expected key=value, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        params[key.strip()] = value
    return params


def add_generation_args(parser: argparse.ArgumentParser, *, max_new_tokens: int, conv_mode: str = "vicuna_v1") -> None:
    import script_prune

    parser.add_argument("--model-path", required=True)
    parser.add_argument("--model-base", default=None)
    parser.add_argument("--image-folder", default="")
    parser.add_argument("--question-file", required=True)
    parser.add_argument("--answers-file", required=True)
    parser.add_argument("--conv-mode", default=conv_mode)
    parser.add_argument("--num-chunks", type=int, default=1)
    parser.add_argument("--chunk-idx", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top_p", "--top-p", dest="top_p", type=float, default=None)
    parser.add_argument("--num_beams", "--num-beams", dest="num_beams", type=int, default=1)
    parser.add_argument("--max_new_tokens", "--max-new-tokens", dest="max_new_tokens", type=int, default=max_new_tokens)
    parser.add_argument("--visual-token-num", "--visual_token_num", dest="visual_token_num", type=int, default=576,
                        help="visual tokens kept per image row (LLaVA-NeXT: per crop)")
    parser.add_argument("--pruning-method", default="script", choices=["none"] + list(script_prune.list_methods()),
                        help="token selection method from script_prune, or 'none' for the unpruned model")
    parser.add_argument("--pruning-param", action="append", default=[], metavar="KEY=VALUE",
                        help="method parameter (repeatable), e.g. --pruning-param tau=0.1")
    parser.add_argument("--no-negate-relevance", dest="negate_relevance", action="store_false",
                        help="use the raw CLIP relevance (default: negated, as the authors' release)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu, ... (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=DTYPES, help="default: float16 on GPU, float32 on CPU")
    parser.add_argument("--attn-implementation", default="sdpa")
    parser.add_argument("--num-workers", type=int, default=None, help="image loading workers (default 4 on GPU, 0 on CPU)")


def resolve_device_dtype(device: str | None, dtype: str | None):
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype is None:
        dtype = "float32" if device == "cpu" else "float16"
    if dtype not in DTYPES:
        raise ValueError(f"--dtype: expected one of {DTYPES}, got {dtype!r}")
    return torch.device(device), getattr(torch, dtype)


def pruning_config_from_flags(method: str, visual_token_num: int, param_items: Sequence[str] | None,
                              no_negate_relevance: bool):
    """PruningConfig of the CLI flags (checked here, before any model loads).

    `--pruning-param negate=true` together with `--no-negate-relevance` is a contradiction, refused.
    """
    from llava.model.pruning import PruningConfig

    params = parse_pruning_params(param_items)
    if no_negate_relevance and params.get("negate") is True:
        raise ValueError("--pruning-param negate=true contradicts --no-negate-relevance; give only one of them")
    return PruningConfig(method=method, visual_token_num=visual_token_num, params=params,
                         negate_relevance=not no_negate_relevance)


def build_pruning_config(args: argparse.Namespace):
    """PruningConfig from the flags, or None for --pruning-method none."""
    if args.pruning_method == "none":
        if args.pruning_param:
            raise ValueError("--pruning-param: not allowed with --pruning-method none")
        return None
    return pruning_config_from_flags(args.pruning_method, args.visual_token_num, args.pruning_param,
                                     not args.negate_relevance)


# ----------------------------------------------------------------------------- samples and prompts
@dataclass
class EvalSample:
    """One question to answer.

    question: the user text without the image tag (the tag is added when `load_image` is set).
    prompt_field: what the answer line stores as "prompt".
    load_image: returns the PIL image; None for a text-only question.
    query: the text given to the pruning method's relevance (instruction lines removed).
    extra: additional answer-line fields (MMBench: round_id, options, option_char).
    """

    question_id: Any
    question: str
    prompt_field: str
    load_image: Callable[[], Any] | None
    query: str
    extra: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return answer_key({"question_id": self.question_id, "prompt": self.prompt_field, **self.extra})


def build_prompt(question: str, has_image: bool, conv_mode: str, mm_use_im_start_end: bool) -> str:
    """The full chat prompt: system + USER turn (image tag first when there is an image) + empty ASSISTANT turn."""
    from llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN
    from llava.conversation import conv_templates

    if conv_mode not in conv_templates:
        raise ValueError(f"--conv-mode: expected one of {sorted(conv_templates)}, got {conv_mode!r}")
    if has_image:
        tag = DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN if mm_use_im_start_end else DEFAULT_IMAGE_TOKEN
        question = tag + "\n" + question
    conv = conv_templates[conv_mode].copy()
    conv.append_message(conv.roles[0], question)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


@dataclass(frozen=True)
class ImageFile:
    """Picklable image source (DataLoader workers): `folder/name` opened as RGB."""

    folder: str
    name: str

    def __call__(self):
        from PIL import Image

        with Image.open(require_path(Path(self.folder) / self.name, "image")) as im:
            return im.convert("RGB")


def image_file_loader(image_folder: str, image_file: str) -> ImageFile:
    """A callable that opens `image_folder/image_file` as RGB."""
    return ImageFile(str(image_folder), str(image_file))


def check_images_exist(image_folder: str, image_files: Sequence[str]) -> None:
    """Fail before loading the model when the image folder or any image is missing."""
    folder = require_path(image_folder, "image folder (--image-folder)", is_dir=True)
    for name in image_files:
        require_path(folder / name, "image")


class _SampleDataset:
    """Torch-style dataset: (sample, input_ids (L,), pixel values or None, image size or None)."""

    def __init__(self, samples: list[EvalSample], tokenizer, image_processor, model_config, conv_mode: str):
        self.samples, self.tokenizer, self.image_processor = samples, tokenizer, image_processor
        self.model_config, self.conv_mode = model_config, conv_mode

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from llava.constants import IMAGE_TOKEN_INDEX
        from llava.mm_utils import process_images, tokenizer_image_token

        s = self.samples[i]
        has_image = s.load_image is not None
        prompt = build_prompt(s.question, has_image, self.conv_mode,
                              bool(getattr(self.model_config, "mm_use_im_start_end", False)))
        input_ids = tokenizer_image_token(prompt, self.tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")
        if not has_image:
            return s, input_ids, None, None
        image = s.load_image()
        pixels = process_images([image], self.image_processor, self.model_config)
        return s, input_ids, pixels, image.size


def _first(batch):
    return batch[0]


def _to_device(pixels, device, dtype):
    if pixels is None:
        return None
    if isinstance(pixels, (list, tuple)):
        return [p.to(device=device, dtype=dtype) for p in pixels]
    return pixels.to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------- the generation loop
def load_model(args: argparse.Namespace):
    """(tokenizer, model, image_processor, model_name) with the pruning setting of the flags."""
    from llava.mm_utils import get_model_name_from_path
    from llava.model.builder import load_pretrained_model

    device, dtype = resolve_device_dtype(args.device, args.dtype)
    model_name = get_model_name_from_path(args.model_path)
    tokenizer, model, image_processor, _ = load_pretrained_model(
        args.model_path, args.model_base, model_name, device=str(device), torch_dtype=dtype,
        attn_implementation=args.attn_implementation, pruning=build_pruning_config(args),
    )
    return tokenizer, model, image_processor, model_name


def _strip_prompt_ids(output_ids, input_ids):
    """Generated ids only (some generate paths return the prompt too)."""
    n = input_ids.shape[1]
    if output_ids.shape[1] > n and bool((output_ids[0, :n] == input_ids[0].to(output_ids.device)).all()):
        return output_ids[:, n:]
    return output_ids


def _generation_kwargs(args: argparse.Namespace) -> dict:
    kw: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams, "use_cache": True}
    if args.temperature > 0:
        kw.update(do_sample=True, temperature=args.temperature)
        if args.top_p is not None:
            kw["top_p"] = args.top_p
    else:
        kw["do_sample"] = False
    return kw


def _generate_answer(model, tokenizer, sample: EvalSample, input_ids, pixels, image_size, gen_kwargs: dict) -> tuple[str, int]:
    """Greedy (or sampled) answer text and the number of visual tokens that reached the LLM (0 without image)."""
    param = next(model.parameters())
    input_ids = input_ids.unsqueeze(0).to(param.device)  # (1, L)
    images = _to_device(pixels, param.device, param.dtype)
    extra_inputs: dict[str, Any] = {}
    if images is not None:
        extra_inputs = {"images": images, "image_sizes": [image_size], "texts": [sample.query]}
    output_ids = model.generate(input_ids, **extra_inputs, **gen_kwargs)
    text = tokenizer.batch_decode(_strip_prompt_ids(output_ids, input_ids), skip_special_tokens=True)[0].strip()
    counts = getattr(model, "last_visual_token_counts", None) if images is not None else None
    return text, int(counts[0]) if counts else 0


def _answer_line(sample: EvalSample, text: str, model_id: str, method: str, budget: int, params: dict,
                 visual_tokens: int) -> dict:
    """`{question_id, [round_id,] prompt, text, [options, option_char,] answer_id, model_id, metadata}`."""
    extra = dict(sample.extra)
    head = {"question_id": sample.question_id}
    if "round_id" in extra:
        head["round_id"] = extra.pop("round_id")
    return {
        **head, "prompt": sample.prompt_field, "text": text, **extra,
        "answer_id": uuid.uuid4().hex, "model_id": model_id,
        "metadata": {"method": method, "budget": budget, "params": params, "visual_tokens": visual_tokens},
    }


def run_generation(args: argparse.Namespace, samples: list[EvalSample]) -> int:
    """Answer this process's chunk of `samples` into `--answers-file`; returns the number of new answers."""
    import torch
    from tqdm import tqdm

    pruning = build_pruning_config(args)  # validate the flags even when there is nothing left to answer
    chunk = get_chunk(samples, args.num_chunks, args.chunk_idx)
    writer = ResumableJsonlWriter(os.path.expanduser(args.answers_file))
    current = run_settings({"method": pruning.method if pruning else "none", "budget": args.visual_token_num,
                            "params": pruning.params if pruning else {}})
    other = writer.settings - {current}
    if other:
        writer.close()
        raise ValueError(
            f"--answers-file {args.answers_file} holds answers of another setting (method, budget, params) "
            f"{sorted(other)} than this run {current}; write to another file (scripts: set RUN_TAG) or delete it")
    todo = [s for s in chunk if s.key not in writer]
    if writer.repaired:
        print(f"[resume] dropped a partial last line of {args.answers_file}", file=sys.stderr)
    if len(todo) < len(chunk):
        print(f"[resume] {len(chunk) - len(todo)} of {len(chunk)} answers already in {args.answers_file}", file=sys.stderr)
    if not todo:
        writer.close()
        return 0
    crash_after = int(os.environ.get(CRASH_ENV, "0") or 0)

    tokenizer, model, image_processor, model_name = load_model(args)
    on_gpu = next(model.parameters()).device.type == "cuda"
    num_workers = args.num_workers if args.num_workers is not None else (4 if on_gpu else 0)
    dataset = _SampleDataset(todo, tokenizer, image_processor, model.config, args.conv_mode)
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, shuffle=False, num_workers=num_workers,
                                         collate_fn=_first)
    method = pruning.method if pruning is not None else "none"
    params = pruning.params if pruning is not None else {}
    gen_kwargs = _generation_kwargs(args)
    written = 0
    bar = tqdm(total=len(chunk), initial=len(chunk) - len(todo), desc=f"{model_name} {method}@{args.visual_token_num}",
               dynamic_ncols=True)
    with writer, torch.inference_mode():
        for sample, input_ids, pixels, image_size in loader:
            text, visual_tokens = _generate_answer(model, tokenizer, sample, input_ids, pixels, image_size, gen_kwargs)
            row = _answer_line(sample, text, model_name, method, args.visual_token_num, params, visual_tokens)
            if crash_after and written >= crash_after:
                writer.write_partial_and_die(row)
            writer.write(row)
            written += 1
            bar.set_postfix(visual_tokens=visual_tokens)
            bar.update(1)
    bar.close()
    return written


"""Efficiency of visual token pruning, measured and theoretical (the paper's Table 6, in the open).

    python -m llava.eval.efficiency --flops-only --shape llava-v1.6-vicuna-7b --budgets 576,128,64,32
    python -m llava.eval.efficiency --random-weights --shape internvl3-8b --layers 2 --vision-layers 2 \
        --methods script,divprune,fastv --budgets 64 --repeats 3 --json out.json
    python -m llava.eval.efficiency --model-path PATH --methods script --budgets 64

Every measured row is one transformers VLM (``LlavaForConditionalGeneration``, ``LlavaNext...``,
``LlavaOnevision...`` for LLaVA-Video, ``InternVL...``, ``Qwen2_5_VL...``) of the requested shape, built
from transformers' config classes with random weights (or a checkpoint), pruned by the public layer
``script_prune.patch.apply(model, method, budget, ...)`` and run by ``model.generate`` on one prompt
(``--text-tokens`` text positions around the visual placeholders), warm-up runs first, then the median
over ``--repeats``:

- ``prefill_ms``: generate()'s first step (vision tower, selection, LLM prefill, first token) and
  ``decode_ms_per_token``: the next ``--decode-tokens - 1`` steps, from a streamer's timestamps;
- the stages of the pruned prefill, from the layer's stage timer (``script_prune.patch.set_stage_timer``):
  ``vision_ms`` (vision tower + projector), ``select_ms`` (relevance inputs + selection),
  ``llm_prefill_ms`` (the language model on the shortened prompt; in-LLM methods such as FastV select
  inside it). The unpruned row runs the stock forward, which has no stages: its ``vision_ms`` is the stock
  ``get_image_features`` and its ``llm_prefill_ms`` the stock forward over ``inputs_embeds`` of the same
  length, each run apart;
- ``kv_cache_mb``: the cache tensors generate() returns, at the prefill's positions; ``peak_mem_mb``:
  CUDA peak allocated on a GPU, the process's peak RSS on a CPU (``peak_mem_kind`` says which);
- ``llm_visual_tokens``: visual tokens that reached the LLM (``script_prune.patch.visual_tokens``: kept,
  merged and layout tokens; in-LLM methods: those left after their layer), ``kept_tokens``: the selected
  tokens over all rows (``script_prune.patch.kept``).

Every registry method is measured the same way; in-LLM methods get ``layer=--fastv-k`` when they take
``layer`` (K = layers - 1 when a truncated LLM has no layer after K; the row says so). A method the
layer refuses for the family (e.g. VisionZip on InternVL) gets a row with ``measured: false`` and the
reason. FLOPs: the paper's convention on the full-depth shape (``llava/eval/flops.py``; in-LLM methods
layer-aware through its ``IN_LLM_LAYER_TOKENS``).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

import script_prune as sp
from llava.eval import flops as F
from script_prune.patch.family import output_cache_field

BASELINE = "none"  # the unpruned model's row
MIB = 2**20


# ----------------------------------------------------------------------------------------- settings
@dataclass
class BenchSettings:
    """What to measure and how often."""

    methods: list[str]
    budgets: list[int]
    repeats: int = 3
    warmup: int = 1
    decode_tokens: int = 8
    text_tokens: int = 60
    query_tokens: int = 12
    fastv_k: int = 2
    seed: int = 0
    include_baseline: bool = True
    #: method -> parameters ``apply`` gets for it (``--param method:key=value``), e.g. PDrop's ``layers``
    params: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        known = set(sp.list_methods()) | {BASELINE}
        bad = [m for m in self.methods if m not in known]
        if bad:
            raise ValueError(f"methods {bad} are not known; choose from {sorted(known)}")
        for method, params in self.params.items():
            if method not in self.methods:
                raise ValueError(f"--param names method {method!r}, which is not among --methods {self.methods}")
            sp.check_params(method, params)
        if not self.budgets or any(not isinstance(b, int) or b < 1 for b in self.budgets):
            raise ValueError(f"budgets must be a non-empty list of ints >= 1, got {self.budgets!r}")
        for name in ("repeats", "text_tokens", "query_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.decode_tokens < 2:
            raise ValueError(f"decode_tokens must be >= 2 (the first token comes from the prefill), "
                             f"got {self.decode_tokens}")
        if self.warmup < 0 or self.fastv_k < 1:
            raise ValueError(f"warmup must be >= 0 and fastv_k >= 1, got {self.warmup}, {self.fastv_k}")


# ----------------------------------------------------------------------------------------- models
#: Which transformers family builds each shape of ``llava.eval.flops.SHAPES``.
SHAPE_FAMILY = {"llava-v1.5-7b": "llava", "llava-v1.5-13b": "llava", "tiny": "llava",
                "llava-v1.6-vicuna-7b": "llava_next", "llava-v1.6-vicuna-13b": "llava_next", "tiny-next": "llava_next",
                "llava-video-7b": "llava_video", "tiny-video": "llava_video",
                "internvl3-8b": "internvl", "tiny-internvl": "internvl",
                "qwen2.5-vl-7b": "qwen2_5_vl", "tiny-qwen-vl": "qwen2_5_vl"}
#: Visual placeholder ids: the last ids of the vocabulary (text ids are drawn below them).
IMAGE_ID, VIDEO_ID, START_ID, END_ID = -1, -2, -3, -4
RESERVED = 8


@dataclass
class Bench:
    """A VLM ready to measure: the model, its shape, one prompt, and how the layer gets relevance.

    inputs: generate()'s keyword arguments for one prompt (input_ids (1, L), attention_mask, pixels...);
    placeholders: visual placeholder positions of the prompt; relevance: ``apply``'s ``relevance``
    (None: the family's default); query: texts for ``set_query`` (the ``clip_text`` source), or None;
    pooling: LLaVA-Video's frame pooling set on the model (``set_video_pooling``), or None.
    """

    model: torch.nn.Module
    shape: F.ModelShape
    inputs: dict[str, torch.Tensor]
    placeholders: int
    relevance: Any = None
    query: list[str] | None = None
    source: str = "random-weights"
    clock: str = "wall"  # a key of CLOCKS
    pooling: str | None = None

    @property
    def device(self) -> torch.device:
        return self.inputs["input_ids"].device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def text_config(self) -> Any:
        return self.model.config.get_text_config()

    @property
    def layers_run(self) -> int:
        return int(self.text_config.num_hidden_layers)


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Temporarily make ``dtype`` torch's default floating dtype (new parameters are created in it)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _fill_parameters(module: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """Fast deterministic pseudo-random fill (tiles a prime-length random pool; norms get 1, biases 0).

    Initialising 7B-shaped layers with normal_ takes tens of seconds on a small CPU; the values only
    need to be finite and non-degenerate for timing and for the selection methods to see varied tokens."""
    gen = torch.Generator().manual_seed(seed)
    size = 1_048_573  # prime length: consecutive rows of a weight do not repeat in step
    pool = torch.randn(size, generator=gen) * std
    pool2 = torch.cat([pool, pool])  # any window of `size` values is a view into this
    with torch.no_grad():
        for name, p in module.named_parameters():
            if pool2.device != p.device:
                pool2 = pool2.to(p.device)
            flat = p.data.view(-1)
            if p.ndim == 1:
                flat.fill_(1.0 if "norm" in name else 0.0)
                continue
            offset = int(torch.randint(0, size, (1,), generator=gen))
            window = pool2[offset:offset + size].to(p.dtype)
            n, full = flat.numel(), flat.numel() // size
            if full:
                flat[: full * size].view(full, size).copy_(window.expand(full, size))
            flat[full * size:].copy_(window[: n - full * size])


def _text_config(llm: F.LLMShape, layers: int, model_type: str) -> dict[str, Any]:
    return dict(model_type=model_type, hidden_size=llm.hidden, intermediate_size=llm.intermediate,
                num_hidden_layers=layers, num_attention_heads=llm.heads, num_key_value_heads=llm.kv_heads,
                vocab_size=llm.vocab, max_position_embeddings=32768, tie_word_embeddings=False, pad_token_id=0)


def _vit_config(vision: F.VisionShape, layers: int, **extra: Any) -> dict[str, Any]:
    return dict(hidden_size=vision.hidden, intermediate_size=vision.intermediate, num_hidden_layers=layers,
                num_attention_heads=vision.heads, image_size=vision.image_size, patch_size=vision.patch_size, **extra)


def model_config(shape: F.ModelShape, layers: int, vision_layers: int) -> Any:
    """transformers' config of ``shape`` with ``layers`` LLM and ``vision_layers`` vision-tower layers."""
    from transformers import (InternVLConfig, LlavaConfig, LlavaNextConfig, LlavaOnevisionConfig,
                              Qwen2_5_VLConfig)

    family, llm, vision = SHAPE_FAMILY[shape.name], shape.llm, shape.vision
    ids = {name: llm.vocab + offset for name, offset in
           (("image", IMAGE_ID), ("video", VIDEO_ID), ("start", START_ID), ("end", END_ID))}
    if family in ("llava", "llava_next"):
        text = _text_config(llm, layers, "llama")
        clip = dict(model_type="clip_vision_model", projection_dim=vision.projection_dim, hidden_act="quick_gelu",
                    **_vit_config(vision, vision_layers))
        common = dict(text_config=text, vision_config=clip, image_token_index=ids["image"], vision_feature_layer=-2,
                      vision_feature_select_strategy="default")
        if family == "llava":
            return LlavaConfig(**common)
        tile = vision.image_size
        pinpoints = [[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile], [tile, 3 * tile], [3 * tile, tile]]
        return LlavaNextConfig(image_grid_pinpoints=pinpoints, **common)
    qwen = _text_config(llm, layers, "qwen2")
    if family == "llava_video":
        siglip = dict(model_type="siglip_vision_model", **_vit_config(vision, vision_layers))
        return LlavaOnevisionConfig(text_config=qwen, vision_config=siglip, image_token_index=ids["image"],
                                    video_token_index=ids["video"], vision_feature_layer=-1,
                                    vision_feature_select_strategy="full")
    if family == "internvl":
        tile = _vit_config(vision, vision_layers)
        tile.update(image_size=[vision.image_size] * 2, patch_size=[vision.patch_size] * 2)
        return InternVLConfig(text_config=qwen, vision_config=tile, image_token_id=ids["image"],
                              vision_feature_layer=-1, vision_feature_select_strategy="default",
                              downsample_ratio=0.5)
    head_dim = llm.hidden // llm.heads  # M-RoPE sections (t, h, w) of half the head dim, as Qwen2.5-VL: 1/4, 3/8, 3/8
    sections = [head_dim // 8, 3 * head_dim // 16, head_dim // 2 - head_dim // 8 - 3 * head_dim // 16]
    qwen["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": sections}
    window = 8 * vision.patch_size * 2  # 112 px at patch 14: 4 x 4 merged tokens per window
    full_attention = [i for i in range(vision_layers) if i % 8 == 7] or [vision_layers - 1]
    vit = dict(depth=vision_layers, hidden_size=vision.hidden, intermediate_size=vision.intermediate,
               num_heads=vision.heads, out_hidden_size=llm.hidden, patch_size=vision.patch_size, spatial_merge_size=2,
               temporal_patch_size=vision.temporal_patch, window_size=window, fullatt_block_indexes=full_attention,
               tokens_per_second=2)
    return Qwen2_5_VLConfig(text_config=qwen, vision_config=vit, image_token_id=ids["image"],
                            video_token_id=ids["video"], vision_start_token_id=ids["start"],
                            vision_end_token_id=ids["end"])


#: Attention implementations the tool builds models with (``--attn-implementation``).
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


def check_attn_implementation(name: str) -> str:
    """``name`` if the tool can build models with it here (flash_attention_2 needs the flash_attn package)."""
    if name not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {name!r}")
    if name == "flash_attention_2":
        from transformers.utils import is_flash_attn_2_available

        if not is_flash_attn_2_available():
            raise ValueError("attn_implementation 'flash_attention_2' needs the flash_attn package and a CUDA GPU")
    return name


def build_model(config: Any, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0,
                cls: Any = None, attn_implementation: str = "sdpa") -> torch.nn.Module:
    """The transformers model of ``config`` (``cls``, default: transformers' VLM class for it) with random weights,
    built in place on ``device`` (no fp32 copy first; on ``"meta"``: shapes only, no values), every sub-model
    (vision tower, LLM) with ``attn_implementation``."""
    from transformers import AutoModelForImageTextToText
    from transformers.initialization import no_init_weights

    config._attn_implementation = check_attn_implementation(attn_implementation)  # set on the sub-configs too
    with no_init_weights(), torch.device(device), _default_dtype(dtype):
        model = AutoModelForImageTextToText.from_config(config) if cls is None else cls(config)
    if torch.device(device).type != "meta":
        _fill_parameters(model, seed)
    return model.to(device=device, dtype=dtype).eval()


def _text_ids(count: int, vocab: int, gen: torch.Generator) -> list[int]:
    return torch.randint(3, vocab - RESERVED, (count,), generator=gen).tolist()


def visual_prompt(shape: F.ModelShape, family: str, config: Any, text_tokens: int, gen: torch.Generator,
                  device: torch.device, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], int]:
    """One prompt for ``shape`` on ``family`` (a value of ``SHAPE_FAMILY``): 3/5 of the text, the visual placeholders
    as the family's processor lays them out, the rest of the text; random pixels. -> generate()'s inputs, placeholder
    count."""
    vision = shape.vision
    side, tile = vision.patches_per_side, vision.image_size
    vocab = config.get_text_config().vocab_size
    text = _text_ids(text_tokens, vocab, gen)
    prefix, suffix = text[: text_tokens * 3 // 5], text[text_tokens * 3 // 5:]
    pixels = lambda *size: torch.randn(*size, generator=gen).to(device, dtype)  # noqa: E731
    inputs: dict[str, torch.Tensor] = {}
    if family == "llava":
        count, marker = side * side, config.image_token_index
        inputs["pixel_values"] = pixels(1, 3, tile, tile)
    elif family == "llava_next":  # a 2x2-tile square image: base row + 2s x 2s grid with a newline per grid row
        grid = math.isqrt(shape.crops - 1)
        if grid * grid != shape.crops - 1 or [grid * tile] * 2 not in config.image_grid_pinpoints:
            raise ValueError(f"shape {shape.name}: the LLaVA-NeXT prompt is a square image of {shape.crops - 1} tiles, "
                             f"which needs pinpoint {[grid * tile] * 2} in image_grid_pinpoints")
        count, marker = side * side + grid * side * (grid * side + 1), config.image_token_index
        inputs.update(pixel_values=pixels(1, shape.crops, 3, tile, tile),
                      image_sizes=torch.tensor([[grid * tile, grid * tile]], device=device))
    elif family == "llava_video":  # frames pooled 2x2 (LLaVA-Video), one newline after the video
        count, marker = shape.crops * shape.tokens_per_crop + 1, config.video_token_index
        inputs["pixel_values_videos"] = pixels(1, shape.crops, 3, tile, tile)
    elif family == "internvl":  # tiles + thumbnail, 256 tokens each, one contiguous run
        count, marker = shape.crops * shape.tokens_per_crop, config.image_token_id
        inputs["pixel_values"] = pixels(shape.crops, 3, tile, tile)
    elif family == "qwen2_5_vl":  # one image of side x side patches, 2x2 merged, between vision start / end
        count, marker = shape.tokens_per_crop, config.image_token_id
        prefix, suffix = prefix + [config.vision_start_token_id], [config.vision_end_token_id] + suffix
        inputs.update(pixel_values=pixels(side * side, 3 * vision.temporal_patch * vision.patch_size ** 2),
                      image_grid_thw=torch.tensor([[1, side, side]], device=device))
    else:
        raise ValueError(f"no prompt layout for family {family!r}")
    ids = torch.tensor([prefix + [marker] * count + suffix], device=device)
    inputs.update(input_ids=ids, attention_mask=torch.ones_like(ids))
    if family == "qwen2_5_vl":
        inputs["mm_token_type_ids"] = (ids == marker).int()
    return inputs, count


class FixedIds:
    """A stand-in CLIP tokenizer for random weights: every question is the same ``count`` random token ids."""

    def __init__(self, count: int, vocab: int, seed: int) -> None:
        self.ids = torch.randint(1, vocab - 1, (count,), generator=torch.Generator().manual_seed(seed)).tolist()

    def __call__(self, text: str) -> Any:
        from types import SimpleNamespace

        return SimpleNamespace(input_ids=list(self.ids))


def random_clip_text(vision: F.VisionShape, query_tokens: int, device: Any, dtype: torch.dtype,
                     seed: int) -> sp.patch.ClipText:
    """The ``clip_text`` relevance source of a LLaVA shape with random weights: CLIP's text tower at the
    ViT-L/14 text shape (tiny shapes: a tiny one), a visual projection, ``query_tokens`` fixed random ids."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    big = vision.hidden >= 512
    cfg = CLIPTextConfig(hidden_size=768 if big else 32, intermediate_size=3072 if big else 64,
                         num_hidden_layers=12 if big else 2, num_attention_heads=12 if big else 4,
                         projection_dim=vision.projection_dim, vocab_size=49408, max_position_embeddings=77,
                         hidden_act="quick_gelu")
    text = build_model(cfg, device, dtype, seed + 1, cls=CLIPTextModelWithProjection)
    projection = torch.nn.Linear(vision.hidden, vision.projection_dim, bias=False, device=device, dtype=dtype)
    _fill_parameters(projection, seed + 2)
    return sp.patch.ClipText(text, projection, FixedIds(query_tokens, cfg.vocab_size, seed))


def random_bench(shape_name: str, layers: int | None = None, vision_layers: int | None = None, *,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0,
                 text_tokens: int = 60, query_tokens: int = 12, with_text_tower: bool = True,
                 attn_implementation: str = "sdpa") -> Bench:
    """A VLM with a real shape and random weights (``layers`` LLM / ``vision_layers`` ViT layers; default all),
    its attention ``attn_implementation``."""
    shape = F.get_shape(shape_name)
    n_layers = shape.llm.layers if layers is None else layers
    n_vision = shape.vision.layers if vision_layers is None else vision_layers
    if n_layers < 1 or n_vision < 1:
        raise ValueError(f"layers and vision_layers must be >= 1, got {layers}, {vision_layers}")
    config = model_config(shape, n_layers, n_vision)
    model = build_model(config, device, dtype, seed, attn_implementation=attn_implementation)
    device = torch.device(device)
    family = SHAPE_FAMILY[shape.name]
    inputs, count = visual_prompt(shape, family, config, text_tokens, torch.Generator().manual_seed(seed), device,
                                  dtype)
    bench = Bench(model, shape, inputs, count)
    if family in ("llava", "llava_next") and with_text_tower:
        bench.relevance = random_clip_text(shape.vision, query_tokens, device, dtype, seed)
        bench.query = ["(random query ids)"]
    if family == "llava_video":
        bench.pooling = "average"
    return bench


def checkpoint_bench(model_path: str, *, device: str = "cpu", dtype: torch.dtype | None = None,
                     query: str = "Is there a person in the image?", text_tokens: int = 60, seed: int = 0) -> Bench:
    """A LLaVA checkpoint loaded with ``llava.model.builder.load_pretrained_model`` (its transformers model,
    ``.hf``), its CLIP relevance source with ``query``, random pixels: 1 image (LLaVA-1.5) or a 2x2-tile
    square image (LLaVA-NeXT)."""
    if not os.path.isdir(model_path):
        raise FileNotFoundError(f"model_path {model_path!r} is not a directory")
    from llava.model.builder import load_pretrained_model

    _, adapter, _, _ = load_pretrained_model(model_path, device=device, torch_dtype=dtype)
    hf = adapter.hf.eval()
    cfg, vcfg = hf.config.text_config, hf.config.vision_config
    llm = F.LLMShape(hidden=cfg.hidden_size, intermediate=cfg.intermediate_size, layers=cfg.num_hidden_layers,
                     heads=cfg.num_attention_heads, kv_heads=getattr(cfg, "num_key_value_heads", None) or
                     cfg.num_attention_heads, vocab=cfg.vocab_size)
    vision = F.VisionShape(hidden=vcfg.hidden_size, intermediate=vcfg.intermediate_size, layers=vcfg.num_hidden_layers,
                           heads=vcfg.num_attention_heads, image_size=vcfg.image_size, patch_size=vcfg.patch_size,
                           projection_dim=getattr(vcfg, "projection_dim", 768))
    projector = hf.model.multi_modal_projector
    widths = tuple(m.out_features for m in projector.modules() if isinstance(m, torch.nn.Linear))[:-1]
    family = "llava_next" if adapter.next_layout else "llava"
    shape = F.ModelShape(os.path.basename(os.path.normpath(model_path)), llm, vision,
                         crops=5 if adapter.next_layout else 1, projector_hidden=widths)
    inputs, count = visual_prompt(shape, family, hf.config, text_tokens, torch.Generator().manual_seed(seed), hf.device,
                                  hf.dtype)
    return Bench(hf, shape, inputs, count, relevance=adapter.relevance_source(), query=[query], source=model_path)


# ----------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS: dict[str, Callable[[], float]] = {
    "wall": time.perf_counter,  # elapsed time (what a user waits for)
    "process": time.process_time,  # CPU time of this process, all threads (robust to other load on a CPU)
}


class StageTimer:
    """The layer's stage timer (``script_prune.patch.set_stage_timer``): device-synchronised ms per stage."""

    def __init__(self, clock: Callable[[], float], device: torch.device) -> None:
        self.clock, self.device = clock, device
        self.times: dict[str, list[float]] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        _sync(self.device)
        start = self.clock()
        yield
        _sync(self.device)
        self.times.setdefault(stage, []).append((self.clock() - start) * 1e3)


class StepClock:
    """A generate() streamer that only notes when each step's tokens are ready (device synchronised):
    the prompt, then the first token (after the prefill), then one per decoding step."""

    def __init__(self, clock: Callable[[], float], device: torch.device) -> None:
        self.clock, self.device = clock, device
        self.stamps: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        _sync(self.device)
        self.stamps.append(self.clock())

    def end(self) -> None:
        pass

    def split(self) -> tuple[float, float]:
        """(prefill ms, decode ms per token) of the generate() call that just ran."""
        if len(self.stamps) < 3:
            raise RuntimeError(f"generate() produced {len(self.stamps) - 1} token(s); timing needs at least 2")
        first, last = self.stamps[1], self.stamps[-1]
        return (first - self.stamps[0]) * 1e3, (last - first) * 1e3 / (len(self.stamps) - 2)


def _reset_peak(device: torch.device) -> str:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return "cuda_peak_allocated"
    try:  # Linux: writing 5 resets the process's peak RSS (VmHWM)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return "cpu_peak_rss"
    except OSError:
        return "cpu_peak_rss_process_lifetime"


def _peak_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MIB
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / MIB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MIB


def cache_nbytes(cache: Any, positions: int | None = None) -> int:
    """Bytes of a transformers KV cache's keys and values (every layer); with ``positions``, of its first
    ``positions`` sequence positions only (the prefill's, when generate() has appended decoded tokens)."""
    total = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):  # (B, kv_heads, S, head_dim)
            if isinstance(t, torch.Tensor) and t.numel():
                kept = t.shape[2] if positions is None else min(positions, t.shape[2])
                total += t.numel() // t.shape[2] * kept * t.element_size()
    return total


def _median(xs: list[float]) -> float | None:
    return float(statistics.median(xs)) if xs else None


# ----------------------------------------------------------------------------------------- rows
def method_params(bench: Bench, method: str, settings: BenchSettings) -> tuple[dict[str, Any], str | None]:
    """The parameters ``apply`` gets for ``method`` (the user's ``--param`` ones; in-LLM ``layer``: ``--fastv-k``
    fitted to the LLM that runs unless given) and a note."""
    if method == BASELINE:
        return {}, None
    spec = sp.get_method(method)
    given = dict(settings.params.get(method, {}))
    if spec.stage != "llm" or "layer" not in spec.params or "layer" in given:
        return given, None
    k = max(1, min(settings.fastv_k, bench.layers_run - 1))
    note = None if k == settings.fastv_k else (
        f"{method}: K={k} in the {bench.layers_run}-layer LLM that ran (K={settings.fastv_k} needs more layers); "
        f"tflops use K={settings.fastv_k} on the full model")
    return {**given, "layer": k}, note


def flops_row(shape: F.ModelShape, method: str, budget: int, settings: BenchSettings, full: bool) -> dict[str, Any]:
    """The theoretical part of a row (paper convention; in-LLM methods layer-aware, or None without a rule)."""
    n_vis = shape.visual_tokens(budget)
    params = {"layer": settings.fastv_k, **settings.params.get(method, {})}
    row: dict[str, Any] = {
        "shape": shape.name, "method": method, "budget": budget, "visual_tokens": n_vis,
        "tflops_paper_proportional": F.paper_proportional_tflops(n_vis, shape.full_visual_tokens, shape.llm),
        "kv_visual_fp16_mb": F.kv_cache_bytes(shape.llm, n_vis, 2) / MIB,
    }
    in_llm = method != BASELINE and sp.get_method(method).stage == "llm"
    if in_llm and method not in F.IN_LLM_LAYER_TOKENS:
        row.update(tflops=None, flops_reduction=None, tflops_convention=(
            f"no FLOPs rule for in-LLM method {method!r} (add it to IN_LLM_LAYER_TOKENS in llava/eval/flops.py)"))
        return row
    tflops = F.method_tflops(shape, method, budget, params=params)
    row.update(tflops=tflops, flops_reduction=F.paper_tflops(shape.full_visual_tokens, shape.llm) / tflops,
               tflops_convention=F.PAPER_CONVENTION + (
                   f"; {method}: visual tokens per layer from IN_LLM_LAYER_TOKENS, layer={settings.fastv_k}, "
                   f"first layers at {shape.full_visual_tokens} tokens" if in_llm else ""))
    if full:
        row["flops_full"] = F.full_prefill_breakdown(shape, n_vis, settings.text_tokens,
                                                     method=method if in_llm else None, params=params)
    return row


@contextmanager
def pruned(bench: Bench, method: str, budget: int, params: dict[str, Any], timer: StageTimer) -> Iterator[None]:
    """``bench.model`` pruned by the public layer for the duration (the unpruned row: whole rows kept, which
    runs the stock forward, or for LLaVA-Video's 2x2 pooling the layer's prefill keeping everything)."""
    from script_prune.patch.llava_onevision import set_video_pooling

    model = bench.model
    if bench.pooling is not None:
        set_video_pooling(model, bench.pooling)
    if method == BASELINE:
        sp.patch.apply(model, method="random", budget=bench.shape.tokens_per_crop)
    else:
        sp.patch.apply(model, method=method, budget=budget, relevance=bench.relevance, **params)
    try:
        if bench.query is not None:
            sp.patch.set_query(model, bench.query)
        sp.patch.set_stage_timer(model, timer)
        yield
    finally:
        sp.patch.remove(model)


def stock_stages(bench: Bench, timer: StageTimer) -> None:
    """The unpruned row's stages, which the stock forward does not time apart: ``"vision"``, the stock
    ``get_image_features`` on the prompt's pixels; ``"llm"``, the stock forward over ``inputs_embeds`` of the
    prompt's length (no pixels)."""
    model, inputs = bench.model, bench.inputs
    accepts = inspect.signature(model.get_image_features).parameters
    pixels = {key: value for key, value in inputs.items()
              if key in accepts and key not in ("input_ids", "attention_mask")}
    length = inputs["input_ids"].shape[1]
    embeds = model.get_input_embeddings()(inputs["input_ids"][:, :1]).expand(-1, length, -1).contiguous()
    with timer("vision"):
        model.get_image_features(**pixels)
    with timer("llm"):
        model(inputs_embeds=embeds, attention_mask=torch.ones_like(inputs["input_ids"]), use_cache=True,
              logits_to_keep=1)


def measure_row(bench: Bench, method: str, budget: int, settings: BenchSettings) -> dict[str, Any]:
    """Measured part of one row: stages, prefill, decode, KV cache, peak memory, visual tokens."""
    params, note = method_params(bench, method, settings)
    device, clock = bench.device, CLOCKS[bench.clock]
    timer = StageTimer(clock, device)
    kind = _reset_peak(device)
    samples: dict[str, list[float]] = {"prefill": [], "decode": []}
    try:
        with pruned(bench, method, budget, params, timer):
            for rep in range(settings.warmup + settings.repeats):
                if rep == settings.warmup:
                    timer.times.clear()
                steps = StepClock(clock, device)
                out = bench.model.generate(**bench.inputs, max_new_tokens=settings.decode_tokens,
                                           min_new_tokens=settings.decode_tokens, do_sample=False, streamer=steps,
                                           return_dict_in_generate=True, pad_token_id=0)
                if rep >= settings.warmup:
                    for key, value in zip(("prefill", "decode"), steps.split()):
                        samples[key].append(value)
                cache = getattr(out, output_cache_field(type(out)))
                positions = cache.get_seq_length() - (settings.decode_tokens - 1)  # the prefill's positions
                kv_bytes = cache_nbytes(cache, positions)
                del out, cache
            visual = sum(sp.patch.visual_tokens(bench.model))
            kept = sum(len(k) for k in sp.patch.kept(bench.model))
            stock = not timer.times  # the stock forward ran (whole rows kept): time its stages apart
            for rep in range(settings.warmup + settings.repeats if stock else 0):
                if rep == settings.warmup:
                    timer.times.clear()
                stock_stages(bench, timer)
            stages = {name: _median(times) for name, times in timer.times.items()}
    except ValueError as err:  # the layer refuses this method / budget for the family: say so in the row
        return {"measured": False, "note": f"{method}: {err}"}
    prefill_ms, spec = _median(samples["prefill"]), None if method == BASELINE else sp.get_method(method)
    llm_ms = stages["llm"]
    text_positions = bench.inputs["input_ids"].shape[1] - bench.placeholders
    row = {
        "measured": True,
        "llm_visual_tokens": visual,  # visual tokens that reached the LLM (in-LLM methods: after their layer)
        "kept_tokens": kept,  # selected tokens over all rows
        "text_positions": text_positions,
        "seq_len": bench.inputs["input_ids"].shape[1],  # the unpruned prompt
        "cached_positions": positions,  # positions held in the KV cache after the prefill
        "vision_ms": stages["vision"],
        "select_ms": None if method == BASELINE else stages.get("select"),
        "llm_prefill_ms": llm_ms,
        "prefill_ms": prefill_ms,
        "select_pct_of_llm_prefill": (None if method == BASELINE or stages.get("select") is None
                                      else 100.0 * stages["select"] / llm_ms),
        "decode_ms_per_token": _median(samples["decode"]),
        "kv_cache_mb": kv_bytes / MIB,
        "kv_cache_source": f"measured from the cache tensors generate() returns, {positions} prefill positions, "
                           f"{bench.layers_run} layers, {str(bench.dtype).replace('torch.', '')}",
        "stage_source": ("stock model, stages run apart: get_image_features, and the forward over inputs_embeds of "
                         "the prompt's length" if stock else "script_prune.patch.set_stage_timer"),
        "peak_mem_mb": _peak_mb(device),
        "peak_mem_kind": kind,
    }
    if spec is not None and spec.stage == "llm":
        row["select_note"] = "in-LLM: score row + selection happen inside llm_prefill_ms"
        row.update({f"{method}_{name}_run": value for name, value in params.items()})
    if note:
        row["note"] = note
    return row


def run_benchmark(bench: Bench | None, shape: F.ModelShape, settings: BenchSettings, *,
                  full: bool = False, progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """All rows: the baseline (unpruned) first, then every method x budget. ``bench=None``: FLOPs only."""
    combos = [(BASELINE, shape.tokens_per_crop)] if settings.include_baseline else []
    combos += [(m, b) for b in settings.budgets for m in settings.methods if m != BASELINE]
    rows = [flops_row(shape, m, b, settings, full) for m, b in combos]
    if bench is None:
        return rows
    torch.manual_seed(settings.seed)
    with torch.inference_mode():
        for row in rows:
            if progress:
                progress(f"measuring {row['method']} @ {row['budget']}")
            row.update(measure_row(bench, row["method"], row["budget"], settings))
            row.update({"device": str(bench.device), "dtype": str(bench.dtype).replace("torch.", ""),
                        "layers_run": bench.layers_run, "clock": bench.clock, "threads": torch.get_num_threads(),
                        "repeats": settings.repeats, "warmup": settings.warmup, "source": bench.source,
                        "text_tokens": settings.text_tokens, "decode_tokens": settings.decode_tokens,
                        "attn_implementation": getattr(bench.model.config, "_attn_implementation", None)})
    base = next((r for r in rows if r["method"] == BASELINE and r.get("measured")), None)
    if base is not None:
        for row in rows:
            if row.get("measured"):
                row["prefill_speedup"] = base["prefill_ms"] / row["prefill_ms"]
                row["llm_prefill_speedup"] = base["llm_prefill_ms"] / row["llm_prefill_ms"]
                row["decode_speedup"] = base["decode_ms_per_token"] / row["decode_ms_per_token"]
    return rows


# ----------------------------------------------------------------------------------------- output
def _tflops_text(v: float | None) -> str:
    """3 decimals like the paper; small (tiny-model) values in scientific notation; no rule: "?"."""
    if v is None:
        return "?"
    return f"{v:.3f}" if v >= 0.01 else f"{v:.2e}"


def _flops_cell(r: dict[str, Any]) -> str:
    if r["tflops"] is None:
        return "? (no rule in flops.py)"
    return f"{_tflops_text(r['tflops'])} (x{r['flops_reduction']:.1f})"


def _fmt(v: Any, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def format_table(rows: list[dict[str, Any]]) -> str:
    """Table 6's layout: method, tokens, FLOPs (xreduction), prefill and LLM prefill (xspeedup), decode, KV, memory,
    then the stages (vision, selection and its share of the LLM prefill)."""
    if not any("measured" in r for r in rows):
        return _format_flops_table(rows)
    head = ["Method", "# Token", "FLOPs (T)", "Prefill (ms)", "LLM prefill (ms)", "Decode (ms/tok)", "KV cache (MB)",
            "Peak mem (MB)", "Vision (ms)", "Select (ms)", "Select % LLM"]
    lines = []
    for r in rows:
        name = "unpruned" if r["method"] == BASELINE else r["method"]
        if r.get("measured"):
            pre = f"{r['prefill_ms']:.1f} (x{r.get('prefill_speedup', 1.0):.2f})"
            llm = f"{r['llm_prefill_ms']:.1f} (x{r.get('llm_prefill_speedup', 1.0):.2f})"
            dec = f"{r['decode_ms_per_token']:.1f} (x{r.get('decode_speedup', 1.0):.2f})"
            cells = [pre, llm, dec, _fmt(r["kv_cache_mb"]), _fmt(r["peak_mem_mb"], ".0f"), _fmt(r["vision_ms"]),
                     _fmt(r["select_ms"], ".2f"), _fmt(r["select_pct_of_llm_prefill"], ".2f")]
        elif "measured" in r:
            cells = ["not measured"] + ["-"] * 7
        else:
            cells = ["-"] * 8
        lines.append([name, str(r["visual_tokens"]), _flops_cell(r), *cells])
    out = _aligned(head, lines)
    notes = [f"  {r['method']}@{r['budget']}: {r['note']}" for r in rows if r.get("note")]
    return "\n".join(out + notes)


def _aligned(head: list[str], lines: list[list[str]]) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt_line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return [fmt_line(head), fmt_line(["-" * w for w in widths])] + [fmt_line(c) for c in lines]


def _format_flops_table(rows: list[dict[str, Any]]) -> str:
    """--flops-only: formula TFLOPs, the paper's proportional scaling, Table 6's KV-cache convention."""
    head = ["Method", "# Token", "FLOPs (T), formula", "n/N scaling (T) (paper's NeXT rows)", "KV cache fp16, visual (MB)"]
    lines = [["unpruned" if r["method"] == BASELINE else r["method"], str(r["visual_tokens"]),
              _flops_cell(r), _tflops_text(r["tflops_paper_proportional"]),
              f"{r['kv_visual_fp16_mb']:.1f}"] for r in rows]
    return "\n".join(_aligned(head, lines))


def format_full(rows: list[dict[str, Any]]) -> str:
    """The --full breakdown, one line per row and term, with each term's convention."""
    out = []
    for r in rows:
        for term, entry in r.get("flops_full", {}).items():
            out.append(f"{r['method']}@{r['budget']}  {term:<16} {entry['tmacs']:8.3f} T  [{entry['convention']}]")
    return "\n".join(out)


def write_json(rows: list[dict[str, Any]], path: str) -> None:
    """Write rows atomically (temporary file + os.replace)."""
    out_dir = os.path.dirname(os.path.abspath(path))
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".json", dir=out_dir)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(rows, fh, indent=2, allow_nan=False, default=str)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ----------------------------------------------------------------------------------------- CLI
def _int_list(text: str, name: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise ValueError(f"{name} must be comma-separated integers, got {text!r}") from err


def _dtype(name: str, device: str) -> torch.dtype:
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    if name not in table:
        raise ValueError(f"dtype must be auto or one of {sorted(table)}, got {name!r}")
    return table[name]


def method_param_args(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["pdrop:layers=[2,6,12]", "script:tau=0.1"]`` -> ``{"pdrop": {"layers": [2, 6, 12]}, "script": {"tau": 0.1}}``."""
    from llava.eval.common import parse_pruning_params

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        method, sep, rest = item.partition(":")
        if not sep or not method or "=" not in rest:
            raise ValueError(f"--param: expected METHOD:KEY=VALUE, got {item!r}")
        out.setdefault(method, {}).update(parse_pruning_params([rest]))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llava.eval.efficiency", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model-path", help="LLaVA checkpoint folder to measure")
    src.add_argument("--random-weights", action="store_true", help="real shapes, random weights")
    p.add_argument("--shape", default="llava-v1.5-7b", help=f"one of {sorted(F.SHAPES)}")
    p.add_argument("--layers", type=int, default=None, help="LLM layers to build with --random-weights (default all)")
    p.add_argument("--vision-layers", type=int, default=None,
                   help="vision-tower layers to build with --random-weights (default all)")
    p.add_argument("--methods", default="script", help="comma-separated script_prune methods")
    p.add_argument("--pruning-method", default=None, help="alias of --methods with one method")
    p.add_argument("--budgets", default="64",
                   help="comma-separated tokens kept per visual row (image, crop, tile, frame)")
    p.add_argument("--no-baseline", action="store_true", help="skip the unpruned row")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--decode-tokens", type=int, default=8, help="tokens generated per run (>= 2)")
    p.add_argument("--text-tokens", type=int, default=60, help="text positions in the prompt")
    p.add_argument("--query-tokens", type=int, default=12,
                   help="random query length fed to the CLIP text tower (--random-weights, LLaVA shapes)")
    p.add_argument("--query", default="Is there a person in the image?", help="query text (--model-path)")
    p.add_argument("--fastv-k", type=int, default=2,
                   help="in-LLM methods with a 'layer' parameter (FastV) prune after this LLM layer")
    p.add_argument("--param", action="append", default=[], metavar="METHOD:KEY=VALUE",
                   help="a parameter for one method (repeatable; VALUE as JSON, e.g. pdrop:layers=[2,6,12])")
    p.add_argument("--flops-only", action="store_true", help="theoretical FLOPs only (no model, instant)")
    p.add_argument("--full", action="store_true", help="also count text tokens, vision tower and projector")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--clock", default="wall", choices=sorted(CLOCKS),
                   help="wall: elapsed time; process: CPU time of this process (a CPU shared with other jobs)")
    p.add_argument("--attn-implementation", default="sdpa", choices=ATTN_IMPLEMENTATIONS,
                   help="attention of the random-weights model (flash_attention_2 needs flash_attn on a GPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    return p


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        methods = [args.pruning_method] if args.pruning_method else [m for m in args.methods.split(",") if m]
        settings = BenchSettings(methods=methods, budgets=_int_list(args.budgets, "budgets"), repeats=args.repeats,
                                 warmup=args.warmup, decode_tokens=args.decode_tokens, text_tokens=args.text_tokens,
                                 query_tokens=args.query_tokens, fastv_k=args.fastv_k, seed=args.seed,
                                 include_baseline=not args.no_baseline, params=method_param_args(args.param))
        dtype = _dtype(args.dtype, args.device)
        if args.threads:
            torch.set_num_threads(args.threads)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        bench = None
        if args.flops_only:
            shape = F.get_shape(args.shape)
        elif args.model_path:
            bench = checkpoint_bench(args.model_path, device=args.device, dtype=dtype, query=args.query,
                                    text_tokens=args.text_tokens, seed=args.seed)
            shape = bench.shape
        elif args.random_weights:
            needs_text = any("query_embeds" in sp.get_method(m).inputs for m in methods if m != BASELINE)
            bench = random_bench(args.shape, args.layers, args.vision_layers, device=args.device, dtype=dtype,
                                seed=args.seed, text_tokens=args.text_tokens, query_tokens=args.query_tokens,
                                with_text_tower=needs_text, attn_implementation=args.attn_implementation)
            shape = bench.shape
        else:
            raise ValueError("pass --flops-only, --random-weights or --model-path")
        if bench is not None:
            if args.clock == "process" and bench.device.type != "cpu":
                raise ValueError("clock 'process' measures CPU time; use --clock wall on a GPU")
            bench.clock = args.clock
        if settings.fastv_k > shape.llm.layers:
            raise ValueError(f"fastv_k must be <= the model's {shape.llm.layers} layers, got {settings.fastv_k}")
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    rows = run_benchmark(bench, shape, settings, full=args.full,
                         progress=lambda s: print(s, file=sys.stderr, flush=True))
    where = "theoretical only" if bench is None else (
        f"{bench.source}, {bench.layers_run} LLM layers run, {rows[0].get('device')}, {rows[0].get('dtype')}, "
        f"{rows[0].get('attn_implementation')} attention, "
        f"median of {settings.repeats} after {settings.warmup} warm-up, {bench.clock} clock, "
        f"{torch.get_num_threads()} thread(s)")
    print(f"# {shape.name} ({where}); {shape.crops} visual row(s) of {shape.tokens_per_crop} tokens, "
          f"{rows[0].get('seq_len')} prompt positions" if bench else f"# {shape.name} ({where})")
    print(format_table(rows))
    if args.full:
        print(format_full(rows))
    if args.json:
        write_json(rows, args.json)
    return rows


if __name__ == "__main__":
    main()

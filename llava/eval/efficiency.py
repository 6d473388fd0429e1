"""Efficiency of visual token pruning, measured and theoretical (the paper's Table 6, in the open).

    python -m llava.eval.efficiency --flops-only --shape llava-v1.6-vicuna-7b --budgets 576,128,64,32
    python -m llava.eval.efficiency --random-weights --shape llava-v1.6-vicuna-7b --layers 2 \
        --methods script,divprune --budgets 64 --repeats 3 --json out.json
    python -m llava.eval.efficiency --model-path PATH --methods script --budgets 64

For every (method, budget) the tool runs the pipeline a LLaVA model runs, stage by stage, and
times each stage separately (warm-up runs first, then the median over ``--repeats``):

1. vision tower: CLIP ViT over all crops, selected layer (-2) patch features (shared by all rows);
2. method inputs: the CLIP text tower + visual projection for query methods, the [CLS]
   attention and keys of the selected layer for VisionZip (``inputs_ms``);
3. selection: the ``script_prune`` call alone (``select_ms``), plus the projector (``projector_ms``);
   selection methods select on the projected tokens, merging methods reduce the pre-projector
   features and project what is kept, as the pruning layer (``script_prune.patch``) does;
4. LLM prefill over ``inputs_embeds`` = text prefix + kept visual tokens + text suffix
   (``--text-tokens`` in all), logits for the last position only (``prefill_ms``);
5. greedy decoding of ``--decode-tokens`` tokens with the KV cache (``decode_ms_per_token``).

KV cache: ``kv_cache_mb`` is measured from the cache tensors after prefill (all tokens, the layers
that ran, the run dtype, MiB); ``kv_visual_fp16_mb`` is Table 6's convention (visual tokens only,
full depth, fp16: 1440 MiB at 2880 tokens). Peak memory: CUDA peak allocated on a GPU, the
process's peak RSS (VmHWM, reset per row where the kernel allows) on a CPU; ``peak_mem_kind`` says which.

Methods that act inside the LLM (``MethodSpec.stage == "llm"``, FastV) run through the model's own
implementation (``llava.model.fastv.fastv_prefill``): all visual tokens enter the LLM, layers < K see
them all, later layers and the KV cache only the kept ones; their selection time is inside
``prefill_ms``. A truncated LLM (``--layers``) with no layer after K runs FastV at K = layers - 1 (the
row says so). Their FLOPs follow the layer-aware count on the full model (first K layers see all
visual tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

import script_prune as sp
from llava.eval import flops as F
from llava.model.hf_compat import CACHE_ARG, OUTPUT_CACHE_FIELD, output_cache

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
    vision_repeats: int | None = None  # timed vision-tower passes (default: repeats)

    def __post_init__(self) -> None:
        known = set(sp.list_methods()) | {BASELINE}
        bad = [m for m in self.methods if m not in known]
        if bad:
            raise ValueError(f"methods {bad} are not known; choose from {sorted(known)}")
        if not self.budgets or any(not isinstance(b, int) or b < 1 for b in self.budgets):
            raise ValueError(f"budgets must be a non-empty list of ints >= 1, got {self.budgets!r}")
        for name in ("repeats", "decode_tokens", "text_tokens", "query_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.vision_repeats is not None and self.vision_repeats < 1:
            raise ValueError(f"vision_repeats must be >= 1, got {self.vision_repeats}")
        if self.warmup < 0 or self.fastv_k < 0:
            raise ValueError(f"warmup and fastv_k must be >= 0, got {self.warmup}, {self.fastv_k}")


# ----------------------------------------------------------------------------------------- pipeline
@dataclass
class VisionOutputs:
    """Vision tower outputs for R crops."""

    features: torch.Tensor  # (R, N, C) selected-layer patch features
    hidden_before: torch.Tensor | None = None  # (R, N+1, C) input of the selected layer (random-weights mode)
    cls_attention: torch.Tensor | None = None  # (R, N) when the tower computed it (checkpoint mode)
    keys: torch.Tensor | None = None  # (R, N, Dh)


@dataclass
class Pipeline:
    """The parts of a LLaVA model the benchmark times, stage by stage."""

    shape: F.ModelShape  # the real model's shape (FLOPs use its full depth)
    vision_fn: Callable[[torch.Tensor, bool], VisionOutputs]  # (pixels (R,3,S,S), with_attention) -> outputs
    projector: torch.nn.Module  # LLaVA mm_projector
    llm: torch.nn.Module  # LlamaForCausalLM-like (inputs_embeds, KV cache, logits_to_keep)
    relevance_fn: Callable[[VisionOutputs], dict[str, torch.Tensor]] | None = None  # image/query embeds
    attention_fn: Callable[[VisionOutputs], dict[str, torch.Tensor]] | None = None  # cls_attention/keys
    source: str = "random-weights"
    clock: str = "wall"  # a key of CLOCKS

    @property
    def device(self) -> torch.device:
        return next(self.llm.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.llm.parameters()).dtype

    @property
    def layers_run(self) -> int:
        return len(self.llm.get_decoder().layers)


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


def _clip_vision_config(vs: F.VisionShape):
    from transformers import CLIPVisionConfig

    cfg = CLIPVisionConfig(hidden_size=vs.hidden, intermediate_size=vs.intermediate, num_hidden_layers=vs.layers,
                           num_attention_heads=vs.heads, image_size=vs.image_size, patch_size=vs.patch_size,
                           projection_dim=vs.projection_dim, hidden_act="quick_gelu")
    cfg._attn_implementation = "sdpa"
    return cfg


def _clip_text_config(vs: F.VisionShape):
    from transformers import CLIPTextConfig

    big = vs.hidden >= 512
    cfg = CLIPTextConfig(hidden_size=768 if big else 32, intermediate_size=3072 if big else 64,
                         num_hidden_layers=12 if big else 2, num_attention_heads=12 if big else 4,
                         projection_dim=vs.projection_dim, vocab_size=49408, max_position_embeddings=77,
                         hidden_act="quick_gelu")
    cfg._attn_implementation = "sdpa"
    return cfg


def _llama_config(llm: F.LLMShape, layers: int):
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=llm.hidden, intermediate_size=llm.intermediate, num_hidden_layers=layers,
                      num_attention_heads=llm.heads, num_key_value_heads=llm.kv_heads, vocab_size=llm.vocab,
                      max_position_embeddings=4096, rms_norm_eps=1e-5)
    cfg._attn_implementation = "sdpa"
    return cfg


def random_pipeline(shape_name: str, layers: int | None = None, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32, with_text_tower: bool = True, seed: int = 0,
                    query_tokens: int = 12) -> Pipeline:
    """A model with a real LLaVA shape and random weights (``layers`` LLM layers; default all).

    The query for relevance methods is ``query_tokens`` random CLIP token ids."""
    from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection, LlamaForCausalLM
    from transformers.initialization import no_init_weights

    shape = F.get_shape(shape_name)
    n_layers = shape.llm.layers if layers is None else layers
    if n_layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    widths = (shape.vision.hidden, *shape.projector_hidden, shape.llm.hidden)
    with no_init_weights(), torch.device(device), _default_dtype(dtype):  # built in place: no fp32 copy first
        vision = CLIPVisionModelWithProjection(_clip_vision_config(shape.vision))
        llm = LlamaForCausalLM(_llama_config(shape.llm, n_layers))
        text = CLIPTextModelWithProjection(_clip_text_config(shape.vision)) if with_text_tower else None
        parts: list[torch.nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            parts += [torch.nn.Linear(a, b), torch.nn.GELU()]
        projector = torch.nn.Sequential(*parts[:-1])  # mlp2x_gelu: Linear, GELU, Linear
    for k, module in enumerate((vision, llm, text, projector)):
        if module is not None:
            _fill_parameters(module, seed + k)
            module.to(device=device, dtype=dtype).eval()
    clip = vision.vision_model
    query_ids = torch.randint(1, 49000, (1, query_tokens), generator=torch.Generator().manual_seed(seed)).to(device)
    return Pipeline(
        shape=shape,
        vision_fn=lambda pixels, with_attention: clip_vision_outputs(clip, pixels),
        projector=projector,
        llm=llm,
        relevance_fn=None if text is None else (
            lambda vis: clip_relevance_inputs(clip, vision.visual_projection, text, vis, query_ids)),
        attention_fn=lambda vis: clip_attention_inputs(clip, vis),
        source="random-weights",
    )


def checkpoint_pipeline(model_path: str, *, device: str = "cpu", dtype: torch.dtype | None = None,
                        query: str = "Is there a person in the image?") -> Pipeline:
    """The stages of a LLaVA checkpoint loaded with ``llava.model.builder.load_pretrained_model`` (transformers'
    own LLaVA class): its vision tower (VisionZip's [CLS] attention recomputed from the selected layer's input,
    as in random-weights mode), the pruning layer's CLIP relevance source (query ``query``), its projector and
    its language model."""
    if not os.path.isdir(model_path):
        raise FileNotFoundError(f"model_path {model_path!r} is not a directory")
    from llava.model.builder import load_pretrained_model

    _, model, _, _ = load_pretrained_model(model_path, device=device, torch_dtype=dtype)
    model.eval()
    hf = model.hf  # transformers' own LlavaForConditionalGeneration / LlavaNextForConditionalGeneration
    tower = hf.model.vision_tower
    clip = getattr(tower, "vision_model", tower)
    select = hf.config.vision_feature_layer
    cfg = hf.config.text_config
    llm_shape = F.LLMShape(hidden=cfg.hidden_size, intermediate=cfg.intermediate_size, layers=cfg.num_hidden_layers,
                           heads=cfg.num_attention_heads,
                           kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
                           vocab=cfg.vocab_size)
    vcfg = hf.config.vision_config
    vshape = F.VisionShape(hidden=vcfg.hidden_size, intermediate=vcfg.intermediate_size,
                           layers=vcfg.num_hidden_layers, heads=vcfg.num_attention_heads,
                           image_size=vcfg.image_size, patch_size=vcfg.patch_size,
                           projection_dim=getattr(vcfg, "projection_dim", 768))
    projector = hf.model.multi_modal_projector
    widths = tuple(m.out_features for m in projector.modules() if isinstance(m, torch.nn.Linear))[:-1]
    shape = F.ModelShape(os.path.basename(os.path.normpath(model_path)), llm_shape, vshape,
                         crops=5 if model.next_layout else 1, projector_hidden=widths)

    def vision_fn(pixels: torch.Tensor, with_attention: bool) -> VisionOutputs:
        return clip_vision_outputs(clip, pixels, select)

    def relevance_fn(vis: VisionOutputs) -> dict[str, torch.Tensor]:
        return model.clip_embeddings(vis.features, query)  # the clip_text source of the pruning layer

    def attention_fn(vis: VisionOutputs) -> dict[str, torch.Tensor]:
        return clip_attention_inputs(clip, vis, select)

    return Pipeline(shape=shape, vision_fn=vision_fn, projector=projector, llm=hf, relevance_fn=relevance_fn,
                    attention_fn=attention_fn, source=model_path)


# ----------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS: dict[str, Callable[[], float]] = {
    "wall": time.perf_counter,  # elapsed time (what a user waits for)
    "process": time.process_time,  # CPU time of this process, all threads (robust to other load on a CPU)
}


def timed(fn: Callable[[], Any], pipe: "Pipeline") -> tuple[Any, float]:
    """Run ``fn`` once; return its result and its time in ms on ``pipe.clock`` (device synchronised)."""
    clock = CLOCKS[pipe.clock]
    _sync(pipe.device)
    t0 = clock()
    out = fn()
    _sync(pipe.device)
    return out, (clock() - t0) * 1e3


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


def cache_nbytes(cache: Any) -> int:
    """Bytes held by a transformers KV cache (keys and values of every layer)."""
    total = 0
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for layer in layers:
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total
    for kv in cache:  # legacy tuple of (k, v)
        total += sum(t.numel() * t.element_size() for t in kv)
    return total


# ----------------------------------------------------------------------------------------- stages
def clip_vision_outputs(vision: torch.nn.Module, pixels: torch.Tensor, select_layer: int = -2) -> VisionOutputs:
    """CLIP forward with hidden states; LLaVA's selected layer without the [CLS] token."""
    hs = vision(pixel_values=pixels, output_hidden_states=True).hidden_states
    return VisionOutputs(features=hs[select_layer][:, 1:], hidden_before=hs[select_layer - 1])


def clip_relevance_inputs(vision: torch.nn.Module, visual_projection: torch.nn.Module, text_tower: torch.nn.Module,
                          vis: VisionOutputs, query_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """image_embeds (R, N, E) = visual_projection(post_layernorm(patch features)); query_embeds (1, E)."""
    image_embeds = visual_projection(vision.post_layernorm(vis.features))
    query_embeds = text_tower(input_ids=query_ids).text_embeds  # (1, E)
    return {"image_embeds": image_embeds, "query_embeds": query_embeds}


def clip_attention_inputs(vision: torch.nn.Module, vis: VisionOutputs, select_layer: int = -2) -> dict[str, torch.Tensor]:
    """cls_attention (R, N): [CLS] row of the selected layer's attention, mean over heads;
    keys (R, N, Dh): that layer's patch keys, mean over heads. Only the [CLS] row is computed."""
    # hidden_states[s] is the output of encoder layer s - 1 (s >= 0) or of layer s (s < 0)
    layer = vision.encoder.layers[select_layer if select_layer < 0 else select_layer - 1]
    attn = layer.self_attn
    x = layer.layer_norm1(vis.hidden_before)  # (R, T, C)
    r, t, _ = x.shape
    heads, hd = attn.num_heads, attn.head_dim
    q = attn.q_proj(x[:, :1]).view(r, 1, heads, hd).transpose(1, 2)  # (R, H, 1, hd)
    k = attn.k_proj(x).view(r, t, heads, hd).transpose(1, 2)  # (R, H, T, hd)
    probs = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * attn.scale, dim=-1)  # (R, H, 1, T)
    return {"cls_attention": probs[:, :, 0, 1:].mean(1), "keys": k[:, :, 1:].float().mean(1)}


@dataclass
class Selected:
    tokens: torch.Tensor  # (R, k + e, D) projected visual tokens for the LLM
    select_ms: float
    projector_ms: float


def run_selection(pipe: Pipeline, method: str, budget: int, features: torch.Tensor,
                  inputs: dict[str, torch.Tensor], params: dict[str, Any]) -> Selected:
    """Projector + script_prune call, timed separately (same order as script_prune.patch's prefill)."""
    dev = pipe.device
    n = features.shape[1]
    if method == BASELINE or sp.keeps_all(budget, n) or sp.get_method(method).stage == "llm":
        tokens, proj_ms = timed(lambda: pipe.projector(features), pipe)
        return Selected(tokens, 0.0, proj_ms)
    spec = sp.get_method(method)
    if spec.merges:
        red, sel_ms = timed(lambda: sp.reduce(features, budget, method, **inputs, **params), pipe)
        kept = torch.gather(features, 1, red.indices.unsqueeze(-1).expand(-1, -1, features.shape[-1]))
        if red.merged is not None:
            kept = torch.cat([kept, red.merged.to(features.dtype)], dim=1)
        tokens, proj_ms = timed(lambda: pipe.projector(kept), pipe)
        return Selected(tokens, sel_ms, proj_ms)
    projected, proj_ms = timed(lambda: pipe.projector(features), pipe)
    idx, sel_ms = timed(lambda: sp.select(projected, budget, method, **inputs, **params), pipe)
    tokens = torch.gather(projected, 1, idx.unsqueeze(-1).expand(-1, -1, projected.shape[-1]))
    return Selected(tokens, sel_ms, proj_ms)


def build_prompt(pipe: Pipeline, visual: torch.Tensor, text_tokens: int,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """inputs_embeds (1, T, D): a text prefix (the system prompt's length share), the visual tokens of all
    crops, then the question; ``text_tokens`` text positions in all (random ids: timing does not depend on them).
    Also returns visual_rows (1, T) long: the crop index of each visual token, -1 for text (for FastV)."""
    vocab = pipe.llm.get_input_embeddings().num_embeddings
    ids = torch.randint(3, vocab, (1, text_tokens), generator=gen).to(pipe.device)
    text = pipe.llm.get_input_embeddings()(ids)  # (1, T_text, D)
    n_prefix = (text_tokens * 3) // 5
    vis = visual.reshape(1, -1, visual.shape[-1]).to(text.dtype)
    rows = torch.arange(visual.shape[0], device=pipe.device).repeat_interleave(visual.shape[1])
    text_rows = torch.full((text_tokens,), -1, dtype=torch.long, device=pipe.device)
    visual_rows = torch.cat([text_rows[:n_prefix], rows, text_rows[n_prefix:]])[None]
    return torch.cat([text[:, :n_prefix], vis, text[:, n_prefix:]], dim=1), visual_rows


def prefill(pipe: Pipeline, embeds: torch.Tensor) -> Any:
    """LLM forward over the whole prompt with a fresh KV cache; logits of the last position only."""
    return pipe.llm(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)


def fastv_k_run(settings: BenchSettings, layers_run: int) -> int:
    """FastV's layer K for the LLM that runs: the configured K, or the last layer but one when the
    (truncated) LLM has no layer after K."""
    return max(1, min(settings.fastv_k, layers_run - 1))


def llm_stage_prefill(pipe: Pipeline, embeds: torch.Tensor, visual_rows: torch.Tensor, method: str, budget: int,
                      k: int) -> Any:
    """Prefill with an in-LLM method (FastV) through the model's own implementation, ``llava.model.fastv``:
    layers < K see every token, later layers and the KV cache only the kept ones."""
    from types import SimpleNamespace

    from llava.model.fastv import LLMPruning, fastv_prefill

    base, _ = fastv_prefill(pipe.llm.get_decoder(), embeds, None, None, None, True, visual_rows,
                            LLMPruning(layer=k, budget=budget, method=method))
    logits = pipe.llm.get_output_embeddings()(base.last_hidden_state[:, -1:])
    return SimpleNamespace(logits=logits, **{OUTPUT_CACHE_FIELD: output_cache(base)})


def decode(pipe: Pipeline, out: Any, steps: int) -> float:
    """Greedy decoding of ``steps`` tokens from a prefill output; returns ms per token. After a FastV
    prefill the steps use its shortened cache (mask and original position ids from ``llava.model.fastv``)."""
    dev = pipe.device
    cache, token = output_cache(out), out.logits[:, -1].argmax(-1, keepdim=True)

    def loop() -> None:
        nonlocal cache, token
        for _ in range(steps):
            extra: dict[str, Any] = {}
            from llava.model.fastv import decode_inputs, fastv_state

            state = fastv_state(cache)
            if state is not None:
                extra["attention_mask"], extra["position_ids"] = decode_inputs(state, cache, None, None, 1)
            step = pipe.llm(input_ids=token, use_cache=True, logits_to_keep=1, **{CACHE_ARG: cache}, **extra)
            cache, token = output_cache(step), step.logits[:, -1].argmax(-1, keepdim=True)

    _, ms = timed(loop, pipe)
    return ms / steps


# ----------------------------------------------------------------------------------------- rows
def flops_row(shape: F.ModelShape, method: str, budget: int, settings: BenchSettings, full: bool) -> dict[str, Any]:
    """The theoretical part of a row (paper convention; FastV layer-aware)."""
    n_vis = shape.visual_tokens(budget)
    tflops = F.method_tflops(shape, method, budget, fastv_k=settings.fastv_k)
    row: dict[str, Any] = {
        "shape": shape.name, "method": method, "budget": budget, "visual_tokens": n_vis,
        "tflops": tflops, "tflops_convention": F.PAPER_CONVENTION + (
            f"; FastV: first {settings.fastv_k} layers at {shape.full_visual_tokens} tokens" if method == "fastv" else ""),
        "tflops_paper_proportional": F.paper_proportional_tflops(n_vis, shape.full_visual_tokens, shape.llm),
        "flops_reduction": F.paper_tflops(shape.full_visual_tokens, shape.llm) / tflops,
        "kv_visual_fp16_mb": F.kv_cache_bytes(shape.llm, n_vis, 2) / MIB,
    }
    if full:
        k = settings.fastv_k if method == "fastv" else None
        row["flops_full"] = F.full_prefill_breakdown(shape, n_vis, settings.text_tokens, fastv_k=k)
    return row


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def measure_row(pipe: Pipeline, vis: VisionOutputs, vision_ms: float, method: str, budget: int,
                settings: BenchSettings) -> dict[str, Any]:
    """Measured part of one row: inputs, selection, prefill, decode, KV cache, peak memory."""
    dev = pipe.device
    spec = None if method == BASELINE else sp.get_method(method)
    in_llm = spec is not None and spec.stage == "llm"
    note = None
    if in_llm:
        if "layer" not in spec.params or pipe.layers_run < 2:
            return {"measured": False, "note": f"{method} acts inside the LLM; only FastV-style methods (param "
                                               "'layer') on an LLM of >= 2 layers can be measured"}
        k = fastv_k_run(settings, pipe.layers_run)
        if k != settings.fastv_k:
            note = (f"{method}: K={k} in the {pipe.layers_run}-layer LLM that ran (K={settings.fastv_k} needs more "
                    f"layers); tflops use K={settings.fastv_k} on the full model")
    params: dict[str, Any] = {}
    if spec is not None and "negate" in spec.params:
        params["negate"] = True  # LLaVA's convention (the clip_text source's sign)
    gen = torch.Generator().manual_seed(settings.seed)
    samples: dict[str, list[float]] = {k: [] for k in ("inputs", "select", "proj", "prefill", "decode")}
    kind = _reset_peak(dev)
    kv_bytes, seq_len, n_llm_visual = 0, 0, 0
    for rep in range(settings.warmup + settings.repeats):
        inputs: dict[str, torch.Tensor] = {}
        t_inputs = 0.0
        if spec is not None and any(x in spec.inputs for x in ("image_embeds", "query_embeds")):
            if pipe.relevance_fn is None:
                raise ValueError(f"method {method!r} needs the CLIP text tower, which this pipeline lacks")
            got, t = timed(lambda: pipe.relevance_fn(vis), pipe)
            inputs.update(got)
            t_inputs += t
        if spec is not None and any(x in spec.inputs for x in ("cls_attention", "keys")):
            got, t = timed(lambda: pipe.attention_fn(vis), pipe)
            inputs.update(got)
            t_inputs += t
        sel = run_selection(pipe, method, budget, vis.features, inputs, params)
        embeds, visual_rows = build_prompt(pipe, sel.tokens, settings.text_tokens, gen)
        if in_llm:
            out, t_prefill = timed(lambda: llm_stage_prefill(pipe, embeds, visual_rows, method, budget, k), pipe)
        else:
            out, t_prefill = timed(lambda: prefill(pipe, embeds), pipe)
        kv_bytes, seq_len = cache_nbytes(output_cache(out)), embeds.shape[1]
        cached = output_cache(out).get_seq_length()
        n_llm_visual = sel.tokens.shape[0] * sel.tokens.shape[1]
        t_decode = decode(pipe, out, settings.decode_tokens)
        del out
        if rep >= settings.warmup:
            for key, v in (("inputs", t_inputs), ("select", sel.select_ms), ("proj", sel.projector_ms),
                           ("prefill", t_prefill), ("decode", t_decode)):
                samples[key].append(v)
    prefill_ms = _median(samples["prefill"])
    select_ms = _median(samples["select"])
    row = {
        "measured": True,
        "llm_visual_tokens": n_llm_visual,  # visual tokens entering the LLM (FastV: before layer K)
        "seq_len": seq_len,  # prompt positions entering the LLM
        "cached_positions": cached,  # positions held in the KV cache after prefill (FastV: shortened)
        "vision_ms": vision_ms,
        "inputs_ms": _median(samples["inputs"]),
        "select_ms": None if in_llm else select_ms,  # in-LLM methods select inside the prefill
        "projector_ms": _median(samples["proj"]),
        "prefill_ms": prefill_ms,
        "select_pct_of_prefill": None if in_llm else 100.0 * select_ms / prefill_ms,
        "decode_ms_per_token": _median(samples["decode"]),
        "kv_cache_mb": kv_bytes / MIB,
        "kv_cache_source": f"measured from cache tensors after prefill ({cached} positions, "
                           f"{pipe.layers_run} layers, {str(pipe.dtype).replace('torch.', '')})",
        "peak_mem_mb": _peak_mb(dev),
        "peak_mem_kind": kind,
    }
    if in_llm:
        row["fastv_k_run"] = k
        row["select_note"] = "in-LLM: score row + selection happen inside prefill_ms"
    if note:
        row["note"] = note
    return row


def run_benchmark(pipe: Pipeline | None, shape: F.ModelShape, settings: BenchSettings, *,
                  full: bool = False, progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """All rows: the baseline (unpruned) first, then every method x budget. ``pipe=None``: FLOPs only."""
    combos = [(BASELINE, shape.tokens_per_crop)] if settings.include_baseline else []
    combos += [(m, b) for b in settings.budgets for m in settings.methods if m != BASELINE]
    rows = [flops_row(shape, m, b, settings, full) for m, b in combos]
    if pipe is None:
        return rows
    torch.manual_seed(settings.seed)
    dev, dt = pipe.device, pipe.dtype
    gen = torch.Generator().manual_seed(settings.seed)
    vs = shape.vision
    pixels = torch.randn(shape.crops, 3, vs.image_size, vs.image_size, generator=gen).to(dev, dt)
    with_attention = any(m != BASELINE and "cls_attention" in sp.get_method(m).inputs for m in settings.methods)
    with torch.inference_mode():
        vision_times = []
        vision_repeats = settings.repeats if settings.vision_repeats is None else settings.vision_repeats
        for rep in range(settings.warmup + vision_repeats):
            vis, t = timed(lambda: pipe.vision_fn(pixels, with_attention), pipe)
            if rep >= settings.warmup:
                vision_times.append(t)
        vision_ms = _median(vision_times)
        for row in rows:
            if progress:
                progress(f"measuring {row['method']} @ {row['budget']}")
            row.update(measure_row(pipe, vis, vision_ms, row["method"], row["budget"], settings))
            row.update({"device": str(dev), "dtype": str(dt).replace("torch.", ""), "layers_run": pipe.layers_run,
                        "clock": pipe.clock, "threads": torch.get_num_threads(),
                        "repeats": settings.repeats, "warmup": settings.warmup, "source": pipe.source,
                        "text_tokens": settings.text_tokens, "decode_tokens": settings.decode_tokens})
    base = next((r for r in rows if r["method"] == BASELINE and r.get("measured")), None)
    if base is not None:
        for row in rows:
            if row.get("measured"):
                row["prefill_speedup"] = base["prefill_ms"] / row["prefill_ms"]
                row["decode_speedup"] = base["decode_ms_per_token"] / row["decode_ms_per_token"]
    return rows


# ----------------------------------------------------------------------------------------- output
def _tflops_text(v: float) -> str:
    """3 decimals like the paper; small (tiny-model) values in scientific notation."""
    return f"{v:.3f}" if v >= 0.01 else f"{v:.2e}"


def _fmt(v: Any, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def format_table(rows: list[dict[str, Any]]) -> str:
    """Table 6's layout: method, tokens, FLOPs (xreduction), prefill (xspeedup), decode, KV, memory, selection."""
    if not any("measured" in r for r in rows):
        return _format_flops_table(rows)
    head = ["Method", "# Token", "FLOPs (T)", "Prefill (ms)", "Decode (ms/tok)", "KV cache (MB)",
            "Peak mem (MB)", "Select (ms)", "Select % prefill", "Inputs (ms)"]
    lines = []
    for r in rows:
        name = "unpruned" if r["method"] == BASELINE else r["method"]
        flops = f"{_tflops_text(r['tflops'])} (x{r['flops_reduction']:.1f})"
        if r.get("measured"):
            pre = f"{r['prefill_ms']:.1f} (x{r.get('prefill_speedup', 1.0):.2f})"
            dec = f"{r['decode_ms_per_token']:.1f} (x{r.get('decode_speedup', 1.0):.2f})"
            cells = [pre, dec, _fmt(r["kv_cache_mb"]), _fmt(r["peak_mem_mb"], ".0f"), _fmt(r["select_ms"], ".2f"),
                     _fmt(r["select_pct_of_prefill"], ".2f"), _fmt(r["inputs_ms"], ".1f")]
        elif "measured" in r:
            cells = ["not measured"] + ["-"] * 6
        else:
            cells = ["-"] * 7
        lines.append([name, str(r["visual_tokens"]), flops, *cells])
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
              f"{_tflops_text(r['tflops'])} (x{r['flops_reduction']:.1f})", _tflops_text(r["tflops_paper_proportional"]),
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llava.eval.efficiency", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model-path", help="LLaVA checkpoint folder to measure")
    src.add_argument("--random-weights", action="store_true", help="real shapes, random weights")
    p.add_argument("--shape", default="llava-v1.5-7b", help=f"one of {sorted(F.SHAPES)}")
    p.add_argument("--layers", type=int, default=None, help="LLM layers to build with --random-weights")
    p.add_argument("--methods", default="script", help="comma-separated script_prune methods")
    p.add_argument("--pruning-method", default=None, help="alias of --methods with one method")
    p.add_argument("--budgets", default="64", help="comma-separated tokens kept per image row / NeXT crop")
    p.add_argument("--no-baseline", action="store_true", help="skip the unpruned row")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--vision-repeats", type=int, default=None,
                   help="timed vision-tower passes (default: --repeats); the tower runs once per benchmark")
    p.add_argument("--decode-tokens", type=int, default=8)
    p.add_argument("--text-tokens", type=int, default=60, help="text positions in the prompt")
    p.add_argument("--query-tokens", type=int, default=12,
                   help="random query length fed to the CLIP text tower (--random-weights)")
    p.add_argument("--query", default="Is there a person in the image?", help="query text (--model-path)")
    p.add_argument("--fastv-k", type=int, default=2, help="FastV prunes after this LLM layer")
    p.add_argument("--flops-only", action="store_true", help="theoretical FLOPs only (no model, instant)")
    p.add_argument("--full", action="store_true", help="also count text tokens, vision tower and projector")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--clock", default="wall", choices=sorted(CLOCKS),
                   help="wall: elapsed time; process: CPU time of this process (a CPU shared with other jobs)")
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
                                 include_baseline=not args.no_baseline, vision_repeats=args.vision_repeats)
        dtype = _dtype(args.dtype, args.device)
        if args.threads:
            torch.set_num_threads(args.threads)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        pipe = None
        if args.flops_only:
            shape = F.get_shape(args.shape)
        elif args.model_path:
            pipe = checkpoint_pipeline(args.model_path, device=args.device, dtype=dtype, query=args.query)
            shape = pipe.shape
        elif args.random_weights:
            needs_text = any("query_embeds" in sp.get_method(m).inputs for m in methods if m != BASELINE)
            pipe = random_pipeline(args.shape, args.layers, device=args.device, dtype=dtype,
                                   with_text_tower=needs_text, seed=args.seed, query_tokens=args.query_tokens)
            shape = pipe.shape
        else:
            raise ValueError("pass --flops-only, --random-weights or --model-path")
        if pipe is not None:
            if args.clock == "process" and pipe.device.type != "cpu":
                raise ValueError("clock 'process' measures CPU time; use --clock wall on a GPU")
            pipe.clock = args.clock
        if settings.fastv_k > shape.llm.layers:
            raise ValueError(f"fastv_k must be <= the model's {shape.llm.layers} layers, got {settings.fastv_k}")
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    rows = run_benchmark(pipe, shape, settings, full=args.full,
                         progress=lambda s: print(s, file=sys.stderr, flush=True))
    where = "theoretical only" if pipe is None else (
        f"{pipe.source}, {pipe.layers_run} LLM layers run, {rows[0].get('device')}, {rows[0].get('dtype')}, "
        f"median of {settings.repeats} after {settings.warmup} warm-up, {pipe.clock} clock, "
        f"{torch.get_num_threads()} thread(s)")
    print(f"# {shape.name} ({where}); vision tower "
          f"{_fmt(rows[0].get('vision_ms'))} ms for {shape.crops} crop(s)" if pipe else f"# {shape.name} ({where})")
    print(format_table(rows))
    if args.full:
        print(format_full(rows))
    if args.json:
        write_json(rows, args.json)
    return rows


if __name__ == "__main__":
    main()

"""Theoretical compute of LLaVA prefill, in the paper's convention and in a fuller accounting.

Everything here is pure arithmetic on shapes, no model (the multi-stage in-LLM methods read their per-layer
token counts from ``script_prune.inllm``, the one place their schedules live).

Paper convention (Script, Tables 2, 3 and 6): one LLM decoder layer processing ``n`` visual tokens
costs ``4 n d^2 + 2 n^2 d + 3 n d m`` (d = hidden size, m = FFN width); the count is multiplied
by the number of layers and reported in units of 1e12 ("TFLOPs"). The three terms are the
multiply-accumulates (MACs) of the q/k/v/o projections, of the two attention products
(``Q K^T`` and ``A V``) and of the three SwiGLU projections (gate, up, down). Because each term
counts one multiply-add as one operation, Table 6's "41.7 T" for 2880 tokens equals
``2 x 20.825`` (two FLOPs per MAC).
"""

from __future__ import annotations

import functools

from collections.abc import Callable
from dataclasses import dataclass, field

TERA = 1e12
PAPER_CONVENTION = ("paper: sum over LLM layers of 4nd^2+2n^2d+3ndm (grouped KV heads: 2nd^2+2nd*d_kv+2n^2d+3ndm), "
                    "n = visual tokens only, MACs/1e12")


@dataclass(frozen=True)
class LLMShape:
    """Decoder-only LLM shape (LLaMA-style: SwiGLU MLP, optional grouped KV heads)."""

    hidden: int  # d
    intermediate: int  # m (FFN width)
    layers: int
    heads: int
    kv_heads: int
    vocab: int = 32000

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_width(self) -> int:
        """Width of the key (and of the value) projection: ``kv_heads * head_dim`` (< hidden with grouped KV heads)."""
        return self.kv_heads * self.head_dim


@dataclass(frozen=True)
class VisionShape:
    """ViT shape (CLIP-style by default: two-matrix GELU MLP, one [CLS] token).

    ``cls_token``: False for SigLIP and Qwen2.5-VL's ViT; ``mlp_matrices``: 3 for a SwiGLU MLP (Qwen2.5-VL);
    ``temporal_patch``: frames per patch (Qwen2.5-VL's 3-D patch embedding takes 2)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    image_size: int
    patch_size: int
    projection_dim: int = 768  # CLIP joint embedding width (visual_projection output)
    cls_token: bool = True
    mlp_matrices: int = 2
    temporal_patch: int = 1

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def patches(self) -> int:
        return self.patches_per_side**2

    @property
    def tokens(self) -> int:
        """Sequence length through the encoder: patches (+ [CLS])."""
        return self.patches + int(self.cls_token)


@dataclass(frozen=True)
class ModelShape:
    """A LLaVA model's compute-relevant shape.

    ``crops`` is how many visual rows the vision tower encodes (1 for LLaVA-1.5, base + 2x2 tiles = 5
    for LLaVA-NeXT at its usual 672px resolution, 64 video frames for LLaVA-Video, 4 tiles + thumbnail
    for InternVL3 at 896 px); the pruning budget is per row, so a budget ``b`` gives ``crops * b`` visual
    tokens to the LLM (layout tokens such as LLaVA-NeXT's newlines are not counted, as in the paper).
    ``row_tokens``: LLM tokens of one row when they differ from the vision patches (pooled video frames,
    InternVL's pixel shuffle, Qwen2.5-VL's 2x2 merger); ``merge``: vision patches per projector input
    (4 for the pixel shuffle / merger, whose projector then takes ``merge * vision.hidden`` features).
    """

    name: str
    llm: LLMShape
    vision: VisionShape
    crops: int = 1
    projector_hidden: tuple[int, ...] = field(default=(4096,))  # mlp2x_gelu: vision -> 4096 -> d
    row_tokens: int | None = None
    merge: int = 1

    @property
    def tokens_per_crop(self) -> int:
        return self.vision.patches if self.row_tokens is None else self.row_tokens

    @property
    def projector_inputs(self) -> int:
        """Feature vectors through the projector over all rows (before any pooling or pruning)."""
        return self.crops * self.vision.patches // self.merge

    @property
    def full_visual_tokens(self) -> int:
        return self.crops * self.tokens_per_crop

    def visual_tokens(self, budget_per_crop: int) -> int:
        """Visual tokens that reach the LLM for a per-crop budget (budget >= tokens per crop keeps all)."""
        if budget_per_crop < 1:
            raise ValueError(f"budget_per_crop must be >= 1, got {budget_per_crop}")
        return self.crops * min(budget_per_crop, self.tokens_per_crop)


LLAMA_7B = LLMShape(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000)
LLAMA_13B = LLMShape(hidden=5120, intermediate=13824, layers=40, heads=40, kv_heads=40, vocab=32000)
CLIP_L14_336 = VisionShape(hidden=1024, intermediate=4096, layers=24, heads=16, image_size=336, patch_size=14)
#: Qwen2-7B (LLaVA-Video-7B-Qwen2) and Qwen2.5-7B (InternVL3-8B, Qwen2.5-VL-7B): 28 heads, 4 KV heads.
QWEN2_7B = LLMShape(hidden=3584, intermediate=18944, layers=28, heads=28, kv_heads=4, vocab=152064)
QWEN2_5_7B_INTERNVL = LLMShape(hidden=3584, intermediate=18944, layers=28, heads=28, kv_heads=4, vocab=151674)
#: SigLIP-so400m/14 at 384 px as LLaVA-OneVision / LLaVA-Video use it (26 layers, last one selected, no [CLS]).
SIGLIP_SO400M_384 = VisionShape(hidden=1152, intermediate=4304, layers=26, heads=16, image_size=384, patch_size=14,
                                cls_token=False)
#: InternViT-300M-448px (InternVL3-8B): one 448 px tile.
INTERNVIT_300M = VisionShape(hidden=1024, intermediate=4096, layers=24, heads=16, image_size=448, patch_size=14)
#: Qwen2.5-VL-7B's ViT on one 896 x 896 image (64 x 64 patches of 14 px, SwiGLU MLP, 3-D patches of 2 frames).
QWEN2_5_VL_VIT_896 = VisionShape(hidden=1280, intermediate=3420, layers=32, heads=16, image_size=896, patch_size=14,
                                 cls_token=False, mlp_matrices=3, temporal_patch=2)
TINY_LLM = LLMShape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=4, vocab=32000)
TINY_GQA_LLM = LLMShape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=1000)
TINY_VISION = VisionShape(
    hidden=32, intermediate=64, layers=2, heads=4, image_size=56, patch_size=14, projection_dim=16
)

SHAPES: dict[str, ModelShape] = {
    "llava-v1.5-7b": ModelShape("llava-v1.5-7b", LLAMA_7B, CLIP_L14_336, crops=1),
    "llava-v1.5-13b": ModelShape("llava-v1.5-13b", LLAMA_13B, CLIP_L14_336, crops=1),
    "llava-v1.6-vicuna-7b": ModelShape("llava-v1.6-vicuna-7b", LLAMA_7B, CLIP_L14_336, crops=5),
    "llava-v1.6-vicuna-13b": ModelShape("llava-v1.6-vicuna-13b", LLAMA_13B, CLIP_L14_336, crops=5),
    # 64 frames, each 27 x 27 SigLIP patches -> 2x2 average pooling -> 13 x 13 = 169 tokens (the paper's 64 x 169)
    "llava-video-7b": ModelShape("llava-video-7b", QWEN2_7B, SIGLIP_SO400M_384, crops=64, projector_hidden=(3584,),
                                 row_tokens=169),
    # 896 x 896: 2 x 2 tiles of 448 + thumbnail, 32 x 32 patches each -> pixel shuffle 0.5 -> 256 tokens (1,280)
    "internvl3-8b": ModelShape("internvl3-8b", QWEN2_5_7B_INTERNVL, INTERNVIT_300M, crops=5, projector_hidden=(3584,),
                               row_tokens=256, merge=4),
    # one 896 x 896 image: 64 x 64 patches -> 2 x 2 merger -> 1,024 tokens in one row
    "qwen2.5-vl-7b": ModelShape("qwen2.5-vl-7b", QWEN2_7B, QWEN2_5_VL_VIT_896, crops=1, projector_hidden=(5120,),
                                row_tokens=1024, merge=4),
    "tiny": ModelShape("tiny", TINY_LLM, TINY_VISION, crops=1, projector_hidden=(64,)),
    "tiny-next": ModelShape("tiny-next", TINY_LLM, TINY_VISION, crops=5, projector_hidden=(64,)),
    # tiny widths of the three newer families (same code paths as the real shapes, for tests)
    "tiny-video": ModelShape("tiny-video", TINY_GQA_LLM,
                             VisionShape(hidden=32, intermediate=64, layers=1, heads=4, image_size=40, patch_size=8,
                                         cls_token=False), crops=3, projector_hidden=(64,), row_tokens=4),
    "tiny-internvl": ModelShape("tiny-internvl", TINY_GQA_LLM,
                                VisionShape(hidden=32, intermediate=64, layers=1, heads=4, image_size=16, patch_size=2),
                                crops=5, projector_hidden=(64,), row_tokens=16, merge=4),
    "tiny-qwen-vl": ModelShape("tiny-qwen-vl", TINY_GQA_LLM,
                               VisionShape(hidden=16, intermediate=32, layers=2, heads=2, image_size=16, patch_size=2,
                                           cls_token=False, mlp_matrices=3, temporal_patch=2),
                               crops=1, projector_hidden=(64,), row_tokens=16, merge=4),
}


def get_shape(name: str) -> ModelShape:
    """Look up a named shape; ValueError naming the known ones otherwise."""
    if name not in SHAPES:
        raise ValueError(f"shape must be one of {sorted(SHAPES)}, got {name!r}")
    return SHAPES[name]


def _check_tokens(n: int, what: str = "n") -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"{what} must be a non-negative int, got {n!r}")


def llm_layer_macs(n: int, d: int, m: int, d_kv: int | None = None) -> float:
    """MACs of one LLaMA decoder layer over ``n`` tokens: ``4nd^2 + 2n^2d + 3ndm`` (paper's formula).

    ``d_kv``: width of the key / value projections with grouped KV heads (Qwen2: 4 x 128 = 512); the
    projections then cost ``2nd^2 + 2nd d_kv`` instead of ``4nd^2``. Default ``d`` (LLaMA-7B, the paper)."""
    _check_tokens(n)
    d_kv = d if d_kv is None else d_kv
    return 2.0 * n * d * d + 2.0 * n * d * d_kv + 2.0 * n * n * d + 3.0 * n * d * m


def layers_tflops(tokens_per_layer: list[int], llm: LLMShape) -> float:
    """Paper-convention TFLOPs of the LLM when layer ``l`` sees ``tokens_per_layer[l]`` visual tokens."""
    return sum(llm_layer_macs(n, llm.hidden, llm.intermediate, llm.kv_width) for n in tokens_per_layer) / TERA


def paper_tflops(n_visual: int, llm: LLMShape = LLAMA_7B, layers: int | None = None) -> float:
    """The paper's TFLOPs for ``n_visual`` visual tokens over all (or ``layers``) LLM layers."""
    num_layers = llm.layers if layers is None else layers
    return layers_tflops([n_visual] * num_layers, llm)


def paper_proportional_tflops(n_visual: int, n_full: int, llm: LLMShape = LLAMA_7B) -> float:
    """How the paper's LLaVA-NeXT rows were scaled: ``tflops(n_full) * n_visual / n_full``.

    This is linear in ``n_visual`` (the quadratic attention term is scaled as if it were linear),
    so it overstates the compute of pruned settings slightly: 320 tokens -> 2.314 vs 2.099.
    """
    _check_tokens(n_visual, "n_visual")
    if n_full <= 0:
        raise ValueError(f"n_full must be positive, got {n_full}")
    return paper_tflops(n_full, llm) * n_visual / n_full


def fastv_layer_tokens(n_full: int, n_kept: int, layers: int, params: dict) -> list[int]:
    """FastV: the first K = ``params["layer"]`` (default 2) layers see all ``n_full`` visual tokens, the others
    ``n_kept``."""
    k = params.get("layer", 2)
    if not 0 <= k <= layers:
        raise ValueError(f"k (FastV layer) must be in [0, {layers}], got {k}")
    if n_kept > n_full:
        raise ValueError(f"n_kept ({n_kept}) must be <= n_full ({n_full})")
    return [n_full] * k + [n_kept] * (layers - k)


def fastv_shape_tokens(shape: ModelShape, budget_per_crop: int, params: dict) -> list[int]:
    """FastV on ``shape``: :func:`fastv_layer_tokens` with all visual tokens before layer K, the kept ones after."""
    return fastv_layer_tokens(shape.full_visual_tokens, shape.visual_tokens(budget_per_crop), shape.llm.layers, params)


def staged_shape_tokens(method: str, shape: ModelShape, budget_per_crop: int, params: dict) -> list[int]:
    """A multi-stage in-LLM method (SparseVLM, PDrop) on ``shape``: ``crops`` x the visual tokens per crop each layer
    sees, from the pruning library's one schedule (``script_prune.inllm.layer_tokens``; merged tokens included;
    registry defaults for the parameters not given); ``budget_per_crop`` is the tables' per-layer average."""
    from script_prune import get_method, inllm  # torch-only; imported where a staged method is asked for

    n = shape.tokens_per_crop
    defaults = get_method(method).params
    params = {**defaults, **{key: value for key, value in params.items() if key in defaults}}  # not FastV's K
    counts = inllm.layer_tokens(method, min(shape.visual_tokens(budget_per_crop) // shape.crops, n), n,
                                shape.llm.layers, params)
    return [shape.crops * c for c in counts]


#: Methods that prune inside the LLM: name -> visual tokens seen by every decoder layer,
#: ``f(shape, budget_per_crop, params) -> list of layers ints``. A method pruned before the LLM (every
#: vision-side method) sees its kept count in all layers; an in-LLM method gets its FLOPs from one entry here.
IN_LLM_LAYER_TOKENS: dict[str, Callable[[ModelShape, int, dict], list[int]]] = {
    "fastv": fastv_shape_tokens,
    "sparsevlm": functools.partial(staged_shape_tokens, "sparsevlm"),
    "pdrop": functools.partial(staged_shape_tokens, "pdrop"),
}


def fastv_tflops(n_full: int, n_kept: int, llm: LLMShape = LLAMA_7B, k: int = 2) -> float:
    """Paper-convention TFLOPs of FastV: the first ``k`` layers see all ``n_full`` visual tokens,
    the remaining ``layers - k`` see only ``n_kept``."""
    return layers_tflops(fastv_layer_tokens(n_full, n_kept, llm.layers, {"layer": k}), llm)


def layer_tokens(shape: ModelShape, method: str, budget_per_crop: int, params: dict | None = None) -> list[int]:
    """Visual tokens each LLM layer of ``shape`` sees for ``method`` (``IN_LLM_LAYER_TOKENS``, else the kept count)."""
    rule = IN_LLM_LAYER_TOKENS.get(method)
    if rule is None:
        return [shape.visual_tokens(budget_per_crop)] * shape.llm.layers
    return rule(shape, budget_per_crop, params or {})


def method_tflops(shape: ModelShape, method: str, budget_per_crop: int, fastv_k: int = 2,
                  params: dict | None = None) -> float:
    """Paper-convention TFLOPs for ``method`` at ``budget_per_crop`` (in-LLM methods layer-aware; ``params`` are the
    method's parameters, ``fastv_k`` FastV's K when ``params`` does not name it)."""
    params = {"layer": fastv_k, **(params or {})}
    return layers_tflops(layer_tokens(shape, method, budget_per_crop, params), shape.llm)


def vision_tower_macs(vision: VisionShape, crops: int = 1, layers: int | None = None) -> float:
    """MACs of a ViT over ``crops`` images: patch embedding + per layer ``4nd^2 + 2n^2d + k ndm`` (k = 2 for a
    two-matrix MLP, 3 for SwiGLU) with n = patches (+ [CLS]). ``layers`` defaults to all encoder layers (what a
    Hugging Face forward computes even though LLaVA reads the penultimate layer). Full attention in every layer
    (Qwen2.5-VL's window-attention layers cost less: an upper bound there)."""
    num_layers = vision.layers if layers is None else layers
    n, d, m = vision.tokens, vision.hidden, vision.intermediate
    patch_embed = vision.patches * 3 * vision.temporal_patch * vision.patch_size**2 * d
    per_layer = 4.0 * n * d * d + 2.0 * n * n * d + vision.mlp_matrices * n * d * m
    return crops * (patch_embed + num_layers * per_layer)


def projector_macs(shape: ModelShape, n_tokens: int) -> float:
    """MACs of the multimodal projector (a chain of linear layers) over ``n_tokens`` input feature vectors
    (each ``merge`` vision patches wide)."""
    _check_tokens(n_tokens, "n_tokens")
    widths = (shape.vision.hidden * shape.merge, *shape.projector_hidden, shape.llm.hidden)
    return float(n_tokens) * sum(a * b for a, b in zip(widths[:-1], widths[1:]))


def full_prefill_breakdown(
    shape: ModelShape, n_visual: int, n_text: int, fastv_k: int | None = None, method: str | None = None,
    params: dict | None = None,
) -> dict[str, dict[str, float | str]]:
    """Fuller prefill accounting, each entry labelled with its convention (all in T-MACs).

    - ``llm_visual_only``: the paper's number (visual tokens only).
    - ``llm_all_tokens``: same formula with n = visual + text tokens (the quadratic term then
      includes text-visual attention), plus the LM head on the last position.
    - ``vision_tower``: the ViT over all rows (pruning happens after it, so it never shrinks).
    - ``projector``: the projector over all its inputs (projection precedes selection).
    - ``total``: vision_tower + projector + llm_all_tokens.
    With ``fastv_k`` set (or an in-LLM ``method`` of ``IN_LLM_LAYER_TOKENS`` with its ``params``), the LLM
    terms count the visual tokens each layer sees; ``n_visual`` is then the kept count.
    """
    _check_tokens(n_visual, "n_visual")
    _check_tokens(n_text, "n_text")
    llm = shape.llm
    if fastv_k is not None:
        method, params = "fastv", {**(params or {}), "layer": fastv_k}
    rule = IN_LLM_LAYER_TOKENS.get(method) if method is not None else None
    per_layer = [n_visual] * llm.layers if rule is None else rule(shape.full_visual_tokens, n_visual, llm.layers,
                                                                  params or {})
    llm_vis = layers_tflops(per_layer, llm) * TERA
    llm_all = layers_tflops([n + n_text for n in per_layer], llm) * TERA
    llm_all += llm.hidden * llm.vocab  # LM head for the next-token logits (last position only)
    vision = vision_tower_macs(shape.vision, crops=shape.crops)
    proj = projector_macs(shape, shape.projector_inputs)
    return {
        "llm_visual_only": {"tmacs": llm_vis / TERA, "convention": PAPER_CONVENTION},
        "llm_all_tokens": {
            "tmacs": llm_all / TERA,
            "convention": "same per-layer formula with n = visual + text tokens, plus LM head (1 position)",
        },
        "vision_tower": {
            "tmacs": vision / TERA,
            "convention": f"ViT, {shape.vision.layers} layers x {shape.crops} row(s), "
            f"n={shape.vision.tokens}, 4nd^2+2n^2d+{shape.vision.mlp_matrices}ndm + patch embedding (full attention)",
        },
        "projector": {
            "tmacs": proj / TERA,
            "convention": f"linear chain {shape.vision.hidden * shape.merge}->"
            f"{'->'.join(map(str, shape.projector_hidden))}->{llm.hidden} over {shape.projector_inputs} feature vectors",
        },
        "total": {
            "tmacs": (llm_all + vision + proj) / TERA,
            "convention": "vision_tower + projector + llm_all_tokens (MACs; x2 for FLOPs)",
        },
    }


def kv_cache_bytes(llm: LLMShape, seq_len: int, bytes_per_elem: int, layers: int | None = None) -> int:
    """Bytes of a KV cache: ``2 (K and V) * layers * kv_heads * head_dim * seq_len * bytes``.

    With the 7B shape in fp16, 2880 visual tokens give 1440 MiB and 320 give 160 MiB
    (Table 6's KV-cache column counts visual tokens only, in MiB)."""
    _check_tokens(seq_len, "seq_len")
    num_layers = llm.layers if layers is None else layers
    return 2 * num_layers * llm.kv_heads * llm.head_dim * seq_len * bytes_per_elem

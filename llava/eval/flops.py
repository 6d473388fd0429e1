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

from dataclasses import dataclass, field

TERA = 1e12
PAPER_CONVENTION = "paper: sum over LLM layers of 4nd^2+2n^2d+3ndm, n = visual tokens only, MACs/1e12"


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


@dataclass(frozen=True)
class VisionShape:
    """ViT shape (CLIP-style: two-matrix GELU MLP, one [CLS] token)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    image_size: int
    patch_size: int
    projection_dim: int = 768  # CLIP joint embedding width (visual_projection output)

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def patches(self) -> int:
        return self.patches_per_side**2

    @property
    def tokens(self) -> int:
        """Sequence length through the encoder: patches + [CLS]."""
        return self.patches + 1


@dataclass(frozen=True)
class ModelShape:
    """A LLaVA model's compute-relevant shape.

    ``crops`` is how many 336px crops the vision tower encodes per image (1 for LLaVA-1.5,
    base + 2x2 tiles = 5 for LLaVA-NeXT at its usual 672px resolution); the pruning budget is
    per crop, so a budget ``b`` gives ``crops * b`` visual tokens to the LLM (newline tokens
    of LLaVA-NeXT are not counted, as in the paper).
    """

    name: str
    llm: LLMShape
    vision: VisionShape
    crops: int = 1
    projector_hidden: tuple[int, ...] = field(default=(4096,))  # mlp2x_gelu: vision -> 4096 -> d

    @property
    def tokens_per_crop(self) -> int:
        return self.vision.patches

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
TINY_LLM = LLMShape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=4, vocab=32000)
TINY_VISION = VisionShape(
    hidden=32, intermediate=64, layers=2, heads=4, image_size=56, patch_size=14, projection_dim=16
)

SHAPES: dict[str, ModelShape] = {
    "llava-v1.5-7b": ModelShape("llava-v1.5-7b", LLAMA_7B, CLIP_L14_336, crops=1),
    "llava-v1.5-13b": ModelShape("llava-v1.5-13b", LLAMA_13B, CLIP_L14_336, crops=1),
    "llava-v1.6-vicuna-7b": ModelShape("llava-v1.6-vicuna-7b", LLAMA_7B, CLIP_L14_336, crops=5),
    "llava-v1.6-vicuna-13b": ModelShape("llava-v1.6-vicuna-13b", LLAMA_13B, CLIP_L14_336, crops=5),
    "tiny": ModelShape("tiny", TINY_LLM, TINY_VISION, crops=1, projector_hidden=(64,)),
    "tiny-next": ModelShape("tiny-next", TINY_LLM, TINY_VISION, crops=5, projector_hidden=(64,)),
}


def get_shape(name: str) -> ModelShape:
    """Look up a named shape; ValueError naming the known ones otherwise."""
    if name not in SHAPES:
        raise ValueError(f"shape must be one of {sorted(SHAPES)}, got {name!r}")
    return SHAPES[name]


def _check_tokens(n: int, what: str = "n") -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"{what} must be a non-negative int, got {n!r}")


def llm_layer_macs(n: int, d: int, m: int) -> float:
    """MACs of one LLaMA decoder layer over ``n`` tokens: ``4nd^2 + 2n^2d + 3ndm`` (paper's formula)."""
    _check_tokens(n)
    return 4.0 * n * d * d + 2.0 * n * n * d + 3.0 * n * d * m


def paper_tflops(n_visual: int, llm: LLMShape = LLAMA_7B, layers: int | None = None) -> float:
    """The paper's TFLOPs for ``n_visual`` visual tokens over all (or ``layers``) LLM layers."""
    num_layers = llm.layers if layers is None else layers
    return num_layers * llm_layer_macs(n_visual, llm.hidden, llm.intermediate) / TERA


def paper_proportional_tflops(n_visual: int, n_full: int, llm: LLMShape = LLAMA_7B) -> float:
    """How the paper's LLaVA-NeXT rows were scaled: ``tflops(n_full) * n_visual / n_full``.

    This is linear in ``n_visual`` (the quadratic attention term is scaled as if it were linear),
    so it overstates the compute of pruned settings slightly: 320 tokens -> 2.314 vs 2.099.
    """
    _check_tokens(n_visual, "n_visual")
    if n_full <= 0:
        raise ValueError(f"n_full must be positive, got {n_full}")
    return paper_tflops(n_full, llm) * n_visual / n_full


def fastv_tflops(n_full: int, n_kept: int, llm: LLMShape = LLAMA_7B, k: int = 2) -> float:
    """Paper-convention TFLOPs of FastV: the first ``k`` layers see all ``n_full`` visual tokens,
    the remaining ``layers - k`` see only ``n_kept``."""
    if not 0 <= k <= llm.layers:
        raise ValueError(f"k (FastV layer) must be in [0, {llm.layers}], got {k}")
    if n_kept > n_full:
        raise ValueError(f"n_kept ({n_kept}) must be <= n_full ({n_full})")
    return paper_tflops(n_full, llm, layers=k) + paper_tflops(n_kept, llm, layers=llm.layers - k)


#: In-LLM methods whose visual tokens change at several decoder layers: their per-layer counts come from the
#: one schedule of the pruning library (``script_prune.inllm.layer_tokens``, registry defaults unless given).
STAGED_METHODS = ("sparsevlm", "pdrop")


def staged_tflops(shape: ModelShape, method: str, budget_per_crop: int, params: dict | None = None) -> float:
    """Paper-convention TFLOPs of a multi-stage in-LLM method: layer by layer, ``crops`` x the visual tokens per
    crop that layer sees (SparseVLM's merged tokens included), ``budget_per_crop`` being the tables' average."""
    from script_prune import get_method, inllm  # torch only for the staged methods

    if method not in STAGED_METHODS:
        raise ValueError(f"method must be one of {STAGED_METHODS}, got {method!r}")
    n = shape.tokens_per_crop
    params = {**get_method(method).params, **(params or {})}
    counts = inllm.layer_tokens(method, min(shape.visual_tokens(budget_per_crop) // shape.crops, n), n,
                                shape.llm.layers, params)
    return sum(llm_layer_macs(shape.crops * c, shape.llm.hidden, shape.llm.intermediate) for c in counts) / TERA


def method_tflops(shape: ModelShape, method: str, budget_per_crop: int, fastv_k: int = 2,
                  params: dict | None = None) -> float:
    """Paper-convention TFLOPs for ``method`` at ``budget_per_crop`` (the in-LLM methods are layer-aware;
    ``params``: a staged method's parameters)."""
    n_kept = shape.visual_tokens(budget_per_crop)
    if method == "fastv":
        return fastv_tflops(shape.full_visual_tokens, n_kept, shape.llm, k=fastv_k)
    if method in STAGED_METHODS:
        return staged_tflops(shape, method, budget_per_crop, params)
    return paper_tflops(n_kept, shape.llm)


def vision_tower_macs(vision: VisionShape, crops: int = 1, layers: int | None = None) -> float:
    """MACs of a CLIP ViT over ``crops`` images: patch embedding + per layer ``4nd^2 + 2n^2d + 2ndm``
    (two-matrix MLP) with n = patches + [CLS]. ``layers`` defaults to all encoder layers (what a
    Hugging Face forward computes even though LLaVA reads the penultimate layer)."""
    num_layers = vision.layers if layers is None else layers
    n, d, m = vision.tokens, vision.hidden, vision.intermediate
    patch_embed = vision.patches * 3 * vision.patch_size**2 * d
    per_layer = 4.0 * n * d * d + 2.0 * n * n * d + 2.0 * n * d * m
    return crops * (patch_embed + num_layers * per_layer)


def projector_macs(shape: ModelShape, n_tokens: int) -> float:
    """MACs of the multimodal projector (a chain of linear layers) over ``n_tokens`` patch features."""
    _check_tokens(n_tokens, "n_tokens")
    widths = (shape.vision.hidden, *shape.projector_hidden, shape.llm.hidden)
    return float(n_tokens) * sum(a * b for a, b in zip(widths[:-1], widths[1:]))


def full_prefill_breakdown(
    shape: ModelShape, n_visual: int, n_text: int, fastv_k: int | None = None
) -> dict[str, dict[str, float | str]]:
    """Fuller prefill accounting, each entry labelled with its convention (all in T-MACs).

    - ``llm_visual_only``: the paper's number (visual tokens only).
    - ``llm_all_tokens``: same formula with n = visual + text tokens (the quadratic term then
      includes text-visual attention), plus the LM head on the last position.
    - ``vision_tower``: CLIP ViT over all crops (pruning happens after it, so it never shrinks).
    - ``projector``: mlp2x_gelu over the projected tokens (all patches: projection precedes selection).
    - ``total``: vision_tower + projector + llm_all_tokens.
    With ``fastv_k`` set, the LLM terms use ``shape.full_visual_tokens`` for the first k layers and
    ``n_visual`` after.
    """
    _check_tokens(n_visual, "n_visual")
    _check_tokens(n_text, "n_text")
    llm = shape.llm

    def llm_terms(n_vis: int, layers: int) -> float:
        return layers * llm_layer_macs(n_vis + n_text, llm.hidden, llm.intermediate)

    if fastv_k is None:
        llm_all = llm_terms(n_visual, llm.layers)
        llm_vis = paper_tflops(n_visual, llm) * TERA
    else:
        n_full = shape.full_visual_tokens
        llm_all = llm_terms(n_full, fastv_k) + llm_terms(n_visual, llm.layers - fastv_k)
        llm_vis = fastv_tflops(n_full, n_visual, llm, k=fastv_k) * TERA
    llm_all += llm.hidden * llm.vocab  # LM head for the next-token logits (last position only)
    vision = vision_tower_macs(shape.vision, crops=shape.crops)
    proj = projector_macs(shape, shape.full_visual_tokens)
    return {
        "llm_visual_only": {"tmacs": llm_vis / TERA, "convention": PAPER_CONVENTION},
        "llm_all_tokens": {
            "tmacs": llm_all / TERA,
            "convention": "same per-layer formula with n = visual + text tokens, plus LM head (1 position)",
        },
        "vision_tower": {
            "tmacs": vision / TERA,
            "convention": f"CLIP ViT, {shape.vision.layers} layers x {shape.crops} crop(s), "
            f"n={shape.vision.tokens}, 4nd^2+2n^2d+2ndm + patch embedding",
        },
        "projector": {
            "tmacs": proj / TERA,
            "convention": f"linear chain {shape.vision.hidden}->{'->'.join(map(str, shape.projector_hidden))}"
            f"->{llm.hidden} over {shape.full_visual_tokens} patch features",
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

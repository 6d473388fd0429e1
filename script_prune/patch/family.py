"""The family interface: what one model family tells the shared pruning layer.

A family (one small file: ``llava.py``, ``llava_next.py``, ...) subclasses :class:`Family` and
answers four questions; everything else (selection, relevance, the shortened prefill, the cache,
decoding, in-LLM methods) is shared:

1. ``encode``: the visual rows of a prefill (an image, a crop, a video frame each), as the
   projected tokens the LLM would receive ``(R, N, D)`` plus the vision tower's features.
2. ``layout``: given which tokens of every row are kept ``(R, N)`` bool, the sequence of visual
   tokens that fills the prompt's placeholder runs, in the order the stock model fills them,
   with a kept flag per token (the unpruned layout, so its length equals the placeholder count).
3. ``positions``: the position ids of the shortened prompt (1-D contiguous by default; M-RoPE
   families gather 3-D positions of the kept tokens instead) and how decoding continues.
4. ``decoder``: access to the LLM's decoder stack for in-LLM methods (:class:`DecoderAccess`).

``llm_inputs`` lets a family hand the LLM extra per-token inputs pruned with the same keep mask
(Qwen3-VL's DeepStack features). See docs/adding_a_family.md.
"""

from __future__ import annotations

import contextlib
import inspect
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator

import torch
from torch import Tensor, nn

#: Row id of a layout token that belongs to no row (LLaVA-NeXT's ``image_newline``).
LAYOUT_TOKEN = -2
#: Row id of text and padding positions.
TEXT = -1


@dataclass
class VisualRows:
    """The visual rows of one prefill, in sequence order (sample, then image, then crop / frame).

    tokens: (R, N, D) projected visual tokens, what the LLM receives and what selection runs on.
    vision_features: (R, N, C) the vision tower's selected-layer features (the projector input).
    row_image: (R,) long, which image / video (in sequence order over the batch) each row belongs to.
    image_lengths: (I,) long, placeholder tokens of each image / video in the unpruned prompt.
    lengths: (R,) long valid tokens per row when rows differ in length (dynamic resolution; the
        rows are then right-padded to N and the budget resolves per length), None when all are N.
    inputs: per-row method inputs the family provides on request (``Family.provides``), e.g.
        VisionZip's ``cls_attention`` (R, N) and ``keys`` (R, N, hd).
    extra: family data the layout needs (e.g. NeXT grid shapes).
    """

    tokens: Tensor
    vision_features: Tensor
    row_image: Tensor
    image_lengths: Tensor
    lengths: Tensor | None = None
    inputs: dict[str, Tensor] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]

    @property
    def row_length(self) -> int:
        return self.tokens.shape[1]


@dataclass
class Layout:
    """Visual tokens for the placeholder runs of the whole batch, in placeholder (scatter) order.

    tokens: (T', D); kept: (T',) bool, the tokens that stay in the shortened prompt, in this order;
    row: (T',) long, the visual row of each token (LAYOUT_TOKEN for layout markers such as newlines,
    and for merged tokens); index: (T',) long, its index within its row (-1 for markers / merged);
    image: (T',) long, the image each entry belongs to. Without merged tokens T' is the placeholder
    count; merged tokens (``merged`` given to ``Family.layout``) come as extra kept entries and
    :func:`fit_layout` moves each image's kept entries first and cuts it to its placeholder count.
    """

    tokens: Tensor
    kept: Tensor
    row: Tensor
    index: Tensor
    image: Tensor


def fit_layout(layout: Layout, image_lengths: Tensor) -> Layout:
    """Each image's kept entries first (order kept), then its dropped ones, cut to its placeholder count.

    Needs at most ``image_lengths[i]`` kept entries per image (true for any budget: a row keeps at most
    its N tokens, merged ones included). # T' entries -> T = image_lengths.sum() entries
    """
    total = layout.kept.shape[0]
    position = torch.arange(total, device=layout.kept.device)
    key = layout.image * (2 * total) + (~layout.kept) * total + position  # by image, kept first, then order
    order = torch.sort(key).indices
    image = layout.image[order]
    counts = torch.bincount(layout.image, minlength=image_lengths.shape[0])  # (I,) entries per image
    rank = position - (counts.cumsum(0) - counts)[image]
    order = order[rank < image_lengths[image]]
    return Layout(layout.tokens[order], layout.kept[order], layout.row[order], layout.index[order],
                  layout.image[order])


#: host values read during the current prefill, by key (:func:`read_once`); None outside a prefill
_PREFILL_READS: ContextVar[dict | None] = ContextVar("script_prune_prefill_reads", default=None)


@contextlib.contextmanager
def one_read_per_prefill() -> Iterator[None]:
    """The span of one prefill: inside it, :func:`read_once` reads each key's host values once."""
    token = _PREFILL_READS.set({})
    try:
        yield
    finally:
        _PREFILL_READS.reset(token)


def read_once(key: tuple, read: Callable[[], Any]) -> Any:
    """``read()`` (values a family needs on the host, e.g. image sizes or grids: a host sync) made once per
    ``key`` within one prefill, where the family asks twice (its row lengths, then its encoder); outside a
    prefill it reads every time. Key by the ``id`` of the call's tensors the read depends on (the call keeps
    them alive for the whole prefill)."""
    reads = _PREFILL_READS.get()
    if reads is None:
        return read()
    if key not in reads:
        reads[key] = read()
    return reads[key]


def device_index(values: list[int], device: torch.device) -> Tensor:
    """A host list of indices as a long tensor on ``device``, copied without blocking the host."""
    index = torch.tensor(values, dtype=torch.long)
    if device.type == "cuda":
        index = index.pin_memory()
    return index.to(device, non_blocking=True)


def rotate_half(x: Tensor) -> Tensor:
    """``[-x2, x1]`` of the two halves of the last dim (the rotate-half RoPE convention). # (..., d)"""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


@dataclass
class DecoderAccess:
    """What in-LLM methods need of a decoder stack (a ``LlamaModel``-like module).

    The default reads the attribute names Llama, Mistral and Qwen2 decoders share (``layers``,
    ``norm``, ``rotary_emb``, ``self_attn.{q,k}_proj``, ``input_layernorm``) and applies 1-D
    rotate-half RoPE; a family with other names or M-RoPE overrides :meth:`rope` /
    :meth:`last_query_attention`.
    """

    module: nn.Module

    @property
    def config(self):
        return self.module.config

    @property
    def layers(self) -> list[nn.Module]:
        return list(self.module.layers[: self.config.num_hidden_layers])

    def norm(self, hidden: Tensor) -> Tensor:
        return self.module.norm(hidden)

    def rope(self, hidden: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """(cos, sin) as the layers receive them. # (B, L, D), (B, L) -> 2 x (B, L, hd)"""
        return self.module.rotary_emb(hidden, position_ids=position_ids)

    @staticmethod
    def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """RoPE on heads ``x`` (B, H, L, hd) with cos/sin (B, L, hd)."""
        return x * cos[:, None] + rotate_half(x) * sin[:, None]

    def last_query_attention(self, layer: nn.Module, hidden: Tensor, rope: tuple[Tensor, Tensor],
                             mask: Tensor) -> Tensor:
        """Softmax attention of each row's last real token over all keys at ``layer``, mean over heads.

        hidden: (B, L, D) the layer's input; rope: its (cos, sin); mask: (B, L) 0/1 padding mask.
        -> (B, L) float32 (see :meth:`query_attention`).
        """
        positions = torch.arange(mask.shape[1], device=mask.device)
        last = (mask.bool() * (positions + 1)).argmax(dim=1)  # (B,) last real token, either padding side
        return self.query_attention(layer, hidden, rope, mask, last[:, None])[:, 0]

    def query_attention(self, layer: nn.Module, hidden: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor,
                        queries: Tensor) -> Tensor:
        """Softmax attention rows of the queries at positions ``queries`` (B, Q) at ``layer``, mean over heads.

        Computed from the layer's own q/k projections for those queries only, so the layers keep their
        attention implementation (sdpa / flash) and no L x L matrix is formed. Masked or later keys get 0.
        -> (B, Q, L) float32.
        """
        attn = layer.self_attn
        normed = layer.input_layernorm(hidden)
        batch, length, _ = normed.shape
        hd = attn.head_dim
        positions = torch.arange(length, device=mask.device)
        rows = torch.arange(batch, device=normed.device)[:, None]  # (B, 1)
        cos, sin = (t.expand(batch, -1, -1) for t in rope)
        count = queries.shape[1]
        query = attn.q_proj(normed[rows, queries]).view(batch, count, -1, hd).transpose(1, 2)  # (B, H, Q, hd)
        keys = attn.k_proj(normed).view(batch, length, -1, hd).transpose(1, 2)  # (B, Hkv, L, hd)
        query = self.apply_rope(query, cos[rows, queries], sin[rows, queries])
        keys = self.apply_rope(keys, cos, sin)
        groups = query.shape[1] // keys.shape[1]
        query = query.reshape(batch, keys.shape[1], groups, count, hd)  # head h uses kv head h // G
        logits = torch.einsum("bkgqd,bkld->bkgql", query.float(), keys.float()) * float(attn.scaling)
        allowed = mask.bool()[:, None] & (positions[None, None] <= queries[..., None])  # (B, Q, L)
        logits = logits.masked_fill(~allowed[:, None, None], float("-inf"))
        return logits.softmax(dim=-1).mean(dim=(1, 2))  # (B, Q, L)


class Family:
    """One model family. Subclasses set ``name`` / ``class_names`` and implement ``encode`` and ``layout``."""

    name: ClassVar[str] = ""
    #: transformers class names this family patches (checked by exact class, not subclass).
    class_names: ClassVar[tuple[str, ...]] = ()
    #: relevance source used when ``apply`` gets none (None: the family has none; methods needing
    #: relevance then ask for one).
    default_relevance: ClassVar[str | None] = None
    #: method inputs (beyond relevance) ``encode`` can provide, e.g. VisionZip's ("cls_attention", "keys").
    provides: ClassVar[tuple[str, ...]] = ()
    #: forward arguments whose presence on an empty cache makes a prefill "visual" (video: add
    #: ``pixel_values_videos``).
    visual_inputs: ClassVar[tuple[str, ...]] = ("pixel_values",)
    #: forward arguments that carry visual inputs, dropped from the LLM call once spliced.
    visual_keys: ClassVar[tuple[str, ...]] = ("pixel_values", "image_sizes")
    #: budget ``apply`` uses when given none (an int per row; dynamic-resolution families: a fraction).
    default_budget: ClassVar[int | float] = 64
    #: False: merging methods (TRIM, VisionZip) are refused (a merged token has no original position,
    #: which M-RoPE families need).
    merging: ClassVar[bool] = True
    #: what the family lacks for what it refuses, named in ``apply``'s errors: keys ``"merging"`` (merging
    #: methods when ``merging`` is False), ``"attention"`` (vision-attention inputs such as VisionZip's
    #: ``cls_attention`` / ``keys`` not in ``provides``), ``"clip_text"`` (no CLIP joint space for that relevance)
    missing: ClassVar[dict[str, str]] = {}
    #: False: in-LLM methods (FastV, SparseVLM, PDrop) are refused (the decoder loop cannot carry the family's LLM).
    in_llm: ClassVar[bool] = True
    #: lowest transformers release this family was tested on (None: the project's whole declared range);
    #: ``apply`` refuses an older one by name instead of pruning through hook points that moved
    min_transformers: ClassVar[str | None] = None

    # -- vision side ---------------------------------------------------------------------------
    def encode(self, model: nn.Module, call: dict[str, Any], needs: frozenset[str] = frozenset()) -> VisualRows:
        """The visual rows of a call; ``needs``: the method inputs of ``provides`` to fill in ``VisualRows.inputs``."""
        raise NotImplementedError

    def layout(self, model: nn.Module, rows: VisualRows, keep: Tensor, merged: Tensor | None = None) -> Layout:
        """The layout of ``keep`` (R, N) bool; ``merged`` (R, e, D): projected merged tokens of every row
        (merging methods), placed where the family puts them (after their row's kept tokens)."""
        raise NotImplementedError

    def project(self, model: nn.Module, features: Tensor) -> Tensor:
        """Vision features (pre-projector, as ``VisualRows.vision_features``) -> LLM tokens. (..., C) -> (..., D)"""
        return model.model.multi_modal_projector(features)

    def row_length(self, model: nn.Module) -> int:
        """Tokens per visual row before pruning (the N of the budget)."""
        raise NotImplementedError

    def num_rows(self, model: nn.Module, call: dict[str, Any]) -> int:
        """Visual rows of a call, without running the vision tower (for ``kept`` of an unpruned prefill)."""
        raise NotImplementedError

    def stock_layout(self, model: nn.Module) -> bool:
        """True when the stock forward lays the rows out as :meth:`encode` does, so a budget that keeps whole
        rows may run it unchanged (False: an option such as LLaVA-Video's average pooling changes the rows)."""
        return True

    def row_lengths(self, model: nn.Module, call: dict[str, Any]) -> list[int]:
        """Tokens of every row of a call in sequence order, without running the vision tower (the budget
        keeps whole rows when it keeps the longest). Default: ``row_length`` for each of ``num_rows``."""
        return [self.row_length(model)] * self.num_rows(model, call)

    def images_per_prompt(self, model: nn.Module, input_ids: Tensor) -> Tensor:
        """(B,) images of every prompt: its placeholder runs (each image is one contiguous run). Used to
        repeat per-image inputs by prompt when generate() expands prompts (beams, num_return_sequences)."""
        placeholder = self.placeholder_mask(model, input_ids)
        starts = placeholder.clone()
        starts[:, 1:] &= ~placeholder[:, :-1]
        return starts.sum(dim=1)

    def visual_blocks(self, model: nn.Module, call: dict[str, Any]) -> dict[str, tuple[list[int], list[int]]]:
        """How generate() repeats a call's visual inputs per prompt (beams, num_return_sequences): for every
        visual tensor given, its consecutive dim-0 blocks (rows per image / video / prompt) and the prompt of
        each block, prompts ascending. Inputs not named (per-token ones such as ``mm_token_type_ids``) are
        repeated per row by the stock expansion. Default: one row of ``visual_keys`` per image
        (:meth:`images_per_prompt`)."""
        counts = self.images_per_prompt(model, call["input_ids"]).tolist()  # one host sync per generate
        prompts = [b for b, count in enumerate(counts) for _ in range(count)]
        return {key: ([1] * len(prompts), prompts) for key in self.visual_keys if isinstance(call.get(key), Tensor)}

    def item_prompts(self, model: nn.Module, input_ids: Tensor, lengths: list[int]) -> list[int]:
        """The prompt of every placeholder item (image / video / frame run), given the placeholder tokens of
        each in scatter order. # (B, L), I lengths -> I prompts"""
        slots = self.placeholder_mask(model, input_ids).nonzero()[:, 0]  # (T,) prompt of every placeholder
        starts = torch.tensor([sum(lengths[:i]) for i in range(len(lengths))], dtype=torch.long)
        return slots[starts.to(slots.device)].tolist() if lengths else []

    def placeholder_mask(self, model: nn.Module, input_ids: Tensor) -> Tensor:
        """(B, L) bool: the placeholder positions the rows' layout fills, in scatter order (images and,
        for video families, video placeholders: those of ``video_token_id`` when the config has one)."""
        mask = input_ids == int(model.config.image_token_id)
        video = getattr(model.config, "video_token_id", None)
        return mask if video is None else mask | (input_ids == int(video))

    def embed_tokens(self, model: nn.Module) -> nn.Module:
        return model.get_input_embeddings()

    def vision_post_layernorm(self, model: nn.Module) -> nn.Module | None:
        """The vision tower's final LayerNorm (CLIP joint-space embeddings for ``clip_text``), if any."""
        tower = model.model.vision_tower
        return getattr(getattr(tower, "vision_model", tower), "post_layernorm", None)

    # -- LLM side ------------------------------------------------------------------------------
    def language_model(self, model: nn.Module) -> nn.Module:
        return model.model.language_model

    def decoder(self, model: nn.Module) -> DecoderAccess:
        return DecoderAccess(self.language_model(model))

    def positions(self, model: nn.Module, call: dict[str, Any], index: Tensor, mask: Tensor) -> Tensor:
        """Position ids of the shortened prompt: LLaVA's contiguous positions over real tokens.

        index: (B, Ls) source positions of the shortened prompt; mask: (B, Ls) 0/1. M-RoPE
        families gather their 3-D positions with ``index`` instead. -> (B, Ls) long.
        """
        return (mask.long().cumsum(dim=1) - 1).clamp(min=0)

    def continue_from(self, model: nn.Module, positions: Tensor, mask: Tensor) -> None:
        """Called with the short prompt's positions ((B, Ls), or (3, B, Ls) for M-RoPE) and 0/1 mask once an
        in-LLM method pruned it; M-RoPE families set ``rope_deltas`` from them. Nothing by default."""

    def decode_shift(self, model: nn.Module, real: Tensor, short_mask: Tensor) -> Tensor:
        """(B, 1) to subtract from generate()'s decoding position ids (counted over the original
        prompt): the tokens each row dropped. M-RoPE families that continue from ``rope_deltas``
        (set in :meth:`positions`) return zeros."""
        return (real.sum(dim=1) - short_mask.sum(dim=1))[:, None]

    def decoder_additions(self, model: nn.Module, rows: VisualRows, layout: Layout) -> Tensor | None:
        """Features the LLM adds to the hidden states of the visual positions after its first layers (Qwen3-VL's
        DeepStack), for in-LLM methods: (levels, T, D) in placeholder (layout) order, level i added after decoder
        layer i. None by default."""
        return None

    def llm_inputs(self, model: nn.Module, rows: VisualRows, layout: Layout, index: Tensor,
                   mask: Tensor, kept_per_row: list[int] | None) -> dict[str, Any]:
        """Extra (or replacing) arguments of the short call, pruned with the same keep mask (DeepStack);
        index / mask: (B, Ls) the short prompt's source positions and 0/1 mask; kept_per_row: the kept tokens
        of every row, known on the host from the budget so that sizes need no device read (None for merging
        methods, whose counts vary). None by default."""
        return {}


# How the installed transformers names the KV cache, read from its own signatures / output classes: 5.24 renamed
# ``past_key_values`` to ``cache`` (argument of the decoder layers, of *Model / *ForCausalLM forward and of
# create_causal_mask, field of the outputs) and ignores the old name when both are given, so passing the wrong
# one silently leaves a cache unfilled. Every use in script_prune.patch goes through these two functions.
def cache_keyword(fn: Any) -> str:
    """``"cache"`` (transformers >= 5.24) or ``"past_key_values"``: how ``fn`` takes the KV cache."""
    params = inspect.signature(fn).parameters
    return "cache" if "cache" in params else "past_key_values"


def output_cache_field(output_type: type) -> str:
    """``"cache"`` (transformers >= 5.24) or ``"past_key_values"``: the KV-cache field of a model output class
    (reading the other name would trigger its deprecation warning)."""
    return "cache" if "cache" in getattr(output_type, "__dataclass_fields__", {}) else "past_key_values"

"""In-LLM methods (``MethodSpec.stage == "llm"``: FastV) on the shared layer.

FastV (Chen et al., ECCV 2024): decoder layers ``0 .. K-1`` run on the whole prompt; the K-th
layer's attention of the last prompt token over the visual tokens (mean over heads) ranks them,
and the layers ``K ..`` see text + the ``k`` best tokens of every visual row only
(``script_prune.select(..., method="fastv", scores=...)``, budget per row as on the vision side;
layout tokens such as NeXT newlines always stay). Here:

- the score row comes from that layer's own q/k projections for one query
  (:meth:`DecoderAccess.last_query_attention`), so every layer keeps sdpa / flash-attention;
- kept tokens keep their original position ids (FastV's choice: RoPE distances to the text are
  unchanged; 3-D M-RoPE positions for Qwen-VL) and decoding continues at the original positions;
- the dropped tokens' entries also leave the cache of layers ``0 .. K-1``, so every layer's cache
  holds the same short sequence and decoding runs on it with the stock mask code (FastV's release
  keeps them in the first K layers: there, decoded tokens still see the dropped tokens early on).

The stock top-level forward runs unchanged; only the language model's forward is swapped for the
duration of the prefill call, so logits, loss and output classes stay transformers' own.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast

import script_prune as sp

from .family import TEXT, DecoderAccess, VisualRows, cache_keyword, output_cache_field
from .prefill import PatchState, Prompt, PromptState, first_given, gather_tokens, pack, without_pixels

#: How this transformers version passes the cache to decoder layers / the mask function / outputs.
OUTPUT_CACHE_FIELD = output_cache_field(BaseModelOutputWithPast)
MASK_CACHE_KEYWORD = cache_keyword(create_causal_mask)


def check_layer(method: str, layer: Any, num_layers: int) -> int:
    """FastV's K must name a decoder layer after which some layers remain: 1 <= K < num_layers."""
    if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer < num_layers:
        raise ValueError(f"parameter 'layer' (K) of in-LLM method {method!r} must be an int in [1, {num_layers - 1}] "
                         f"for this LLM ({num_layers} decoder layers), got {layer!r}")
    return layer


def row_top_k(scores: Tensor, row_of: Tensor, real: Tensor, k: int, num_rows: int, method: str,
              layer: int) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor]]:
    """Keep mask after layer K and the kept tokens of every row.

    scores, row_of: (B, L) (row id >= 0 for visual tokens, < 0 for text / layout tokens);
    real: (B, L) bool. All rows go through one ``script_prune.select`` on an (R, W) score matrix
    padded with -1 (attention probabilities are >= 0). -> keep (B, L) bool, chosen (R, W) bool and
    the slots (row (M,), slot (M,), (sample, position) (M, 2)) of the M visual tokens.
    """
    visual = (row_of >= 0) & real
    where = visual.nonzero()  # (M, 2)
    rid = row_of[where[:, 0], where[:, 1]]
    order = torch.sort(rid, stable=True).indices
    where, rid = where[order], rid[order]
    counts = torch.bincount(rid, minlength=num_rows)  # (R,)
    slot = torch.arange(rid.shape[0], device=rid.device) - (counts.cumsum(0) - counts)[rid]
    width = int(counts.max())
    padded = scores.new_full((num_rows, width), -1.0)
    padded[rid, slot] = scores[where[:, 0], where[:, 1]].float()
    picked = sp.select(padded[..., None], k, method, scores=padded, layer=layer)  # (R, min(k, W))
    chosen = torch.zeros(num_rows, width, dtype=torch.bool, device=scores.device).scatter_(1, picked, True)
    chosen &= torch.arange(width, device=scores.device)[None] < counts[:, None]
    keep = real & ~visual
    keep[where[:, 0], where[:, 1]] = chosen[rid, slot]
    return keep, chosen, (rid, slot, where)


def kept_per_row(index_of: Tensor, chosen: Tensor, slots: tuple[Tensor, Tensor, Tensor], n: int) -> list[Tensor]:
    """Ascending within-row indices of the kept tokens of every row (for ``script_prune.patch.kept``)."""
    rid, slot, where = slots
    values = torch.full(chosen.shape, n, dtype=torch.long, device=chosen.device)  # (R, W), n = not kept
    values[rid, slot] = index_of[where[:, 0], where[:, 1]]
    values = torch.sort(values.masked_fill(~chosen, n), dim=1).values
    return [row[:c] for row, c in zip(values, chosen.sum(dim=1).tolist())]


def shorten_cache(cache: Any, index: Tensor, upto: int) -> None:
    """Keep only positions ``index`` (B, Ls) in the cached keys / values of layers ``0 .. upto-1``."""
    for layer in cache.layers[:upto]:
        gather = index[:, None, :, None].to(layer.keys.device)
        layer.keys = layer.keys.gather(2, gather.expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1]))
        layer.values = layer.values.gather(2, gather.expand(-1, layer.values.shape[1], -1, layer.values.shape[-1]))


def check_cache_length(cache: Any, upto: int, length: int, stage: str, keyword: str) -> None:
    """Layers ``0 .. upto-1`` of the cache must hold exactly ``length`` positions at this ``stage`` of an in-LLM
    prefill (the whole prompt before shortening, text + kept tokens after it). A layer left empty or unshortened
    means the decoder did not write the cache it was handed (e.g. an upstream rename of the cache argument, as in
    transformers 5.24): stop with a clear error rather than decode from a wrong cache. Shapes only, no host sync."""
    for i, layer in enumerate(cache.layers[:upto]):
        held = None if getattr(layer, "keys", None) is None else layer.keys.shape[2]
        if held != length:
            what = "was not filled" if held is None else f"holds {held} positions"
            raise RuntimeError(
                f"in-LLM pruning: layer {i} of the KV cache {what}, expected {length} ({stage}); the decoder layers "
                f"did not write the cache handed to them as `{keyword}=` -- decoding from it would give wrong "
                "results, so generation stops here"
            )


def fastv_language_forward(access: DecoderAccess, state: PatchState, prompt: Prompt, row_of: Tensor,
                           index_of: Tensor, shape: tuple[int, int], k: int, layer_k: int, full_length: int,
                           **kwargs: Any) -> BaseModelOutputWithPast:
    """The decoder stack with FastV after layer K (stands in for the language model's forward once)."""
    for unsupported in ("output_attentions", "output_hidden_states"):
        if kwargs.pop(unsupported, None):
            raise ValueError(f"{unsupported} is not supported with in-LLM pruning (the layers after K see fewer tokens)")
    kwargs.pop("return_dict", None)
    hidden = kwargs.pop("inputs_embeds")  # (B, L, D)
    mask = kwargs.pop("attention_mask").long()  # (B, L)
    positions = kwargs.pop("position_ids")
    cache = first_given(kwargs.pop("cache", None), kwargs.pop("past_key_values", None))
    use_cache = kwargs.pop("use_cache", None)
    config = access.config
    use_cache = config.use_cache if use_cache is None else use_cache
    if use_cache and cache is None:
        cache = DynamicCache(config=config)
    if cache is not None and not isinstance(cache, DynamicCache):
        raise ValueError(f"in-LLM pruning shortens the KV cache in place and needs a DynamicCache, got {type(cache).__name__}")
    layers = access.layers
    keyword = state.extra["layer_cache_keyword"]

    def run(chunk, hidden, causal, rope, position_ids):
        for layer in chunk:
            hidden = layer(hidden, attention_mask=causal, position_embeddings=rope, position_ids=position_ids,
                           use_cache=use_cache, **{keyword: cache}, **kwargs)
        return hidden

    mrope = positions.dim() == 3  # M-RoPE (3, B, L): the masks take no positions (they only detect packing)
    positions = positions[-3:] if mrope else positions  # generate() hands Qwen-VL 4 rows, the first for the text
    causal = create_causal_mask(config=config, inputs_embeds=hidden, attention_mask=mask,
                                position_ids=None if mrope else positions, **{MASK_CACHE_KEYWORD: cache})
    rope = access.rope(hidden, positions)
    hidden = run(layers[: layer_k - 1], hidden, causal, rope, positions)
    scores = access.last_query_attention(layers[layer_k - 1], hidden, rope, mask)  # (B, L) float32
    hidden = run(layers[layer_k - 1: layer_k], hidden, causal, rope, positions)

    num_rows, row_length = shape
    keep, chosen, slots = row_top_k(scores, row_of, prompt.real, k, num_rows, state.config.method, layer_k)
    state.visual_counts = (keep & prompt.placeholder).sum(dim=1)  # after layer K
    index, short_mask = pack(keep, prompt.left)  # (B, Ls)
    hidden = gather_tokens(hidden, index)
    if mrope:  # kept tokens keep their 3-D positions
        short_positions = positions.gather(2, index[None].expand(3, -1, -1))  # (3, B, Ls)
    else:
        short_positions = positions.expand(hidden.shape[0], -1).gather(1, index)
    state.extra["short_prompt"] = (short_positions, short_mask)
    if cache is not None:
        check_cache_length(cache, layer_k, full_length, "the whole prompt, before shortening", keyword)
        shorten_cache(cache, index, layer_k)
        state.prompt = PromptState(weakref.ref(cache), full_length, short_mask,
                                   torch.zeros_like(short_mask[:, :1]), bool((short_mask == 0).any()))
    state.kept = kept_per_row(index_of, chosen, slots, row_length)
    # layers >= K start with an empty cache: their mask is sized from the short prompt alone
    causal = create_causal_mask(config=config, inputs_embeds=hidden, attention_mask=short_mask,
                                position_ids=None if mrope else short_positions, **{MASK_CACHE_KEYWORD: None})
    rope = access.rope(hidden, short_positions)
    # Positions reach these layers through RoPE only: flash-attention would read the non-contiguous ids of
    # an unpadded row as packed sequences.
    hidden = run(layers[layer_k:], hidden, causal, rope, None)
    if cache is not None:
        check_cache_length(cache, len(layers), index.shape[1], "text + kept tokens", keyword)
    return BaseModelOutputWithPast(last_hidden_state=access.norm(hidden), **{OUTPUT_CACHE_FIELD: cache if use_cache else None})


def in_llm_prefill(model: nn.Module, state: PatchState, call: dict[str, Any], rows: VisualRows, prompt: Prompt,
                   k: int) -> Any:
    """The whole prompt goes in; the language model prunes after layer K (see the module docstring)."""
    family, cfg = state.family, state.config
    if call.get("labels") is not None:
        raise ValueError(f"labels are not supported with in-LLM pruning ({cfg.method!r} drops positions inside the "
                         "LLM, so the logits no longer align with the labels)")
    keep_all = torch.ones(rows.tokens.shape[:2], dtype=torch.bool, device=rows.tokens.device)
    layout = family.layout(model, rows, keep_all)
    where = prompt.placeholder
    embeds = prompt.embeds.masked_scatter(where[..., None], layout.tokens.to(prompt.embeds.dtype))
    row_of = torch.full_like(call["input_ids"], TEXT).masked_scatter(where, layout.row)
    index_of = torch.full_like(call["input_ids"], -1).masked_scatter(where, layout.index)
    positions = call.get("position_ids")
    if positions is None:  # the family's positions of the whole prompt (LLaVA: contiguous; Qwen-VL: 3-D M-RoPE)
        every = torch.arange(prompt.real.shape[1], device=prompt.real.device).expand_as(prompt.real)
        positions = family.positions(model, call, every, prompt.real.long())
    full_call = without_pixels(family, call)
    full_call.update(inputs_embeds=embeds, attention_mask=prompt.real.long(), position_ids=positions)
    language_model = family.language_model(model)
    layer_k = cfg.params.get("layer", cfg.spec.params["layer"])
    previous = language_model.__dict__.get("forward")
    language_model.forward = functools.partial(
        fastv_language_forward, family.decoder(model), state, prompt, row_of, index_of, rows.tokens.shape[:2], k, layer_k,
        call["input_ids"].shape[1])
    try:
        output = state.stock_forward(**full_call)
    finally:
        if previous is None:
            del language_model.forward
        else:
            language_model.forward = previous
    family.continue_from(model, *state.extra.pop("short_prompt"))
    return output

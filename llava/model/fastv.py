"""FastV inside the LLM: prune image tokens after decoder layer K, for the rest of the prefill and for decoding.

Transitional: the LLaVA models prune with ``script_prune.patch.in_llm`` now; only the efficiency tool's
stage-by-stage timing (``llava.eval.efficiency.llm_stage_prefill``: a bare decoder fed ``inputs_embeds``)
still calls this module. It goes once that tool times FastV through the layer.

FastV (Chen et al., ECCV 2024) keeps the image tokens that receive the most attention from the last prompt
token at layer K and drops the others from every later layer. Here:

- ``K = params["layer"]`` (default 2). Decoder layers ``0 .. K-1`` run on the full sequence. The score row is
  the attention of the K-th decoder layer (index ``K-1``, the last one that sees every token), as in FastV's
  release: the last prompt token's query against all keys of that layer, RoPE applied as the layer applies
  it, grouped-query heads mapped to their key/value head, softmax, mean over heads. It is computed here from
  the layer's own ``q_proj``/``k_proj`` for that one query (``last_token_attention``), so every layer keeps
  running with sdpa / flash-attention (no ``output_attentions``, no eager attention).
- Selection: ``script_prune.select(..., method="fastv", scores=...)`` with the budget per image row: per
  LLaVA-1.5 image and per LLaVA-NeXT crop (the base image and every anyres tile keep ``visual_token_num``
  each; a crop cut by the unpad step that holds fewer tokens keeps them all). NeXT ``image_newline`` tokens
  are layout markers: always kept, not counted in the budget (the vision-side budget does not count them
  either). All crops of the batch go through one ``select`` call (rows padded with score -1, which attention
  probabilities never reach).
- Layers ``K .. L-1`` see only text + kept image tokens. Kept tokens keep their ORIGINAL position ids (as
  FastV does), so RoPE distances to the text are unchanged; decoding continues at the original positions.
- KV cache: the entries of the dropped tokens are also removed from layers ``0 .. K-1``, so every layer's
  cache holds the same shortened sequence and decoding uses one consistent cache (all transformers mask
  helpers then work unchanged, and the KV memory is that of the kept tokens). FastV's KV-cache release keeps
  the full cache in layers ``< K`` instead: there, decoded tokens still attend to the dropped image tokens
  in the first K layers. This is the one deliberate difference.
- Batches: rows keep different numbers of tokens when their crops differ; the shortened batch stays
  rectangular by keeping, per row, as many extra dropped/padding positions as needed, masked out
  (attention mask 0) exactly like padding.

The shortened prompt mask is stored on the cache object (``FASTV_STATE``) so decoding steps, whose 2D
attention mask generate() keeps growing from the ORIGINAL prompt length, are mapped onto the shortened cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import script_prune as sp
from script_prune.patch.in_llm import check_cache_length

from .hf_compat import CACHE_ARG, MASK_CACHE_ARG, OUTPUT_CACHE_FIELD

# visual_rows codes (B, L) long: >= 0 image row (crop) id, TEXT for text/padding, ALWAYS_KEPT for NeXT newlines
TEXT = -1
ALWAYS_KEPT = -2
FASTV_STATE = "llava_fastv_state"  # attribute of the cache holding FastVCacheState


@dataclass(frozen=True)
class LLMPruning:
    """In-LLM pruning setting: drop image tokens after decoder layer ``layer``, keep ``budget`` per image row."""

    layer: int
    budget: int
    method: str = "fastv"


@dataclass
class FastVCacheState:
    """What decoding needs after a FastV prefill.

    prompt_mask: (B, Ls) long, the attention mask of the shortened prompt held in the cache.
    prompt_length: L, the original (spliced, padded) prompt length generate() counts from.
    next_position: (B, 1) long, original position id of the first decoded token.
    """

    prompt_mask: torch.Tensor
    prompt_length: int
    next_position: torch.Tensor

    @property
    def dropped(self) -> int:
        return self.prompt_length - self.prompt_mask.shape[1]


# ------------------------------------------------------------------------------------------ scores
def last_real_index(mask: torch.Tensor) -> torch.Tensor:
    """(B, L) 0/1 mask -> (B,) index of the last real token of each row (either padding side)."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return (mask.bool() * (positions + 1)).argmax(dim=1)


def last_token_attention(attn: torch.nn.Module, normed: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                         mask: torch.Tensor) -> torch.Tensor:
    """Attention probabilities of each row's last real token over all keys, mean over heads -> (B, L) float32.

    attn: the layer's self-attention module (q_proj, k_proj, head_dim, scaling, num_key_value_groups);
    normed: (B, L, D) the layer's input after its input_layernorm; position_embeddings: (cos, sin) (B, L, hd)
    as the layer receives them; mask: (B, L) 0/1 padding mask. Keys after the query or masked get 0.
    """
    batch, length, _ = normed.shape
    rows = torch.arange(batch, device=normed.device)
    last = last_real_index(mask)  # (B,)
    cos, sin = position_embeddings
    cos, sin = cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)
    hd = attn.head_dim
    query = attn.q_proj(normed[rows, last][:, None]).view(batch, 1, -1, hd).transpose(1, 2)  # (B, H, 1, hd)
    keys = attn.k_proj(normed).view(batch, length, -1, hd).transpose(1, 2)  # (B, Hkv, L, hd)
    query, _ = apply_rotary_pos_emb(query, query, cos[rows, last][:, None], sin[rows, last][:, None])
    keys, _ = apply_rotary_pos_emb(keys, keys, cos, sin)
    kv_heads = keys.shape[1]
    query = query.reshape(batch, kv_heads, -1, hd)  # (B, Hkv, G, hd): head h reads key/value head h // G
    logits = torch.einsum("bkgd,bkld->bkgl", query.float(), keys.float()) * attn.scaling  # (B, Hkv, G, L)
    allowed = mask.bool() & (torch.arange(length, device=mask.device)[None] <= last[:, None])  # (B, L)
    logits = logits.masked_fill(~allowed[:, None, None, :], float("-inf"))
    return logits.softmax(dim=-1).mean(dim=(1, 2))  # (B, L)


# ------------------------------------------------------------------------------------------ selection
def fastv_keep_mask(scores: torch.Tensor, visual_rows: torch.Tensor, mask: torch.Tensor, budget: int, layer: int,
                    method: str = "fastv") -> torch.Tensor:
    """Which positions survive layer K -> (B, L) bool.

    Text (real tokens) and ALWAYS_KEPT tokens survive; of every image row r of every sample the ``budget``
    tokens with the highest ``scores`` (B, L) survive (all of them when the row is not longer than the budget).
    All rows go through one ``script_prune.select`` call on a padded (R, N_max) score matrix.
    """
    real = mask.bool()
    keep = real & (visual_rows < 0)
    where = (visual_rows >= 0).nonzero()  # (M, 2) (sample, position), row-major
    if where.shape[0] == 0:
        return keep
    # (sample, row) pairs -> compact row ids: generate() repeats a sample's rows for beams / num_return_sequences
    key = where[:, 0] * (int(visual_rows.max()) + 1) + visual_rows[where[:, 0], where[:, 1]]  # (M,)
    row_of = torch.unique(key, return_inverse=True)[1]
    order = torch.sort(row_of, stable=True).indices
    where, row_of = where[order], row_of[order]
    counts = torch.bincount(row_of)  # (R,)
    starts = counts.cumsum(0) - counts
    slot = torch.arange(row_of.shape[0], device=row_of.device) - starts[row_of]  # position within its row
    num_rows, width = counts.shape[0], int(counts.max())
    padded_scores = scores.new_full((num_rows, width), -1.0)
    padded_scores[row_of, slot] = scores[where[:, 0], where[:, 1]].float()
    # FastV ranks by the scores alone: the scores double as the (R, N, 1) "features" select needs for shapes
    picked = sp.select(padded_scores[..., None], budget, method, scores=padded_scores, layer=layer)  # (R, k)
    chosen = torch.zeros(num_rows, width, dtype=torch.bool, device=scores.device)
    chosen.scatter_(1, picked, True)
    keep[where[:, 0], where[:, 1]] = chosen[row_of, slot] & real[where[:, 0], where[:, 1]]
    return keep


def rectangular_index(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """keep (B, L) bool -> (index (B, Ls) ascending positions, mask (B, Ls) long), Ls = max kept per row.

    Rows keeping fewer than Ls tokens also take their leftmost non-kept positions (padding first under left
    padding), masked out, so the shortened batch stays rectangular."""
    count = keep.sum(dim=1)  # (B,)
    length = int(count.max())
    need = length - count
    filler = ~keep & ((~keep).cumsum(dim=1) <= need[:, None])
    index = (keep | filler).nonzero()[:, 1].view(keep.shape[0], length)
    return index, keep.gather(1, index).long()


# ------------------------------------------------------------------------------------------ cache
def _check_cache(cache: Any) -> None:
    if not isinstance(cache, DynamicCache) or any(type(layer) is not DynamicLayer for layer in cache.layers):
        raise ValueError(
            "cache: in-LLM pruning (fastv) shortens the cache in place and needs a DynamicCache with "
            f"full-attention layers, got {type(cache).__name__}"
        )


def shorten_cache_layers(cache: DynamicCache, index: torch.Tensor, upto: int) -> None:
    """Keep only the positions ``index`` (B, Ls) in the cached keys/values of layers ``0 .. upto-1``."""
    for layer in cache.layers[:upto]:
        gather = index[:, None, :, None].to(layer.keys.device).expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
        layer.keys = layer.keys.gather(2, gather)
        layer.values = layer.values.gather(2, gather)


def fastv_state(cache: Any) -> FastVCacheState | None:
    return getattr(cache, FASTV_STATE, None) if cache is not None else None


def decode_inputs(state: FastVCacheState, cache: DynamicCache, attention_mask: torch.Tensor | None,
                  position_ids: torch.Tensor | None, query_length: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Map a decoding step's mask (counted from the ORIGINAL prompt, as generate() keeps it) onto the shortened
    cache -> (attention_mask (B, Ls + t), position_ids). Missing position ids continue the original ones."""
    past = cache.get_seq_length()
    prompt_mask = state.prompt_mask.to(cache.layers[0].keys.device)
    if attention_mask is None:
        new = prompt_mask.new_ones(prompt_mask.shape[0], past + query_length - prompt_mask.shape[1])
        attention_mask = torch.cat([prompt_mask, new], dim=1)
    elif attention_mask.dim() == 2 and attention_mask.shape[1] == past + query_length + state.dropped:
        tail = attention_mask[:, state.prompt_length:].to(prompt_mask.device, prompt_mask.dtype)
        attention_mask = torch.cat([prompt_mask, tail], dim=1)
    elif attention_mask.dim() == 2 and attention_mask.shape[1] != past + query_length:
        raise ValueError(
            f"attention_mask has {attention_mask.shape[1]} columns; after the FastV prefill it must cover the original "
            f"prompt ({state.prompt_length}) or the shortened cache ({prompt_mask.shape[1]}) plus the decoded tokens"
        )
    if position_ids is None:
        decoded = past - prompt_mask.shape[1]
        steps = torch.arange(query_length, device=prompt_mask.device)[None]
        position_ids = state.next_position.to(prompt_mask.device) + decoded + steps
    return attention_mask, position_ids


# ------------------------------------------------------------------------------------------ prefill
def _mask_function(config):
    return create_sliding_window_causal_mask if getattr(config, "sliding_window", None) else create_causal_mask


def _run_layers(layers, hidden, causal_mask, position_embeddings, position_ids, cache, use_cache, kwargs):
    for layer in layers:
        hidden = layer(hidden, attention_mask=causal_mask, position_embeddings=position_embeddings,
                       position_ids=position_ids, use_cache=use_cache, **{CACHE_ARG: cache}, **kwargs)
    return hidden


def fastv_prefill(model, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None,
                  position_ids: torch.Tensor | None, cache: Any, use_cache: bool | None,
                  visual_rows: torch.Tensor, setting: LLMPruning, **kwargs: Any):
    """The decoder stack of ``model`` (a LlamaModel/MistralModel) with FastV -> (BaseModelOutputWithPast,
    kept visual tokens per sample (B,) long).

    inputs_embeds (B, L, D); attention_mask (B, L) 0/1 or None; position_ids (B, L) or None; visual_rows
    (B, L) long (see module docstring). Layers 0..K-1 see all L tokens, layers K.. the shortened Ls."""
    if kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
        raise ValueError("output_attentions / output_hidden_states are not supported with in-LLM pruning (fastv)")
    kwargs = {k: v for k, v in kwargs.items() if k not in ("output_attentions", "output_hidden_states", "return_dict")}
    config, k_layer = model.config, setting.layer
    batch, length, _ = inputs_embeds.shape
    if visual_rows.shape != (batch, length):
        raise ValueError(f"visual_rows must have shape {(batch, length)}, got {tuple(visual_rows.shape)}")
    if attention_mask is not None and attention_mask.shape != (batch, length):
        raise ValueError(f"attention_mask must be a 2D (B, L) = {(batch, length)} 0/1 mask for in-LLM pruning, "
                         f"got shape {tuple(attention_mask.shape)}")
    if not 1 <= k_layer < config.num_hidden_layers:
        raise ValueError(f"setting.layer (K) must be in [1, {config.num_hidden_layers - 1}], got {k_layer}")
    mask = (torch.ones(batch, length, dtype=torch.long, device=inputs_embeds.device) if attention_mask is None
            else attention_mask.long())
    if position_ids is None:
        position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
    position_ids = position_ids.expand(batch, -1)
    use_cache = config.use_cache if use_cache is None else use_cache
    if use_cache and cache is None:
        cache = DynamicCache(config=config)
    if cache is not None:
        _check_cache(cache)
    make_mask = _mask_function(config)
    layers = model.layers[: config.num_hidden_layers]

    hidden = inputs_embeds
    causal = make_mask(config=config, inputs_embeds=hidden, attention_mask=mask, position_ids=position_ids,
                       **{MASK_CACHE_ARG: cache})
    rope = model.rotary_emb(hidden, position_ids=position_ids)
    hidden = _run_layers(layers[: k_layer - 1], hidden, causal, rope, position_ids, cache, use_cache, kwargs)
    score_layer = layers[k_layer - 1]
    scores = last_token_attention(score_layer.self_attn, score_layer.input_layernorm(hidden), rope, mask)  # (B, L)
    hidden = _run_layers([score_layer], hidden, causal, rope, position_ids, cache, use_cache, kwargs)

    keep = fastv_keep_mask(scores, visual_rows.to(scores.device), mask, setting.budget, k_layer, setting.method)
    kept_visual = (keep & (visual_rows.to(keep.device) != TEXT)).sum(dim=1)  # (B,)
    index, short_mask = rectangular_index(keep)  # (B, Ls)
    hidden = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))
    short_positions = position_ids.gather(1, index)
    if cache is not None:
        check_cache_length(cache, k_layer, length, "the whole prompt, before shortening", CACHE_ARG)
        shorten_cache_layers(cache, index, k_layer)
        next_position = (position_ids * mask).max(dim=1, keepdim=True).values + 1
        setattr(cache, FASTV_STATE, FastVCacheState(short_mask, length, next_position))
    # layers >= K start with an empty cache: size the mask from the shortened inputs alone
    causal = make_mask(config=config, inputs_embeds=hidden, attention_mask=short_mask, position_ids=short_positions,
                       **{MASK_CACHE_ARG: None})
    rope = model.rotary_emb(hidden, position_ids=short_positions)
    # The positions reach these layers through RoPE only: flash-attention would read non-contiguous position ids
    # of an unpadded row as packed sequences and split the attention, so the layers get none.
    hidden = _run_layers(layers[k_layer:], hidden, causal, rope, None, cache, use_cache, kwargs)
    if cache is not None:
        check_cache_length(cache, len(layers), index.shape[1], "text + kept tokens", CACHE_ARG)
    hidden = model.norm(hidden)
    return BaseModelOutputWithPast(last_hidden_state=hidden, **{OUTPUT_CACHE_FIELD: cache if use_cache else None}), kept_visual

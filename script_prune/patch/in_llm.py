"""In-LLM methods (``MethodSpec.stage == "llm"``: FastV, SparseVLM, PDrop) on the shared layer.

One decoder loop serves all three: a method is a schedule of stages (``script_prune.inllm.stage_plan``, the
one place a budget becomes per-stage keep counts per row) and a scoring rule. At every stage the surviving
visual tokens of each row are re-ranked and the row keeps its count; text and layout tokens always stay.

- FastV (Chen et al., ECCV 2024): one stage after layer K; scores = the K-th layer's attention of the last
  prompt token (mean over heads).
- PDrop (Xing et al., CVPR 2025): stages before layers 8 / 16 / 24 (of 32); scores = the attention of the
  last instruction token at the layer about to run (its own q/k, before the drop), mean over heads.
- SparseVLM v1 (Zhang et al., ICML 2025): the outputs of layers 2 / 6 / 15 are pruned; scores = the mean
  over the text raters (``script_prune.inllm.sparsevlm_raters``, chosen once from the LLM's input
  embeddings) of their head-averaged attention at that layer. With ``recycle`` the best 30 % of the tokens
  a stage drops are clustered (density peaks) into merged tokens, which are visual tokens of their row
  from then on (re-ranked at later stages).

Conventions here:

- score rows come from the layer's own q/k projections for the few queries needed
  (:meth:`DecoderAccess.query_attention`), so every layer keeps sdpa / flash-attention;
- kept tokens keep their original position ids (1-D or 3-D M-RoPE) and decoding continues at the
  original positions (the references of SparseVLM / PDrop re-number LLaVA's positions contiguously;
  keeping them is what M-RoPE families need and leaves RoPE distances to the text unchanged);
- a merged token sits right after its row's last kept token in the sequence and takes the position of
  its cluster centre (a dropped token of that row);
- one host sync per prefill (:func:`host_shapes`, the shared ``resolve``): every stage's shapes are host ints
  from the schedule and that read, so no stage and no decoding step waits for the device;
- every layer's KV cache holds the same final sequence: a stage removes the dropped entries from the
  cache of all layers that ran before it, and a merged token's entry in those layers is its centre's
  (the merged token itself exists from the next layer on). Decoding runs on it with the stock mask code.

The stock top-level forward runs unchanged; only the language model's forward is swapped for the
duration of the prefill call, so logits, loss and output classes stay transformers' own.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast

import script_prune as sp
from script_prune import inllm

from .family import TEXT, DecoderAccess, VisualRows, cache_keyword, device_index, output_cache_field
from .prefill import PatchState, Prompt, PromptState, first_given, gather_tokens, pack, resolve, without_pixels
from .relevance import question_mask

#: How this transformers version passes the cache to decoder layers / the mask function / outputs.
OUTPUT_CACHE_FIELD = output_cache_field(BaseModelOutputWithPast)
MASK_CACHE_KEYWORD = cache_keyword(create_causal_mask)


def check_layer(method: str, layer: Any, num_layers: int) -> int:
    """FastV's K must name a decoder layer after which some layers remain: 1 <= K < num_layers."""
    if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer < num_layers:
        raise ValueError(f"parameter 'layer' (K) of in-LLM method {method!r} must be an int in [1, {num_layers - 1}] "
                         f"for this LLM ({num_layers} decoder layers), got {layer!r}")
    return layer


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




# ------------------------------------------------------------------------------------------ schedule
#: Which decoder layer's attention ranks a stage, relative to the stage's ``layers_before`` (see the docstring).
SCORE_LAYER_OFFSET = {"fastv": -1, "sparsevlm": -1, "pdrop": 0}


def check_in_llm_params(method: str, params: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """The method's parameters (defaults filled in) checked against this LLM's depth (ValueError naming them)."""
    params = {**sp.get_method(method).params, **params}
    if method == "fastv":
        return {**params, "layer": check_layer(method, params["layer"], num_layers)}
    if method not in SCORE_LAYER_OFFSET:
        raise ValueError(f"in-LLM method {method!r} is not wired into script_prune.patch (fastv, sparsevlm, pdrop)")
    layers = inllm.pdrop_layers(params, num_layers) if method == "pdrop" else tuple(params["layers"])
    # PDrop drops before layer l (0: on the embeddings, by layer 0's attention); SparseVLM prunes layer l's output
    # (the last layer's: only decoding, through the cache, sees the cut)
    if any(not 0 <= l <= num_layers - 1 for l in layers) or any(b <= a for a, b in zip(layers, layers[1:])):
        given = "" if params.get("layers") is not None else " (the defaults scaled to this depth; pass layers=)"
        raise ValueError(f"parameter 'layers' of in-LLM method {method!r} must be strictly increasing in "
                         f"[0, {num_layers - 1}] for this LLM ({num_layers} decoder layers), got {layers}{given}")
    return {**params, "layers": layers}


@dataclass(frozen=True)
class Stage:
    """One prune step. ``layers_before`` decoder layers ran on the previous sequence, layer ``score_layer``'s
    attention ranks; every row holds ``before`` (R,) visual tokens, keeps ``counts`` (R,) of them and, when
    recycling, clusters its ``taken`` (R,) best dropped tokens into ``clusters`` (R,) merged tokens (host ints:
    no sync)."""

    layers_before: int
    score_layer: int
    before: list[int]
    counts: list[int]
    taken: list[int]
    clusters: list[int]

    @property
    def after(self) -> list[int]:
        """Visual tokens of every row after the stage (kept + merged)."""
        return [c + m for c, m in zip(self.counts, self.clusters)]


def schedule(method: str, params: dict[str, Any], budget: int | float, lengths: list[int], held: list[int],
             num_layers: int) -> list[Stage]:
    """The stages of a prefill whose visual rows hold ``lengths`` tokens (the budget resolves per row length,
    so fractions work on rows of unequal length; ``script_prune.inllm.stage_counts`` per distinct length) of
    which ``held`` reach the LLM (fewer where LLaVA-NeXT's unpadding cut a tile row)."""
    plans = {(n, h): inllm.stage_counts(method, sp.resolve_budget(budget, n), n, num_layers, params, held=h)
             for n, h in set(zip(lengths, held))}
    rows = list(zip(lengths, held))
    stages, before = [], list(held)
    for s, stage in enumerate(plans[rows[0]]):
        counts, taken, clusters = ([plans[row][s][j] for row in rows] for j in (1, 2, 3))
        stages.append(Stage(stage[0], stage[0] + SCORE_LAYER_OFFSET[method], before, counts, taken, clusters))
        before = stages[-1].after
    return stages


def sample_lengths(fixed: list[int], row_sample: list[int], visual: list[int]) -> list[int]:
    """Entries of every sample (host ints): its ``fixed`` text / layout tokens plus its rows' ``visual`` tokens."""
    out = list(fixed)
    for sample, count in zip(row_sample, visual):
        out[sample] += count
    return out


# ------------------------------------------------------------------------------------------ the sequence
@dataclass
class Tokens:
    """The prompt as one decoder stage sees it (every field (B, Ls) unless said otherwise).

    hidden (B, Ls, D); positions (B, Ls) or (3, B, Ls); mask 0/1; row: visual row (< 0: text / layout);
    index: index within the row (-1: merged or not visual); visual: counts as a visual token of the sample
    (placeholder slots, merged tokens); rater: SparseVLM's text raters; additions: (levels, B, Ls, D) added
    to the hidden states after layers 0 .. levels-1 (DeepStack; 0 at text positions; a merged token takes
    its centre's), or None.
    """

    hidden: Tensor
    positions: Tensor
    mask: Tensor
    row: Tensor
    index: Tensor
    visual: Tensor
    rater: Tensor
    additions: Tensor | None = None

    def take(self, index: Tensor, mask: Tensor, source: Tensor) -> "Tokens":
        """The entries at ``index`` (B, Ls') with the new 0/1 ``mask``; positions from ``source`` (B, Ls'), the
        position each entry takes (its own, or a merged token's centre)."""
        if self.positions.dim() == 3:
            positions = self.positions.gather(2, source[None].expand(self.positions.shape[0], -1, -1))
        else:
            positions = self.positions.expand(index.shape[0], -1).gather(1, source)
        additions = None if self.additions is None else torch.stack([gather_tokens(a, source) for a in self.additions])
        return Tokens(gather_tokens(self.hidden, index), positions, mask, self.row.gather(1, index),
                      self.index.gather(1, index), self.visual.gather(1, index), self.rater.gather(1, index), additions)


@dataclass
class RowSlots:
    """The visual tokens of every row as an (R, W) table: ``sample`` (R,), ``position`` (R, W) in the sequence,
    ``valid`` (R, W)."""

    sample: Tensor
    position: Tensor
    valid: Tensor


def row_slots(tokens: Tokens, row_sample: Tensor, visual: Tensor, width: int) -> RowSlots:
    """Where each row's visual tokens sit, in sequence order, in a table of ``width`` (host int, the most any
    row holds) slots; ``row_sample`` (R,) and ``visual`` (R,) the rows' sample and visual tokens (no host sync)."""
    length = tokens.row.shape[1]
    device = tokens.row.device
    rows = torch.arange(row_sample.shape[0], device=device)
    mine = (tokens.row[row_sample] == rows[:, None]) & tokens.mask[row_sample].bool()  # (R, Ls)
    positions = torch.arange(length, device=device)
    position = torch.sort(torch.where(mine, positions, positions + length), dim=1).indices[:, :width]  # (R, W)
    valid = torch.arange(width, device=device)[None] < visual[:, None]
    return RowSlots(row_sample, position, valid)


def rank_rows(scores: Tensor, slots: RowSlots) -> Tensor:
    """Each row's visual tokens in descending score order (ties: the earlier token). (B, L) -> (R, W) slots."""
    table = scores.float()[slots.sample[:, None], slots.position].masked_fill(~slots.valid, -1.0)  # probabilities >= 0
    return torch.sort(table, dim=1, descending=True, stable=True).indices


def recycled_tokens(tokens: Tokens, slots: RowSlots, order: Tensor, stage: Stage, sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SparseVLM's recycling at one stage: per row, its ``taken`` best dropped tokens (ranks ``counts ..
    counts + taken``) clustered by density peaks into ``clusters`` merged tokens (``script_prune.inllm.dpc_merge``).
    ``sizes`` (4, R): the stage's before / counts / taken / clusters on the device.
    -> merged (R, C, D), merged_ok (R, C), centre (R, C) sequence position of each merged token's centre."""
    device = order.device
    _, counts, taken, clusters = sizes
    width = max(stage.taken)
    rank = (counts[:, None] + torch.arange(width, device=device)[None]).clamp(max=order.shape[1] - 1)  # (R, T)
    chosen = order.gather(1, rank)  # (R, T) slots of the recycled tokens
    valid = torch.arange(width, device=device)[None] < taken[:, None]
    position = slots.position.gather(1, chosen)  # (R, T)
    x = tokens.hidden[slots.sample[:, None], position]  # (R, T, D)
    merged, merged_ok, centre = inllm.dpc_merge(x, valid, clusters.clamp(min=1), width=max(stage.clusters))
    merged_ok &= clusters[:, None] > 0
    return merged, merged_ok, position.gather(1, centre)


def marked(shape: tuple[int, int], flat: Tensor, hit: Tensor) -> Tensor:
    """(rows, cols) bool: True where some entry of ``flat`` (row * cols + col, any shape) has ``hit`` set (other
    entries of ``flat`` may point anywhere in range). A scatter-add, so it needs no host sync."""
    count = torch.zeros(shape[0] * shape[1], dtype=torch.long, device=flat.device)
    return count.scatter_add_(0, flat.reshape(-1), hit.reshape(-1).long()).view(shape) > 0


def prune_stage(tokens: Tokens, scores: Tensor, stage: Stage, sizes: Tensor, row_sample: Tensor, short: int,
                left: bool) -> tuple[Tokens, Tensor]:
    """Keep each row's ``counts`` best visual tokens (plus merged tokens when recycling) -> the short tokens and
    the source position (B, Ls') of every entry in ``tokens`` (a merged token: its centre's). ``sizes`` (4, R):
    the stage's before / counts / taken / clusters on the device; ``short``: Ls', the longest sample after the
    stage (host int). No host sync."""
    num_rows = row_sample.shape[0]
    slots = row_slots(tokens, row_sample, sizes[0], max(stage.before, default=0))
    order = rank_rows(scores, slots)  # (R, W)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    chosen = slots.valid & (rank < sizes[1][:, None])  # (R, W)
    batch, length = tokens.mask.shape
    picked = marked((batch, length), slots.sample[:, None] * length + slots.position, chosen)  # (B, L)
    keep = tokens.mask.bool() & ((tokens.row < 0) | picked)
    key = 2 * torch.arange(length, device=keep.device).expand(batch, -1)  # sequence order of the entries
    source = torch.arange(length, device=keep.device).expand(batch, -1)
    if max(stage.clusters, default=0) > 0:
        merged, merged_ok, centre = recycled_tokens(tokens, slots, order, stage, sizes)  # (R, C, D), (R, C), (R, C)
        last = slots.position.masked_fill(~chosen, -1).amax(dim=1)  # (R,) the row's last kept token
        extra = num_rows * merged.shape[1]
        owner = slots.sample[:, None].expand_as(merged_ok).reshape(-1)  # (E,) sample of every merged entry
        ok = merged_ok.reshape(-1)[None] & (owner[None] == torch.arange(batch, device=keep.device)[:, None])  # (B, E)
        row = torch.arange(num_rows, device=keep.device).repeat_interleave(merged.shape[1])  # (E,)
        tokens = Tokens(torch.cat([tokens.hidden, merged.reshape(1, extra, -1).expand(batch, -1, -1)], 1),
                        tokens.positions, tokens.mask, torch.cat([tokens.row, row.expand(batch, -1)], 1),
                        torch.cat([tokens.index, torch.full_like(ok, -1, dtype=torch.long)], 1),
                        torch.cat([tokens.visual, ok], 1), torch.cat([tokens.rater, torch.zeros_like(ok)], 1),
                        tokens.additions)
        keep = torch.cat([keep, ok], 1)
        key = torch.cat([key, (2 * last[:, None] + 1).expand_as(merged_ok).reshape(1, -1).expand(batch, -1)], 1)
        source = torch.cat([source, centre.reshape(1, -1).expand(batch, -1)], 1)
    index, short_mask = pack(keep, left, short=short, key=key)  # (B, Ls')
    source = source.gather(1, index)
    return tokens.take(index, short_mask, source), source


# ------------------------------------------------------------------------------------------ the decoder
def stage_scores(method: str, access: DecoderAccess, layer: nn.Module, tokens: Tokens,
                 rope: tuple[Tensor, Tensor], slots: int) -> Tensor:
    """(B, Ls) the scores a stage ranks by: SparseVLM's raters' mean attention, else the last token's. ``slots``:
    a host bound on any sample's raters (its question tokens); the raters go first, the other slots weigh 0."""
    if method != "sparsevlm":
        return access.last_query_attention(layer, tokens.hidden, rope, tokens.mask)
    length = tokens.rater.shape[1]
    positions = torch.arange(length, device=tokens.rater.device)
    queries = torch.sort(torch.where(tokens.rater, positions, positions + length), dim=1).indices[:, :slots]
    valid = tokens.rater.gather(1, queries)  # (B, Q)
    attention = access.query_attention(layer, tokens.hidden, rope, tokens.mask, queries)  # (B, Q, Ls)
    return inllm.rater_scores(attention, valid)


def final_keep_rows(tokens: Tokens, num_rows: int, row_length: int) -> Tensor:
    """(R, N) bool: the original tokens each row still holds (merged tokens have none; ``script_prune.patch.kept``
    reads the indices from it on demand). No host sync."""
    own = (tokens.row >= 0) & (tokens.index >= 0) & tokens.mask.bool()
    flat = torch.where(own, tokens.row * row_length + tokens.index, 0)  # (B, Ls); others hit nothing
    return marked((num_rows, row_length), flat, own)


@dataclass(frozen=True)
class HostShapes:
    """What the in-LLM prefill knows on the host (read with the prefill's one host sync): every row's sample
    ``row_sample`` (R,) and visual tokens in the prompt ``held`` (R,; below the row's length where LLaVA-NeXT's
    unpadding cut it), every sample's ``fixed`` text / layout tokens (B,; they always stay), and the most
    ``questions`` / ``placeholders`` tokens of a sample (SparseVLM's rater slots: a sample's raters are among its
    question tokens)."""

    row_sample: list[int]
    held: list[int]
    fixed: list[int]
    questions: int
    placeholders: int


def padded(lengths: list[int], width: int) -> bool:
    """Whether a batch of samples of ``lengths`` entries in ``width`` columns holds padding."""
    return min(lengths, default=width) < width


def causal_mask(config: Any, tokens: Tokens, past: Any, has_padding: bool) -> Any:
    """The stock causal mask (``create_causal_mask``) of ``tokens``, told on the host whether they hold padding.

    The stock code reads the 2-D mask on the host to learn whether it can skip the mask (sdpa's ``is_causal``):
    without padding no 2-D mask goes in (skipped without a read); with padding, the padding also goes in as an
    ``and_mask_function``, which makes the stock code build the mask without reading (it would find the padding
    and build the same mask). No positions: they only serve packed-sequence detection, and our rows never are
    packed (kept tokens keep their non-contiguous positions). No host sync (flash-attention still reads a padded
    mask, as stock)."""
    if not has_padding:
        return create_causal_mask(config=config, inputs_embeds=tokens.hidden, attention_mask=None, position_ids=None,
                                  **{MASK_CACHE_KEYWORD: past})
    real = tokens.mask.bool()
    return create_causal_mask(config=config, inputs_embeds=tokens.hidden, attention_mask=tokens.mask, position_ids=None,
                              and_mask_function=lambda batch, head, q, kv: real[batch, kv], **{MASK_CACHE_KEYWORD: past})


def in_llm_language_forward(access: DecoderAccess, state: PatchState, tokens: Tokens, stages: list[Stage],
                            host: HostShapes, row_length: int, left: bool, **kwargs: Any) -> BaseModelOutputWithPast:
    """The decoder stack with the method's stages (stands in for the language model's forward once). Every shape
    comes from ``stages`` / ``host``: no host sync of its own."""
    for unsupported in ("output_attentions", "output_hidden_states"):
        if kwargs.pop(unsupported, None):
            raise ValueError(f"{unsupported} is not supported with in-LLM pruning (later layers see fewer tokens)")
    # carried by ``tokens`` (DeepStack's arguments are None here: the stock call had no pixels; the loop adds them)
    for name in ("return_dict", "inputs_embeds", "attention_mask", "visual_pos_masks", "deepstack_visual_embeds"):
        kwargs.pop(name, None)
    positions = kwargs.pop("position_ids")
    tokens.positions = positions[-3:] if positions.dim() == 3 else positions  # generate() hands Qwen-VL 4 rows
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
    method = state.config.method
    full_length = tokens.mask.shape[1]
    device = tokens.mask.device
    row_sample = device_index(host.row_sample, device)  # (R,)
    # every stage's per-row sizes in one copy: (S, 4, R) before / counts / taken / clusters
    sizes = device_index([v for st in stages for part in (st.before, st.counts, st.taken, st.clusters) for v in part],
                         device).view(len(stages), 4, len(host.row_sample))
    lengths = sample_lengths(host.fixed, host.row_sample, stages[0].before)

    def prepared(tokens: Tokens, past: Any, lengths: list[int]) -> tuple[Any, tuple[Tensor, Tensor], Tensor]:
        causal = causal_mask(config, tokens, past, padded(lengths, tokens.mask.shape[1]))
        mrope = tokens.positions.dim() == 3  # M-RoPE (3, B, L)
        return causal, access.rope(tokens.hidden, tokens.positions), None if mrope else tokens.positions

    def run(start, end, tokens, causal, rope, position_ids):
        hidden = tokens.hidden
        for i in range(start, end):
            hidden = layers[i](hidden, attention_mask=causal, position_embeddings=rope, position_ids=position_ids,
                               use_cache=use_cache, **{keyword: cache}, **kwargs)
            if tokens.additions is not None and i < tokens.additions.shape[0]:
                hidden = hidden + tokens.additions[i].to(hidden.dtype)
        tokens.hidden = hidden
        return tokens

    causal, rope, position_ids = prepared(tokens, cache, lengths)
    done = 0
    for s, stage in enumerate(stages):
        tokens = run(done, stage.score_layer, tokens, causal, rope, position_ids)
        scores = stage_scores(method, access, layers[stage.score_layer], tokens, rope, host.questions)  # (B, Ls) float32
        tokens = run(stage.score_layer, stage.layers_before, tokens, causal, rope, position_ids)
        length = tokens.mask.shape[1]
        lengths = sample_lengths(host.fixed, host.row_sample, stage.after)
        tokens, source = prune_stage(tokens, scores, stage, sizes[s], row_sample, max(lengths), left)
        if cache is not None:
            what = "the whole prompt, before shortening" if done == 0 else f"before the cut after layer {stage.layers_before}"
            check_cache_length(cache, stage.layers_before, length, what, keyword)
            shorten_cache(cache, source, stage.layers_before)
        done = stage.layers_before
        # the layers after the cut start with an empty cache: their mask is sized from the short prompt alone.
        # Positions reach them through RoPE only: flash-attention would read the non-contiguous ids of an
        # unpadded row as packed sequences.
        causal, rope, _ = prepared(tokens, None, lengths)
        position_ids = None
    tokens = run(done, len(layers), tokens, causal, rope, position_ids)
    state.visual_counts = (tokens.visual & tokens.mask.bool()).sum(dim=1)
    state.keep_rows = final_keep_rows(tokens, len(host.row_sample), row_length)
    state.extra["short_prompt"] = (tokens.positions, tokens.mask)
    if cache is not None:
        check_cache_length(cache, len(layers), tokens.mask.shape[1], "text + kept tokens", keyword)
        state.prompt = PromptState(weakref.ref(cache), full_length, tokens.mask,
                                   torch.zeros_like(tokens.mask[:, :1]), padded(lengths, tokens.mask.shape[1]))
    return BaseModelOutputWithPast(last_hidden_state=access.norm(tokens.hidden),
                                   **{OUTPUT_CACHE_FIELD: cache if use_cache else None})


def sparsevlm_rater_mask(embeds: Tensor, prompt: Prompt, question: Tensor, host: HostShapes) -> Tensor:
    """(B, L) bool: SparseVLM's raters among each sample's ``question`` (B, L) tokens (the text after its last
    image), from the LLM's input embeddings of the whole prompt (widths from ``host``: no host sync)."""
    length = question.shape[1]
    positions = torch.arange(length, device=question.device)
    t_at = torch.sort(torch.where(question, positions, positions + length), dim=1).indices[:, :host.questions]  # (B, T)
    v_at = torch.sort(torch.where(prompt.placeholder, positions, positions + length), dim=1).indices[:, :host.placeholders]
    raters = inllm.sparsevlm_raters(gather_tokens(embeds, v_at), gather_tokens(embeds, t_at),
                                    prompt.placeholder.gather(1, v_at), question.gather(1, t_at))  # (B, T)
    return torch.zeros_like(question).scatter_(1, t_at, raters & question.gather(1, t_at))


def host_shapes(family: Any, prompt: Prompt, row_of: Tensor, question: Tensor, lengths: list[int]) -> HostShapes:
    """The prefill's one host sync (:func:`~script_prune.patch.prefill.resolve`): the prompt's checks, every row's
    sample and visual tokens, every sample's text / layout tokens and question / placeholder counts. Raises when
    a row of the layout holds more tokens than the family's ``lengths`` (R,) say."""
    num_rows, batch = len(lengths), row_of.shape[0]
    visual = prompt.real & (row_of >= 0)  # (B, L)
    per_row = torch.zeros(num_rows, dtype=torch.long, device=row_of.device).index_add_(
        0, row_of.clamp(min=0).reshape(-1), visual.reshape(-1).long())  # (R,)
    values = resolve(prompt, prompt.row_sample, per_row, (prompt.real & (row_of < 0)).sum(dim=1), question.sum(dim=1),
                     prompt.placeholder.sum(dim=1))
    row_sample, held = values[:num_rows], values[num_rows:2 * num_rows]
    fixed, questions, placeholders = (values[2 * num_rows + i * batch:2 * num_rows + (i + 1) * batch] for i in range(3))
    if any(h > n for h, n in zip(held, lengths)):
        raise ValueError(f"family {family.name!r} reported row lengths {list(lengths)} but laid out {held} visual "
                         "tokens per row")
    return HostShapes(row_sample, held, fixed, max(questions, default=0), max(placeholders, default=0))


def in_llm_prefill(model: nn.Module, state: PatchState, call: dict[str, Any], rows: VisualRows,
                   prompt: Prompt, lengths: list[int]) -> Any:
    """The whole prompt goes in; the language model prunes at the method's stages (see the module docstring).
    ``lengths``: the family's tokens of every row (host). One host sync of its own (:func:`host_shapes`)."""
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
    question = question_mask(call["input_ids"], prompt.real, prompt.placeholder)  # (B, L)
    host = host_shapes(family, prompt, row_of, question, lengths)
    positions = call.get("position_ids")
    if positions is None:  # the family's positions of the whole prompt (LLaVA: contiguous; Qwen-VL: 3-D M-RoPE)
        every = torch.arange(prompt.real.shape[1], device=prompt.real.device).expand_as(prompt.real)
        positions = family.positions(model, call, every, prompt.real.long())
    raters = (sparsevlm_rater_mask(embeds, prompt, question, host) if cfg.method == "sparsevlm"
              else torch.zeros_like(where))
    additions = family.decoder_additions(model, rows, layout)  # (levels, T, D) or None
    if additions is not None:
        dense = additions.new_zeros(additions.shape[0], *embeds.shape)  # (levels, B, L, D)
        additions = dense.masked_scatter(where[None, ..., None], additions.to(dense.dtype))
    tokens = Tokens(embeds, positions, prompt.real.long(), row_of, index_of, where.clone(), raters, additions)
    access = family.decoder(model)
    row_length = rows.tokens.shape[1]
    stages = schedule(cfg.method, cfg.params, cfg.budget, lengths, host.held, int(access.config.num_hidden_layers))
    full_call = without_pixels(family, call)
    full_call.update(inputs_embeds=embeds, attention_mask=prompt.real.long(), position_ids=positions)
    language_model = family.language_model(model)
    previous = language_model.__dict__.get("forward")
    language_model.forward = functools.partial(in_llm_language_forward, access, state, tokens, stages, host,
                                               row_length, prompt.left)
    try:
        output = state.stock_forward(**full_call)
    finally:
        if previous is None:
            del language_model.forward
        else:
            language_model.forward = previous
    family.continue_from(model, *state.extra.pop("short_prompt"))
    return output

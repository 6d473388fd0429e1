"""The shared shortened prefill, the patch state, and how decoding continues on the short cache.

A patched model's ``forward`` (installed by ``script_prune.patch.apply``) does this on a prefill
that carries pixels (``pixel_values`` given, cache empty):

1. the family encodes the visual rows (the stock ``get_image_features`` runs; its projector's
   input and output are read) -> tokens ``H_v`` (R, N, D);
2. the method selects ``k`` tokens per row (``script_prune.select`` on ``H_v``, with relevance
   inputs from the configured source) -> ``kept`` (R, k);
3. the family lays the rows out as the stock model would, flagging kept tokens; the prompt's
   placeholder runs are filled and the dropped positions leave ``inputs_embeds``, the attention
   mask, the position ids (and labels) before the LLM; rows are re-packed to the longest kept
   prompt, keeping the batch's padding side;
4. the stock forward runs on the shortened prompt (the KV cache then holds text + kept tokens).

Decoding steps that reach the same cache get generate()'s attention mask (counted over the
ORIGINAL prompt) mapped onto the short cache and their position ids shifted by the tokens dropped
in their row, so greedy / sampling / beam search / num_return_sequences need nothing else.
A budget that keeps whole rows (``script_prune.keeps_all``) calls the stock forward unchanged.
In-LLM methods (FastV, SparseVLM, PDrop) take the same path up to the layout and then prune inside the
decoder (``in_llm.py``).
"""

from __future__ import annotations

import inspect
import weakref
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

import script_prune as sp
from script_prune.budget import keeps_all, kept_tokens, resolve_budget

from .family import Family, VisualRows, device_index, fit_layout, one_read_per_prefill, output_cache_field
from .relevance import Query, RelevanceSource, question_mask

STATE_ATTR = "_script_prune_patch"
#: Merging methods whose kept count is data dependent (differs between rows): reduced one row at a time.
ROW_BY_ROW = ("trim_iqr",)


@dataclass(frozen=True)
class PatchConfig:
    """What ``apply`` was given, validated: method, per-row budget, method parameters, relevance source."""

    method: str
    budget: int | float
    params: dict[str, Any]
    relevance: RelevanceSource | None

    @property
    def spec(self) -> sp.MethodSpec:
        return sp.get_method(self.method)

    def method_params(self) -> dict[str, Any]:
        """``params`` plus ``negate`` from the relevance source when the method takes it and the user did not."""
        params = dict(self.params)
        if self.relevance is not None and "negate" in self.spec.params and "negate" not in params:
            params["negate"] = self.relevance.negate
        return params


@dataclass
class PromptState:
    """What decoding needs after a shortened prefill.

    cache: the prefill's KV cache (weak); full_length: L, the original prompt length generate()
    counts from; prompt_mask: (B, Ls) 0/1 mask of the short prompt in the cache; position_shift:
    (B, 1) positions to subtract from generate()'s position ids (dropped tokens; 0 for FastV).
    """

    cache: weakref.ref
    full_length: int
    prompt_mask: Tensor
    position_shift: Tensor
    padded: bool


@dataclass
class PatchState:
    """Attached to a patched model (attribute ``_script_prune_patch``)."""

    family: Family
    config: PatchConfig
    stock_forward: Callable[..., Any]
    previous_forward: Any  # the instance attribute ``forward`` before patching (accelerate hooks), or None
    previous_expand: Any  # the instance attribute ``_expand_inputs_for_generation`` before patching, or None
    signature: inspect.Signature
    kept: list[Tensor] | None = None
    keep_rows: Tensor | None = None  # (R, N) bool kept tokens of the last prefill; ``kept`` is read from it on demand
    visual_counts: Tensor | None = None  # (B,) visual tokens per sample that reached the LLM (see visual_tokens)
    prompt: PromptState | None = None
    texts: list[str] | None = None
    timer: Callable[[str], AbstractContextManager[Any]] | None = None  # see script_prune.patch.set_stage_timer
    extra: dict[str, Any] = field(default_factory=dict)


#: The stages of a pruned prefill that ``script_prune.patch.set_stage_timer`` sees, in order.
STAGES = ("vision", "select", "llm")


def stage(state: PatchState, name: str) -> AbstractContextManager[Any]:
    """The user's timer around one stage of the prefill; nothing (no sync, no clock) when none is set."""
    return nullcontext() if state.timer is None else state.timer(name)


# ------------------------------------------------------------------------------------------ packing
def pack(keep: Tensor, left: bool, short: int | None = None, key: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Kept positions of each row packed to the longest row. # (B, L) bool -> index (B, Ls), mask (B, Ls)

    ``index`` holds the source positions in order (ascending ``key`` (B, L) in [0, 2L) when given, e.g.
    to place appended entries; ties keep their order); shorter rows are padded on the left (``left``)
    or right, their padding slots pointing at an arbitrary position and masked out (mask 0).
    ``short``: Ls when the caller already read it (else one host sync reads it here).
    """
    length = keep.shape[1]
    count = keep.sum(dim=1)  # (B,)
    if short is None:
        short = int(count.max()) if keep.shape[0] else 0
    positions = torch.arange(length, device=keep.device).expand_as(keep) if key is None else key
    beyond = length if key is None else 2 * length
    order = torch.sort(torch.where(keep, positions, positions + beyond), dim=1, stable=True).indices[:, :short]
    slot = torch.arange(short, device=keep.device)[None]  # (1, Ls)
    if left:
        source = slot - (short - count)[:, None]  # (B, Ls) slot in the kept list, < 0 for padding
        valid = source >= 0
        index = order.gather(1, source.clamp(min=0))
    else:
        valid = slot < count[:, None]
        index = order
    return index, valid.long()


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """x (B, L, ...) at index (B, Ls) -> (B, Ls, ...)."""
    shaped = index.view(*index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, shaped)


# ------------------------------------------------------------------------------------------ the call
def bind_call(state: PatchState, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Positional and keyword arguments of a forward call as one name -> value dict."""
    bound = state.signature.bind_partial(*args, **kwargs).arguments
    for name, param in state.signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD and name in bound:
            bound.update(bound.pop(name))
    return bound


def first_given(*values: Any) -> Any:
    """The first value that is not None (a cache may be empty, hence falsy: no ``or``)."""
    return next((v for v in values if v is not None), None)


def call_cache(call: dict[str, Any]) -> Any:
    """The KV cache of a call: ``cache=`` (transformers >= 5.24) or ``past_key_values=``."""
    return first_given(call.get("cache"), call.get("past_key_values"))


def output_cache(output: Any) -> Any:
    """The KV cache of a model output, read under the field name this transformers version uses (reading
    the other name would trigger its deprecation warning)."""
    return getattr(output, output_cache_field(type(output)), None)


def patched_forward(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The forward a patched model runs (see the module docstring)."""
    state: PatchState = model.__dict__[STATE_ATTR]
    call = bind_call(state, args, kwargs)
    cache = call_cache(call)
    past = 0 if cache is None else cache.get_seq_length()
    if past == 0 and any(call.get(key) is not None for key in state.family.visual_inputs):
        return prefill(model, state, call)
    if call.get("mm_encoder_outputs") and past == 0:
        raise ValueError("a model patched by script_prune.patch needs pixel_values on the prefill, not precomputed "
                         "mm_encoder_outputs (the rows are selected before the layout)")
    prompt = state.prompt
    if prompt is not None and past > 0 and prompt.cache() is cache:
        decode_inputs(prompt, call, past)
    return state.stock_forward(**call)


def decode_inputs(prompt: PromptState, call: dict[str, Any], past: int) -> None:
    """Map a decoding step's mask and positions (counted over the ORIGINAL prompt) onto the short cache."""
    new = call.get("input_ids") if call.get("input_ids") is not None else call.get("inputs_embeds")
    query = new.shape[1]
    short = prompt.prompt_mask.shape[1]
    mask = call.get("attention_mask")
    if mask is None:
        if prompt.padded:
            tail = prompt.prompt_mask.new_ones(prompt.prompt_mask.shape[0], past + query - short)
            call["attention_mask"] = torch.cat([prompt.prompt_mask, tail], dim=1)
    elif mask.dim() == 2 and mask.shape[1] == prompt.full_length + past - short + query:
        tail = mask[:, prompt.full_length:].to(prompt.prompt_mask.dtype)
        call["attention_mask"] = torch.cat([prompt.prompt_mask.to(mask.device), tail], dim=1)
    elif mask.dim() != 2 or mask.shape[1] != past + query:
        raise ValueError(
            f"attention_mask of shape {tuple(mask.shape)} after a pruned prefill: expected 2-D with "
            f"{prompt.full_length + past - short + query} (original prompt) or {past + query} (short cache) columns"
        )
    if call.get("position_ids") is not None:
        call["position_ids"] = call["position_ids"] - prompt.position_shift.to(call["position_ids"].device)


def expand_for_generation(model: nn.Module, stock_expand: Callable[..., Any], expand_size: int = 1,
                          is_encoder_decoder: bool = False, input_ids: Tensor | None = None,
                          **model_kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """generate()'s input expansion (beams, num_return_sequences) with visual inputs repeated per PROMPT.

    The stock expansion repeats every tensor's rows, which for per-image inputs (``pixel_values`` with one row
    per image, Qwen's flattened patches, ``image_grid_thw``) is right only when every prompt holds one row:
    each prompt's blocks (``Family.visual_blocks``) are repeated together instead.
    """
    state: PatchState = model.__dict__[STATE_ATTR]
    blocks: dict[str, tuple[list[int], list[int]]] = {}
    if expand_size > 1 and input_ids is not None:
        call = {"input_ids": input_ids, **{key: model_kwargs.get(key) for key in state.family.visual_keys}}
        if any(isinstance(call.get(key), Tensor) for key in state.family.visual_inputs):
            blocks = state.family.visual_blocks(model, call)
    visual = {key: model_kwargs.pop(key) for key in blocks}
    input_ids_out, model_kwargs = stock_expand(expand_size=expand_size, is_encoder_decoder=is_encoder_decoder,
                                               input_ids=input_ids, **model_kwargs)
    model_kwargs.update({key: repeat_per_prompt(value, *blocks[key], expand_size) for key, value in visual.items()})
    return input_ids_out, model_kwargs


def repeat_per_prompt(value: Tensor, sizes: list[int], prompts: list[int], expand_size: int) -> Tensor:
    """Rows of ``value`` in blocks of ``sizes`` (block i of prompt ``prompts[i]``, ascending): each prompt's
    blocks repeated ``expand_size`` times together. # (sum(sizes), ...) -> (expand_size * sum(sizes), ...)"""
    if sum(sizes) != value.shape[0]:
        raise ValueError(f"a visual input of {value.shape[0]} rows does not match its items' {sum(sizes)} rows")
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    order: list[int] = []
    for prompt in sorted(set(prompts)):
        rows = [r for i, p in enumerate(prompts) if p == prompt for r in range(starts[i], starts[i] + sizes[i])]
        order += rows * expand_size
    return value.index_select(0, torch.tensor(order, dtype=torch.long, device=value.device))


# ------------------------------------------------------------------------------------------ prefill
@dataclass(frozen=True)
class RowGroup:
    """Rows of one relevance group that share a length (selected by one ``script_prune`` call).

    sub: (G,) positions within the relevance group, ids: (G,) row ids (both None: every row, in order);
    host_ids: the row ids on the host; length: their valid tokens.
    """

    sub: Tensor | None
    ids: Tensor | None
    host_ids: list[int]
    length: int


def rows_by_length(row_ids: Tensor | None, row_lengths: list[int], device: torch.device) -> list[RowGroup]:
    """Split a relevance group (``row_ids`` (G,) or None for all rows) by row length, on the host.

    No host sync when the group is all rows (every relevance source but a ``clip_text`` batch whose
    questions need different numbers of CLIP segments, which reads its row ids once).
    """
    host = list(range(len(row_lengths))) if row_ids is None else row_ids.tolist()
    by_length: dict[int, list[int]] = {}
    for position, row in enumerate(host):
        by_length.setdefault(row_lengths[row], []).append(position)
    if row_ids is None and len(by_length) == 1:
        return [RowGroup(None, None, host, row_lengths[0])]
    groups = []
    for length, positions in by_length.items():
        sub = device_index(positions, device)
        groups.append(RowGroup(sub, sub if row_ids is None else row_ids[sub], [host[p] for p in positions], length))
    return groups


def take(x: Tensor | None, index: Tensor | None) -> Tensor | None:
    """``x[index]`` (None index: all of ``x``; None ``x`` stays None)."""
    return x if x is None or index is None else x[index]


def select_rows(model: nn.Module, state: PatchState, rows: VisualRows, query: Query, row_sample: Tensor,
                row_lengths: list[int]) -> tuple[Tensor, Tensor | None]:
    """Which tokens of every row stay: ``script_prune.select`` on ``H_v`` with the resolved per-row budget.

    Merging methods (TRIM) run ``script_prune.reduce`` on the vision features (the projector input) instead
    and their merged tokens are projected like the others. Rows are processed together, split only by
    relevance group (query shape) and row length (``row_lengths``: the family's host-side lengths, in row
    order); TRIM-IQR, whose kept count differs per row, one row at a time. Selection runs on the trusted
    path (``validate=False``: apply checked the budget and parameters; the features are the model's), so
    this step waits for the device nowhere. -> keep (R, N) bool, merged: (R, e, D) projected merged tokens
    or None.
    """
    cfg = state.config
    params = cfg.method_params()
    r, n = rows.tokens.shape[:2]
    device = rows.tokens.device
    if len(row_lengths) != r:
        raise ValueError(f"family {state.family.name!r} reported {len(row_lengths)} row lengths for {r} encoded rows")
    if cfg.spec.needs_relevance:
        groups = cfg.relevance.groups(model, state.family, rows, query, row_sample)
    else:
        groups = [(None, None, None)]
    keep = torch.zeros(r, n, dtype=torch.bool, device=device)
    merged: list[tuple[Tensor | None, Tensor]] = []
    for row_ids, image_embeds, query_embeds in groups:  # one group per query shape, usually one
        for group in rows_by_length(row_ids, row_lengths, device):  # one length for fixed-resolution families
            ids, length = group.ids, group.length
            k = resolve_budget(cfg.budget, length)
            inputs = dict(image_embeds=None if image_embeds is None else take(image_embeds, group.sub)[:, :length],
                          query_embeds=take(query_embeds, group.sub))
            inputs.update({name: take(value, ids)[:, :length] for name, value in rows.inputs.items()})
            # the choice of tokens is not differentiable: methods see detached tensors, so a forward with autograd
            # on works (some kernels refuse grad-carrying inputs) and gradients flow through the kept tokens
            inputs = {name: None if v is None else v.detach() for name, v in inputs.items()}
            if keeps_all(k, length):
                picked = torch.arange(length, device=device).expand(len(group.host_ids), -1)
            elif cfg.spec.merges and cfg.method in ROW_BY_ROW:  # kept count differs per row: one call per row
                for j, row in enumerate(group.host_ids):
                    reduction = sp.reduce(rows.vision_features[row:row + 1, :length].detach(), k, cfg.method,
                                          **{name: None if v is None else v[j:j + 1] for name, v in inputs.items()},
                                          validate=False, **params)
                    keep[row, reduction.indices[0]] = True
                    if reduction.merged is not None:
                        features = reduction.merged.to(rows.vision_features.dtype)  # (1, e, C)
                        merged.append((device_index([row], device), state.family.project(model, features)))
                continue
            elif cfg.spec.merges:
                reduction = sp.reduce(take(rows.vision_features, ids)[:, :length].detach(), k, cfg.method,
                                      validate=False, **inputs, **params)
                picked = reduction.indices
                if reduction.merged is not None:
                    features = reduction.merged.to(rows.vision_features.dtype)  # (G, e, C)
                    merged.append((ids, state.family.project(model, features)))
            else:
                picked = sp.select(take(rows.tokens, ids)[:, :length].detach(), k, cfg.method, validate=False,
                                   **inputs, **params)
            if ids is None:
                keep.scatter_(1, picked, True)
            else:
                keep[ids[:, None], picked] = True
    return keep, stack_merged(merged, r)


def kept_indices(keep: Tensor) -> list[Tensor]:
    """(R, N) bool -> R ascending int64 tensors of the kept indices (one host sync)."""
    n = keep.shape[1]
    values = torch.arange(n, device=keep.device).expand(keep.shape[0], -1)[keep]  # row-major, ascending per row
    return list(torch.split(values, keep.sum(dim=1).tolist()))


def stack_merged(parts: list[tuple[Tensor, Tensor]], rows: int) -> Tensor | None:
    """Merged tokens of the row groups -> (R, e, D); None when no group merged."""
    if not parts:
        return None
    counts = {tokens.shape[1] for _, tokens in parts}
    covered = sum(tokens.shape[0] for _, tokens in parts)
    if len(counts) != 1 or covered != rows:
        raise ValueError("the merging method gave different numbers of merged tokens for the rows of one prefill")
    ids, tokens = parts[0]
    out = tokens.new_empty(rows, *tokens.shape[1:])
    for ids, tokens in parts:
        out[slice(None) if ids is None else ids] = tokens
    return out


@dataclass
class Prompt:
    """The unpruned prompt of a prefill with its visual rows laid out (shared by both stages).

    embeds: (B, L, D) input embeddings of the prompt ids (placeholders not filled yet); real: (B, L) bool (not padding);
    placeholder: (B, L) bool; row_sample: (R,) sample of every row; image_sample: (I,) sample of every image;
    checks: (3,) long on the device, [placeholders in the prompt, visual tokens the images give, batch left
    padded (or unpadded)], read by :func:`resolve`, which sets ``left``.
    """

    embeds: Tensor
    real: Tensor
    placeholder: Tensor
    row_sample: Tensor
    image_sample: Tensor
    checks: Tensor
    left: bool | None = None


def locate_rows(model: nn.Module, state: PatchState, call: dict[str, Any], rows: VisualRows) -> Prompt:
    """Where the rows sit in the prompt (no host sync; :func:`resolve` checks the placeholder count)."""
    input_ids = call["input_ids"]
    placeholder = state.family.placeholder_mask(model, input_ids)  # (B, L)
    mask = call.get("attention_mask")
    real = torch.ones_like(placeholder) if mask is None else mask.bool()
    ends = placeholder.sum(dim=1).cumsum(0)  # (B,) placeholders up to each sample's end, in scatter order
    starts = rows.image_lengths.cumsum(0) - rows.image_lengths  # (I,) first placeholder slot of every image
    image_sample = torch.searchsorted(ends, starts, right=True).clamp(max=input_ids.shape[0] - 1)  # (I,)
    left = ~(~real[:, -1]).any()
    checks = torch.stack([ends[-1], rows.image_lengths.sum(), left.long()])
    embeds = state.family.embed_tokens(model)(input_ids)  # (B, L, D)
    return Prompt(embeds, real, placeholder, image_sample[rows.row_image], image_sample, checks)


def resolve(prompt: Prompt, *scalars: Tensor) -> list[int]:
    """Read the prompt's checks and ``scalars`` (0-d or 1-d integer tensors) with ONE host sync; raise when the
    placeholder count differs from the images' visual tokens (as the stock check), set ``prompt.left``.
    -> the scalars' values, flat in order."""
    found, expected, left, *values = torch.cat([prompt.checks, *(s.reshape(-1).long() for s in scalars)]).tolist()
    if found != expected:
        raise ValueError(f"the prompt holds {found} image placeholder tokens but the images give {expected} visual tokens")
    prompt.left = bool(left)
    return values


def prefill(model: nn.Module, state: PatchState, call: dict[str, Any]) -> Any:
    """A prefill with pixels: stock forward when the budget keeps whole rows, else the shortened prefill.

    Host syncs of the shortened prefill beyond what the stock model's own forward does: one (:func:`resolve`:
    the placeholder check, the padding side and the short prompt's length), plus the family's own host reads
    (sizes, grids; made once per prefill through ``family.read_once``) and those of the relevance source where
    they need host values (none for LLaVA with ``llm_text``)."""
    with one_read_per_prefill():
        return run_prefill(model, state, call)


def run_prefill(model: nn.Module, state: PatchState, call: dict[str, Any]) -> Any:
    family, cfg = state.family, state.config
    if call.get("input_ids") is None:
        raise ValueError("script_prune.patch needs input_ids (with the image placeholders) on a prefill with "
                         f"{' / '.join(family.visual_inputs)}; inputs_embeds alone do not say where the images are")
    mask = call.get("attention_mask")
    if mask is not None and mask.dim() != 2:
        raise ValueError(f"script_prune.patch needs a 2-D (B, L) attention mask on a prefill with images, got shape "
                         f"{tuple(mask.shape)} (static / compiled caches, whose masks generate() builds in 4-D, are "
                         "not supported yet)")
    lengths = family.row_lengths(model, call)  # tokens of every row (the longest decides "whole rows")
    n = max(lengths, default=family.row_length(model))
    k = resolve_budget(cfg.budget, n)
    state.prompt = state.visual_counts = state.kept = state.keep_rows = None
    if keeps_all(k, n) and family.stock_layout(model):
        output = state.stock_forward(**call)
        state.kept = [torch.arange(m, device=call["input_ids"].device) for m in lengths]
        placeholder = family.placeholder_mask(model, call["input_ids"])
        state.visual_counts = (placeholder if mask is None else placeholder & mask.bool()).sum(dim=1)
        return output
    with stage(state, "vision"):
        rows = family.encode(model, call, frozenset(cfg.spec.inputs))
    prompt = locate_rows(model, state, call, rows)
    if cfg.spec.stage == "llm":
        from .in_llm import in_llm_prefill

        with stage(state, "llm"):  # the selection happens inside the decoder (its resolve reads the row shapes too)
            return in_llm_prefill(model, state, call, rows, prompt, lengths)
    query = Query(call["input_ids"], question_mask(call["input_ids"], prompt.real, prompt.placeholder), state.texts)
    with stage(state, "select"):  # relevance inputs + selection (+ projection of merged tokens)
        keep_rows, merged = select_rows(model, state, rows, query, prompt.row_sample, lengths)  # (R, N)
    layout = family.layout(model, rows, keep_rows, merged)
    if merged is not None:  # without merged tokens every kept token stays in its own placeholder slot
        layout = fit_layout(layout, rows.image_lengths)
    # tokens each sample keeps: its real text + the kept visual entries of its images (its short length)
    per_image = torch.zeros_like(prompt.image_sample).index_add_(0, layout.image, layout.kept.long())  # (I,)
    count = (prompt.real & ~prompt.placeholder).sum(dim=1)  # (B,)
    count = count.index_add(0, prompt.image_sample, per_image)
    longest, shortest = resolve(prompt, count.max(), count.min())  # the one host sync
    embeds = prompt.embeds.masked_scatter(prompt.placeholder[..., None], layout.tokens.to(prompt.embeds.dtype))
    keep = prompt.real & (~prompt.placeholder).masked_scatter(prompt.placeholder, layout.kept)  # (B, L)
    index, short_mask = pack(keep, prompt.left, short=longest)  # (B, Ls)
    short_call = without_pixels(family, call)
    short_call.update(inputs_embeds=gather_tokens(embeds, index), attention_mask=short_mask,
                      position_ids=family.positions(model, call, index, short_mask))
    counts = None if cfg.spec.merges else [kept_tokens(cfg.budget, n) for n in lengths]  # merging: counts vary
    short_call.update(family.llm_inputs(model, rows, layout, index, short_mask, counts))
    if call.get("labels") is not None:
        short_call["labels"] = gather_tokens(call["labels"], index).masked_fill(short_mask == 0, -100)
    with stage(state, "llm"):
        output = state.stock_forward(**short_call)
    shift = family.decode_shift(model, prompt.real, short_mask)  # (B, 1)
    remember_prompt(state, call, output, call["input_ids"].shape[1], short_mask, shift, shortest < longest)
    state.keep_rows = keep_rows
    state.visual_counts = (keep & prompt.placeholder).sum(dim=1)
    return output


def without_pixels(family: Family, call: dict[str, Any]) -> dict[str, Any]:
    """The call without visual inputs and input_ids (the short prompt goes in as inputs_embeds)."""
    drop = set(family.visual_keys) | {"input_ids"}
    return {key: value for key, value in call.items() if key not in drop}


def remember_prompt(state: PatchState, call: dict[str, Any], output: Any, full_length: int, short_mask: Tensor,
                    shift: Tensor, padded: bool) -> None:
    """Keep what decoding needs (see :class:`PromptState`); ``padded``: the short prompt has padding (the
    prefill knows it from its one host read)."""
    cache = first_given(output_cache(output), call_cache(call))
    if cache is not None:
        state.prompt = PromptState(weakref.ref(cache), full_length, short_mask, shift, padded)

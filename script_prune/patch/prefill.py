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
In-LLM methods (FastV) take the same path up to the layout and then prune inside the decoder
(``in_llm.py``).
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
from script_prune.budget import keeps_all, resolve_budget

from .family import Family, VisualRows, fit_layout, output_cache_field
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
def pack(keep: Tensor, left: bool) -> tuple[Tensor, Tensor]:
    """Kept positions of each row packed to the longest row. # (B, L) bool -> index (B, Ls), mask (B, Ls)

    ``index`` holds the source positions in order; shorter rows are padded on the left (``left``)
    or right, their padding slots pointing at an arbitrary position and masked out (mask 0).
    """
    length = keep.shape[1]
    count = keep.sum(dim=1)  # (B,)
    short = int(count.max()) if keep.shape[0] else 0
    positions = torch.arange(length, device=keep.device)
    order = torch.sort(torch.where(keep, positions, positions + length), dim=1).indices[:, :short]  # kept first
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
    """generate()'s input expansion (beams, num_return_sequences) with per-image inputs repeated per PROMPT.

    The stock expansion repeats every tensor's rows, which for ``pixel_values`` / ``image_sizes`` (one row
    per image) is right only when every prompt holds one image: prompt b's images are repeated as a block.
    """
    state: PatchState = model.__dict__[STATE_ATTR]
    visual = {key: model_kwargs.pop(key) for key in state.family.visual_keys
              if isinstance(model_kwargs.get(key), Tensor)}
    input_ids_out, model_kwargs = stock_expand(expand_size=expand_size, is_encoder_decoder=is_encoder_decoder,
                                               input_ids=input_ids, **model_kwargs)
    if visual and expand_size > 1 and input_ids is not None:
        counts = state.family.images_per_prompt(model, input_ids).tolist()  # (B,) one host sync per generate
        starts = [sum(counts[:b]) for b in range(len(counts))]
        order = [i for b, c in enumerate(counts) for _ in range(expand_size) for i in range(starts[b], starts[b] + c)]
        visual = {key: value.index_select(0, torch.tensor(order, device=value.device)) for key, value in visual.items()}
    model_kwargs.update(visual)
    return input_ids_out, model_kwargs


# ------------------------------------------------------------------------------------------ prefill
def select_rows(model: nn.Module, state: PatchState, rows: VisualRows, query: Query,
                row_sample: Tensor) -> tuple[Tensor, list[Tensor], Tensor | None]:
    """Which tokens of every row stay: ``script_prune.select`` on ``H_v`` with the resolved per-row budget.

    Merging methods (TRIM) run ``script_prune.reduce`` on the vision features (the projector input) instead
    and their merged tokens are projected like the others. Rows are processed together, split only by
    relevance group (query shape) and row length (``rows.lengths``); TRIM-IQR, whose kept count differs per
    row, one row at a time. -> keep (R, N) bool, kept: R ascending
    int64 tensors, merged: (R, e, D) projected merged tokens or None.
    """
    cfg = state.config
    params = cfg.method_params()
    r, n = rows.tokens.shape[:2]
    device = rows.tokens.device
    if cfg.spec.needs_relevance:
        groups = cfg.relevance.groups(model, state.family, rows, query, row_sample)
    else:
        groups = [(torch.arange(r, device=device), None, None)]
    lengths = rows.lengths if rows.lengths is not None else torch.full((r,), n, device=device)
    keep = torch.zeros(r, n, dtype=torch.bool, device=device)
    merged: list[tuple[Tensor, Tensor]] = []
    for row_ids, image_embeds, query_embeds in groups:  # one group per query shape, usually one
        for length in torch.unique(lengths[row_ids]).tolist():  # one length for fixed-resolution families
            sub = (lengths[row_ids] == length).nonzero().flatten()
            ids = row_ids[sub]
            k = resolve_budget(cfg.budget, length)
            inputs = dict(image_embeds=None if image_embeds is None else image_embeds[sub, :length],
                          query_embeds=None if query_embeds is None else query_embeds[sub])
            inputs.update({name: value[ids, :length] for name, value in rows.inputs.items()})
            # the choice of tokens is not differentiable: methods see detached tensors, so a forward with autograd
            # on works (some kernels refuse grad-carrying inputs) and gradients flow through the kept tokens
            inputs = {name: None if v is None else v.detach() for name, v in inputs.items()}
            if keeps_all(k, length):
                picked = torch.arange(length, device=device).expand(ids.shape[0], -1)
            elif cfg.spec.merges and cfg.method in ROW_BY_ROW:  # kept count differs per row: one call per row
                for j, row in enumerate(ids.tolist()):
                    reduction = sp.reduce(rows.vision_features[row:row + 1, :length].detach(), k, cfg.method,
                                          **{name: None if v is None else v[j:j + 1] for name, v in inputs.items()},
                                          **params)
                    keep[row, reduction.indices[0]] = True
                    if reduction.merged is not None:
                        features = reduction.merged.to(rows.vision_features.dtype)  # (1, e, C)
                        merged.append((ids[j:j + 1], state.family.project(model, features)))
                continue
            elif cfg.spec.merges:
                reduction = sp.reduce(rows.vision_features[ids, :length].detach(), k, cfg.method, **inputs, **params)
                picked = reduction.indices
                if reduction.merged is not None:
                    features = reduction.merged.to(rows.vision_features.dtype)  # (G, e, C)
                    merged.append((ids, state.family.project(model, features)))
            else:
                picked = sp.select(rows.tokens[ids, :length].detach(), k, cfg.method, **inputs, **params)
            keep[ids[:, None], picked] = True
    values = torch.arange(n, device=device).expand(r, -1)[keep]  # row-major, ascending within each row
    return keep, list(torch.split(values, keep.sum(dim=1).tolist())), stack_merged(merged, r)


def stack_merged(parts: list[tuple[Tensor, Tensor]], rows: int) -> Tensor | None:
    """Merged tokens of the row groups -> (R, e, D); None when no group merged."""
    if not parts:
        return None
    counts = {tokens.shape[1] for _, tokens in parts}
    covered = sum(ids.shape[0] for ids, _ in parts)
    if len(counts) != 1 or covered != rows:
        raise ValueError("the merging method gave different numbers of merged tokens for the rows of one prefill")
    ids, tokens = parts[0]
    out = tokens.new_empty(rows, *tokens.shape[1:])
    for ids, tokens in parts:
        out[ids] = tokens
    return out


@dataclass
class Prompt:
    """The unpruned prompt of a prefill with its visual rows laid out (shared by both stages).

    embeds: (B, L, D) input embeddings of the prompt ids (placeholders not filled yet); real: (B, L) bool (not padding);
    placeholder: (B, L) bool; row_sample: (R,) sample of every row; left: the batch is left padded
    (or unpadded).
    """

    embeds: Tensor
    real: Tensor
    placeholder: Tensor
    row_sample: Tensor
    left: bool


def locate_rows(model: nn.Module, state: PatchState, call: dict[str, Any], rows: VisualRows) -> Prompt:
    """Where the rows sit in the prompt; checks the placeholder count against the unpruned layout."""
    input_ids = call["input_ids"]
    placeholder = state.family.placeholder_mask(model, input_ids)  # (B, L)
    mask = call.get("attention_mask")
    real = torch.ones_like(placeholder) if mask is None else mask.bool()
    slot_sample = placeholder.nonzero()[:, 0]  # (T,) sample of every placeholder, in scatter order
    expected = rows.image_lengths.sum()
    if bool(slot_sample.shape[0] != expected):  # one host sync, as the stock check
        raise ValueError(f"the prompt holds {slot_sample.shape[0]} image placeholder tokens but the images give "
                         f"{int(expected)} visual tokens")
    starts = rows.image_lengths.cumsum(0) - rows.image_lengths  # (I,)
    row_sample = slot_sample[starts][rows.row_image]  # (R,)
    left = not bool((~real[:, -1]).any())
    embeds = state.family.embed_tokens(model)(input_ids)  # (B, L, D)
    return Prompt(embeds, real, placeholder, row_sample, left)


def prefill(model: nn.Module, state: PatchState, call: dict[str, Any]) -> Any:
    """A prefill with pixels: stock forward when the budget keeps whole rows, else the shortened prefill."""
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
    state.prompt = state.visual_counts = None
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

        with stage(state, "llm"):  # the selection happens inside the decoder
            return in_llm_prefill(model, state, call, rows, prompt, k)
    query = Query(call["input_ids"], question_mask(call["input_ids"], prompt.real, prompt.placeholder), state.texts)
    with stage(state, "select"):  # relevance inputs + selection (+ projection of merged tokens)
        keep_rows, kept, merged = select_rows(model, state, rows, query, prompt.row_sample)  # (R, N), R x (k,)
    layout = family.layout(model, rows, keep_rows, merged)
    if merged is not None:  # without merged tokens every kept token stays in its own placeholder slot
        layout = fit_layout(layout, rows.image_lengths)
    embeds = prompt.embeds.masked_scatter(prompt.placeholder[..., None], layout.tokens.to(prompt.embeds.dtype))
    keep = prompt.real & (~prompt.placeholder).masked_scatter(prompt.placeholder, layout.kept)  # (B, L)
    index, short_mask = pack(keep, prompt.left)  # (B, Ls)
    short_call = without_pixels(family, call)
    short_call.update(inputs_embeds=gather_tokens(embeds, index), attention_mask=short_mask,
                      position_ids=family.positions(model, call, index, short_mask))
    short_call.update(family.llm_inputs(model, rows, layout, index, short_mask))
    if call.get("labels") is not None:
        short_call["labels"] = gather_tokens(call["labels"], index).masked_fill(short_mask == 0, -100)
    with stage(state, "llm"):
        output = state.stock_forward(**short_call)
    shift = family.decode_shift(model, prompt.real, short_mask)  # (B, 1)
    remember_prompt(state, call, output, call["input_ids"].shape[1], short_mask, shift)
    state.kept = kept
    state.visual_counts = (keep & prompt.placeholder).sum(dim=1)
    return output


def without_pixels(family: Family, call: dict[str, Any]) -> dict[str, Any]:
    """The call without visual inputs and input_ids (the short prompt goes in as inputs_embeds)."""
    drop = set(family.visual_keys) | {"input_ids"}
    return {key: value for key, value in call.items() if key not in drop}


def remember_prompt(state: PatchState, call: dict[str, Any], output: Any, full_length: int, short_mask: Tensor,
                    shift: Tensor) -> None:
    cache = first_given(output_cache(output), call_cache(call))
    if cache is not None:
        padded = bool((short_mask == 0).any())
        state.prompt = PromptState(weakref.ref(cache), full_length, short_mask, shift, padded)

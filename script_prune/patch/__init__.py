"""Visual-token pruning for transformers' own VLM classes, in place (the shape of ToMe's ``tome.patch``).

::

    import script_prune as sp
    sp.patch.apply(model, method="script", budget=64, relevance="llm_text")  # in place, returns model
    out = model.generate(input_ids=..., pixel_values=..., attention_mask=..., max_new_tokens=8)
    sp.patch.kept(model)    # one (k,) int64 tensor per visual row of the last prefill, ascending
    sp.patch.remove(model)  # the stock model again

Supported classes: ``LlavaForConditionalGeneration`` (one row per image),
``LlavaNextForConditionalGeneration`` (one row per anyres crop), ``LlavaOnevisionForConditionalGeneration``
(crops and video frames), ``InternVLForConditionalGeneration`` (tiles and thumbnail),
``Qwen2_5_VLForConditionalGeneration`` and ``Qwen3VLForConditionalGeneration`` (images and frames, 3-D M-RoPE
positions kept; Qwen3-VL's DeepStack features pruned alike). ``budget``: int = tokens kept per
row, float in (0, 1) = fraction kept per row (``script_prune.resolve_budget``); a budget that keeps
whole rows runs the stock forward unchanged. Any selection method of the registry
(``script_prune.list_methods()``) with its parameters as keyword arguments, and the in-LLM methods FastV (``layer=K``), SparseVLM and
PDrop (``layers=(...)``; ``in_llm.py``); merging methods run ``script_prune.reduce`` on the vision features and their merged
tokens follow their row's kept tokens (TRIM, VisionZip with the vision tower's [CLS] attention and keys;
TRIM-IQR, whose kept count differs per row, reduces one row at a time).

Applying twice is refused (``remove`` first); ``remove`` restores the exact stock forward (and
generate()'s input expansion, patched so that several images per prompt repeat per prompt).
See prefill.py for the shortened prefill and docs/adding_a_family.md for new families.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from torch import Tensor, nn

import script_prune as sp
from script_prune.budget import check_budget
from script_prune.registry import RELEVANCE_INPUTS

from .family import DecoderAccess, Family, Layout, VisualRows, cache_keyword
from .llava import LlavaFamily
from .llava_next import LlavaNextFamily
from .internvl import InternVLFamily
from .llava_onevision import LlavaOnevisionFamily
from .qwen2_5_vl import Qwen2_5_VLFamily
from .qwen3_vl import Qwen3VLFamily
from .prefill import STATE_ATTR, PatchConfig, PatchState, expand_for_generation, kept_indices, patched_forward

#: generate()'s input expansion, patched so per-image inputs repeat per prompt (see expand_for_generation)
EXPAND = "_expand_inputs_for_generation"
from .relevance import ClipText, LLMText, RelevanceSource, resolve_source

__all__ = [
    "check_transformers_version",
    "ClipText",
    "DecoderAccess",
    "FAMILIES",
    "Family",
    "LLMText",
    "Layout",
    "RelevanceSource",
    "VisualRows",
    "apply",
    "is_patched",
    "kept",
    "remove",
    "set_query",
    "supported_classes",
    "visual_tokens",
]

#: The families, one file each; a new family is one more entry here.
FAMILIES: tuple[Family, ...] = (LlavaFamily(), LlavaNextFamily(), LlavaOnevisionFamily(), InternVLFamily(),
                                Qwen2_5_VLFamily(), Qwen3VLFamily())


def supported_classes() -> list[str]:
    return [name for family in FAMILIES for name in family.class_names]


def family_of(model: Any) -> Family:
    """The family patching ``type(model)`` (exact class name, a transformers model), else ValueError."""
    name = type(model).__name__
    for family in FAMILIES:
        if name in family.class_names and type(model).__module__.startswith("transformers."):
            return family
    raise ValueError(f"script_prune.patch does not support {type(model).__module__}.{name}; "
                     f"supported: {', '.join(supported_classes())}")


def is_patched(model: nn.Module) -> bool:
    return STATE_ATTR in model.__dict__


def _state(model: nn.Module) -> PatchState:
    if not is_patched(model):
        raise ValueError(f"{type(model).__name__} is not patched by script_prune.patch (call apply first)")
    return model.__dict__[STATE_ATTR]


def check_transformers_version(family: Family, name: str, installed: str | None = None) -> None:
    """Refuse a family on a transformers release older than the one it was tested on (``Family.min_transformers``)."""
    if family.min_transformers is None:
        return
    from packaging.version import Version

    if installed is None:
        import transformers

        installed = transformers.__version__
    if Version(installed) < Version(family.min_transformers):
        raise RuntimeError(f"script_prune.patch supports {name} on transformers >= {family.min_transformers} (tested there); "
                           f"installed {installed}: pip install -U 'transformers>={family.min_transformers}'")


def _config(model: nn.Module, family: Family, method: Any, budget: Any, relevance: Any,
            params: dict[str, Any]) -> PatchConfig:
    """Validate everything ``apply`` can check before a forward, naming the argument at fault."""
    check_transformers_version(family, type(model).__name__)
    if not isinstance(method, str) or method not in sp.list_methods():
        raise ValueError(f"method must be one of {sp.list_methods()}, got {method!r}")
    spec = sp.get_method(method)
    budget = check_budget(family.default_budget if budget is FAMILY_DEFAULT else budget)
    if spec.merges and not family.merging:
        raise ValueError(f"merging method {method!r} is not supported on {type(model).__name__}: merged tokens have no "
                         "original position for its M-RoPE (use a selection method)")
    params = sp.check_params(method, params)
    name = type(model).__name__
    if spec.stage == "llm":
        from .in_llm import check_in_llm_params

        if not family.in_llm:
            raise ValueError(f"in-LLM method {method!r} is not supported on {name} yet (its LLM adds visual features "
                             "inside the decoder, which the pruned decoder loop does not carry)")
        params = check_in_llm_params(method, params, int(family.decoder(model).config.num_hidden_layers))
        return PatchConfig(method, budget, params, None)
    other = sorted(set(spec.inputs) - set(RELEVANCE_INPUTS) - set(family.provides))
    if other:
        raise ValueError(f"method {method!r} needs inputs {other}, which script_prune.patch cannot provide for {name}")
    source = resolve_source(relevance, family, name)
    config = PatchConfig(method, budget, params, source)
    if spec.needs_relevance and source is None:
        raise ValueError(
            f"method {method!r} needs query relevance (inputs image_embeds, query_embeds) and {name} has no relevance "
            "source of its own (no CLIP text tower): pass relevance='llm_text' (the LLM's embeddings of the question) "
            "or relevance=script_prune.patch.ClipText(text_model, visual_projection, tokenizer)"
        )
    return config


class _FamilyDefault:
    """``apply``'s default budget: the family's ``default_budget`` (64 per row; a fraction for Qwen-VL)."""

    def __repr__(self) -> str:
        return "<family default>"


FAMILY_DEFAULT: Any = _FamilyDefault()


def apply(model: nn.Module, method: str = "script", budget: int | float = FAMILY_DEFAULT, relevance: Any = None,
          **params: Any) -> nn.Module:
    """Prune ``model``'s visual tokens with ``method`` at ``budget`` per visual row, in place; returns ``model``.

    relevance: None (the family's default source, if any), ``"llm_text"``, or a :class:`RelevanceSource`
    such as :class:`ClipText`; its sign becomes the method's ``negate`` unless ``negate`` is given.
    ``params``: the method's parameters (``script_prune.get_method(method).params``). ``budget`` omitted:
    the family's ``default_budget`` (64 tokens per row; 0.25 of each row for the Qwen-VL families).
    Refused: an unsupported class, a model already patched, a bad method / budget / parameter, a
    relevance method without a source.
    """
    family = family_of(model)
    if is_patched(model):
        cfg = _state(model).config
        raise ValueError(f"{type(model).__name__} is already patched (method={cfg.method!r}, budget={cfg.budget!r}); "
                         "call script_prune.patch.remove(model) before applying again")
    config = _config(model, family, method, budget, relevance, params)
    previous = model.__dict__.get("forward")
    stock = model.forward
    stock_expand = model._expand_inputs_for_generation
    state = PatchState(family, config, stock, previous, model.__dict__.get(EXPAND), inspect.signature(stock))
    if config.spec.stage == "llm":  # how this transformers version hands decoder layers the cache, decided once
        state.extra["layer_cache_keyword"] = cache_keyword(type(family.decoder(model).layers[0]).forward)

    @functools.wraps(stock)
    def forward(*args: Any, **kwargs: Any) -> Any:
        return patched_forward(model, *args, **kwargs)

    # generate() of transformers >= 5.24 encodes the images itself before the prefill when forward takes
    # `mm_encoder_outputs`; hiding that parameter makes it hand pixel_values to the prefill, as before.
    forward.__signature__ = state.signature.replace(
        parameters=[p for name, p in state.signature.parameters.items() if name != "mm_encoder_outputs"])
    model.__dict__[STATE_ATTR] = state
    model.forward = forward
    setattr(model, EXPAND, functools.partial(expand_for_generation, model, stock_expand))
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply`: the model's forward is the one it had before; returns ``model``."""
    state = _state(model)
    for name, previous in (("forward", state.previous_forward), (EXPAND, state.previous_expand)):
        if previous is None:
            delattr(model, name)
        else:
            setattr(model, name, previous)
    del model.__dict__[STATE_ATTR]
    return model


def kept(model: nn.Module) -> list[Tensor]:
    """One entry per visual row of the last prefill (image / crop, sequence order; generate() repeats a
    prompt's rows per beam / returned sequence): ascending int64 indices into that row's tokens.

    For LLaVA-NeXT tiles these are the selected indices; those in the unpadded-away border never
    reach the LLM. For in-LLM methods, the tokens left after the last stage (merged ones have no index); a row cut by the unpad step keeps at most its tokens in the prompt.
    """
    state = _state(model)
    if state.kept is None and state.keep_rows is not None:  # read on demand: the prefill does not wait for it
        state.kept = kept_indices(state.keep_rows)
    if state.kept is None:
        raise ValueError("no prefill with pixel_values has run since script_prune.patch.apply")
    return list(state.kept)


def visual_tokens(model: nn.Module) -> list[int]:
    """Visual tokens of every sample that reached the LLM at the last prefill with pixels (kept tokens, merged
    tokens and layout tokens such as NeXT newlines; for in-LLM methods those left after layer K). One host sync."""
    state = _state(model)
    if state.visual_counts is None:
        raise ValueError("no prefill with pixel_values has run since script_prune.patch.apply")
    return state.visual_counts.tolist()


def set_query(model: nn.Module, texts: list[str] | None) -> None:
    """The question text of every sample for the next prefills (``clip_text`` relevance); None clears it."""
    state = _state(model)
    if texts is not None and (not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts)):
        raise ValueError(f"texts must be a list of strings (one per prompt) or None, got {texts!r}")
    state.texts = None if texts is None else list(texts)

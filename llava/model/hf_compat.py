"""The one place that knows how the installed transformers release names the KV cache.

transformers 5.24 renamed the cache argument of the decoder layers, ``*Model.forward``,
``*ForCausalLM.forward``, ``create_causal_mask`` and the output field from ``past_key_values`` to
``cache``. The old name is deprecated (removal announced for 5.40) and is *ignored* when both are
given, so passing the wrong one silently leaves a cache unfilled. Every call in this package passes
the cache through the names below, read once from the installed release's own signatures. The declared
range (``pyproject.toml``) is 5.6 - 5.x: 5.6.0 takes the old name, 5.24.0 the new one; both pass the suite.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaModel

_OLD = "past_key_values"


def _cache_name(params: Any, where: str) -> str:
    for name in ("cache", _OLD):
        if name in params:
            return name
    raise ImportError(f"unsupported transformers release: {where} takes neither `cache` nor `past_key_values`")


# keyword of the decoder layers and of *Model / *ForCausalLM forward
CACHE_ARG = _cache_name(inspect.signature(LlamaModel.forward).parameters, "LlamaModel.forward")
# keyword of create_causal_mask / create_sliding_window_causal_mask
MASK_CACHE_ARG = _cache_name(inspect.signature(create_causal_mask).parameters, "create_causal_mask")
# field of BaseModelOutputWithPast / CausalLMOutputWithPast
OUTPUT_CACHE_FIELD = _cache_name({f.name for f in dataclasses.fields(BaseModelOutputWithPast)},
                                 "BaseModelOutputWithPast")
if _cache_name(inspect.signature(LlamaDecoderLayer.forward).parameters, "LlamaDecoderLayer.forward") != CACHE_ARG:
    raise ImportError("unsupported transformers release: decoder layers and LlamaModel.forward name the cache differently")


def pop_cache(kwargs: dict[str, Any]) -> Any:
    """Remove the cache from ``kwargs`` under either name -> the cache (or None).

    Callers (generate(), users) may use the current or the deprecated name; both at once with different
    objects is refused instead of silently dropping one."""
    new, old = kwargs.pop("cache", None), kwargs.pop(_OLD, None)
    if new is not None and old is not None and new is not old:
        raise ValueError("got both `cache` and `past_key_values` (different objects); pass the KV cache once, as `cache`")
    return new if new is not None else old


def output_cache(output: Any) -> Any:
    """The KV cache of a model output (``BaseModelOutputWithPast`` / ``CausalLMOutputWithPast``), or None."""
    return getattr(output, OUTPUT_CACHE_FIELD, None)

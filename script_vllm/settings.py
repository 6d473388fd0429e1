"""Per-request pruning settings: read from ``mm_processor_kwargs``, validated once, carried per visual item.

A request asks for pruning with ``mm_processor_kwargs={"script_budget": 0.25}`` (and optionally
``"script_method"``, default ``"script"``, and ``"script_params"``, a dict of the method's parameters).
Server-wide defaults are the same keys in ``vllm serve --mm-processor-kwargs`` / ``LLM(mm_processor_kwargs=...)``;
a request's keys override them. No ``script_budget``: the request runs the stock model.

The settings and the request's question (its prompt token ids after the last visual placeholder,
``script_prune.patch.relevance.question_mask``) travel from the processor to the encoder as one
per-item field (UTF-8 JSON in a uint8 tensor): ``embed_multimodal`` sees only pixels otherwise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

import script_prune as sp
from script_prune.budget import check_budget, kept_tokens

#: the request keys this plugin reads (kept out of the HF processor call)
KEYS = ("script_method", "script_budget", "script_params")
#: the processor-to-encoder field (one per image / video item)
FIELD = {"image": "script_request_image", "video": "script_request_video"}


@dataclass(frozen=True)
class Settings:
    """One request's pruning: method, per-row budget (int = tokens per row, float in (0, 1) = fraction),
    method parameters, and the question's token ids (relevance ``llm_text``)."""

    method: str
    budget: int | float
    params: dict[str, Any] = field(default_factory=dict)
    query: tuple[int, ...] = ()

    def kept(self, n: int) -> int:
        """Tokens kept in a row of ``n`` (``script_prune.kept_tokens``)."""
        return kept_tokens(self.budget, n)

    @staticmethod
    def encode_optional(settings: "Settings | None") -> torch.Tensor:
        """(bytes,) uint8 JSON of ``settings``; ``{}`` for a request without pruning."""
        data = {} if settings is None else {"method": settings.method, "budget": settings.budget,
                                            "params": settings.params, "query": list(settings.query)}
        return torch.tensor(list(json.dumps(data, sort_keys=True).encode()), dtype=torch.uint8)

    @staticmethod
    def decode_optional(blob: torch.Tensor) -> "Settings | None":
        data = json.loads(bytes(blob.tolist()).decode())
        return Settings(data["method"], data["budget"], data["params"], tuple(data["query"])) if data else None


def parse(kwargs: Mapping[str, object]) -> Settings | None:
    """The settings of merged ``mm_processor_kwargs`` (server defaults + request), or None (no pruning).

    Refused, naming the key: an unknown method, an LLM-side or merging method (vLLM's kept count is fixed when
    the prompt is processed and merged tokens have no M-RoPE position), a bad budget or parameter.
    """
    if kwargs.get("script_budget") is None:
        unknown = [key for key in KEYS if kwargs.get(key) is not None]
        if unknown:
            raise ValueError(f"mm_processor_kwargs {unknown} given without 'script_budget' (an int >= 1 tokens per row "
                             "or a float in (0, 1) fraction per row)")
        return None
    method = kwargs.get("script_method") or "script"
    if not isinstance(method, str) or method not in sp.list_methods():
        raise ValueError(f"mm_processor_kwargs 'script_method' must be one of {sp.list_methods()}, got {method!r}")
    spec = sp.get_method(method)
    if spec.stage != "vision" or spec.merges:
        raise ValueError(f"mm_processor_kwargs 'script_method' {method!r} is not supported in vLLM: only vision-side "
                         "selection methods (no in-LLM pruning, no merging: merged tokens have no M-RoPE position)")
    budget = check_budget(kwargs["script_budget"], "mm_processor_kwargs 'script_budget'")
    params = kwargs.get("script_params") or {}
    if not isinstance(params, Mapping):
        raise ValueError(f"mm_processor_kwargs 'script_params' must be a dict of {method!r}'s parameters, got {params!r}")
    params = sp.check_params(method, dict(params))
    other = sorted(set(spec.inputs) - {"image_embeds", "query_embeds"})
    if other:
        raise ValueError(f"mm_processor_kwargs 'script_method' {method!r} needs inputs {other}, which the vLLM plugin "
                         "cannot provide")
    return Settings(method, budget, params)


def strip(kwargs: Mapping[str, object]) -> dict[str, object]:
    """``kwargs`` without this plugin's keys (what the HF processor gets)."""
    return {key: value for key, value in kwargs.items() if key not in KEYS and key != "script_query"}

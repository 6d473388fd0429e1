"""Script: graph-structured and query-conditioned visual token pruning (pure torch).

Usage::

    import script_prune as sp
    idx = sp.select(features, 64, image_embeds=image_embeds, query_embeds=query_embeds)  # (B, 64)

See docs/algorithm.md for the exact semantics. ``script_prune.patch`` (imported on first
access, the only part that imports transformers) prunes transformers' own VLM classes in place:
``sp.patch.apply(model, method="script", budget=64)``.
"""

import importlib as _importlib

from .budget import check_budget, keeps_all, kept_tokens, resolve_budget
from .registry import (
    MethodSpec,
    Reduction,
    check_params,
    dpp_greedy,
    get_method,
    list_methods,
    query_relevance,
    reduce,
    redundancy_scores,
    register_method,
    select,
)
from . import methods  # noqa: E402,F401  registers script and its ablations
from . import baselines  # noqa: E402,F401  registers the baselines (after registry/methods)
from . import inllm  # noqa: E402,F401  registers SparseVLM and PDrop (multi-stage in-LLM methods)

__all__ = [
    "MethodSpec",
    "check_budget",
    "check_params",
    "keeps_all",
    "kept_tokens",
    "resolve_budget",
    "Reduction",
    "dpp_greedy",
    "get_method",
    "list_methods",
    "query_relevance",
    "reduce",
    "redundancy_scores",
    "register_method",
    "select",
]


def __getattr__(name: str):
    """``script_prune.patch`` on first access, so ``import script_prune`` never imports transformers."""
    if name == "patch":
        return _importlib.import_module(".patch", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

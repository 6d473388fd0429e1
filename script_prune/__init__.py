"""Script: graph-structured and query-conditioned visual token pruning (pure torch).

Usage::

    import script_prune as sp
    idx = sp.select(features, 64, image_embeds=image_embeds, query_embeds=query_embeds)  # (B, 64)

See docs/algorithm.md for the exact semantics.
"""

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

__all__ = [
    "MethodSpec",
    "Reduction",
    "check_params",
    "dpp_greedy",
    "get_method",
    "list_methods",
    "query_relevance",
    "reduce",
    "redundancy_scores",
    "register_method",
    "select",
]

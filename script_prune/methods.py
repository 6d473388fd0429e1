"""Script and its ablations (paper Table 5) registered as selection methods.

Each function receives validated batched float32 tensors and ``1 <= budget < N`` and
returns (B, budget) int64 indices (the wrapper sorts them).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import core
from .registry import register_method

PAPER = "Script (graph-structured and query-conditioned semantic token pruning)"
QUERY_INPUTS = ("image_embeds", "query_embeds")


def _check_graph_params(params: dict) -> None:
    """GSP's graph (Eq. 7-9): ``tau`` thresholds a cosine similarity, ``gamma`` scales the excess above it."""
    if not -1.0 <= params["tau"] <= 1.0:
        raise ValueError(f"tau must be in [-1, 1] (a cosine-similarity threshold), got {params['tau']}")
    if params["gamma"] < 0.0:
        raise ValueError(f"gamma must be >= 0, got {params['gamma']}")


def _check_gsp_params(params: dict) -> None:
    _check_graph_params(params)
    if not 0.0 <= params["gsp_ratio"] <= 1.0:
        raise ValueError(f"gsp_ratio must be in [0, 1], got {params['gsp_ratio']}")


def _gsp_keep(similarity: Tensor, budget: int, tau: float, gamma: float, gsp_ratio: float) -> Tensor:
    """GSP survivors: the ``n - floor(rho (n - m))`` least redundant tokens. # (B, N, N) -> (B, N) bool"""
    n = similarity.shape[1]
    scores = core.redundancy_from_similarity(similarity, tau, gamma)
    return core.lowest_k_mask(scores, core.gsp_keep_count(n, budget, gsp_ratio))


def _walk_bound(n: int, budget: int, gsp_ratio: float) -> int:
    """Most greedy steps before the ``budget``-th GSP survivor: every removed token, then ``budget`` kept ones."""
    return n - core.gsp_keep_count(n, budget, gsp_ratio) + budget


@register_method(
    "script",
    inputs=QUERY_INPUTS,
    params={"tau": 0.2, "gamma": 1.0, "gsp_ratio": 0.5, "negate": False},
    check=_check_gsp_params,
    paper=PAPER,
    description="GSP survivors walked in DPP greedy order of the query-conditioned kernel (Sec. 4.3)",
)
def script(
    features: Tensor, budget: int, image_embeds: Tensor, query_embeds: Tensor,
    tau: float, gamma: float, gsp_ratio: float, negate: bool,
) -> Tensor:
    """Script: one Gram shared by GSP and the kernel ``diag(r) S diag(r)``. # (B, N, D) -> (B, m)"""
    similarity = core.cosine_similarity_matrix(features)  # (B, N, N)
    keep = _gsp_keep(similarity, budget, tau, gamma, gsp_ratio)
    relevance = core.query_relevance(image_embeds, query_embeds, negate)
    n = features.shape[1]
    # the walk scales S into the kernel in place (torch path) or on the fly (fused path)
    return core.script_walk(similarity, keep, budget, max_steps=_walk_bound(n, budget, gsp_ratio), relevance=relevance)


@register_method(
    "qcsp",
    inputs=QUERY_INPUTS,
    params={"negate": False},
    paper=PAPER,
    description="QCSP alone: greedy DPP MAP of diag(r) S diag(r) (Script with gsp_ratio=0)",
)
def qcsp(features: Tensor, budget: int, image_embeds: Tensor, query_embeds: Tensor, negate: bool) -> Tensor:
    """First ``m`` greedy DPP picks of the query-conditioned kernel. # (B, N, D) -> (B, m)"""
    relevance = core.query_relevance(image_embeds, query_embeds, negate)
    return core.dpp_greedy(core.cosine_similarity_matrix(features), budget, relevance=relevance)


@register_method(
    "gsp",
    params={"tau": 0.2, "gamma": 1.0},
    check=_check_graph_params,
    paper=PAPER,
    description="GSP alone: the m least redundant tokens of the bipartite graph (Eq. 9)",
)
def gsp(features: Tensor, budget: int, tau: float, gamma: float) -> Tensor:
    """The ``m`` lowest redundancy scores, ties to the lower index. # (B, N, D) -> (B, m)"""
    scores = core.redundancy_scores(features, tau, gamma)
    return torch.sort(scores, dim=1, stable=True).indices[:, :budget]


@register_method(
    "qcrs",
    inputs=QUERY_INPUTS,
    params={"negate": False},
    paper=PAPER,
    description="QCRS alone: the m most query-relevant tokens (Eq. 4)",
)
def qcrs(features: Tensor, budget: int, image_embeds: Tensor, query_embeds: Tensor, negate: bool) -> Tensor:
    """Top ``m`` relevance, ties to the lower index. # (B, N, D) -> (B, m)"""
    return core.descending_order(core.query_relevance(image_embeds, query_embeds, negate))[:, :budget]


@register_method(
    "gsp_qcrs",
    inputs=QUERY_INPUTS,
    params={"tau": 0.2, "gamma": 1.0, "gsp_ratio": 0.5, "negate": False},
    check=_check_gsp_params,
    paper=PAPER,
    description="GSP survivors taken in descending relevance order (no DPP)",
)
def gsp_qcrs(
    features: Tensor, budget: int, image_embeds: Tensor, query_embeds: Tensor,
    tau: float, gamma: float, gsp_ratio: float, negate: bool,
) -> Tensor:
    """The first ``m`` GSP survivors in descending relevance. # (B, N, D) -> (B, m)"""
    keep = _gsp_keep(core.cosine_similarity_matrix(features), budget, tau, gamma, gsp_ratio)
    order = core.descending_order(core.query_relevance(image_embeds, query_embeds, negate))
    return core.first_kept(order, keep, budget)


@register_method(
    "random",
    params={"seed": 0},
    description="Uniformly random tokens; every row uses its own generator seeded with `seed`",
)
def random(features: Tensor, budget: int, seed: int) -> Tensor:
    """``budget`` random indices from a generator on the features' device seeded with ``seed``.

    Every row gets a fresh generator with the same seed, so a row's picks depend only on
    (seed, N, budget, device), not on its batch position: rows of one batch get the same
    indices, and batched == one-by-one. # (B, N, D) -> (B, m)
    """
    b, n, _ = features.shape
    generator = torch.Generator(device=features.device)
    generator.manual_seed(seed)
    perm = torch.randperm(n, generator=generator, device=features.device)[:budget]
    return perm.unsqueeze(0).expand(b, -1)


@register_method("uniform", description="Evenly spaced indices floor((2i + 1) N / (2m)), i = 0..m-1")
def uniform(features: Tensor, budget: int) -> Tensor:
    """``floor((2i + 1) N / (2m))``: bin centres of m equal bins, unique and ascending. # (B, N, D) -> (B, m)"""
    b, n, _ = features.shape
    i = torch.arange(budget, device=features.device)
    return ((2 * i + 1) * n // (2 * budget)).unsqueeze(0).expand(b, -1)


@register_method(
    "script_released",
    inputs=QUERY_INPUTS,
    paper=PAPER + " (the authors' released code)",
    description="What the authors' release computes: negated raw-dot CLIP relevance, approximate greedy",
)
def script_released(features: Tensor, budget: int, image_embeds: Tensor, query_embeds: Tensor) -> Tensor:
    """The release's selection (graph step omitted: it never changes the result). # (B, N, D) -> (B, m)

    ``image_embeds``: CLIP joint-space image embeddings (B, N, C), unnormalised;
    ``query_embeds``: one CLIP text embedding per 77-token query segment (B, M, C).
    """
    relevance = core.released_relevance(image_embeds, query_embeds)
    kernel = core.scale_kernel_(core.cosine_similarity_matrix(features), relevance)
    return core.released_greedy(kernel, budget)

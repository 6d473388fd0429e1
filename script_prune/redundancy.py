"""Redundancy estimators compared in the paper's Table 1 (Sec. 3.2) and the Fig. 9 map (App. E).

Every estimator scores each visual token with the GSP redundancy score of Eq. 9 (Sec. 4.1), with the
same ``tau`` / ``gamma`` semantics as :func:`script_prune.core.redundancy_scores`; they differ only in
*which similarity pairs* ("edges") they look at:

- ``full``      exhaustive graph: every other token, ``N (N - 1) / 2`` unordered pairs (self excluded).
- ``local``     spatial window: the 8-connected (3 x 3 Moore, Sec. 3.2) neighbours on the ``h x w``
                token grid, only the ones that exist at the borders.
- ``bipartite`` GSP's even/odd graph (Eq. 8): even tokens against every odd token and vice versa,
                ``ceil(N/2) * floor(N/2)`` pairs; equals ``core.redundancy_scores``.
- ``random``    no similarity at all: i.i.d. uniform scores (the paper's "Random" row).

Eq. 9 over an edge set ``E_i`` of token ``i`` (cosine similarities ``S_ij``, Eq. 8):
``d_i = #{j in E_i : S_ij >= tau}``, ``mu_i`` = mean of those ``S_ij``; the score is
``d_i * exp(gamma * (mu_i - tau))`` when ``d_i > 0``, else the fallback ``mu~_i`` = mean of ``S_ij``
over all of ``E_i`` (0 when ``E_i`` is empty). Higher = more redundant; GSP keeps the ``K`` lowest.

All functions are batched torch, ``# (B, N, D)`` in, device and dtype from the inputs, the scores and
the selection in float32. Token ``i`` of an ``(h, w)`` grid sits at row ``i // w``, column ``i % w``.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from torch import Tensor

from . import core

__all__ = [
    "ESTIMATORS",
    "NEIGHBOUR_OFFSETS",
    "eq9_scores",
    "full_graph_scores",
    "bipartite_scores",
    "grid_neighbour_similarity",
    "local_window_scores",
    "neighbour_mean_similarity",
    "random_scores",
    "estimator_scores",
    "similarity_pairs",
    "similarity_pair_share",
    "keep_count",
    "kept_set",
    "iou",
]

ESTIMATORS = ("full", "local", "bipartite", "random")

#: (dy, dx) of the 8-connected neighbours, row-major around the centre.
NEIGHBOUR_OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def _check_features(features: Tensor) -> Tensor:
    if not isinstance(features, Tensor) or features.dim() != 3:
        raise ValueError(f"features must be a (B, N, D) tensor, got {getattr(features, 'shape', type(features))}")
    if features.shape[1] < 1 or features.shape[2] < 1:
        raise ValueError(f"features must have N >= 1 tokens and D >= 1 dims, got {tuple(features.shape)}")
    return features.float()  # selection math in float32


def _check_grid(n: int, grid_hw: tuple[int, int]) -> tuple[int, int]:
    h, w = (int(v) for v in grid_hw)
    if h < 1 or w < 1 or h * w != n:
        raise ValueError(f"grid_hw {tuple(grid_hw)} must be positive with h * w == N = {n}")
    return h, w


def eq9_scores(similarity: Tensor, edges: Tensor, tau: float, gamma: float) -> Tensor:
    """Eq. 9 of every row token over the edges marked in ``edges``.

    similarity ``# (B, N, M)`` cosine ``S_ij``; edges ``# (B or 1, N or 1, M)`` bool, which pairs count.
    Returns ``# (B, N)`` float32: ``d * exp(gamma * (mu - tau))`` if ``d > 0`` else the mean over the edges.
    """
    sim = similarity.float()
    edges = edges.expand_as(sim)
    above = edges & (sim >= tau)  # (B, N, M) the edges of G_tau
    degree = above.sum(dim=-1, dtype=sim.dtype)  # (B, N) d(t_i)
    mu = torch.where(above, sim, 0.0).sum(dim=-1) / degree.clamp_min(1.0)  # (B, N) mu(t_i)
    n_edges = edges.sum(dim=-1, dtype=sim.dtype)  # (B, N)
    fallback = torch.where(edges, sim, 0.0).sum(dim=-1) / n_edges.clamp_min(1.0)  # (B, N) mu~(t_i), 0 if none
    return torch.where(degree > 0, degree * torch.exp(gamma * (mu - tau)), fallback)


def full_graph_scores(features: Tensor, tau: float = 0.2, gamma: float = 1.0) -> Tensor:
    """Exhaustive estimator: Eq. 9 over all ``N - 1`` other tokens. # (B, N, D) -> (B, N)

    One ``N x N`` cosine Gram (Eq. 8 over every pair); the diagonal (self-similarity 1) is no edge.
    """
    x = _check_features(features)
    sim = core.cosine_similarity_matrix(x)  # (B, N, N)
    n = sim.shape[1]
    others = ~torch.eye(n, dtype=torch.bool, device=sim.device).unsqueeze(0)  # (1, N, N)
    return eq9_scores(sim, others, tau, gamma)


def bipartite_scores(features: Tensor, tau: float = 0.2, gamma: float = 1.0) -> Tensor:
    """GSP's bipartite estimator (Sec. 4.1, Eq. 8-9), computing only the even x odd block. # (B, N, D) -> (B, N)

    ``V_src`` = even token indices, ``V_dst`` = odd ones; an even token's edges are all odd tokens and
    vice versa. Same scores as :func:`script_prune.core.redundancy_scores` (which slices the block out of
    the full Gram), but with ``ceil(N/2) * floor(N/2)`` dot products instead of ``N^2``.
    """
    x = core.l2_normalize(_check_features(features))  # (B, N, D)
    block = torch.bmm(x[:, 0::2], x[:, 1::2].transpose(1, 2))  # (B, ceil(N/2), floor(N/2))
    all_edges = torch.ones(1, 1, 1, dtype=torch.bool, device=x.device)  # every cross pair is an edge
    scores = x.new_empty(x.shape[:2])  # (B, N)
    scores[:, 0::2] = eq9_scores(block, all_edges, tau, gamma)  # even tokens over the odd ones
    scores[:, 1::2] = eq9_scores(block.transpose(1, 2), all_edges, tau, gamma)  # odd over even
    return scores


def grid_neighbour_similarity(features: Tensor, grid_hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Cosine similarity of every token with its 8-connected grid neighbours.

    features ``# (B, N, D)`` with ``N = h * w``. Returns ``sims # (B, N, 8)`` float32 in the order of
    :data:`NEIGHBOUR_OFFSETS` (0 where the neighbour lies outside the grid) and ``valid # (N, 8)`` bool
    (the neighbour exists). About ``4 N`` dot products: each unordered neighbour pair once.
    """
    x = core.l2_normalize(_check_features(features))
    b, n, d = x.shape
    h, w = _check_grid(n, grid_hw)
    rows = torch.arange(n, device=x.device) // w  # (N,) grid row of each token
    cols = torch.arange(n, device=x.device) % w  # (N,) grid column
    sims = x.new_zeros(b, n, 8)  # (B, N, 8)
    valid = torch.zeros(n, 8, dtype=torch.bool, device=x.device)  # (N, 8)
    # S is symmetric: the 4 "forward" offsets give all 8 (offset k mirrors offset 7 - k). Offset (dy, dx)
    # is the flat shift s = dy * w + dx, so each is one dot product of two contiguous slices of x.
    for k in range(4, 8):  # offsets, not samples
        dy, dx = NEIGHBOUR_OFFSETS[k]
        shift = dy * w + dx
        if shift >= n:
            continue  # no token has this neighbour (a single grid row)
        dot = torch.einsum("bnd,bnd->bn", x[:, : n - shift], x[:, shift:])  # (B, N - s): <x_i, x_(i+s)>
        exists = (rows[: n - shift] + dy < h) & (cols[: n - shift] + dx >= 0) & (cols[: n - shift] + dx < w)
        dot = torch.where(exists, dot, 0.0)  # flat neighbours that wrap around a row are no neighbours
        sims[:, : n - shift, k] = dot
        sims[:, shift:, 7 - k] = dot
        valid[: n - shift, k] = exists
        valid[shift:, 7 - k] = exists
    return sims, valid


def local_window_scores(features: Tensor, grid_hw: tuple[int, int], tau: float = 0.2,
                        gamma: float = 1.0) -> Tensor:
    """Local-window estimator: Eq. 9 over the existing 8-connected neighbours. # (B, N, D) -> (B, N)

    A corner token has 3 edges, an edge token 5, an inner token 8 (the 3 x 3 Moore window of Sec. 3.2
    without the centre).
    """
    sims, valid = grid_neighbour_similarity(features, grid_hw)  # (B, N, 8), (N, 8)
    return eq9_scores(sims, valid.unsqueeze(0), tau, gamma)


def neighbour_mean_similarity(features: Tensor, grid_hw: tuple[int, int]) -> Tensor:
    """Fig. 9's patch redundancy: mean cosine with the existing 8-connected neighbours. # (B, N, D) -> (B, N)

    A 1 x 1 grid (no neighbour) gives 0.
    """
    sims, valid = grid_neighbour_similarity(features, grid_hw)  # (B, N, 8), (N, 8)
    count = valid.sum(dim=-1).clamp_min(1).to(sims.dtype)  # (N,)
    return torch.where(valid, sims, 0.0).sum(dim=-1) / count


def random_scores(features: Tensor, seed: int = 0) -> Tensor:
    """The "Random" row: i.i.d. U(0, 1) scores, no similarity computed. # (B, N, D) -> (B, N)

    Drawn from one generator on the features' device seeded with ``seed`` (one draw for the batch).
    """
    gen = torch.Generator(device=features.device).manual_seed(int(seed))
    return torch.rand(features.shape[:2], generator=gen, device=features.device, dtype=torch.float32)


def estimator_scores(name: str, features: Tensor, grid_hw: tuple[int, int] | None = None, tau: float = 0.2,
                     gamma: float = 1.0, seed: int = 0) -> Tensor:
    """Scores of the estimator ``name`` (one of :data:`ESTIMATORS`). # (B, N, D) -> (B, N)"""
    if name == "full":
        return full_graph_scores(features, tau, gamma)
    if name == "bipartite":
        return bipartite_scores(features, tau, gamma)
    if name == "local":
        if grid_hw is None:
            raise ValueError("the local-window estimator needs grid_hw (the token grid)")
        return local_window_scores(features, grid_hw, tau, gamma)
    if name == "random":
        return random_scores(features, seed)
    raise ValueError(f"estimator must be one of {ESTIMATORS}, got {name!r}")


def similarity_pairs(name: str, grid_hw: tuple[int, int]) -> int:
    """Unordered token pairs ``{i, j}, i != j`` whose cosine the estimator uses on an ``h x w`` grid."""
    h, w = (int(v) for v in grid_hw)
    n = h * w
    if name == "full":
        return n * (n - 1) // 2
    if name == "bipartite":
        return math.ceil(n / 2) * (n // 2)
    if name == "local":  # horizontal + vertical + both diagonals
        return h * (w - 1) + (h - 1) * w + 2 * (h - 1) * (w - 1)
    if name == "random":
        return 0
    raise ValueError(f"estimator must be one of {ESTIMATORS}, got {name!r}")


def similarity_pair_share(name: str, grid_hw: tuple[int, int]) -> Fraction:
    """Table 1's "Sim. (%)" / 100: the estimator's pairs over the ``N (N - 1) / 2`` of the full graph."""
    total = similarity_pairs("full", grid_hw)
    return Fraction(similarity_pairs(name, grid_hw), total) if total else Fraction(0)


def keep_count(n: int, prune_ratio: float) -> int:
    """``K = n - floor(ratio * n)`` tokens kept (at least 1); ``ratio`` read as the decimal written."""
    if not 0.0 <= float(prune_ratio) < 1.0:
        raise ValueError(f"prune_ratio must be in [0, 1), got {prune_ratio}")
    return max(1, n - math.floor(Fraction(repr(float(prune_ratio))) * n))


def kept_set(scores: Tensor, k: int) -> Tensor:
    """GSP's kept set: the ``k`` least redundant tokens, ties to the lower index. # (B, N) -> (B, N) bool"""
    return core.lowest_k_mask(scores.float(), k)


def iou(kept_a: Tensor, kept_b: Tensor) -> Tensor:
    """Intersection over union of two kept sets per row. # (B, N) bool, (B, N) bool -> (B,) float32"""
    inter = (kept_a & kept_b).sum(dim=1, dtype=torch.float32)
    union = (kept_a | kept_b).sum(dim=1, dtype=torch.float32)
    return torch.where(union > 0, inter / union.clamp_min(1.0), torch.ones_like(union))

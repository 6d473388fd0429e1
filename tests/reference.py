"""Slow float64 references for script_prune, written directly from the math (loops allowed).

Independent of ``script_prune.core``: explicit per-token loops, explicit determinants
(``slogdet`` per candidate) and the issue's step list for the released code. Single
samples only (no batch dim); inputs are converted to float64 numpy arrays.
"""

from __future__ import annotations

import math

import numpy as np

EXHAUSTED = 1e-10


def as64(x) -> np.ndarray:
    """A tensor / array as a float64 numpy array."""
    if hasattr(x, "detach"):
        x = x.detach().to("cpu").double().numpy()
    return np.asarray(x, dtype=np.float64)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of two vectors (0 if either is zero)."""
    na, nb = math.sqrt(float(a @ a)), math.sqrt(float(b @ b))
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(a @ b) / (na * nb)


def cosine_matrix(features) -> np.ndarray:
    """S_ij = cos(h_i, h_j) by a double loop. (N, D) -> (N, N)"""
    h = as64(features)
    n = h.shape[0]
    s = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            s[i, j] = cosine(h[i], h[j])
    return s


def redundancy(features, tau: float = 0.2, gamma: float = 1.0) -> np.ndarray:
    """Eq. 8-9 token by token: even indices are src, odd dst; each scored against the other side."""
    h = as64(features)
    n = h.shape[0]
    out = np.zeros(n)
    for i in range(n):
        partners = [j for j in range(n) if j % 2 != i % 2]
        if not partners:
            out[i] = 0.0
            continue
        sims = [cosine(h[i], h[j]) for j in partners]
        neighbours = [s for s in sims if s >= tau]
        if neighbours:
            deg = len(neighbours)
            mu = sum(neighbours) / deg
            out[i] = deg * math.exp(gamma * (mu - tau))
        else:
            out[i] = sum(sims) / len(sims)
    return out


def relevance(image_embeds, query_embeds, negate: bool = False) -> np.ndarray:
    """Eq. 3-4: cosine with the mean query row, optionally negated, min-max to [0, 1]."""
    e, q = as64(image_embeds), as64(query_embeds)
    mean_q = q.sum(axis=0) / q.shape[0]
    r = np.array([cosine(e[i], mean_q) for i in range(e.shape[0])])
    if negate:
        r = -r
    lo, hi = r.min(), r.max()
    if hi - lo <= 0:
        return np.ones_like(r)
    return (r - lo) / (hi - lo)


def _logdet(kernel: np.ndarray, subset: list[int]) -> tuple[float, float]:
    """(sign, log|det|) of the principal submatrix on ``subset``."""
    if not subset:
        return 1.0, 0.0
    sign, logdet = np.linalg.slogdet(kernel[np.ix_(subset, subset)])
    return float(sign), float(logdet)


def dpp_greedy_slogdet(kernel, k: int) -> list[int]:
    """Naive greedy MAP: each step adds the item maximising det(L[picked + i]) (explicit slogdet).

    The residual of i is det(L[picked + i]) / det(L[picked]); once the largest residual is
    <= 1e-10 the rest follow descending diagonal, ties to the lower index.
    """
    L = as64(kernel)
    n = L.shape[0]
    picked: list[int] = []
    while len(picked) < k:
        sign0, log0 = _logdet(L, picked)
        best, best_i = -math.inf, -1
        for i in range(n):
            if i in picked:
                continue
            sign, logdet = _logdet(L, picked + [i])
            residual = sign * math.exp(logdet - log0) if sign0 > 0 else -math.inf
            if residual > best:  # strict: ties keep the lower index
                best, best_i = residual, i
        if best <= EXHAUSTED:
            rest = sorted((i for i in range(n) if i not in picked), key=lambda i: (-L[i, i], i))
            picked.extend(rest[: k - len(picked)])
            break
        picked.append(best_i)
    return picked


def stable_lowest(scores: np.ndarray, k: int) -> list[int]:
    """Indices of the k lowest scores, ties to the lower index."""
    return sorted(range(len(scores)), key=lambda i: (scores[i], i))[:k]


def stable_highest(scores: np.ndarray, k: int) -> list[int]:
    """Indices of the k highest scores, ties to the lower index."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]


def gsp_survivors(features, m: int, tau: float, gamma: float, rho: float) -> set[int]:
    """GSP keeps n - floor(rho (n - m)) least redundant tokens."""
    n = as64(features).shape[0]
    from fractions import Fraction

    keep = n - math.floor(Fraction(repr(rho)) * (n - m))
    return set(stable_lowest(redundancy(features, tau, gamma), keep))


def script_select(
    features, image_embeds, query_embeds, m: int, tau=0.2, gamma=1.0, rho=0.5, negate=False
) -> list[int]:
    """Sec. 4.3: the full slogdet greedy order of diag(r) S diag(r), first m GSP survivors, ascending."""
    keep = gsp_survivors(features, m, tau, gamma, rho)
    r = relevance(image_embeds, query_embeds, negate)
    L = cosine_matrix(features) * np.outer(r, r)
    order = dpp_greedy_slogdet(L, L.shape[0])
    return sorted([i for i in order if i in keep][:m])


def released_select(features, image_embeds, query_embeds, m: int) -> list[int]:
    """The authors' release, following the issue's step list literally, ascending."""
    h, e, t = as64(features), as64(image_embeds), as64(query_embeds)
    n, segments = e.shape[0], t.shape[0]
    S = cosine_matrix(h)
    a = [sum(float(t[s] @ e[i]) for i in range(n)) / n for s in range(segments)]
    kept = stable_highest(np.array(a), max(1, segments // 2))
    rel = np.array([sum(-float(e[i] @ t[s]) for s in kept) / len(kept) for i in range(n)])
    rel = (rel - rel.min()) / (rel.max() - rel.min() + 1e-6)
    K = np.outer(rel, rel) * S
    s = np.diag(K).copy()
    picks: list[int] = []
    for _ in range(m):
        j = max((i for i in range(n) if i not in picks), key=lambda i: (s[i], -i))
        picks.append(j)
        if s[j] > 0:
            s = s - (K[:, j] / (math.sqrt(s[j]) + 1e-6)) ** 2
    return sorted(picks)

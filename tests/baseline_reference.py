"""Slow float64 references for the baseline methods, written from each paper's description.

One sample at a time, explicit Python loops, numpy float64. Used only by tests/test_baselines.py.
Every function takes numpy arrays for ONE sample (no batch dimension) and returns Python lists.
"""
from __future__ import annotations

import math

import numpy as np


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    na = math.sqrt(float(np.dot(a, a)))
    nb = math.sqrt(float(np.dot(b, b)))
    return float(np.dot(a, b)) / (na * nb)


def argmax_lowest(values: list[float], allowed: list[bool] | None = None) -> int:
    """Index of the largest value (first one on ties), among the allowed entries."""
    best, best_i = -math.inf, -1
    for i, v in enumerate(values):
        if allowed is not None and not allowed[i]:
            continue
        if v > best:
            best, best_i = v, i
    return best_i


def top_k_desc(values: list[float], k: int) -> list[int]:
    """Indices of the k largest values (ties: lower index first)."""
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    return order[:k]


# ------------------------------------------------------------------ DivPrune
def divprune_ref(features: np.ndarray, budget: int) -> list[int]:
    """Max-min diversity greedy (MMDP): distance 1 - cos; pick order."""
    x = features.astype(np.float64)
    n = x.shape[0]
    dist = [[1.0 - cosine(x[i], x[j]) for j in range(n)] for i in range(n)]
    nearest = [min(dist[i][j] for j in range(n) if j != i) for i in range(n)]
    picks = [argmax_lowest(nearest)]
    while len(picks) < budget:
        score = [min(dist[i][p] for p in picks) for i in range(n)]
        picks.append(argmax_lowest(score, [i not in picks for i in range(n)]))
    return picks


# ------------------------------------------------------------------ VisionZip
def visionzip_ref(
    features: np.ndarray, cls_attention: np.ndarray, keys: np.ndarray, dominant: int, contextual: int, merge: str
) -> tuple[list[int], list[np.ndarray], list[list[int]]]:
    """Dominant by [CLS] attention; contextual: evenly spaced targets among the rest, key-cosine assignment,
    group merge. Returns (dominant indices ascending, merged tokens, groups as [target, members...])."""
    n = features.shape[0]
    dom = sorted(top_k_desc([float(v) for v in cls_attention], dominant))
    rest = [i for i in range(n) if i not in dom]
    if contextual == 0:
        return dom, [], []
    step = max(1, len(rest) // contextual)
    target_positions = list(range(0, len(rest), step))[:contextual]
    targets = [rest[p] for p in target_positions]
    groups = [[t] for t in targets]
    for i in rest:
        if i in targets:
            continue
        sims = [cosine(keys[i].astype(np.float64), keys[t].astype(np.float64)) for t in targets]
        groups[argmax_lowest(sims)].append(i)
    merged = []
    for group in groups:
        members = [features[i].astype(np.float64) for i in group]
        if merge == "mean":
            merged.append(sum(members) / len(members))
        else:  # target + mean of the joined tokens
            joined = members[1:]
            merged.append(members[0] + (sum(joined) / len(joined) if joined else 0.0))
    return dom, merged, groups


# ------------------------------------------------------------------ FastV
def fastv_ref(scores: np.ndarray, budget: int) -> list[int]:
    return sorted(top_k_desc([float(v) for v in scores], budget))


# ------------------------------------------------------------------ TRIM
def trim_scores_ref(image_embeds: np.ndarray, query: np.ndarray, negate: bool, similarity: str) -> list[float]:
    sims = []
    for e in image_embeds.astype(np.float64):
        row = []
        for t in query.astype(np.float64):
            row.append(cosine(e, t) if similarity == "cosine" else float(np.dot(e, t)))
        s = sum(row) / len(row)
        sims.append(-s if negate else s)
    top = max(sims)
    exps = [math.exp(s - top) for s in sims]
    total = sum(exps)
    return [v / total for v in exps]


def iqr_count_ref(scores: list[float], whisker: float = 1.5) -> int:
    q1, q3 = np.percentile(np.asarray(scores, dtype=np.float64), [25, 75])  # numpy's linear interpolation
    upper = q3 + whisker * (q3 - q1)
    return sum(1 for s in scores if s > upper)


def keep_and_average_ref(features: np.ndarray, scores: list[float], keep: int) -> tuple[list[int], np.ndarray]:
    kept = sorted(top_k_desc(scores, keep))
    rest = [features[i].astype(np.float64) for i in range(features.shape[0]) if i not in kept]
    return kept, sum(rest) / len(rest)


# ------------------------------------------------------------------ CDPruner
def cdpruner_relevance_ref(image_embeds: np.ndarray, query: np.ndarray, negate: bool, theta) -> list[float]:
    rel = []
    for e in image_embeds.astype(np.float64):
        s = sum(cosine(e, t) for t in query.astype(np.float64)) / query.shape[0]
        rel.append(-s if negate else s)
    lo, hi = min(rel), max(rel)
    rel = [(r - lo + 1e-6) / (hi - lo) for r in rel] if hi > lo else [1.0] * len(rel)
    if theta is not None:
        alpha = theta / (2.0 * (1.0 - theta))
        rel = [math.exp(alpha * r) for r in rel]
    return rel


def cdpruner_ref(features: np.ndarray, image_embeds: np.ndarray, query: np.ndarray, budget: int,
                 negate: bool = True, theta=None) -> list[int]:
    """Greedy MAP by explicit determinants: each step adds the token maximising log det L[S + i]."""
    rel = cdpruner_relevance_ref(image_embeds, query, negate, theta)
    x = features.astype(np.float64)
    n = x.shape[0]
    kernel = np.empty((n, n))
    for i in range(n):
        for j in range(n):
            kernel[i, j] = rel[i] * cosine(x[i], x[j]) * rel[j]
    picks: list[int] = []
    for _ in range(budget):
        best, best_i = -math.inf, -1
        for i in range(n):
            if i in picks:
                continue
            idx = picks + [i]
            sign, logdet = np.linalg.slogdet(kernel[np.ix_(idx, idx)])
            value = logdet if sign > 0 else -math.inf
            if value > best:
                best, best_i = value, i
        picks.append(best_i)
    return picks

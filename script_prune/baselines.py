"""Baseline pruning methods from other papers, registered in the method registry.

Every selection function here is batched: it takes float32 ``features`` of shape (B, N, D) (the visual
tokens after the projector unless a method says otherwise), an int ``budget`` with 1 <= budget < N and
the method's extra tensor inputs, and returns either a (B, budget) int64 index tensor or a ``Reduction``.
No per-sample Python loops: loops run over greedy steps only, each step a batched tensor operation.

Methods (see docs/methods.md for the sources of every convention):

- ``divprune``  DivPrune (Alvar et al., CVPR'25): greedy max-min diversity under the distance 1 - cos.
- ``visionzip`` VisionZip (Yang et al., CVPR'25): dominant tokens by [CLS] attention plus contextual tokens
  merged by key similarity (merges).
- ``fastv``     FastV (Chen et al., ECCV'24): top tokens by the attention they receive from the last prompt
  token at LLM layer K (stage "llm"; the LLM integration computes the scores).
- ``trim``      TRIM (Song et al., COLING'25), budget variant: top tokens by CLIP text-image similarity plus one
  token averaging the rest (merges).
- ``trim_iqr``  TRIM with its adaptive interquartile-range outlier count (merges).
- ``cdpruner``  CDPruner: conditional DPP, kernel rel_i * cos(h_i, h_j) * rel_j, exact greedy MAP.
"""
from __future__ import annotations

import math

import torch

from script_prune import core
from script_prune.registry import Reduction, inside_call, register_method

__all__ = [
    "VISIONZIP_PUBLISHED_SPLITS",
    "cosine_similarity_matrix",
    "divprune_select",
    "visionzip_split",
    "visionzip_reduce",
    "fastv_select",
    "trim_scores",
    "iqr_outlier_counts",
    "trim_reduce",
    "trim_iqr_reduce",
    "cdpruner_relevance",
    "cdpruner_kernel",
    "cdpruner_select",
]

# VisionZip's dominant/contextual splits for LLaVA-1.5 budgets: 54 + 10 for 64 tokens is the authors' README
# setting; 108 + 20 and 162 + 30 keep the same 54:10 ratio (the common reproduction setting).
VISIONZIP_PUBLISHED_SPLITS: dict[int, tuple[int, int]] = {64: (54, 10), 128: (108, 20), 192: (162, 30)}
_VISIONZIP_CONTEXTUAL_SHARE = (10, 64)  # contextual / total of the published splits


# ----------------------------------------------------------------------------------------------------------
# small shared helpers
# ----------------------------------------------------------------------------------------------------------
def cosine_similarity_matrix(features: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarity: (B, N, D) -> (B, N, N) float32 (the core's, on float32)."""
    return core.cosine_similarity_matrix(features.float())


def _batch_rows(batch: int, like: torch.Tensor) -> torch.Tensor:
    """Column vector of batch indices (B, 1) on ``like``'s device, for advanced indexing."""
    return torch.arange(batch, device=like.device).unsqueeze(1)


def _check_tensor(name: str, value: object, shape_desc: str, ndim: int) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a tensor of shape {shape_desc}, got {type(value).__name__}")
    if value.ndim != ndim:
        raise ValueError(f"{name} must have shape {shape_desc}, got {tuple(value.shape)}")
    if not inside_call() and not torch.isfinite(value).all():  # select/reduce checked it already
        raise ValueError(f"{name} contains NaN or inf")
    return value.float()


def _check_token_input(name: str, value: object, features: torch.Tensor, with_dim: bool) -> torch.Tensor:
    """Validate a per-token side input: (B, N) or (B, N, C) matching ``features`` (B, N, D)."""
    b, n = features.shape[:2]
    desc = f"(B={b}, N={n}, C)" if with_dim else f"(B={b}, N={n})"
    value = _check_tensor(name, value, desc, 3 if with_dim else 2)
    if tuple(value.shape[:2]) != (b, n):
        raise ValueError(f"{name} must have shape {desc}, got {tuple(value.shape)}")
    return value


def _check_query(query_embeds: object, batch: int, width: int) -> torch.Tensor:
    """Validate ``query_embeds`` (M, C) or (B, M, C); return it batched as (B, M, C)."""
    if not isinstance(query_embeds, torch.Tensor) or query_embeds.ndim not in (2, 3):
        got = tuple(query_embeds.shape) if isinstance(query_embeds, torch.Tensor) else type(query_embeds).__name__
        raise ValueError(f"query_embeds must have shape (M, C) or (B, M, C), got {got}")
    if not inside_call() and not torch.isfinite(query_embeds).all():  # select/reduce checked it already
        raise ValueError("query_embeds contains NaN or inf")
    query = query_embeds.float()
    if query.ndim == 2:
        query = query.unsqueeze(0).expand(batch, -1, -1)
    if query.shape[0] != batch or query.shape[-1] != width or query.shape[1] < 1:
        raise ValueError(
            f"query_embeds must have shape (M, {width}) or ({batch}, M, {width}) with M >= 1, "
            f"got {tuple(query_embeds.shape)}"
        )
    return query


def _mean_cosine_to_query(image_embeds: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Mean over the M query rows of cos(image_embeds[b, n], query[b, m]): (B, N, C), (B, M, C) -> (B, N)."""
    return (core.l2_normalize(image_embeds) @ core.l2_normalize(query).transpose(1, 2)).mean(dim=-1)


# ----------------------------------------------------------------------------------------------------------
# DivPrune
# ----------------------------------------------------------------------------------------------------------
def divprune_select(features: torch.Tensor, budget: int) -> torch.Tensor:
    """DivPrune's greedy max-min diversity selection, in pick order.

    Distance d_ij = 1 - cos(h_i, h_j) over the projected tokens ``features`` (B, N, D). First pick: the token
    whose nearest neighbour (j != i) is farthest. Then repeatedly the unpicked token whose minimum distance
    to the picked set is largest (ties: lower index). Returns (B, budget) int64.
    """
    distance = cosine_similarity_matrix(features).neg_().add_(1.0)  # (B, N, N), in place
    batch, n = distance.shape[:2]
    eye = torch.eye(n, dtype=torch.bool, device=distance.device)
    nearest = torch.where(eye, float("inf"), distance).amin(dim=-1)  # (B, N)
    rows = torch.arange(batch, device=distance.device)
    picks = torch.empty(batch, budget, dtype=torch.long, device=distance.device)
    picked = torch.zeros(batch, n, dtype=torch.bool, device=distance.device)
    first = nearest.argmax(dim=-1)  # (B,)
    picks[:, 0] = first
    picked[rows, first] = True
    min_dist = distance[rows, first]  # (B, N): distance of every token to the picked set
    for step in range(1, budget):
        nxt = min_dist.masked_fill(picked, float("-inf")).argmax(dim=-1)
        picks[:, step] = nxt
        picked[rows, nxt] = True
        min_dist = torch.minimum(min_dist, distance[rows, nxt])
    return picks


# ----------------------------------------------------------------------------------------------------------
# VisionZip
# ----------------------------------------------------------------------------------------------------------
def _check_visionzip_counts(dominant: object, contextual: object) -> None:
    for name, value in (("dominant", dominant), ("contextual", contextual)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{name} must be None or an int >= 0, got {value!r}")


def _check_visionzip_merge(merge: object) -> None:
    if merge not in ("mean", "released"):
        raise ValueError(f"merge must be 'mean' or 'released', got {merge!r}")


def _check_visionzip_params(params: dict) -> None:
    _check_visionzip_counts(params["dominant"], params["contextual"])
    _check_visionzip_merge(params["merge"])


def visionzip_split(budget: int, dominant: int | None = None, contextual: int | None = None) -> tuple[int, int]:
    """Dominant / contextual token counts for a VisionZip budget.

    The published splits (64 -> 54 + 10, 128 -> 108 + 20, 192 -> 162 + 30) are used as they are; other budgets
    keep the same contextual share 10/64, rounded half up, with at least one contextual token when budget >= 2
    and at least one dominant token. ``dominant``/``contextual`` override the split (they must add up to the
    budget; giving one of them fixes the other).
    """
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be an int >= 1, got {budget!r}")
    _check_visionzip_counts(dominant, contextual)
    if dominant is not None and contextual is not None:
        if dominant + contextual != budget:
            raise ValueError(
                f"dominant + contextual must equal the budget {budget}, got {dominant} + {contextual}"
            )
    elif dominant is not None:
        contextual = budget - dominant
    elif contextual is not None:
        dominant = budget - contextual
    elif budget in VISIONZIP_PUBLISHED_SPLITS:
        dominant, contextual = VISIONZIP_PUBLISHED_SPLITS[budget]
    else:
        num, den = _VISIONZIP_CONTEXTUAL_SHARE
        contextual = (budget * num + den // 2) // den  # round half up
        contextual = min(max(contextual, 1 if budget >= 2 else 0), budget - 1)
        dominant = budget - contextual
    if dominant < 1 or contextual < 0:
        raise ValueError(
            f"visionzip needs dominant >= 1 and contextual >= 0 within budget {budget}, "
            f"got dominant={dominant}, contextual={contextual}"
        )
    return dominant, contextual


def _visionzip_targets(remaining: int, contextual: int) -> torch.Tensor:
    """Positions (within the remaining tokens, ascending) of the evenly spaced merge targets."""
    step = max(1, remaining // contextual)
    return torch.arange(0, remaining, step)[:contextual]


def visionzip_reduce(
    features: torch.Tensor,
    budget: int,
    cls_attention: torch.Tensor,
    keys: torch.Tensor,
    dominant: int | None = None,
    contextual: int | None = None,
    merge: str = "mean",
):
    """VisionZip: dominant tokens by [CLS] attention plus contextual tokens merged by key similarity.

    features (B, N, D): the tokens that are kept or merged; cls_attention (B, N): attention from [CLS] to each
    patch at the vision tower's selected layer (mean over heads); keys (B, N, Dk): that layer's patch keys
    (mean over heads). Dominant = top ``dominant`` by cls_attention. The other N - dominant tokens, in index
    order, give ``contextual`` evenly spaced targets (positions 0, s, 2s, ... with s = max(1, R // contextual));
    every other remaining token joins the target with the highest key cosine similarity. ``merge="mean"``
    averages each group (target included); ``merge="released"`` gives target + mean of the joined tokens,
    as the authors' code does. Returns Reduction(indices=(B, dominant) ascending, merged=(B, contextual, D)).
    """
    _check_visionzip_merge(merge)
    cls_attention = _check_token_input("cls_attention", cls_attention, features, with_dim=False)
    keys = _check_token_input("keys", keys, features, with_dim=True)
    n_dom, n_ctx = visionzip_split(budget, dominant, contextual)
    batch, n, dim = features.shape
    if n_dom + n_ctx >= n:
        raise ValueError(f"visionzip budget {n_dom + n_ctx} must be below the token count {n}")
    dom_idx = cls_attention.topk(n_dom, dim=-1).indices  # (B, n_dom)
    dom_idx = dom_idx.sort(dim=-1).values
    if n_ctx == 0:
        return Reduction(indices=dom_idx, merged=None)

    is_dom = torch.zeros(batch, n, dtype=torch.bool, device=features.device)
    is_dom[_batch_rows(batch, features), dom_idx] = True
    # non-dominant token indices in ascending order: stable sort puts False (0) before True (1)
    rest_idx = torch.sort(is_dom.to(torch.uint8), dim=-1, stable=True).indices[:, : n - n_dom]  # (B, R)
    remaining = n - n_dom
    target_pos = _visionzip_targets(remaining, n_ctx).to(features.device)  # (C,)
    is_target = torch.zeros(remaining, dtype=torch.bool, device=features.device)
    is_target[target_pos] = True
    target_idx = rest_idx[:, target_pos]  # (B, C)
    other_idx = rest_idx[:, ~is_target]  # (B, R - C)

    rows = _batch_rows(batch, features)
    unit_keys = core.l2_normalize(keys)
    similarity = unit_keys[rows, other_idx] @ unit_keys[rows, target_idx].transpose(1, 2)  # (B, R-C, C)
    assign = similarity.argmax(dim=-1)  # (B, R-C)
    one_hot = torch.nn.functional.one_hot(assign, n_ctx).to(features.dtype)  # (B, R-C, C)
    joined_sum = one_hot.transpose(1, 2) @ features[rows, other_idx]  # (B, C, D)
    joined_count = one_hot.sum(dim=1).unsqueeze(-1)  # (B, C, 1)
    target_feat = features[rows, target_idx]  # (B, C, D)
    if merge == "mean":
        merged = (target_feat + joined_sum) / (joined_count + 1.0)
    else:
        merged = target_feat + joined_sum / joined_count.clamp_min(1.0)
    return Reduction(indices=dom_idx, merged=merged)


# ----------------------------------------------------------------------------------------------------------
# FastV
# ----------------------------------------------------------------------------------------------------------
def _check_fastv_layer(layer: object) -> None:
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise ValueError(f"layer must be an int >= 0, got {layer!r}")


def fastv_select(features: torch.Tensor, budget: int, scores: torch.Tensor, layer: int = 2) -> torch.Tensor:
    """FastV's rule: keep the ``budget`` image tokens with the highest ``scores`` (B, N).

    ``scores`` is the attention each image token receives from the last prompt token at LLM layer ``layer``
    (mean over heads); the LLM integration computes it and reads ``layer``. Returns (B, budget) int64.
    """
    _check_fastv_layer(layer)
    scores = _check_token_input("scores", scores, features, with_dim=False)
    return scores.topk(budget, dim=-1).indices


# ----------------------------------------------------------------------------------------------------------
# TRIM
# ----------------------------------------------------------------------------------------------------------
def _check_similarity(similarity: object) -> None:
    if similarity not in ("cosine", "dot"):
        raise ValueError(f"similarity must be 'cosine' or 'dot', got {similarity!r}")


def _check_whisker(whisker: object) -> None:
    if isinstance(whisker, bool) or not isinstance(whisker, (int, float)) or not math.isfinite(whisker) or whisker < 0:
        raise ValueError(f"whisker must be a finite number >= 0, got {whisker!r}")


def trim_scores(
    image_embeds: torch.Tensor, query_embeds: torch.Tensor, negate: bool = False, similarity: str = "cosine"
) -> torch.Tensor:
    """TRIM's token scores: softmax over the N tokens of the image-text similarity (B, N).

    image_embeds (B, N, C): patch embeddings in CLIP's joint space; query_embeds (M, C) or (B, M, C): CLIP
    text embeddings. similarity "cosine" (the paper's CLIP metric) or "dot" (raw dot products, as the
    authors' code); averaged over the M text rows; ``negate`` flips the sign before the softmax (the authors'
    code does). Returns (B, N) float32 summing to 1 per row.
    """
    _check_similarity(similarity)
    image_embeds = _check_tensor("image_embeds", image_embeds, "(B, N, C)", 3)
    query = _check_query(query_embeds, image_embeds.shape[0], image_embeds.shape[-1])
    if similarity == "cosine":
        sim = _mean_cosine_to_query(image_embeds, query)
    else:
        sim = (image_embeds @ query.transpose(1, 2)).mean(dim=-1)
    if negate:
        sim = -sim
    return torch.softmax(sim, dim=-1)


def iqr_outlier_counts(scores: torch.Tensor, whisker: float = 1.5) -> torch.Tensor:
    """Per row, how many scores lie above Q3 + whisker * (Q3 - Q1) (linear-interpolated quartiles): (B, N) -> (B,)."""
    q1 = torch.quantile(scores, 0.25, dim=-1, keepdim=True)
    q3 = torch.quantile(scores, 0.75, dim=-1, keepdim=True)
    upper = q3 + whisker * (q3 - q1)
    return (scores > upper).sum(dim=-1)


def _keep_top_and_average_rest(features: torch.Tensor, scores: torch.Tensor, keep: int):
    """Reduction keeping the top ``keep`` tokens by ``scores`` plus one token averaging all the others."""
    batch, n, _ = features.shape
    top = scores.topk(keep, dim=-1).indices  # (B, keep)
    rest = torch.ones(batch, n, dtype=features.dtype, device=features.device)
    rest[_batch_rows(batch, features), top] = 0.0
    mean_rest = (rest.unsqueeze(1) @ features) / rest.sum(dim=-1).clamp_min(1.0).view(batch, 1, 1)  # (B, 1, D)
    return Reduction(indices=top.sort(dim=-1).values, merged=mean_rest)


def trim_reduce(
    features: torch.Tensor,
    budget: int,
    image_embeds: torch.Tensor,
    query_embeds: torch.Tensor,
    negate: bool = False,
    similarity: str = "cosine",
):
    """TRIM, budget variant: the top ``budget - 1`` tokens by ``trim_scores`` plus one token averaging the rest.

    The averaged token counts towards the budget, so ``budget`` tokens reach the LLM as for every other method.
    With budget == 1 only the top token is kept (merged=None). Returns Reduction((B, budget-1), (B, 1, D)).
    """
    _check_token_input("image_embeds", image_embeds, features, with_dim=True)
    scores = trim_scores(image_embeds, query_embeds, negate=negate, similarity=similarity)
    if budget == 1:
        return Reduction(indices=scores.topk(1, dim=-1).indices, merged=None)
    return _keep_top_and_average_rest(features, scores, budget - 1)


def trim_iqr_reduce(
    features: torch.Tensor,
    budget: int,
    image_embeds: torch.Tensor,
    query_embeds: torch.Tensor,
    negate: bool = False,
    similarity: str = "cosine",
    whisker: float = 1.5,
):
    """TRIM with its adaptive count: keep the IQR outliers of ``trim_scores`` plus one averaged token.

    The count per row is the number of scores above Q3 + 1.5 IQR, clipped to [1, budget - 1] so at most
    ``budget`` tokens reach the LLM (budget == 1 keeps the top token only). The count varies per row; a batch
    whose rows get different counts raises ValueError (call it one row at a time, e.g. per image).
    """
    _check_whisker(whisker)
    _check_token_input("image_embeds", image_embeds, features, with_dim=True)
    scores = trim_scores(image_embeds, query_embeds, negate=negate, similarity=similarity)
    if budget == 1:
        return Reduction(indices=scores.topk(1, dim=-1).indices, merged=None)
    counts = iqr_outlier_counts(scores, float(whisker)).clamp(1, budget - 1)  # (B,)
    lo, hi = counts.aminmax()
    lo, hi = int(lo), int(hi)  # one host sync for the whole batch
    if lo != hi:
        raise ValueError(
            f"trim_iqr: the adaptive outlier counts differ across the batch ({counts.tolist()}); "
            "call it one row at a time or use the budget variant 'trim'"
        )
    return _keep_top_and_average_rest(features, scores, lo)


# ----------------------------------------------------------------------------------------------------------
# CDPruner
# ----------------------------------------------------------------------------------------------------------
def cdpruner_relevance(
    image_embeds: torch.Tensor, query_embeds: torch.Tensor, negate: bool = True, theta: float | None = None
) -> torch.Tensor:
    """CDPruner's relevance (B, N): normalised embeddings, mean cosine over the M text rows, negated
    (``negate``), then per row (r - min + 1e-6) / (max - min); a constant row gives all ones.

    ``theta`` (optional, 0 <= theta < 1) re-weights it as exp(alpha * r) with alpha = theta / (2 (1 - theta)).
    """
    image_embeds = _check_tensor("image_embeds", image_embeds, "(B, N, C)", 3)
    query = _check_query(query_embeds, image_embeds.shape[0], image_embeds.shape[-1])
    rel = _mean_cosine_to_query(image_embeds, query)
    if negate:
        rel = -rel
    lo = rel.amin(dim=-1, keepdim=True)
    span = rel.amax(dim=-1, keepdim=True) - lo
    rel = torch.where(span > 0, (rel - lo + 1e-6) / span.clamp_min(torch.finfo(rel.dtype).tiny), torch.ones_like(rel))
    if theta is not None:
        alpha = theta / (2.0 * (1.0 - theta))
        rel = torch.exp(alpha * rel)
    return rel


def cdpruner_kernel(features: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """Conditional DPP kernel L_ij = rel_i * cos(h_i, h_j) * rel_j: (B, N, D), (B, N) -> (B, N, N)."""
    return core.scale_kernel_(cosine_similarity_matrix(features), relevance)


def _check_theta(theta: object) -> float | None:
    if theta is None:
        return None
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not (0.0 <= float(theta) < 1.0):
        raise ValueError(f"theta must be None or a number in [0, 1), got {theta!r}")
    return float(theta)


def cdpruner_select(
    features: torch.Tensor,
    budget: int,
    image_embeds: torch.Tensor,
    query_embeds: torch.Tensor,
    negate: bool = True,
    theta: float | None = None,
) -> torch.Tensor:
    """CDPruner: exact greedy MAP of the conditional DPP over the projected tokens; (B, budget) in pick order."""
    theta = _check_theta(theta)
    _check_token_input("image_embeds", image_embeds, features, with_dim=True)
    relevance = cdpruner_relevance(image_embeds, query_embeds, negate=negate, theta=theta)
    # the kernel of cdpruner_kernel, scaled in place (torch path) or on the fly (fused path)
    return core.dpp_greedy(cosine_similarity_matrix(features), budget, relevance=relevance)


# ----------------------------------------------------------------------------------------------------------
# registration (the registry validates inputs, budgets and parameters before these are called)
# ----------------------------------------------------------------------------------------------------------
register_method(
    "divprune",
    paper="DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models (Alvar et al., CVPR 2025)",
    description="Greedy max-min diversity (1 - cos distance) over the projected visual tokens.",
)(divprune_select)

register_method(
    "visionzip",
    inputs=("cls_attention", "keys"),
    params={"dominant": None, "contextual": None, "merge": "mean"},
    check=_check_visionzip_params,
    merges=True,
    paper="VisionZip: Longer is Better but Not Necessary in Vision Language Models (Yang et al., CVPR 2025)",
    description="Dominant tokens by [CLS] attention plus contextual tokens merged by key similarity.",
)(visionzip_reduce)

register_method(
    "fastv",
    inputs=("scores",),
    params={"layer": 2},
    check=lambda p: _check_fastv_layer(p["layer"]),
    stage="llm",
    paper="An Image is Worth 1/2 Tokens After Layer 2 (FastV; Chen et al., ECCV 2024)",
    description="After LLM layer K keep the image tokens most attended by the last prompt token.",
)(fastv_select)

register_method(
    "trim",
    inputs=("image_embeds", "query_embeds"),
    params={"negate": False, "similarity": "cosine"},
    check=lambda p: _check_similarity(p["similarity"]),
    merges=True,
    paper="Less is More: A Simple yet Effective Token Reduction Method for Efficient Multi-modal LLMs "
    "(TRIM; Song et al., COLING 2025)",
    description="Top budget-1 tokens by CLIP text-image similarity plus one token averaging the rest.",
)(trim_reduce)

register_method(
    "trim_iqr",
    inputs=("image_embeds", "query_embeds"),
    params={"negate": False, "similarity": "cosine", "whisker": 1.5},
    check=lambda p: (_check_similarity(p["similarity"]), _check_whisker(p["whisker"])),
    merges=True,
    paper="Less is More: A Simple yet Effective Token Reduction Method for Efficient Multi-modal LLMs "
    "(TRIM; Song et al., COLING 2025)",
    description="TRIM's adaptive count: IQR outliers of the similarity (capped at budget-1) plus one averaged token.",
)(trim_iqr_reduce)

register_method(
    "cdpruner",
    inputs=("image_embeds", "query_embeds"),
    params={"negate": True, "theta": None},
    check=lambda p: _check_theta(p["theta"]),
    paper="Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in MLLMs "
    "(CDPruner; Zhang et al., NeurIPS 2025)",
    description="Conditional DPP: kernel rel_i cos(h_i, h_j) rel_j, exact greedy MAP.",
)(cdpruner_select)

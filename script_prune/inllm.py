"""Multi-stage in-LLM methods: SparseVLM and PDrop (stage "llm"), their schedules and their pure math.

The LLM integration (``script_prune.patch.in_llm``) runs the decoder and computes attention rows from
the layers' own q/k; everything here is pure torch on tensors it hands over:

- :func:`stage_plan` is the one place that turns a method's ``budget`` into per-stage keep counts:
  a list of ``(layers_before, count)``: after ``layers_before`` decoder layers the visual tokens of a
  row of ``n`` are cut to ``count`` (FastV: one stage; SparseVLM / PDrop: three).
- :func:`stage_counts` adds what a row really keeps (SparseVLM's merged tokens); :func:`layer_tokens` /
  :func:`average_visual_tokens` are the accounting the tables quote ("64 tokens in average": the visual
  tokens per row each decoder layer sees, averaged over all layers) and the FLOPs tool uses.
- :func:`sparsevlm_raters` (text raters), :func:`rater_scores`, :func:`dpc_merge` (SparseVLM's
  recycling: density-peak clustering of the best dropped tokens into merged tokens).

Sources (facts only, code written here): SparseVLM v1 (Zhang et al., ICML 2025; Gumpest/SparseVLMs, the
paper's version, i.e. its ``V2_0 = False`` path: recycling on) and PyramidDrop (Xing et al., CVPR 2025;
Cooperx521/PyramidDrop, ``modeling_llama_pdrop.py``). See docs/methods.md for the conventions.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from .registry import register_method

__all__ = [
    "SPARSEVLM_LAYERS",
    "SPARSEVLM_SCHEDULES",
    "average_visual_tokens",
    "dpc_merge",
    "layer_tokens",
    "rater_scores",
    "recycle_count",
    "sparsevlm_raters",
    "stage_counts",
    "stage_plan",
]

#: SparseVLM's pruning layers (0-based decoder layer whose attention ranks; its output is pruned) for a
#: 32-layer LLM, and its published keep counts per budget label on 576 tokens (``score.py`` of the release).
SPARSEVLM_LAYERS = (2, 6, 15)
SPARSEVLM_SCHEDULES: dict[int, tuple[int, int, int]] = {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17)}
SPARSEVLM_ROW = 576  # the row length the published schedules are written for (LLaVA-1.5)
#: PDrop's defaults: drop after layers 8, 16, 24 of 32, keeping lambda = 0.5 of the previous stage each time.
PDROP_LAYERS = (8, 16, 24)
PDROP_DEPTH = 32
#: SparseVLM recycling: the top 30 % of the dropped tokens (by score) are clustered into one cluster per 10.
RECYCLE_SHARE = 0.3
RECYCLE_PER_CLUSTER = 10


# ------------------------------------------------------------------------------------------ schedules
def _check_layers(value: object, name: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not value or any(
            isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in value):
        raise ValueError(f"parameter {name!r} must be a non-empty tuple of ints, got {value!r}")
    layers = tuple(int(v) for v in value)
    if layers[0] < 0 or any(b <= a for a, b in zip(layers, layers[1:])):
        raise ValueError(f"parameter {name!r} must be strictly increasing layer indices >= 0, got {value!r}")
    return layers


def _check_sparsevlm(params: dict) -> None:
    if len(_check_layers(params["layers"], "layers")) != 3:
        raise ValueError(f"parameter 'layers' of method 'sparsevlm' must name 3 layers, got {params['layers']!r}")
    if not isinstance(params["recycle"], bool):
        raise ValueError(f"parameter 'recycle' of method 'sparsevlm' must be a bool, got {params['recycle']!r}")


def _check_pdrop(params: dict) -> None:
    if params["layers"] is not None:
        _check_layers(params["layers"], "layers")
    ratio = params["ratio"]
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0.0 < float(ratio) < 1.0:
        raise ValueError(f"parameter 'ratio' (lambda) of method 'pdrop' must be in (0, 1), got {ratio!r}")


def pdrop_layers(params: dict, num_layers: int) -> tuple[int, ...]:
    """PDrop's drop points: ``layers`` as given, else 8 / 16 / 24 scaled to ``num_layers`` (L/4, L/2, 3L/4)."""
    if params.get("layers") is not None:
        return tuple(int(v) for v in params["layers"])
    return tuple(max(1, round(l * num_layers / PDROP_DEPTH)) for l in PDROP_LAYERS)


def stage_plan(method: str, k: int, n: int, num_layers: int, params: dict) -> list[tuple[int, int]]:
    """Per-stage keep counts of a row of ``n`` visual tokens: ``[(layers_before, count), ...]``.

    ``k``: the row's resolved budget (``script_prune.resolve_budget(budget, n)``), the label the tables
    quote. After ``layers_before`` decoder layers the row keeps ``count`` visual tokens (counts never grow).

    - fastv: ``[(K, k)]``: ``k`` kept after layer K.
    - sparsevlm: prunes the outputs of layers 2, 6, 15 (so ``layers_before`` = 3, 7, 16). Budget labels
      192 / 128 / 64 on a 576-token row take the release's schedules (300/200/110, 303/110/36, 66/30/17);
      any other ``k`` on ``n`` tokens takes the schedule of the smallest published label >= ``k * 576 / n``
      (192's above all) scaled: ``count = max(1, floor(published * k / label))``.
    - pdrop: after layers 8 / 16 / 24 keep ``c, c lambda, c lambda^2``; ``c`` is solved so that the
      layer average (:func:`average_visual_tokens`) is ``k`` (the tables' "tokens in average"); a ``k``
      below what the first drop layer allows (``n * layers[0] / L``) raises ValueError.
    """
    if method == "fastv":
        return [(int(params["layer"]), min(k, n))]
    if method == "sparsevlm":
        equivalent = k * SPARSEVLM_ROW / n
        label = min((b for b in sorted(SPARSEVLM_SCHEDULES) if b >= equivalent), default=max(SPARSEVLM_SCHEDULES))
        counts = [max(1, math.floor(p * k / label)) for p in SPARSEVLM_SCHEDULES[label]]  # the release's at k == label
        layers = [l + 1 for l in params["layers"]]
        return _monotone(list(zip(layers, counts)), n)
    if method == "pdrop":
        layers = pdrop_layers(params, num_layers)
        ratio = float(params["ratio"])
        ends = list(layers[1:]) + [num_layers]
        weight = sum((e - l) * ratio ** s for s, (l, e) in enumerate(zip(layers, ends)))  # layers seeing c lambda^s
        floor_average = n * layers[0] / num_layers
        if k <= floor_average:
            raise ValueError(f"budget {k} (visual tokens per row in average over the {num_layers} layers) is out of "
                             f"reach for pdrop with its first drop after layer {layers[0]}: the first layers alone "
                             f"average {floor_average:g} on rows of {n}; pass layers=(...) with an earlier first layer")
        first = (k * num_layers - layers[0] * n) / weight
        counts = [max(1, min(n, round(first * ratio ** s))) for s in range(len(layers))]
        return _monotone(list(zip(layers, counts)), n)
    raise ValueError(f"method {method!r} is not an in-LLM method with a schedule (fastv, sparsevlm, pdrop)")


def _monotone(plan: list[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    """Counts capped at ``n`` and never above the previous stage's."""
    out, previous = [], n
    for layer, count in plan:
        previous = min(previous, count)
        out.append((layer, previous))
    return out


def stage_counts(method: str, k: int, n: int, num_layers: int, params: dict,
                 held: int | None = None) -> list[tuple[int, int, int, int]]:
    """What a row of ``n`` really goes through: per stage ``(layers_before, kept, recycled, merged)``: it keeps
    ``kept`` of its current visual tokens and (SparseVLM with ``recycle``) clusters its ``recycled`` best dropped
    ones into ``merged`` tokens, which count as its visual tokens from then on (see :func:`recycle_count`).
    ``held``: the tokens the row really brings to the LLM when a layout step cut it below ``n`` (LLaVA-NeXT's
    unpadding; the plan stays that of ``n``, a row keeps at most what it holds and recycles what it drops)."""
    recycle = method == "sparsevlm" and bool(params.get("recycle", False))
    out, current = [], n if held is None else held
    for layer, count in stage_plan(method, k, n, num_layers, params):
        kept = min(count, current)
        recycled, merged = recycle_count(current - kept) if recycle else (0, 0)
        out.append((layer, kept, recycled, merged))
        current = kept + merged
    return out


def layer_tokens(method: str, k: int, n: int, num_layers: int, params: dict) -> list[int]:
    """Visual tokens of a row of ``n`` each of the ``num_layers`` decoder layers sees (merged tokens included)."""
    out, start, current = [], 0, n
    for layer, kept, _, merged in stage_counts(method, k, n, num_layers, params):
        out += [current] * (layer - start)
        start, current = layer, kept + merged
    return out + [current] * (num_layers - start)


def average_visual_tokens(method: str, k: int, n: int, num_layers: int, params: dict) -> float:
    """The tables' accounting ("64 tokens in average"): :func:`layer_tokens` averaged over the decoder layers."""
    return sum(layer_tokens(method, k, n, num_layers, params)) / num_layers


def recycle_count(dropped: int) -> tuple[int, int]:
    """SparseVLM's recycling of ``dropped`` tokens: (tokens clustered = floor(0.3 d) + 1 capped at d, clusters =
    floor(that / 10) + 1 capped at it). ``dropped == 0`` -> (0, 0)."""
    if dropped <= 0:
        return 0, 0
    taken = min(dropped, int(dropped * RECYCLE_SHARE) + 1)
    return taken, min(taken, taken // RECYCLE_PER_CLUSTER + 1)


# ------------------------------------------------------------------------------------------ scores
def sparsevlm_raters(visual: Tensor, text: Tensor, visual_ok: Tensor, text_ok: Tensor) -> Tensor:
    """SparseVLM's text raters: text tokens whose visual-to-text attention, averaged over the visual tokens, is
    above the mean over the text tokens.

    visual: (B, V, D), text: (B, T, D) the LLM's input embeddings; *_ok: (B, V) / (B, T) bool (valid entries).
    Attention = softmax over the text tokens of the raw dot products ``v . t``. -> (B, T) bool.
    """
    logits = torch.einsum("bvd,btd->bvt", visual.float(), text.float())  # (B, V, T)
    logits = logits.masked_fill(~text_ok[:, None], float("-inf"))
    attention = logits.softmax(dim=-1).masked_fill(~visual_ok[..., None], 0.0)  # (B, V, T)
    relation = attention.sum(dim=1) / visual_ok.sum(dim=1, keepdim=True).clamp(min=1)  # (B, T)
    mean = (relation * text_ok).sum(dim=1, keepdim=True) / text_ok.sum(dim=1, keepdim=True).clamp(min=1)
    raters = text_ok & (relation > mean)
    return torch.where(raters.any(dim=1, keepdim=True), raters, text_ok)  # uniform text: every token rates


def rater_scores(attention: Tensor, raters: Tensor) -> Tensor:
    """Mean over the raters of their head-averaged attention rows. (B, Q, L), (B, Q) bool -> (B, L) float32
    (rows of non-raters, e.g. padding, are ignored whatever they hold)."""
    rows = torch.where(raters[..., None], attention.float(), 0.0)  # padding queries may hold NaN rows
    return rows.sum(dim=1) / raters.sum(dim=1, keepdim=True).clamp(min=1)


# ------------------------------------------------------------------------------------------ recycling
def dpc_merge(x: Tensor, valid: Tensor, clusters: Tensor, width: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Density-peak clustering (DPC-kNN) of the tokens ``x`` into ``clusters`` per row, merged by averaging.

    x: (G, M, D) tokens (rows padded), valid: (G, M) bool, clusters: (G,) long, 1 <= clusters <= valid count.
    Distances ``|x_i - x_j| / sqrt(D)``; density ``exp(-mean of the squared distances to the c nearest
    tokens)`` (c = the row's clusters, itself included); ``delta`` = distance to the nearest denser token (the
    largest distance of the row for the densest); centres = the c largest ``density * delta``; every token
    joins its nearest centre (a centre itself); a merged token is the mean of its members. Density ties go
    to the lower index (the release adds 1e-6 noise instead). ``width``: C = clusters.max() when the caller
    knows it on the host (no host sync); else it is read here. -> merged (G, C, D) (the entries past a row's
    count are 0), merged_ok (G, C) bool, centre (G, C) long index into M.
    """
    g, m, d = x.shape
    if width is None:
        width = int(clusters.max()) if g else 0
    c_max = width
    xf = x.float()
    dist = torch.cdist(xf, xf) / math.sqrt(d)  # (G, M, M)
    pair_ok = valid[:, :, None] & valid[:, None, :]
    big = dist.masked_fill(~pair_ok, 0.0).flatten(1).amax(dim=1)  # (G,) largest distance of each row
    sorted_dist = dist.masked_fill(~pair_ok, float("inf")).sort(dim=-1).values  # (G, M, M) nearest first
    near = torch.arange(m, device=x.device)[None, None] < clusters[:, None, None]  # (G, 1, M): first c columns
    density = torch.exp(-(sorted_dist.masked_fill(~near, 0.0) ** 2).sum(-1) / clusters[:, None].float())  # (G, M)
    index = torch.arange(m, device=x.device)
    # j is denser than i: higher density, or equal density and a lower index (deterministic tie-break)
    denser = (density[:, None, :] > density[:, :, None]) | (
        (density[:, None, :] == density[:, :, None]) & (index[None, None, :] < index[None, :, None]))
    denser &= pair_ok
    delta = torch.where(denser, dist, big[:, None, None].expand_as(dist)).amin(dim=-1)  # (G, M)
    score = (delta * density).masked_fill(~valid, -1.0)
    order = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :c_max]  # (G, C)
    centre_ok = torch.arange(c_max, device=x.device)[None] < clusters[:, None]  # (G, C)
    to_centre = dist.gather(2, order[:, None, :].expand(-1, m, -1)).masked_fill(~centre_ok[:, None], float("inf"))
    assign = to_centre.argmin(dim=-1)  # (G, M) nearest centre
    own = torch.where(centre_ok, torch.arange(c_max, device=x.device)[None], assign.gather(1, order))
    assign.scatter_(1, order, own)  # a centre joins itself (entries past a row's count are no centres)
    assign = torch.where(valid, assign, c_max)  # padding goes to a discarded extra cluster
    one_hot = (assign[..., None] == torch.arange(c_max, device=x.device)).to(xf.dtype)  # (G, M, C), padding: no 1
    sums = one_hot.transpose(1, 2) @ xf  # (G, C, D)
    counts = one_hot.sum(dim=1)[..., None]  # (G, C, 1)
    merged = (sums / counts.clamp(min=1)).masked_fill(~centre_ok[..., None], 0.0)
    return merged.to(x.dtype), centre_ok, order


# ------------------------------------------------------------------------------------------ registration
def _top_scores(features: Tensor, budget: int, scores: Tensor, **_: object) -> Tensor:
    """The selection rule of every stage: the ``budget`` highest ``scores`` (B, N). # -> (B, budget)"""
    if scores.shape != features.shape[:2]:
        raise ValueError(f"scores must be (B, N) = {tuple(features.shape[:2])} like features, got {tuple(scores.shape)}")
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :budget]


register_method(
    "sparsevlm",
    inputs=("scores",),
    params={"layers": SPARSEVLM_LAYERS, "recycle": True},
    check=_check_sparsevlm,
    stage="llm",
    paper="SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference "
    "(Zhang et al., ICML 2025; v1, the paper's version)",
    description="Prunes the outputs of LLM layers 2, 6, 15 by the text raters' attention; recycles the best "
    "dropped tokens into density-peak-clustered merged tokens.",
)(_top_scores)

register_method(
    "pdrop",
    inputs=("scores",),
    params={"layers": None, "ratio": 0.5},
    check=_check_pdrop,
    stage="llm",
    paper="PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual Redundancy Reduction "
    "(Xing et al., CVPR 2025)",
    description="After LLM layers 8, 16, 24 keep lambda = 0.5 of the visual tokens by the last instruction token's "
    "attention.",
)(_top_scores)

"""The math of Script (paper Sec. 3.4 and 4.1-4.3) as small batched torch functions.

Every function here takes *validated*, batched float32 tensors (the public wrappers in
``script_prune.registry`` do the checking, unbatching and dtype handling). Shapes are
annotated as ``# (B, N, D)``. No per-sample Python loops; the greedy loops run over steps
(not samples). The greedy walks dispatch to the fused Triton kernel (``script_prune.fused``)
for CUDA tensors when Triton is installed; the torch code here is the CPU path and the
reference. No function here synchronises with the host, except the torch path of
:func:`script_walk` (once per chunk of steps, a handful of times per call).
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from torch import Tensor

from . import fused

#: A residual ``d_i^2`` at or below this means the kernel is exhausted (issue 2).
EXHAUSTED_RESIDUAL = 1e-10

#: Floor for vector norms, so all-zero tokens get cosine 0 instead of NaN.
NORM_EPS = 1e-12


# --------------------------------------------------------------------------- similarity


def l2_normalize(x: Tensor) -> Tensor:
    """Rows of ``x`` scaled to unit L2 norm (zero rows stay zero). # (..., D) -> (..., D)"""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)


#: Row-block size of the blocked Gram on CPU (blocks of about this many tokens).
GRAM_BLOCK = 192


def gram_matrix(x: Tensor) -> Tensor:
    """``x x^T``. # (B, N, D) -> (B, N, N)

    On CPU with N >= 2 * GRAM_BLOCK only the blocks on and above the diagonal are
    multiplied and mirrored (about 25-40% less time than one full bmm there); elsewhere
    one bmm. The Python loop runs over row blocks, not samples.
    """
    b, n, _ = x.shape
    blocks = n // GRAM_BLOCK if x.device.type == "cpu" else 1
    if blocks < 2:
        return torch.bmm(x, x.transpose(1, 2))
    edges = [round(i * n / blocks) for i in range(blocks + 1)]
    out = x.new_empty(b, n, n)
    for i in range(blocks):
        rows = slice(edges[i], edges[i + 1])
        for j in range(i, blocks):
            cols = slice(edges[j], edges[j + 1])
            block = torch.bmm(x[:, rows], x[:, cols].transpose(1, 2))
            out[:, rows, cols] = block
            if j != i:
                out[:, cols, rows] = block.transpose(1, 2)
    return out


def cosine_similarity_matrix(features: Tensor) -> Tensor:
    """Pairwise cosine similarity ``S_ij`` of the tokens (Eq. 8 / Eq. 10). # (B, N, D) -> (B, N, N)

    One Gram of the raw features divided by the norms in place (no normalised copy of the
    (B, N, D) features).
    """
    norm = features.norm(dim=-1).clamp_min(NORM_EPS)  # (B, N)
    return gram_matrix(features).div_(norm.unsqueeze(2)).div_(norm.unsqueeze(1))


# --------------------------------------------------------------------------- GSP (Sec. 4.1)


def _side_scores(block: Tensor, tau: float, gamma: float, dim: int) -> Tensor:
    """Eq. 9 for the tokens of one side of the bipartite graph, reducing over ``dim``.

    ``block`` holds the similarities between the two sides; a token's neighbours in
    ``G_tau`` are the entries ``>= tau`` along ``dim``. A side with no partner (N = 1)
    scores 0.
    """
    if block.shape[dim] == 0:
        return block.sum(dim=dim) * 0.0  # no partner: score 0
    above = block >= tau
    degree = above.sum(dim=dim, dtype=block.dtype)  # d(t_i)
    mean_above = (block * above).sum(dim=dim) / degree  # mu(t_i); 0/0 where degree = 0, not selected below
    fallback = block.mean(dim=dim)  # mu~(t_i) over the full graph G
    return torch.where(degree > 0, degree * torch.exp(gamma * (mean_above - tau)), fallback)


def redundancy_from_similarity(similarity: Tensor, tau: float, gamma: float) -> Tensor:
    """GSP redundancy score (Eq. 8-9) from the full cosine matrix. # (B, N, N) -> (B, N)

    src = even token indices, dst = odd ones; the bipartite block is the strided view
    ``S[:, 0::2, 1::2]`` of the one Gram matrix (no second matmul). Higher = more redundant.
    """
    block = similarity[:, 0::2, 1::2]  # (B, ceil(N/2), floor(N/2))
    if block.shape[1] == block.shape[2] and block.shape[1] > 0:  # even N: both sides in one pass
        both = _side_scores(torch.stack((block, block.transpose(1, 2))), tau, gamma, dim=-1)  # (2, B, N/2)
        return both.permute(1, 2, 0).reshape(similarity.shape[:2])  # interleave src, dst
    src, dst = _side_scores(block, tau, gamma, dim=-1), _side_scores(block, tau, gamma, dim=-2)
    scores = similarity.new_empty(similarity.shape[:2])
    scores[:, 0::2] = src
    scores[:, 1::2] = dst
    return scores


def redundancy_scores(features: Tensor, tau: float = 0.2, gamma: float = 1.0) -> Tensor:
    """GSP redundancy score of every token (Eq. 8-9). # (B, N, D) -> (B, N)"""
    return redundancy_from_similarity(cosine_similarity_matrix(features), tau, gamma)


def gsp_keep_count(n: int, m: int, gsp_ratio: float) -> int:
    """Tokens GSP keeps: ``n - floor(rho * (n - m))``.

    ``rho`` is taken as the decimal the user wrote (``Fraction(repr(rho))``), so e.g.
    ``0.29 * 100`` floors to 29, not 28.
    """
    removed = math.floor(Fraction(repr(float(gsp_ratio))) * (n - m))
    return n - removed


def lowest_k_mask(scores: Tensor, k: int) -> Tensor:
    """Mask of the ``k`` lowest scores per row, ties to the lower index. # (B, N) -> (B, N) bool"""
    order = torch.sort(scores, dim=1, stable=True).indices[:, :k]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order, True)


def descending_order(scores: Tensor) -> Tensor:
    """Indices by descending score, ties to the lower index. # (B, N) -> (B, N) int64"""
    return torch.sort(scores, dim=1, descending=True, stable=True).indices


# --------------------------------------------------------------------------- QCRS (Eq. 3-4)


def min_max_normalize(x: Tensor, negate: bool = False) -> Tensor:
    """Per-row min-max scaling of ``x`` (of ``-x`` if ``negate``) to [0, 1]; a constant row
    becomes all ones. # (B, N) -> (B, N)

    ``negate`` computes ``(max - x) / (max - min)``, bit for bit the min-max of ``-x``
    (negation is exact) without materialising ``-x``.
    """
    low, high = torch.aminmax(x, dim=1, keepdim=True)
    span = high - low
    scaled = (high - x if negate else x - low) / span
    return scaled.masked_fill(span <= 0, 1.0)  # 0/0 of a constant row replaced by 1


def query_relevance(image_embeds: Tensor, query_embeds: Tensor, negate: bool = False) -> Tensor:
    """Relevance ``r_norm`` (Eq. 3-4 + min-max). # (B, N, C), (B, M, C) -> (B, N) in [0, 1]

    Cosine of each image embedding with the mean query embedding, negated if ``negate``. The
    mean query is not normalised: ``1 / |q|`` scales a row's cosines by one positive factor,
    which the min-max removes (a zero query gives a constant row either way).
    """
    query_mean = query_embeds.mean(dim=1)  # (B, C), Eq. 3
    cosine = torch.bmm(l2_normalize(image_embeds), query_mean.unsqueeze(2)).squeeze(2)  # |q| cos
    return min_max_normalize(cosine, negate)


def scale_kernel_(similarity: Tensor, relevance: Tensor) -> Tensor:
    """In place: ``L = diag(r) S diag(r)`` (Sec. 4.2). # (B, N, N), (B, N) -> (B, N, N)"""
    return similarity.mul_(relevance.unsqueeze(2)).mul_(relevance.unsqueeze(1))


# --------------------------------------------------------------------------- DPP (Sec. 4.2, Eq. 11)


class _CholeskyGreedy:
    """Fast greedy MAP of a DPP (Chen et al., 2018), run a chunk of steps at a time.

    State: residuals ``d2`` (picked items set to -inf), the factor buffer ``c`` whose row
    ``t`` holds every item's coefficient on the ``t``-th pick (grown on demand), the picks
    and their residuals. One step is eight batched kernels and no host sync. The picks
    made after a row's kernel is exhausted are meaningless (their residuals may even turn
    NaN; rows never mix) and get replaced by :func:`complete_order`.
    """

    def __init__(self, kernel: Tensor, max_steps: int, capacity: int | None = None) -> None:
        b, n, _ = kernel.shape
        self.kernel = kernel  # (B, N, N)
        self.max_steps = max_steps
        self.d2 = torch.diagonal(kernel, dim1=1, dim2=2).clone()  # (B, N)
        self.c = kernel.new_empty(b, min(max_steps, capacity or max_steps), n)  # (B, T, N)
        self._picks = torch.empty(max_steps, b, dtype=torch.long, device=kernel.device)  # (T, B)
        self._best = kernel.new_empty(max_steps, b)  # (T, B) residual of each pick
        self._neg_inf = kernel.new_full((b, 1), -math.inf)
        self.steps = 0

    @property
    def picks(self) -> Tensor:
        """Picks so far. # (B, steps) int64"""
        return self._picks[: self.steps].T

    def _reserve(self, steps: int) -> None:
        """Grow the factor buffer to hold ``steps`` rows (doubling)."""
        if steps > self.c.shape[1]:
            grown = self.c.new_empty(self.c.shape[0], min(self.max_steps, max(steps, 2 * self.c.shape[1])), self.c.shape[2])
            grown[:, : self.steps] = self.c[:, : self.steps]
            self.c = grown

    def run(self, stop: int) -> None:
        """Advance the greedy until ``stop`` picks have been made (``stop <= max_steps``)."""
        self._reserve(stop)
        kernel, d2, c = self.kernel, self.d2, self.c
        b, n, _ = kernel.shape
        for t in range(self.steps, stop):
            best, j = torch.max(d2, dim=1, out=(self._best[t], self._picks[t]))  # first max on ties
            j = j.view(b, 1)
            row = torch.gather(kernel, 1, j.view(b, 1, 1).expand(b, 1, n))  # (B, 1, N): L_j.
            if t > 0:
                prev = c[:, :t]  # (B, t, N)
                cj = torch.gather(prev, 2, j.view(b, 1, 1).expand(b, t, 1))  # (B, t, 1)
                row = torch.baddbmm(row, cj.transpose(1, 2), prev, alpha=-1.0)  # L_j - <c_j, c_i>
            e = torch.mul(row.view(b, n), torch.rsqrt(best).view(b, 1), out=c[:, t])  # (B, N), Eq. 11
            d2.addcmul_(e, e, value=-1.0)
            d2.scatter_(1, j, self._neg_inf)
        self.steps = max(self.steps, stop)

    def exhausted_at(self) -> Tensor:
        """Per row, the first step whose pick had residual <= 1e-10 (``steps`` if none). # (B,)"""
        done = (self._best[: self.steps] <= EXHAUSTED_RESIDUAL).T  # (B, steps)
        first = done.to(torch.int8).argmax(dim=1)
        return torch.where(done.any(dim=1), first, torch.full_like(first, self.steps))


def complete_order(picks: Tensor, valid: Tensor, diagonal: Tensor, length: int) -> Tensor:
    """Extend each row's first ``valid`` picks by descending diagonal, ties to the lower index.

    # picks (B, T), valid (B,), diagonal (B, N) -> (B, length) int64
    """
    b, t = picks.shape
    positions = torch.arange(t, device=picks.device).unsqueeze(0)  # (1, T)
    real = positions < valid.unsqueeze(1)  # (B, T)
    n = diagonal.shape[1]
    taken = torch.zeros(b, n + 1, dtype=torch.bool, device=picks.device)  # column n: padding sink
    taken.scatter_(1, torch.where(real, picks, n), True)
    rest = descending_order(diagonal.masked_fill(taken[:, :n], -math.inf))  # (B, N)
    out_pos = torch.arange(length, device=picks.device).unsqueeze(0)  # (1, length)
    from_picks = torch.gather(picks, 1, out_pos.clamp_max(t - 1).expand(b, -1)) if t > 0 else None
    from_rest = torch.gather(rest, 1, (out_pos - valid.unsqueeze(1)).clamp_min(0))
    if from_picks is None:
        return from_rest
    return torch.where(out_pos < valid.unsqueeze(1), from_picks, from_rest)


def dpp_greedy(kernel: Tensor, k: int, relevance: Tensor | None = None) -> Tensor:
    """Greedy MAP pick order of a DPP with kernel ``L`` (Eq. 11). # (B, N, N) -> (B, k) int64

    Each step takes the unpicked item with the largest residual ``d_i^2`` (first index on
    ties). Once that residual is <= 1e-10 the remaining picks follow descending diagonal.
    With ``relevance`` (B, N) the kernel is ``diag(r) kernel diag(r)``: the fused path scales
    on the fly, the torch path scales ``kernel`` in place (:func:`scale_kernel_`).
    One fused kernel on the fused path (:func:`script_prune.fused.use_fused`); no host sync
    on either path.
    """
    if fused.use_fused(kernel):
        return fused.greedy_walk(kernel, k, scale=relevance)
    if relevance is not None:
        kernel = scale_kernel_(kernel, relevance)
    greedy = _CholeskyGreedy(kernel, k)
    greedy.run(k)
    diagonal = torch.diagonal(kernel, dim1=1, dim2=2)
    return complete_order(greedy.picks, greedy.exhausted_at(), diagonal, k)


def first_kept(order: Tensor, keep: Tensor, m: int) -> Tensor:
    """The first ``m`` entries of each row of ``order`` that ``keep`` marks. # (B, T), (B, N) -> (B, m)

    Every row must contain at least ``m`` kept entries. No host sync: the chosen entries are
    scattered to their rank (others to a discarded column ``m``), not boolean-indexed.
    """
    kept = torch.gather(keep, 1, order)  # (B, T) bool
    rank = torch.cumsum(kept, dim=1) - 1  # (B, T): position among the kept entries
    slot = torch.where(kept & (rank < m), rank, m)
    return order.new_empty(order.shape[0], m + 1).scatter_(1, slot, order)[:, :m]


def script_walk(
    kernel: Tensor, keep: Tensor, m: int, min_chunk: int = 4, max_steps: int | None = None,
    relevance: Tensor | None = None,
) -> Tensor:
    """Sec. 4.3: walk the DPP greedy order of ``kernel`` and take the first ``m`` tokens GSP kept.

    # kernel (B, N, N), keep (B, N) bool with >= m True per row -> (B, m) int64, pick order.

    ``relevance``: as in :func:`dpp_greedy` (the kernel is then ``diag(r) kernel diag(r)``;
    the torch path scales ``kernel`` in place).

    Fused path: one kernel, each row stops on the device after its ``m``-th kept pick;
    ``max_steps`` (default N) sizes its factor buffer and must bound the picks a row makes
    before that, e.g. ``N - (kept per row) + m`` (``script`` passes that).
    Torch path: the greedy advances in chunks of at least ``max(m - fewest kept so far,
    min_chunk)`` steps (no row can finish sooner) and stops as soon as every row has its ``m``
    kept picks or is exhausted, so the host syncs once per chunk, a handful of times in all.
    """
    if fused.use_fused(kernel):
        return fused.greedy_walk(kernel, m, keep, max_steps, scale=relevance)
    if relevance is not None:
        kernel = scale_kernel_(kernel, relevance)
    b, n, _ = kernel.shape
    greedy = _CholeskyGreedy(kernel, n, capacity=2 * m + 64)  # grows if needed
    target = min(m, n)
    while greedy.steps < n:
        greedy.run(min(n, greedy.steps + max(target, min_chunk)))
        picks = greedy.picks[:, : greedy.steps]
        kept_count = torch.gather(keep, 1, picks).sum(dim=1)  # (B,)
        exhausted = greedy.exhausted_at() < greedy.steps
        missing = torch.where(exhausted, 0, m - kept_count).clamp_min(0)
        target = int(missing.max())  # the one host sync per chunk
        if target == 0:
            break
    valid = greedy.exhausted_at()
    diagonal = torch.diagonal(kernel, dim1=1, dim2=2)
    order = complete_order(greedy.picks[:, : greedy.steps], valid, diagonal, n)
    return first_kept(order, keep, m)


# --------------------------------------------------------------------------- the authors' release


def released_relevance(image_embeds: Tensor, query_embeds: Tensor) -> Tensor:
    """Relevance as the authors' released code computes it. # (B, N, C), (B, M, C) -> (B, N)

    Raw dot products ``<e_n, t_s>``; keep the top ``max(1, floor(M/2))`` segments by their
    mean over the image (ties to the lower index); negate the mean over kept segments;
    min-max per row with ``+1e-6`` in the denominator.
    """
    dots = torch.bmm(image_embeds, query_embeds.transpose(1, 2))  # (B, N, M)
    n_keep = max(1, query_embeds.shape[1] // 2)
    top = descending_order(dots.mean(dim=1))[:, :n_keep]  # (B, M')
    kept = torch.gather(dots, 2, top.unsqueeze(1).expand(-1, dots.shape[1], -1))  # (B, N, M')
    rel = -kept.mean(dim=2)  # (B, N)
    low = rel.amin(dim=1, keepdim=True)
    return (rel - low) / (rel.amax(dim=1, keepdim=True) - low + 1e-6)


def released_greedy(kernel: Tensor, m: int) -> Tensor:
    """The approximate greedy of the authors' release. # (B, N, N) -> (B, m) int64, pick order

    ``s = diag(K)``; m times: pick the unpicked ``j`` with the largest ``s_j`` (first on
    ties); if ``s_j > 0``: ``s <- s - (K[:, j] / (sqrt(s_j) + 1e-6))^2``. No
    orthogonalisation against earlier picks.
    """
    b, n, _ = kernel.shape
    s = torch.diagonal(kernel, dim1=1, dim2=2).clone()  # (B, N)
    picked = torch.zeros_like(s, dtype=torch.bool)
    picks = torch.empty(b, m, dtype=torch.long, device=kernel.device)
    for t in range(m):
        best, j = torch.max(s.masked_fill(picked, -math.inf), dim=1, keepdim=True)
        picks[:, t : t + 1] = j
        picked.scatter_(1, j, True)
        column = torch.gather(kernel, 1, j.unsqueeze(2).expand(b, 1, n)).squeeze(1)  # K symmetric
        step = column / (torch.sqrt(best.clamp_min(0.0)) + 1e-6)
        s = torch.where(best > 0, s - step * step, s)
    return picks

"""The public scoring functions and the greedy against float64 references (tests/reference.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import script_prune as sp
from script_prune import core
from tests import reference as ref


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _well_conditioned_kernel(n: int, seed: int) -> torch.Tensor:
    """Random PSD kernel X X^T / d with d = 3n (smallest eigenvalue well above 0)."""
    x = torch.randn(n, 3 * n, generator=_gen(seed), dtype=torch.float64)
    return x @ x.T / (3 * n)


# --------------------------------------------------------------------------- redundancy (GSP)


@pytest.mark.parametrize("n", [1, 2, 7, 16])
@pytest.mark.parametrize("tau", [0.2, -1.0, 0.95])
def test_redundancy_matches_loop_reference(n: int, tau: float) -> None:
    # low-rank features so many similarities exceed tau; tau=0.95 forces the fallback branch
    base = torch.randn(n, 3, generator=_gen(n)) @ torch.randn(3, 24, generator=_gen(100 + n))
    feats = base + 0.3 * torch.randn(n, 24, generator=_gen(200 + n))
    got = sp.redundancy_scores(feats, tau=tau, gamma=1.5)
    assert got.shape == (n,) and got.dtype == torch.float32
    np.testing.assert_allclose(got.double().numpy(), ref.redundancy(feats, tau, 1.5), rtol=1e-4, atol=1e-5)


def test_redundancy_fallback_branch_is_mean_similarity() -> None:
    # three tokens: 0 (src) vs 1 (dst) orthogonal, 2 (src) opposite to 1 -> no edge >= tau anywhere
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    got = sp.redundancy_scores(feats, tau=0.5)
    # token 0: mean(cos(0,1)) = 0; token 1: mean(cos(1,0), cos(1,2)) = (0 - 1)/2; token 2: -1
    torch.testing.assert_close(got, torch.tensor([0.0, -0.5, -1.0]))


def test_redundancy_hand_computed_degree_term() -> None:
    # token 0 (src) and token 1 (dst) identical: degree 1, mu = 1 -> 1 * exp(gamma (1 - tau))
    feats = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    got = sp.redundancy_scores(feats, tau=0.2, gamma=1.0)
    expected = torch.full((2,), float(np.exp(0.8)))
    torch.testing.assert_close(got, expected)


def test_redundancy_batched_equals_one_by_one() -> None:
    feats = torch.randn(3, 11, 8, generator=_gen(3))
    batched = sp.redundancy_scores(feats)
    for b in range(3):
        torch.testing.assert_close(batched[b], sp.redundancy_scores(feats[b]))


# --------------------------------------------------------------------------- relevance (QCRS)


@pytest.mark.parametrize("negate", [False, True])
def test_relevance_matches_reference(negate: bool) -> None:
    img = torch.randn(13, 6, generator=_gen(1))
    query = torch.randn(4, 6, generator=_gen(2))
    got = sp.query_relevance(img, query, negate=negate)
    np.testing.assert_allclose(got.double().numpy(), ref.relevance(img, query, negate), rtol=1e-5, atol=1e-6)
    assert float(got.min()) == 0.0 and float(got.max()) == 1.0


def test_relevance_constant_row_is_all_ones() -> None:
    img = torch.ones(5, 3)
    got = sp.query_relevance(img, torch.randn(2, 3, generator=_gen(0)))
    torch.testing.assert_close(got, torch.ones(5))


def test_relevance_shared_and_batched_query_agree() -> None:
    img = torch.randn(2, 9, 4, generator=_gen(5))
    query = torch.randn(3, 4, generator=_gen(6))
    shared = sp.query_relevance(img, query)
    per_row = sp.query_relevance(img, query.expand(2, -1, -1))
    torch.testing.assert_close(shared, per_row)
    torch.testing.assert_close(shared[1], sp.query_relevance(img[1], query))


# --------------------------------------------------------------------------- DPP greedy


@pytest.mark.parametrize("seed", range(6))
def test_dpp_greedy_matches_slogdet_greedy(seed: int) -> None:
    n, k = 14, 14
    kernel = _well_conditioned_kernel(n, seed)
    got = sp.dpp_greedy(kernel.float(), k)
    assert got.dtype == torch.int64 and got.shape == (k,)
    assert got.tolist() == ref.dpp_greedy_slogdet(kernel, k)


def test_dpp_greedy_batched_equals_one_by_one() -> None:
    kernels = torch.stack([_well_conditioned_kernel(12, s) for s in range(4)]).float()
    batched = sp.dpp_greedy(kernels, 7)
    for b in range(4):
        assert batched[b].tolist() == sp.dpp_greedy(kernels[b], 7).tolist()
        assert batched[b].tolist() == ref.dpp_greedy_slogdet(kernels[b], 7)


def test_dpp_greedy_exhausted_diagonal_kernel() -> None:
    # residuals are the diagonal itself: picks 0 (3), 2 (1); then only zeros remain -> by index
    kernel = torch.diag(torch.tensor([3.0, 0.0, 1.0, 0.0]))
    assert sp.dpp_greedy(kernel, 4).tolist() == [0, 2, 1, 3]
    assert ref.dpp_greedy_slogdet(kernel, 4) == [0, 2, 1, 3]


def test_dpp_greedy_exhausted_rank_one_kernel() -> None:
    # L = v v^T, v = (1, 2, 1, 0.5): first pick 1 (diag 4); every residual is then exactly 0,
    # so the rest follow descending diagonal (1, 1, 0.25) with the tie 0/2 to the lower index
    v = torch.tensor([1.0, 2.0, 1.0, 0.5])
    kernel = torch.outer(v, v)
    assert sp.dpp_greedy(kernel, 4).tolist() == [1, 0, 2, 3]
    assert sp.dpp_greedy(kernel, 2).tolist() == [1, 0]


def test_dpp_greedy_exhaustion_is_per_row() -> None:
    v = torch.tensor([1.0, 2.0, 1.0, 0.5])
    kernels = torch.stack([torch.outer(v, v), _well_conditioned_kernel(4, 9).float()])
    got = sp.dpp_greedy(kernels, 4)
    assert got[0].tolist() == [1, 0, 2, 3]
    assert got[1].tolist() == ref.dpp_greedy_slogdet(kernels[1], 4)


def test_dpp_greedy_ties_go_to_lower_index() -> None:
    assert sp.dpp_greedy(torch.eye(5), 5).tolist() == [0, 1, 2, 3, 4]
    assert sp.dpp_greedy(torch.diag(torch.tensor([1.0, 2.0, 2.0, 1.0])), 3).tolist() == [1, 2, 0]


def test_dpp_greedy_single_item() -> None:
    assert sp.dpp_greedy(torch.tensor([[0.5]]), 1).tolist() == [0]


# --------------------------------------------------------------------------- building blocks


@pytest.mark.parametrize(("n", "m", "rho", "expected"), [
    (576, 64, 0.5, 320), (576, 192, 0.5, 384), (10, 3, 0.0, 10), (10, 3, 1.0, 3),
    (103, 3, 0.29, 74),  # 0.29 * 100 = 29 exactly, although 0.29 * 100.0 == 28.999999999999996
    (7, 2, 0.5, 5),  # floor(2.5) = 2 removed
])
def test_gsp_keep_count(n: int, m: int, rho: float, expected: int) -> None:
    assert core.gsp_keep_count(n, m, rho) == expected


def test_first_kept_walks_the_order() -> None:
    order = torch.tensor([[4, 0, 3, 1, 2]])
    keep = torch.tensor([[True, False, True, True, False]])
    assert core.first_kept(order, keep, 2).tolist() == [[0, 3]]


def test_script_walk_exhausted_row_continues_by_diagonal() -> None:
    # row 0: rank-one kernel v v^T (exact in float32): greedy picks 1, then every residual is 0,
    # so the order goes on by descending diagonal v^2 = (1, 4, 1, .25, .0625, 1): 1, 0, 2, 5, 3, 4.
    # GSP keeps {0, 3, 4, 5}: the first 3 kept in that order are 0, 5, 3.
    v = torch.tensor([1.0, 2.0, 1.0, 0.5, 0.25, 1.0])
    other = _well_conditioned_kernel(6, 4).float()
    keep = torch.tensor([[True, False, False, True, True, True]] * 2)
    got = core.script_walk(torch.stack([torch.outer(v, v), other]), keep, 3)
    assert sorted(got[0].tolist()) == [0, 3, 5]
    want = [i for i in ref.dpp_greedy_slogdet(other, 6) if keep[1, i]][:3]
    assert got[1].tolist() == want


def test_released_greedy_matches_loop() -> None:
    feats = torch.randn(15, 10, generator=_gen(7))
    img = torch.randn(15, 5, generator=_gen(8))
    query = torch.randn(3, 5, generator=_gen(9))
    got = sp.select(feats, 6, "script_released", image_embeds=img, query_embeds=query)
    assert got.tolist() == ref.released_select(feats, img, query, 6)


@pytest.mark.parametrize("n", [5, 383, 401, 800])  # 383: one bmm; 401 and 800: blocked Gram on CPU
def test_cosine_matrix_matches_float64(n: int) -> None:
    feats = torch.randn(2, n, 8, generator=_gen(n))
    feats[1, 3] = 0.0  # a zero token has cosine 0 with everything
    got = core.cosine_similarity_matrix(feats)
    h = feats.double().numpy()
    norms = np.linalg.norm(h, axis=-1, keepdims=True)
    unit = np.divide(h, norms, out=np.zeros_like(h), where=norms > 0)
    np.testing.assert_allclose(got.double().numpy(), unit @ unit.transpose(0, 2, 1), atol=2e-6)
    torch.testing.assert_close(got, got.transpose(1, 2), rtol=0, atol=1e-6)
    assert ref.cosine(h[0, 1], h[0, 2]) == pytest.approx(float(got[0, 1, 2]), abs=1e-6)

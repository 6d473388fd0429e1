"""select / reduce rules for Script and its ablations against float64 references."""

from __future__ import annotations

import pytest
import torch

import script_prune as sp
from tests import reference as ref

OWN_METHODS = ["script", "qcsp", "gsp", "qcrs", "gsp_qcrs", "random", "uniform", "script_released"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _inputs(n: int, seed: int, batch: int | None = None, d: int = 32, c: int = 12, m: int = 3):
    """Random features (N, D), image embeds (N, C), query (M, C); with a batch dim if ``batch``."""
    lead = () if batch is None else (batch,)
    feats = torch.randn(*lead, n, d, generator=_gen(seed))
    img = torch.randn(*lead, n, c, generator=_gen(seed + 1))
    query = torch.randn(m, c, generator=_gen(seed + 2))
    return feats, img, query


def _clustered(n: int, seed: int, d: int = 32) -> torch.Tensor:
    """Features with strong shared structure, so GSP degrees differ a lot."""
    base = torch.randn(4, d, generator=_gen(seed))
    assign = torch.arange(n) % 4
    return base[assign] + 0.6 * torch.randn(n, d, generator=_gen(seed + 50))


# --------------------------------------------------------------------------- script


@pytest.mark.parametrize(("n", "m", "rho", "seed"), [
    (20, 5, 0.5, 0), (21, 8, 0.5, 1), (17, 4, 0.3, 2), (16, 6, 1.0, 3), (15, 5, 0.0, 4), (13, 12, 0.5, 5),
])
def test_script_matches_reference(n: int, m: int, rho: float, seed: int) -> None:
    feats = _clustered(n, seed)
    _, img, query = _inputs(n, seed)
    got = sp.select(feats, m, "script", image_embeds=img, query_embeds=query, gsp_ratio=rho)
    assert got.dtype == torch.int64 and got.shape == (m,)
    assert got.tolist() == ref.script_select(feats, img, query, m, rho=rho)


def test_script_negate_and_tau_reach_the_math() -> None:
    feats = _clustered(19, 7)
    _, img, query = _inputs(19, 7)
    got = sp.select(feats, 5, image_embeds=img, query_embeds=query, negate=True, tau=0.4, gamma=2.0)
    assert got.tolist() == ref.script_select(feats, img, query, 5, tau=0.4, gamma=2.0, negate=True)


def test_script_rho0_is_qcsp_and_rho1_is_gsp() -> None:
    feats = _clustered(24, 11)
    _, img, query = _inputs(24, 11)
    kw = dict(image_embeds=img, query_embeds=query)
    qcsp = sp.select(feats, 7, "qcsp", **kw)
    assert sp.select(feats, 7, "script", gsp_ratio=0.0, **kw).tolist() == qcsp.tolist()
    r = torch.as_tensor(ref.relevance(img, query))
    kernel = torch.as_tensor(ref.cosine_matrix(feats)) * torch.outer(r, r)
    assert qcsp.tolist() == sorted(ref.dpp_greedy_slogdet(kernel, 7))
    gsp = sp.select(feats, 7, "gsp")
    assert sp.select(feats, 7, "script", gsp_ratio=1.0, **kw).tolist() == gsp.tolist()


# --------------------------------------------------------------------------- ablations


def test_gsp_is_least_redundant() -> None:
    feats = _clustered(23, 3)
    got = sp.select(feats, 9, "gsp", tau=0.3)
    assert got.tolist() == sorted(ref.stable_lowest(ref.redundancy(feats, 0.3, 1.0), 9))


def test_qcrs_is_top_relevance() -> None:
    feats, img, query = _inputs(18, 4)
    got = sp.select(feats, 6, "qcrs", image_embeds=img, query_embeds=query, negate=True)
    assert got.tolist() == sorted(ref.stable_highest(ref.relevance(img, query, True), 6))


def test_gsp_qcrs_walks_relevance_within_survivors() -> None:
    feats = _clustered(22, 8)
    _, img, query = _inputs(22, 8)
    got = sp.select(feats, 6, "gsp_qcrs", image_embeds=img, query_embeds=query)
    survivors = ref.gsp_survivors(feats, 6, 0.2, 1.0, 0.5)
    order = ref.stable_highest(ref.relevance(img, query), 22)
    assert got.tolist() == sorted([i for i in order if i in survivors][:6])


def test_uniform_formula_unique_ascending() -> None:
    for n, m in [(10, 3), (576, 64), (7, 6), (5, 1), (169, 16)]:
        got = sp.select(torch.zeros(n, 2), m, "uniform").tolist()
        assert got == [((2 * i + 1) * n) // (2 * m) for i in range(m)]
        assert len(set(got)) == m and got == sorted(got) and got[-1] < n
    assert sp.select(torch.zeros(10, 2), 3, "uniform").tolist() == [1, 5, 8]  # floor(5/3), floor(15/3), floor(25/3)


def test_random_reproducible_and_seeded() -> None:
    feats = torch.zeros(3, 40, 2)
    a = sp.select(feats, 10, "random")
    assert a.tolist() == sp.select(feats, 10, "random", seed=0).tolist()
    assert a[0].tolist() == sp.select(feats[0], 10, "random").tolist()
    assert len(set(a[0].tolist())) == 10 and a[0].tolist() == sorted(a[0].tolist())
    assert a.tolist() != sp.select(feats, 10, "random", seed=1).tolist()


def test_script_released_matches_step_list() -> None:
    for seed, m_seg in [(0, 1), (1, 2), (2, 5)]:
        feats, img, query = _inputs(17, 30 + seed, m=m_seg)
        got = sp.select(feats, 5, "script_released", image_embeds=img, query_embeds=query)
        assert got.tolist() == ref.released_select(feats, img, query, 5)


# --------------------------------------------------------------------------- general rules


@pytest.mark.parametrize("method", OWN_METHODS)
def test_batched_equals_one_by_one(method: str) -> None:
    feats, img, query = _inputs(19, 40, batch=3)  # odd N
    batched = sp.select(feats, 6, method, image_embeds=img, query_embeds=query)
    assert batched.shape == (3, 6) and batched.dtype == torch.int64
    for b in range(3):
        single = sp.select(feats[b], 6, method, image_embeds=img[b], query_embeds=query)
        assert batched[b].tolist() == single.tolist()
        assert batched[b].tolist() == sorted(set(batched[b].tolist()))


@pytest.mark.parametrize("method", OWN_METHODS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_same_picks(method: str, dtype: torch.dtype) -> None:
    # small integers are exact in fp16/bf16, so only the math precision could change the picks
    g = _gen(60)
    feats = torch.randint(-4, 5, (2, 21, 16), generator=g).float()
    img = torch.randint(-4, 5, (2, 21, 8), generator=g).float()
    query = torch.randint(-4, 5, (2, 3, 8), generator=g).float()
    want = sp.select(feats, 7, method, image_embeds=img, query_embeds=query)
    got = sp.select(feats.to(dtype), 7, method, image_embeds=img.to(dtype), query_embeds=query.to(dtype))
    assert got.tolist() == want.tolist()


@pytest.mark.parametrize("method", OWN_METHODS)
def test_budget_at_least_n_keeps_all_and_n1(method: str) -> None:
    feats, img, query = _inputs(9, 70, batch=2)
    for budget in (9, 12):
        got = sp.select(feats, budget, method, image_embeds=img, query_embeds=query)
        assert got.tolist() == [list(range(9))] * 2
    one = sp.select(feats[0, :1], 1, method, image_embeds=img[0, :1], query_embeds=query)
    assert one.tolist() == [0]


@pytest.mark.parametrize("method", OWN_METHODS)
def test_reduce_gives_reduction_without_merged(method: str) -> None:
    feats, img, query = _inputs(15, 80, batch=2)
    red = sp.reduce(feats, 4, method, image_embeds=img, query_embeds=query)
    assert isinstance(red, sp.Reduction) and red.merged is None
    assert red.indices.tolist() == sp.select(feats, 4, method, image_embeds=img, query_embeds=query).tolist()
    single = sp.reduce(feats[0], 4, method, image_embeds=img[0], query_embeds=query)
    assert single.indices.shape == (4,)


def test_budget_one_and_n_minus_one() -> None:
    feats = _clustered(12, 90)
    _, img, query = _inputs(12, 90)
    for m in (1, 11):
        got = sp.select(feats, m, image_embeds=img, query_embeds=query)
        assert got.tolist() == ref.script_select(feats, img, query, m)


def test_method_specs() -> None:
    assert set(OWN_METHODS) <= set(sp.list_methods())
    spec = sp.get_method("script")
    assert spec.inputs == ("image_embeds", "query_embeds")
    assert spec.params == {"tau": 0.2, "gamma": 1.0, "gsp_ratio": 0.5, "negate": False}
    assert spec.stage == "vision" and not spec.merges
    assert sp.get_method("random").params == {"seed": 0}
    assert sp.get_method("gsp").inputs == ()


def test_ties_go_to_lower_index() -> None:
    # identical tokens, N even (both sides have N/2 partners): equal redundancy everywhere,
    # and a constant relevance row (all ones)
    feats = torch.ones(8, 4)
    img = torch.ones(8, 3)
    query = torch.randn(2, 3, generator=_gen(1))
    kw = dict(image_embeds=img, query_embeds=query)
    assert sp.select(feats, 3, "gsp").tolist() == [0, 1, 2]
    assert sp.select(feats, 3, "qcrs", **kw).tolist() == [0, 1, 2]
    assert sp.select(feats, 3, "gsp_qcrs", **kw).tolist() == [0, 1, 2]
    # kernel of ones: rank one, exhausted after the first pick (index 0), then diagonal ties by index
    assert sp.select(feats, 3, "qcsp", **kw).tolist() == [0, 1, 2]
    assert sp.select(feats, 3, "script", **kw).tolist() == [0, 1, 2]
    assert ref.script_select(feats, img, query, 3) == [0, 1, 2]
    # odd N: src tokens have one partner fewer, so they are the less redundant ones
    assert sp.select(torch.ones(9, 4), 3, "gsp").tolist() == [0, 2, 4]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", [m for m in OWN_METHODS if m != "random"])
def test_cuda_matches_cpu(method: str) -> None:
    feats, img, query = _inputs(45, 100, batch=3)
    want = sp.select(feats, 9, method, image_embeds=img, query_embeds=query)
    got = sp.select(feats.cuda().half(), 9, method, image_embeds=img.cuda(), query_embeds=query.cuda())
    assert got.device.type == "cuda"
    want_half = sp.select(feats.half(), 9, method, image_embeds=img, query_embeds=query)
    assert got.cpu().tolist() == want_half.tolist()
    assert want.shape == got.shape


def test_kept_tokens_per_row_by_hand() -> None:
    # int: the count, capped at the row; fraction: floor(f * n) of the written decimal, at least 1
    assert [sp.kept_tokens(64, n) for n in (576, 64, 30)] == [64, 64, 30]
    assert [sp.kept_tokens(0.25, n) for n in (56, 24, 3)] == [14, 6, 1]
    assert sp.kept_tokens(0.29, 100) == 29
    with pytest.raises(ValueError, match="budget must be"):
        sp.kept_tokens(0, 10)

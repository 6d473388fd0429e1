"""Baseline methods (DivPrune, VisionZip, FastV, TRIM, CDPruner) against slow float64 references.

The references in tests/baseline_reference.py are written from each paper's description with explicit loops
(and numpy.percentile / numpy.linalg.slogdet as independent library implementations).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import script_prune.baselines as bl
from script_prune import registry as reg
from tests import baseline_reference as ref

SEEDS = (0, 1, 2)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().numpy()


# ---------------------------------------------------------------------------------------------- registry specs
def test_registered_specs_match_the_contract():
    expected = {
        "divprune": ((), "vision", False),
        "visionzip": (("cls_attention", "keys"), "vision", True),
        "fastv": (("scores",), "llm", False),
        "trim": (("image_embeds", "query_embeds"), "vision", True),
        "trim_iqr": (("image_embeds", "query_embeds"), "vision", True),
        "cdpruner": (("image_embeds", "query_embeds"), "vision", False),
    }
    for name, (inputs, stage, merges) in expected.items():
        spec = reg.get_method(name)
        assert (spec.inputs, spec.stage, spec.merges) == (inputs, stage, merges), name
        assert spec.paper and spec.description
    assert reg.get_method("fastv").params == {"layer": 2}
    assert reg.get_method("cdpruner").params == {"negate": True, "theta": None}


# ---------------------------------------------------------------------------------------------- DivPrune
@pytest.mark.parametrize("seed", SEEDS)
def test_divprune_pick_order_matches_reference(seed):
    g = _gen(seed)
    feats = torch.randn(3, 40, 16, generator=g)
    for budget in (1, 5, 17, 39):
        order = bl.divprune_select(feats, budget)
        for b in range(3):
            assert order[b].tolist() == ref.divprune_ref(_np(feats[b]), budget), (seed, budget, b)
        kept = reg.select(feats, budget, method="divprune")
        assert torch.equal(kept, order.sort(dim=-1).values)


def test_divprune_unbatched_and_low_precision_inputs():
    feats = torch.randn(30, 12, generator=_gen(7))
    want = sorted(ref.divprune_ref(_np(feats), 9))
    assert reg.select(feats, 9, method="divprune").tolist() == want
    assert reg.select(feats.double(), 9, method="divprune").tolist() == want


def test_divprune_first_pick_is_the_most_isolated_token():
    # Three tight pairs and one lone direction: the lone token has the largest nearest-neighbour distance.
    feats = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.05, 0.0], [0.0, 1.0, 0.0], [0.05, 1.0, 0.0],
                          [0.0, 0.0, 1.0], [0.0, 0.05, 1.0], [-1.0, -1.0, -1.0]])
    assert bl.divprune_select(feats.unsqueeze(0), 1).tolist() == [[6]]


# ---------------------------------------------------------------------------------------------- VisionZip
def test_visionzip_published_and_scaled_splits():
    assert bl.visionzip_split(64) == (54, 10)
    assert bl.visionzip_split(128) == (108, 20)
    assert bl.visionzip_split(192) == (162, 30)
    # other budgets keep the 10/64 contextual share, rounded half up, >= 1 contextual from budget 2 on
    assert bl.visionzip_split(16) == (13, 3)  # 2.5 -> 3
    assert bl.visionzip_split(32) == (27, 5)  # 5.0
    assert bl.visionzip_split(160) == (135, 25)
    assert bl.visionzip_split(320) == (270, 50)
    assert bl.visionzip_split(2) == (1, 1)
    assert bl.visionzip_split(1) == (1, 0)
    assert bl.visionzip_split(64, dominant=50) == (50, 14)
    assert bl.visionzip_split(64, contextual=4) == (60, 4)
    assert bl.visionzip_split(64, dominant=60, contextual=4) == (60, 4)
    with pytest.raises(ValueError, match="dominant \\+ contextual"):
        bl.visionzip_split(64, dominant=60, contextual=10)
    with pytest.raises(ValueError, match="dominant"):
        bl.visionzip_split(64, dominant=0)
    with pytest.raises(ValueError, match="contextual"):
        bl.visionzip_split(64, contextual=-1)


def _visionzip_inputs(seed: int, batch: int, n: int, d: int = 6, dk: int = 5):
    g = _gen(seed)
    return (torch.randn(batch, n, d, generator=g), torch.rand(batch, n, generator=g),
            torch.randn(batch, n, dk, generator=g))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("merge", ["mean", "released"])
def test_visionzip_matches_reference(seed, merge):
    feats, cls_att, keys = _visionzip_inputs(seed, 2, 90)
    for budget in (2, 16, 64, 89):
        red = reg.reduce(feats, budget, method="visionzip", cls_attention=cls_att, keys=keys, merge=merge)
        dom, ctx = bl.visionzip_split(budget)
        assert red.indices.shape == (2, dom) and red.merged.shape == (2, ctx, 6)
        for b in range(2):
            want_idx, want_merged, groups = ref.visionzip_ref(
                _np(feats[b]), _np(cls_att[b]), _np(keys[b]), dom, ctx, merge)
            assert red.indices[b].tolist() == want_idx
            assert sorted(i for grp in groups for i in grp) == [i for i in range(90) if i not in want_idx]
            np.testing.assert_allclose(red.merged[b].double().numpy(), np.stack(want_merged), rtol=1e-5, atol=1e-5)


def test_visionzip_merged_token_is_the_mean_of_its_group():
    # Hand-built: 6 tokens; token 0 dominant; remaining [1..5], 2 contextual -> targets at positions 0, 2 = tokens 1, 3.
    feats = torch.arange(6 * 2, dtype=torch.float32).view(6, 2)
    cls_att = torch.tensor([0.9, 0.1, 0.1, 0.1, 0.1, 0.1])
    keys = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [1.0, 0.05]])
    red = reg.reduce(feats, 3, method="visionzip", cls_attention=cls_att, keys=keys, dominant=1, contextual=2)
    assert red.indices.tolist() == [0]
    groups = [[1, 2, 5], [3, 4]]  # by key direction
    want = torch.stack([feats[g].mean(dim=0) for g in groups])
    assert torch.allclose(red.merged, want)


def test_visionzip_unbatched_and_overrides():
    feats, cls_att, keys = _visionzip_inputs(11, 1, 50)
    red = reg.reduce(feats[0], 20, method="visionzip", cls_attention=cls_att[0], keys=keys[0], dominant=12)
    want_idx, want_merged, _ = ref.visionzip_ref(_np(feats[0]), _np(cls_att[0]), _np(keys[0]), 12, 8, "mean")
    assert red.indices.tolist() == want_idx and red.merged.shape == (8, 6)
    np.testing.assert_allclose(red.merged.double().numpy(), np.stack(want_merged), rtol=1e-5, atol=1e-5)


def test_visionzip_errors():
    feats, cls_att, keys = _visionzip_inputs(0, 2, 30)
    with pytest.raises(ValueError, match="cls_attention"):
        reg.reduce(feats, 8, method="visionzip", keys=keys)
    with pytest.raises(ValueError, match="keys"):
        reg.reduce(feats, 8, method="visionzip", cls_attention=cls_att)
    with pytest.raises(ValueError, match="reduce"):
        reg.select(feats, 8, method="visionzip", cls_attention=cls_att, keys=keys)
    with pytest.raises(ValueError, match="cls_attention"):
        reg.reduce(feats, 8, method="visionzip", cls_attention=cls_att[:, :-1], keys=keys)
    with pytest.raises(ValueError, match="keys"):
        reg.reduce(feats, 8, method="visionzip", cls_attention=cls_att, keys=keys[:, :, 0])
    with pytest.raises(ValueError, match="merge"):
        reg.reduce(feats, 8, method="visionzip", cls_attention=cls_att, keys=keys, merge="sum")
    with pytest.raises(ValueError, match="dominant"):
        reg.reduce(feats, 8, method="visionzip", cls_attention=cls_att, keys=keys, dominant=9)


# ---------------------------------------------------------------------------------------------- FastV
@pytest.mark.parametrize("seed", SEEDS)
def test_fastv_keeps_the_most_attended_tokens(seed):
    g = _gen(seed)
    feats, scores = torch.randn(3, 25, 4, generator=g), torch.rand(3, 25, generator=g)
    for budget in (1, 7, 24):
        kept = reg.select(feats, budget, method="fastv", scores=scores)
        assert kept.tolist() == [ref.fastv_ref(_np(scores[b]), budget) for b in range(3)]
    assert reg.select(feats[1], 5, method="fastv", scores=scores[1]).tolist() == ref.fastv_ref(_np(scores[1]), 5)


def test_fastv_errors():
    feats = torch.randn(2, 10, 4)
    with pytest.raises(ValueError, match="scores"):
        reg.select(feats, 3, method="fastv")
    with pytest.raises(ValueError, match="scores"):
        reg.select(feats, 3, method="fastv", scores=torch.rand(2, 11))
    with pytest.raises(ValueError, match="layer"):
        reg.select(feats, 3, method="fastv", scores=torch.rand(2, 10), layer=-1)


# ---------------------------------------------------------------------------------------------- TRIM
def _clip_inputs(seed: int, batch: int, n: int, d: int = 6, c: int = 8, m: int = 3):
    g = _gen(seed)
    return (torch.randn(batch, n, d, generator=g), torch.randn(batch, n, c, generator=g),
            torch.randn(m, c, generator=g))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("negate,similarity", [(False, "cosine"), (True, "dot")])
def test_trim_budget_variant_matches_reference(seed, negate, similarity):
    feats, img, query = _clip_inputs(seed, 2, 36)
    for budget in (2, 9, 35):
        red = reg.reduce(feats, budget, method="trim", image_embeds=img, query_embeds=query,
                         negate=negate, similarity=similarity)
        assert red.indices.shape == (2, budget - 1) and red.merged.shape == (2, 1, 6)
        for b in range(2):
            scores = ref.trim_scores_ref(_np(img[b]), _np(query), negate, similarity)
            kept, mean_rest = ref.keep_and_average_ref(_np(feats[b]), scores, budget - 1)
            assert red.indices[b].tolist() == kept
            np.testing.assert_allclose(red.merged[b, 0].double().numpy(), mean_rest, rtol=1e-5, atol=1e-6)


def test_trim_scores_match_reference_and_budget_one():
    feats, img, query = _clip_inputs(5, 2, 20)
    scores = bl.trim_scores(img, query)
    for b in range(2):
        np.testing.assert_allclose(scores[b].double().numpy(), ref.trim_scores_ref(_np(img[b]), _np(query), False,
                                                                                   "cosine"), rtol=1e-5, atol=1e-7)
    red = reg.reduce(feats, 1, method="trim", image_embeds=img, query_embeds=query)
    assert red.merged is None and red.indices.tolist() == [[int(scores[b].argmax())] for b in range(2)]
    # per-sample query rows (B, M, C) give the same as a shared (M, C) query
    red_shared = reg.reduce(feats, 6, method="trim", image_embeds=img, query_embeds=query)
    red_batched = reg.reduce(feats, 6, method="trim", image_embeds=img, query_embeds=query.expand(2, -1, -1))
    assert torch.equal(red_shared.indices, red_batched.indices)


def _outlier_row(seed: int, n: int, n_out: int, c: int = 8):
    """Image embeddings with ``n_out`` tokens aligned to the query (clear similarity outliers)."""
    g = _gen(seed)
    query = torch.randn(1, c, generator=g)
    img = torch.randn(n, c, generator=g) * 0.3
    img[torch.randperm(n, generator=g)[:n_out]] = query[0] * 3.0 + 0.05 * torch.randn(n_out, c, generator=g)
    return img, query


@pytest.mark.parametrize("seed", SEEDS)
def test_trim_iqr_counts_and_selection_match_reference(seed):
    img, query = _outlier_row(seed, 40, 4)
    feats = torch.randn(40, 6, generator=_gen(seed + 100))
    scores = bl.trim_scores(img.unsqueeze(0), query)
    want_count = ref.iqr_count_ref(ref.trim_scores_ref(_np(img), _np(query), False, "cosine"))
    assert bl.iqr_outlier_counts(scores).tolist() == [want_count]
    assert want_count >= 4
    red = reg.reduce(feats, 20, method="trim_iqr", image_embeds=img, query_embeds=query)
    kept, mean_rest = ref.keep_and_average_ref(_np(feats), ref.trim_scores_ref(_np(img), _np(query), False, "cosine"),
                                               min(want_count, 19))
    assert red.indices.tolist() == kept
    np.testing.assert_allclose(red.merged[0].double().numpy(), mean_rest, rtol=1e-5, atol=1e-6)
    # the budget caps the adaptive count
    assert reg.reduce(feats, 3, method="trim_iqr", image_embeds=img, query_embeds=query).indices.shape == (2,)


def test_iqr_counts_against_numpy_percentile():
    g = _gen(3)
    scores = torch.rand(4, 31, generator=g) ** 6
    got = bl.iqr_outlier_counts(scores).tolist()
    assert got == [ref.iqr_count_ref(_np(scores[b]).tolist()) for b in range(4)]


def test_trim_iqr_batches():
    img, query = _outlier_row(0, 30, 3)
    feats = torch.randn(2, 30, 6, generator=_gen(9))
    same = reg.reduce(feats, 10, method="trim_iqr", image_embeds=img.expand(2, -1, -1), query_embeds=query)
    assert torch.equal(same.indices[0], same.indices[1])
    other, _ = _outlier_row(1, 30, 7)
    with pytest.raises(ValueError, match="one row at a time"):
        reg.reduce(feats, 10, method="trim_iqr", image_embeds=torch.stack([img, other]), query_embeds=query)


def test_trim_errors():
    feats, img, query = _clip_inputs(0, 2, 12)
    with pytest.raises(ValueError, match="query_embeds"):
        reg.reduce(feats, 4, method="trim", image_embeds=img)
    with pytest.raises(ValueError, match="image_embeds"):
        reg.reduce(feats, 4, method="trim", query_embeds=query)
    with pytest.raises(ValueError, match="similarity"):
        reg.reduce(feats, 4, method="trim", image_embeds=img, query_embeds=query, similarity="l2")
    with pytest.raises(ValueError, match="whisker"):
        reg.reduce(feats, 4, method="trim_iqr", image_embeds=img, query_embeds=query, whisker=-1.0)
    with pytest.raises(ValueError, match="reduce"):
        reg.select(feats, 4, method="trim", image_embeds=img, query_embeds=query)


# ---------------------------------------------------------------------------------------------- CDPruner
def test_cdpruner_relevance_golden_values():
    # cos to the query: 1, 0, 1/sqrt(2); negated -1, 0, -0.7071; min-max with +1e-6 in the numerator.
    img = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    query = torch.tensor([[2.0, 0.0]])
    rel = bl.cdpruner_relevance(img, query)
    want = [1e-6, 1.0 + 1e-6, 1.0 - 1.0 / math.sqrt(2.0) + 1e-6]
    assert torch.allclose(rel[0].double(), torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=1e-7)
    theta = 0.5  # alpha = 0.5
    assert torch.allclose(bl.cdpruner_relevance(img, query, theta=theta)[0].double(),
                          torch.tensor([math.exp(0.5 * w) for w in want], dtype=torch.float64), rtol=1e-6)
    assert torch.equal(bl.cdpruner_relevance(img[:, :1].expand(1, 3, 2), query), torch.ones(1, 3))


@pytest.mark.parametrize("seed", SEEDS)
def test_cdpruner_pick_order_matches_determinant_greedy(seed):
    feats, img, query = _clip_inputs(seed, 2, 20, d=32)
    for budget in (1, 6, 12):
        order = bl.cdpruner_select(feats, budget, img, query.unsqueeze(0).expand(2, -1, -1))
        for b in range(2):
            assert order[b].tolist() == ref.cdpruner_ref(_np(feats[b]), _np(img[b]), _np(query), budget), (seed, budget)
        kept = reg.select(feats, budget, method="cdpruner", image_embeds=img, query_embeds=query)
        assert torch.equal(kept, order.sort(dim=-1).values)


def test_cdpruner_params_and_unbatched():
    feats, img, query = _clip_inputs(4, 1, 18, d=24)
    for negate, theta in ((False, None), (True, 0.5)):
        want = sorted(ref.cdpruner_ref(_np(feats[0]), _np(img[0]), _np(query), 7, negate=negate, theta=theta))
        got = reg.select(feats[0], 7, method="cdpruner", image_embeds=img[0], query_embeds=query,
                         negate=negate, theta=theta)
        assert got.tolist() == want


def test_cdpruner_errors():
    feats, img, query = _clip_inputs(0, 2, 12)
    with pytest.raises(ValueError, match="query_embeds"):
        reg.select(feats, 4, method="cdpruner", image_embeds=img)
    with pytest.raises(ValueError, match="image_embeds"):
        reg.select(feats, 4, method="cdpruner", query_embeds=query)
    with pytest.raises(ValueError, match="theta"):
        reg.select(feats, 4, method="cdpruner", image_embeds=img, query_embeds=query, theta=1.0)
    with pytest.raises(ValueError, match="unknown parameter"):
        reg.select(feats, 4, method="cdpruner", image_embeds=img, query_embeds=query, alpha=0.3)


def test_budget_at_least_n_keeps_everything():
    feats, cls_att, keys = _visionzip_inputs(0, 2, 10)
    assert reg.select(feats, 10, method="divprune").tolist() == [list(range(10))] * 2
    red = reg.reduce(feats, 12, method="visionzip", cls_attention=cls_att, keys=keys)
    assert red.indices.tolist() == [list(range(10))] * 2 and red.merged is None

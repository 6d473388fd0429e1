"""Every bad input gives a ValueError naming the argument; registry rules."""

from __future__ import annotations

import re

import pytest
import torch

import script_prune as sp
from script_prune import registry


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture()
def data():
    feats = torch.randn(2, 10, 8, generator=_gen(0))
    img = torch.randn(2, 10, 4, generator=_gen(1))
    query = torch.randn(3, 4, generator=_gen(2))
    return feats, img, query


def _raises(match: str):
    return pytest.raises(ValueError, match=re.escape(match))


@pytest.mark.parametrize("budget", [0, -3])
def test_budget_below_one(data, budget) -> None:
    feats, img, query = data
    with _raises("budget must be >= 1"):
        sp.select(feats, budget, image_embeds=img, query_embeds=query)


@pytest.mark.parametrize("budget", [2.5, True, "4", None])
def test_budget_not_an_integer(data, budget) -> None:
    feats, img, query = data
    with _raises("budget must be an integer"):
        sp.select(feats, budget, image_embeds=img, query_embeds=query)


@pytest.mark.parametrize(("name", "bad"), [("features", float("nan")), ("image_embeds", float("inf")),
                                           ("query_embeds", float("-inf")), ("features", float("inf"))])
def test_nan_inf(data, name, bad) -> None:
    tensors = dict(zip(("features", "image_embeds", "query_embeds"), (t.clone() for t in data)))
    tensors[name].view(-1)[3] = bad
    with _raises(f"{name} contains NaN or inf"):
        sp.select(tensors["features"], 4, image_embeds=tensors["image_embeds"], query_embeds=tensors["query_embeds"])


def test_nan_in_public_scoring_functions() -> None:
    x = torch.randn(5, 3)
    x[2, 1] = float("nan")
    with _raises("features contains NaN or inf"):
        sp.redundancy_scores(x)
    with _raises("image_embeds contains NaN or inf"):
        sp.query_relevance(x, torch.randn(2, 3))
    with _raises("kernel contains NaN or inf"):
        sp.dpp_greedy(torch.outer(x[:, 1], x[:, 1]), 2)


def test_mismatched_shapes(data) -> None:
    feats, img, query = data
    with _raises("image_embeds must have (B, N) = (2, 10)"):
        sp.select(feats, 4, image_embeds=img[:, :9], query_embeds=query)
    with _raises("image_embeds must have (B, N) = (2, 10)"):
        sp.select(feats, 4, image_embeds=img[:1], query_embeds=query)
    with _raises("image_embeds must be 2-D"):
        sp.select(feats[0], 4, image_embeds=img, query_embeds=query)
    with _raises("query_embeds must have C=4 channels"):
        sp.select(feats, 4, image_embeds=img, query_embeds=torch.randn(3, 5))
    with _raises("query_embeds must be (M, C) or (B, M, C) with batch size 2"):
        sp.select(feats, 4, image_embeds=img, query_embeds=torch.randn(3, 2, 4))
    with _raises("query_embeds must have at least one row"):
        sp.select(feats, 4, image_embeds=img, query_embeds=torch.randn(0, 4))
    with _raises("features must be 2-D or 3-D"):
        sp.select(feats[0, 0], 4, "uniform")
    with _raises("features must be 2-D or 3-D"):
        sp.select(feats[None], 4, "uniform")
    with _raises("features must have at least one token"):
        sp.select(torch.zeros(0, 3), 1, "uniform")
    with _raises("query_embeds must have C=4 channels"):
        sp.query_relevance(img, torch.randn(2, 3))


def test_wrong_types(data) -> None:
    feats, img, query = data
    with _raises("features must be a torch.Tensor"):
        sp.select(feats.numpy(), 4, "uniform")
    with _raises("features must be a floating-point tensor"):
        sp.select(feats.long(), 4, "uniform")
    with _raises("image_embeds must be a torch.Tensor"):
        sp.select(feats, 4, image_embeds=[1.0], query_embeds=query)


def test_missing_input(data) -> None:
    feats, img, _ = data
    with _raises("method 'script' needs the input query_embeds"):
        sp.select(feats, 4, image_embeds=img)
    with _raises("method 'qcrs' needs the input image_embeds"):
        sp.select(feats, 4, "qcrs", query_embeds=torch.randn(2, 4))


def test_unknown_method(data) -> None:
    with _raises("method must be one of"):
        sp.select(data[0], 4, "scirpt")
    with _raises("method must be one of"):
        sp.get_method("nope")


def test_unknown_or_bad_param(data) -> None:
    feats, img, query = data
    kw = dict(image_embeds=img, query_embeds=query)
    with _raises("unknown parameter 'rho' for method 'script'"):
        sp.select(feats, 4, rho=0.5, **kw)
    with _raises("unknown parameter 'seed' for method 'uniform'"):
        sp.select(feats, 4, "uniform", seed=1)
    with _raises("parameter 'tau' of method 'script' must be a finite number"):
        sp.select(feats, 4, tau=float("nan"), **kw)
    with _raises("parameter 'negate' of method 'script' must be a bool"):
        sp.select(feats, 4, negate=1, **kw)
    with _raises("parameter 'seed' of method 'random' must be an int"):
        sp.select(feats, 4, "random", seed=1.5)
    with _raises("gsp_ratio must be in [0, 1]"):
        sp.select(feats, 4, gsp_ratio=1.5, **kw)
    with _raises("tau must be in [-1, 1]"):
        sp.select(feats, 4, "gsp", tau=1.2, validate=False)  # ranges are host checks: the trusted path keeps them
    with _raises("gamma must be >= 0"):
        sp.select(feats, 4, gamma=-1.0, **kw)
    with _raises("tau must be a finite number"):
        sp.redundancy_scores(feats, tau=float("inf"))
    with _raises("negate must be a bool"):
        sp.query_relevance(img, query, negate="yes")


def test_dpp_greedy_errors() -> None:
    kernel = torch.eye(4)
    with _raises("k must be <= N = 4, got 5"):
        sp.dpp_greedy(kernel, 5)
    with _raises("k must be >= 1"):
        sp.dpp_greedy(kernel, 0)
    with _raises("kernel must be square"):
        sp.dpp_greedy(torch.ones(3, 4), 2)
    with _raises("kernel must be symmetric"):
        sp.dpp_greedy(torch.tensor([[1.0, 0.5], [0.0, 1.0]]), 1)
    with _raises("kernel must be 2-D or 3-D"):
        sp.dpp_greedy(torch.ones(4), 1)


@pytest.fixture()
def scratch_registry(monkeypatch):
    """Registrations inside a test go to a copy of the registry that is discarded afterwards."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def test_register_rules(scratch_registry) -> None:
    @sp.register_method("_t_first", params={"w": 1})
    def first(features, budget, w):
        return torch.arange(budget).expand(features.shape[0], -1)

    assert "_t_first" in sp.list_methods()
    assert sp.get_method("_t_first").fn is first
    assert sp.select(torch.zeros(5, 2), 2, "_t_first", w=3).tolist() == [0, 1]
    with _raises("method '_t_first' is already registered"):
        sp.register_method("_t_first")(first)
    with _raises("stage must be one of"):
        sp.register_method("_t_bad", stage="gpu")
    with _raises("both inputs and params"):
        sp.register_method("_t_bad", inputs=("x",), params={"x": 1})


def test_merging_method_needs_reduce(scratch_registry) -> None:
    @sp.register_method("_t_merge", merges=True)
    def merge(features, budget):
        keep = torch.arange(budget - 1, -1, -1).expand(features.shape[0], -1)
        return sp.Reduction(keep, features[:, :1] * 0 + 7)

    with _raises("call script_prune.reduce"):
        sp.select(torch.zeros(2, 6, 3), 3, "_t_merge")
    red = sp.reduce(torch.zeros(2, 6, 3), 3, "_t_merge")
    assert red.indices.tolist() == [[0, 1, 2]] * 2  # sorted by the wrapper
    assert red.merged.shape == (2, 1, 3)
    single = sp.reduce(torch.zeros(6, 3), 3, "_t_merge")
    assert single.indices.tolist() == [0, 1, 2] and single.merged.shape == (1, 3)


def test_broken_method_output_is_caught(scratch_registry) -> None:
    @sp.register_method("_t_dupes")
    def dupes(features, budget):
        return torch.zeros(features.shape[0], budget, dtype=torch.long)

    @sp.register_method("_t_short")
    def short(features, budget):
        return torch.arange(budget - 1).expand(features.shape[0], -1)

    @sp.register_method("_t_range")
    def out_of_range(features, budget):
        return torch.arange(budget).expand(features.shape[0], -1) + features.shape[1] - 1

    with pytest.raises(RuntimeError, match="out-of-range"):
        sp.select(torch.zeros(6, 3), 3, "_t_range")
    with pytest.raises(RuntimeError, match="repeated"):
        sp.select(torch.zeros(6, 3), 3, "_t_dupes")
    with pytest.raises(RuntimeError, match="expected 3"):
        sp.select(torch.zeros(6, 3), 3, "_t_short")


def test_other_inputs_get_batched(scratch_registry) -> None:
    seen = {}

    @sp.register_method("_t_scores", inputs=("scores",))
    def by_score(features, budget, scores):
        seen["shape"] = tuple(scores.shape)
        return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :budget]

    assert sp.select(torch.zeros(4, 2), 2, "_t_scores", scores=torch.tensor([0.1, 0.9, 0.5, 0.2])).tolist() == [1, 2]
    assert seen["shape"] == (1, 4)
    with _raises("scores must have batch size 2"):
        sp.select(torch.zeros(2, 4, 2), 2, "_t_scores", scores=torch.zeros(3, 4))
    with _raises("method '_t_scores' needs the input scores"):
        sp.select(torch.zeros(2, 4, 2), 2, "_t_scores")

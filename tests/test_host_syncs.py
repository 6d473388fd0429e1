"""script_prune.counting sees every kind of host sync and launch it claims to, and nothing else; select's value
checks cost one host sync, and the trusted path (validate=False) none wherever the method itself needs none."""

from __future__ import annotations

import pytest
import torch

import script_prune as sp
from script_prune import core, counting, fused, registry
from script_prune.counting import count_ops


def test_counts_each_kind_of_host_sync() -> None:
    x = torch.arange(12.0).view(3, 4)
    mask = x > 5
    cases = {
        "item": lambda: x.sum().item(),
        "bool": lambda: bool(x[0, 0] > 0),
        "int": lambda: int(x.argmax()),
        "tolist": lambda: x.tolist(),
        "numpy": lambda: x.numpy(),
        "nonzero": lambda: x.nonzero(),
        "mask index": lambda: x[mask],
        "mask assign": lambda: x.clone().__setitem__(mask, 0.0),
        "masked_select": lambda: x.masked_select(mask),
        "equal": lambda: torch.equal(x, x),
        "unique": lambda: torch.unique(x),
    }
    for name, fn in cases.items():
        with count_ops() as counts:
            fn()
        assert counts.syncs >= 1, name


def test_views_and_allocations_are_not_launches_and_compute_is() -> None:
    x = torch.randn(4, 6)
    with count_ops() as counts:
        y = x.view(6, 4).transpose(0, 1)[1:, ::2].unsqueeze(0).expand(2, -1, -1)
        torch.empty(3)
        x.new_empty(5)
    assert counts.launches == 0 and counts.syncs == 0
    with count_ops() as counts:
        z = (x * 2).sum(dim=1)
        torch.gather(x, 1, torch.zeros(4, 1, dtype=torch.long))
    assert counts.launch_ops == {"mul": 1, "sum": 1, "zeros": 1, "gather": 1}
    assert counts.syncs == 0
    assert y.shape == (2, 3, 3) and z.shape == (4,)


def test_integer_index_is_not_a_sync_and_patches_are_undone() -> None:
    x = torch.randn(5, 3)
    with count_ops() as counts:
        x[torch.tensor([0, 2])]
    assert counts.syncs == 0
    assert "tolist" not in torch.Tensor.__dict__ and "numpy" not in torch.Tensor.__dict__
    assert x.tolist() == x.tolist()


def test_fused_launch_counts_once_and_hides_what_runs_inside() -> None:
    x = torch.randn(8)
    with count_ops() as counts:
        with counting.fused_launch("k"):
            (x + 1).tolist()
            bool(x.sum() > 0)
    assert counts.launch_ops == {"triton:k": 1} and counts.syncs == 0


def test_first_kept_is_sync_free_and_matches_mask_indexing() -> None:
    g = torch.Generator().manual_seed(0)
    order = torch.stack([torch.randperm(30, generator=g) for _ in range(4)])
    keep = torch.rand(4, 30, generator=g) < 0.5
    keep[:, :7] = True
    kept = torch.gather(keep, 1, order)
    want = order[kept & (torch.cumsum(kept, dim=1) <= 7)].view(4, 7)  # the boolean-mask way
    with count_ops() as counts:
        got = core.first_kept(order, keep, 7)
    assert counts.syncs == 0
    assert torch.equal(got, want)


@pytest.mark.parametrize("method", ["qcsp", "cdpruner", "gsp", "qcrs", "gsp_qcrs", "uniform", "script_released"])
def test_trusted_torch_path_has_no_sync_validated_one(method: str) -> None:
    g = torch.Generator().manual_seed(1)
    feats, img, query = torch.randn(2, 30, 8, generator=g), torch.randn(2, 30, 6, generator=g), torch.randn(3, 6)
    with fused.greedy_backend("torch"):
        with count_ops() as trusted:
            a = sp.select(feats, 5, method, image_embeds=img, query_embeds=query, validate=False)
        with count_ops() as checked:
            b = sp.select(feats, 5, method, image_embeds=img, query_embeds=query)
    assert trusted.syncs == 0, trusted.sync_ops
    assert checked.syncs == 1, checked.sync_ops
    assert torch.equal(a, b)


def test_script_torch_path_syncs_once_per_chunk_only() -> None:
    # the CPU path's early stop reads "every row done?" once per chunk of steps; nothing else syncs
    g = torch.Generator().manual_seed(2)
    feats, img, query = torch.randn(1, 120, 130, generator=g), torch.randn(1, 120, 6, generator=g), torch.randn(2, 6)
    with fused.greedy_backend("torch"), count_ops() as counts:
        sp.select(feats, 16, image_embeds=img, query_embeds=query, validate=False)
    assert set(counts.sync_ops) == {"_local_scalar_dense"}
    assert 1 <= counts.syncs <= 8


@pytest.fixture()
def scratch_registry(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def test_input_error_wins_over_a_method_failing_on_it(scratch_registry) -> None:
    # the value checks are read after the method ran; a NaN input is still the error the caller sees
    @sp.register_method("_t_fragile")
    def fragile(features, budget):
        if not bool(torch.isfinite(features).all()):
            raise RuntimeError("cannot handle NaN")
        return torch.arange(budget).expand(features.shape[0], -1)

    x = torch.zeros(2, 6, 3)
    assert sp.select(x, 2, "_t_fragile").tolist() == [[0, 1]] * 2
    x[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="features contains NaN or inf"):
        sp.select(x, 2, "_t_fragile")
    with pytest.raises(RuntimeError, match="cannot handle NaN"):
        sp.select(x, 2, "_t_fragile", validate=False)


def test_trusted_path_skips_the_output_check_and_validated_path_keeps_it(scratch_registry) -> None:
    @sp.register_method("_t_dupes2")
    def dupes(features, budget):
        return torch.zeros(features.shape[0], budget, dtype=torch.long)

    with pytest.raises(RuntimeError, match="repeated"):
        sp.select(torch.zeros(2, 6, 3), 3, "_t_dupes2")
    assert sp.select(torch.zeros(2, 6, 3), 3, "_t_dupes2", validate=False).tolist() == [[0, 0, 0]] * 2
    with pytest.raises(ValueError, match="validate must be a bool"):
        sp.select(torch.zeros(2, 6, 3), 3, "uniform", validate=1)
    assert sp.reduce(torch.zeros(6, 3), 3, "uniform", validate=False).indices.tolist() == [1, 3, 5]

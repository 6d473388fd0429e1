"""The benchmark CLI runs end to end on tiny cases and reports sane numbers (speed goals are not tested)."""

from __future__ import annotations

import json

import pytest
import torch

from script_prune import bench


def test_bench_main_writes_table_and_json(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(bench, "CASES", (bench.BenchCase(2, 40, 16, 8), bench.BenchCase(1, 31, 8, 5)))
    out = tmp_path / "sub" / "bench.json"
    assert bench.main(["--methods", "script", "uniform", "--json", str(out), "--min-repeats", "2",
                       "--budget-s", "0"]) == 0
    table = capsys.readouterr().out
    assert "script" in table and "median ms" in table
    payload = json.loads(out.read_text())
    assert payload["device"] == "cpu" and len(payload["rows"]) == 4
    script = payload["rows"][0]
    assert (script["B"], script["N"], script["method"]) == (2, 40, "script")
    assert script["median_ms"] > 0 and script["repeats"] >= 2
    # the Gram matrix alone is B * N * N float32 values, a lower bound on script's peak
    assert script["peak_extra_mib"] * 2**20 >= 2 * 40 * 40 * 4


def test_bench_skips_methods_without_synthetic_inputs(monkeypatch) -> None:
    case = bench.BenchCase(1, 10, 4, 3)
    tensors = bench.synthetic_inputs(case, torch.device("cpu"))
    del tensors["scores"]
    row = bench.bench_one("fastv", case, tensors, torch.device("cpu"), 1, 0.0)
    assert row.median_ms is None and "scores" in row.note


@pytest.mark.parametrize("args", [["--methods", "nope"], ["--cases", "9"], ["--device", "tpu"]])
def test_bench_bad_arguments(args) -> None:
    with pytest.raises(SystemExit):
        bench.main(args)


def test_bench_methods_accept_commas_like_the_other_tools(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(bench, "CASES", (bench.BenchCase(1, 20, 8, 4),))
    out = tmp_path / "bench.json"
    assert bench.main(["--methods", "script,uniform", "gsp", "--json", str(out), "--min-repeats", "1",
                       "--budget-s", "0"]) == 0
    assert [row["method"] for row in json.loads(out.read_text())["rows"]] == ["script", "uniform", "gsp"]
    with pytest.raises(SystemExit):
        bench.main(["--methods", "script,nope"])


def test_bench_reports_launches_and_syncs_per_call(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(bench, "CASES", (bench.BenchCase(2, 40, 48, 8),))
    out = tmp_path / "bench.json"
    assert bench.main(["--methods", "script", "qcsp", "--json", str(out), "--min-repeats", "1", "--budget-s", "0",
                       "--greedy", "torch", "--dtype", "float16"]) == 0
    payload = json.loads(out.read_text())
    assert payload["dtype"] == "float16" and payload["greedy_backend"] == "torch" and payload["validate"] is True
    assert "counting" in payload["launch_method"] and "counting" in payload["sync_method"]
    script, qcsp = payload["rows"]
    # validated call: one sync for the value checks; the torch walk of script adds its per-chunk reads
    assert qcsp["syncs"] == 1 and script["syncs"] >= 2
    # the torch greedy launches ~8 kernels per step; the fused CUDA path (meta dry run) a few dozen in all
    assert qcsp["launches"] > 8 * 8 and qcsp["launches_cuda_path"] < 50
    assert script["greedy"] == "torch"


def test_bench_trusted_path_has_no_syncs_for_qcsp(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(bench, "CASES", (bench.BenchCase(1, 30, 40, 5),))
    out = tmp_path / "bench.json"
    assert bench.main(["--methods", "qcsp", "uniform", "--json", str(out), "--min-repeats", "1", "--budget-s", "0",
                       "--trusted"]) == 0
    payload = json.loads(out.read_text())
    assert payload["validate"] is False
    assert [row["syncs"] for row in payload["rows"]] == [0, 0]


def test_bench_bad_greedy_and_dtype() -> None:
    for args in (["--greedy", "cuda"], ["--dtype", "int8"]):
        with pytest.raises(SystemExit):
            bench.main(args)

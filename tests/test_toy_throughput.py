"""llava.toy.throughput: rows and JSON of a small run of the toy model (the numbers are a benchmark's, not
checked), the batch-1 reference and the argument checks."""
from __future__ import annotations

import json

import pytest

from llava.toy import throughput


def test_small_run_rows_json_and_table(tmp_path):
    out = tmp_path / "t.json"
    rows = throughput.main(["--data", str(tmp_path / "data"), "--methods", "script,fastv", "--batch-sizes", "3",
                            "--questions", "5", "--max-new-tokens", "4", "--device", "cpu", "--json", str(out)])
    # batch 1 is always measured first: it is the reference of the speedup and of the answers
    assert [(r["method"], r["batch_size"]) for r in rows] == [("script", 1), ("script", 3), ("fastv", 1), ("fastv", 3)]
    for r in rows:
        assert r["questions"] == 5 and r["questions_per_s"] == pytest.approx(5 / r["seconds"], rel=1e-2)
        assert r["same_as_batch_1"] is True      # greedy, float32: batch 3 (3 + 2) answers as batch 1
    assert rows[0]["speedup_vs_batch_1"] == 1.0
    payload = json.loads(out.read_text())
    assert payload["rows"] == rows and payload["device"] == "cpu" and payload["dtype"] == "float32"
    assert payload["table"].splitlines()[2].startswith("| script | 16 | 1 |")


@pytest.mark.parametrize("argv, message", [
    (["--batch-sizes", "1,x"], "--batch-sizes: expected comma-separated integers"),
    (["--batch-sizes", "0"], "--batch-sizes: expected integers >= 1"),
    (["--methods", "nope"], "--methods: unknown"),
    (["--questions", "0"], "--questions: expected an int >= 1"),
])
def test_bad_arguments(argv, message):
    with pytest.raises(ValueError, match=message):
        throughput.main(argv)

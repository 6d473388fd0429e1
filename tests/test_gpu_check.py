"""scripts/gpu_check.sh: the dry run on a machine without CUDA, the step machinery (failures, timeouts, the time
budget) with stand-in commands, and the report read from the real output formats of the tools it runs."""
from __future__ import annotations

import json
import os
import stat
import shlex
import subprocess
import sys
from pathlib import Path

import torch
from llava.eval import efficiency

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"
STEPS = ["env", "cuda_tests", "bench_torch", "bench_fused", "efficiency_sdpa", "toy_throughput", "efficiency_flash"]


def _run(out: Path, env: dict | None = None, timeout: int = 400) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    if "GPU_CHECK_BUDGET_S" not in (env or {}):
        full.pop("GPU_CHECK_BUDGET_S", None)
    if torch.cuda.is_available() and "PYTHON" not in (env or {}):
        full["GPU_CHECK_DRY_RUN"] = "1"     # on a CUDA machine the dry run has to be asked for
    return subprocess.run(["bash", str(SCRIPT), str(out)], env=full, capture_output=True, text=True, timeout=timeout)


def test_dry_run_without_cuda_prints_the_commands_and_exits_0(tmp_path):
    out = tmp_path / "out dir"
    res = _run(out)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert "dry run" in lines[0]
    shown = {line.split("]")[0].strip(" [") : line for line in lines if line.startswith("  [")}
    assert list(shown) == STEPS + ["report"]
    assert "-m pytest" in shown["cuda_tests"] and "-k cuda" in shown["cuda_tests"]
    for name in ("bench_torch", "bench_fused"):   # the paper's shapes: 1 image, 5 NeXT crops, 64 video frames
        assert "-m script_prune.bench --device cuda" in shown[name] and "--cases 0 2 3" in shown[name]
    assert "--greedy torch" in shown["bench_torch"] and "--trusted" not in shown["bench_torch"]
    assert "--greedy auto --trusted --dtype float16" in shown["bench_fused"]
    for name, attn in (("efficiency_sdpa", "sdpa"), ("efficiency_flash", "flash_attention_2")):
        assert "-m llava.eval.efficiency --random-weights --shape llava-v1.6-vicuna-7b --device cuda --dtype float16" \
            in shown[name] and "--layers" not in shown[name]        # all 32 layers
        # every flag the script passes is one the tool takes (its parser, not a copy of its flag list)
        args = shlex.split(shown[name].split("-m llava.eval.efficiency", 1)[1])
        parsed = efficiency.build_parser().parse_args(args)
        assert parsed.attn_implementation == attn and parsed.random_weights
        assert {"script", "fastv", "sparsevlm", "pdrop"} <= set(parsed.methods.split(","))
    assert "--batch-sizes 1,8,32" in shown["toy_throughput"] and "--device cuda" in shown["toy_throughput"]
    assert f"'{out}/bench_fused.json'" in shown["bench_fused"]      # a path with a space, quoted to paste
    assert not out.exists()                                          # nothing written


def test_usage_and_budget_errors(tmp_path):
    res = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "usage: bash scripts/gpu_check.sh OUT_DIR" in res.stderr
    res = _run(tmp_path / "o", {"GPU_CHECK_BUDGET_S": "soon"})
    assert res.returncode == 2 and "GPU_CHECK_BUDGET_S must be a positive integer" in res.stderr


FAKE_PYTHON = """#!/usr/bin/env bash
# Stand-in interpreter: says CUDA and flash_attn are there, fails the tests, hangs in the bench.
case " $* " in
  *" -c "*) echo "1 1"; exit 0 ;;
  *" --env "*) printf '{{"torch": "stand-in"}}' > "${{@: -1}}"; exit 0 ;;
  *gpu_check_report.py*) exec "{real}" "$@" ;;
  *" --help "*) exit 0 ;;
  *" -m pytest "*) printf '<testsuite><testcase classname="t" name="ok"/><testcase classname="t" name="bad"><failure/></testcase></testsuite>' > "${{@: -1}}"; exit 1 ;;
  *script_prune.bench*) exec sleep 300 ;;
esac
exit 0
"""


def test_steps_failures_timeouts_and_the_time_budget(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON.format(real=sys.executable))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "out"
    # 30 s in all, 15 kept for the report: the hanging bench gets what is left (< 15 s) and is killed
    res = _run(out, {"PYTHON": str(fake), "GPU_CHECK_BUDGET_S": "30"})
    assert res.returncode == 1, res.stderr
    status = {row.split("\t")[0]: row.split("\t")[1] for row in (out / "steps.tsv").read_text().splitlines()[1:]}
    assert status == {"env": "ok", "cuda_tests": "failed", "bench_torch": "timeout", "bench_fused": "skipped",
                      "efficiency_sdpa": "skipped", "toy_throughput": "skipped", "efficiency_flash": "skipped"}
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["cuda_tests"] == {"passed": 1, "failed": 1, "errors": 0, "skipped": 0, "failures": ["t::bad"]}
    assert report["env"] == {"torch": "stand-in"}
    md = (out / "gpu_check.md").read_text()
    assert "CUDA tests: 1 passed, 1 failed" in md and "| bench_torch | timeout |" in md
    assert "no time left in the 30s budget" in md
    assert "steps that did not finish: cuda_tests, bench_torch" in res.stderr


def test_report_reads_the_tools_own_output(tmp_path):
    """The bench's JSON (a real CPU run of case 0) and the efficiency tool's JSON (--flops-only) in the report."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-m", "script_prune.bench", "--device", "cpu", "--cases", "0", "--methods", "script",
                    "--min-repeats", "1", "--budget-s", "0", "--json", str(tmp_path / "bench_torch.json")],
                   env=env, check=True, capture_output=True, timeout=300)
    subprocess.run([sys.executable, "-m", "llava.eval.efficiency", "--flops-only", "--shape", "llava-v1.6-vicuna-7b",
                    "--methods", "script", "--budgets", "64", "--json", str(tmp_path / "efficiency_sdpa.json")],
                   env=env, check=True, capture_output=True, timeout=300)
    (tmp_path / "steps.tsv").write_text("step\tstatus\trc\tseconds\tlog\tnote\nbench_torch\tok\t0\t3\tbench_torch.log\t\n")
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check_report.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    bench = json.loads((tmp_path / "bench_torch.json").read_text())["rows"][0]
    md = (tmp_path / "gpu_check.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| LLaVA-1.5, 1 image |"))
    assert f"| {bench['median_ms']:.3f} |" in row and f"| {bench['syncs']} |" in row and "| torch walk, validating |" in row
    assert f"| {1000 * bench['median_ms'] / 64:.1f} |" in row          # per greedy step: the call over its k = 64 steps
    assert "| sdpa | unpruned | 2880 |" in md and "| sdpa | script | 320 |" in md
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [r["method"] for r in report["efficiency"]] == ["none", "script"]
    assert report["steps"][0]["status"] == "ok" and report["toy_throughput"] is None

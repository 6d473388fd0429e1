"""scripts/video/eval.sh and scripts/internvl3/eval.sh wiring, with a stand-in for lmms-eval (PYTHON= a wrapper
that records the launch command and writes a canned results file where lmms-eval would; the table step runs the
real llava.lmms.table): the command carries METHOD, the per-row budget, BATCH and the cache; the table and the
summary rows follow."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

WRAPPER = """#!/usr/bin/env bash
# stand-in: record lmms-eval launches and write a results file; everything else runs the real interpreter
if [ "$1" = "-m" ] && [ "$2" = "accelerate.commands.launch" ]; then
    printf '%s\\n' "$*" >> "$LAUNCH_LOG"
    out=""; prev=""
    for a in "$@"; do [ "$prev" = "--output_path" ] && out=$a; prev=$a; done
    mkdir -p "$out/model" && cat "$CANNED" > "$out/model/20260101_000000_results.json"
    exit 0
fi
if [ "$1" = "-c" ] && [ "$2" = "import lmms_eval" ]; then exit 0; fi
exec "$REAL_PYTHON" "$@"
"""


def run_script(tmp_path, script, tokens, canned, **env):
    wrapper = tmp_path / "python"
    wrapper.write_text(WRAPPER)
    wrapper.chmod(0o755)
    (tmp_path / "canned.json").write_text(canned)
    full = {**os.environ, "PYTHON": str(wrapper), "REAL_PYTHON": sys.executable, "LAUNCH_LOG": str(tmp_path / "log"),
            "CANNED": str(tmp_path / "canned.json"), "RESULTS_DIR": str(tmp_path / "results"), "NUM_PROCESSES": "2",
            **env}
    return subprocess.run(["bash", str(ROOT / script), *tokens], env=full, capture_output=True, text=True, timeout=300)


def test_video_script_passes_the_budget_and_builds_the_table(tmp_path):
    canned = '{"results": {"mlvu_dev": {"mlvu_percetion_score,none": 60.0}, "videomme": ' \
             '{"videomme_perception_score,none": 50.0}}, "config": {"model_args": "x"}}'
    done = run_script(tmp_path, "scripts/video/eval.sh", ["32"], canned, METHOD="divprune", BATCH="4")
    assert done.returncode == 0, done.stderr
    launch = (tmp_path / "log").read_text()
    assert "--num_processes 2 -m lmms_eval --model script_llava_video" in launch
    assert "pretrained=llava-hf/LLaVA-Video-7B-Qwen2-hf,method=divprune,budget=32,max_frames_num=64" in launch
    assert "--tasks mlvu_dev,mvbench,longvideobench_val_v,videomme --batch_size 4" in launch
    assert f"--use_cache {tmp_path}/results/lmms/cache" in launch and "--log_samples" in launch
    table = (tmp_path / "results/lmms/video/divprune_32/table.md").read_text()
    # Acc. over MLVU and Video-MME: (60 + 50) / 2 = 55; the paper's same two: (67.75 + 63.66) / 2 = 65.705
    assert "| divprune 32 | 60.00 | - | - | - | - | 50.00 | - | - | - | 55.00 | 83.71% |" in table
    with open(tmp_path / "results/summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["benchmark"], r["method"], r["budget"], r["value"]) for r in rows) == [
        ("mlvu", "divprune", "32", "60.0"), ("videomme", "divprune", "32", "50.0")]


def test_internvl3_script_budget_per_tile_and_unpruned_reference(tmp_path):
    canned = '{"results": {"ai2d": {"exact_match,none": 0.5}}, "config": {"model_args": "y"}}'
    assert run_script(tmp_path, "scripts/internvl3/eval.sh", ["1280"], canned, METHOD="none").returncode == 0
    done = run_script(tmp_path, "scripts/internvl3/eval.sh", ["256"], canned)
    assert done.returncode == 0, done.stderr
    first, second = (tmp_path / "log").read_text().splitlines()
    assert "method=none,image_size=896" in first and "budget=" not in first
    assert "pretrained=OpenGVLab/InternVL3-8B-hf,method=script,budget=51,image_size=896" in second
    assert "--batch_size 1" in second
    table = (tmp_path / "results/lmms/internvl3/script_256/table.md").read_text()
    assert "| none 1280 | 50.00 |" in table and "| script 256 | 50.00 |" in table.replace("100.00%", "")
    assert table.splitlines()[-2].endswith("| 50.00 | 100.00% |")  # relative to the unpruned run: equal


@pytest.mark.parametrize("script,args", [("scripts/video/eval.sh", []), ("scripts/video/eval.sh", ["x"]),
                                         ("scripts/internvl3/eval.sh", ["4"])])
def test_usage_errors(tmp_path, script, args):
    done = run_script(tmp_path, script, args, "{}")
    assert done.returncode == 2 and "usage" in done.stderr


def test_bad_batch_is_refused(tmp_path):
    done = run_script(tmp_path, "scripts/video/eval.sh", ["32"], "{}", BATCH="0")
    assert done.returncode != 0 and "BATCH" in done.stderr

"""End-to-end runs of the 20 benchmark scripts (scripts/v1_5/eval/*.sh, scripts/v1_6/eval/*.sh) on CPU against
the tiny LLaVA-1.5 / LLaVA-NeXT checkpoints and tiny synthetic benchmark data (tests/eval_fixtures.py).

Each run: answers generated -> merged -> scored/converted -> one row in results/summary.csv. Plus a
2-chunk run whose merged answers equal the 1-chunk run, a run killed midway in both chunks that resumes
without duplicates, and the missing-data / bad-budget messages. About 10-20 s per script on a laptop CPU.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llava.eval.common import CRASH_ENV
from tests.eval_fixtures import make_eval_data

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = {  # name -> (data folder, number of questions, summary metric)
    "gqa": ("gqa", 3, "accuracy"),
    "mmbench": ("mmbench", 3, "accuracy_local"),
    "mmbench_cn": ("mmbench_cn", 3, "accuracy_local"),
    "mme": ("MME", 4, "perception"),
    "mmvet": ("mm-vet", 2, "submission"),
    "pope": ("pope", 4, "average_f1"),
    "sqa": ("scienceqa", 3, "img_accuracy"),
    "textvqa": ("textvqa", 3, "accuracy"),
    "vizwiz": ("vizwiz", 2, "submission"),
    "vqav2": ("vqav2", 2, "submission"),
}
BUDGET = 4  # tokens per image row / NeXT crop
GEN_ARGS = ["--device", "cpu", "--dtype", "float32", "--max_new_tokens", "3"]


def _ckpt(request, tmp_path_factory, fixture: str, arch: str) -> Path:
    try:
        return Path(request.getfixturevalue(fixture))
    except pytest.FixtureLookupError:
        from llava.model.tiny import make_tiny_checkpoint

        return Path(make_tiny_checkpoint(str(tmp_path_factory.mktemp(fixture)), arch=arch))


@pytest.fixture(scope="module")
def ckpts(request, tmp_path_factory):
    return {"v1_5": _ckpt(request, tmp_path_factory, "tiny_llava15_path", "llava-1.5"),
            "v1_6": _ckpt(request, tmp_path_factory, "tiny_llava_next_path", "llava-next")}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrun")
    make_eval_data(root / "data")
    return root


def _run(version, bench, ckpt: Path, workdir: Path, *, budget=BUDGET, extra_env=None, args=GEN_ARGS):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHON": sys.executable,
           "CKPT_DIR": str(ckpt.parent), "CKPT": ckpt.name, "DATA_DIR": str(workdir / "data"),
           "RESULTS_DIR": str(workdir / "results"), "TOKENIZERS_PARALLELISM": "false"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env.pop(CRASH_ENV, None)
    env.pop("CHUNKS", None)
    env.pop("BATCH", None)
    env.update(extra_env or {})
    return subprocess.run(["bash", str(REPO / f"scripts/{version}/eval/{bench}.sh"), str(budget), *args],
                          env=env, capture_output=True, text=True, timeout=300, cwd=str(workdir))


def _merged(workdir: Path, bench: str, ckpt: Path, tag: str) -> Path:
    folder = BENCHMARKS[bench][0]
    found = sorted((workdir / "data" / folder / "answers").glob(f"**/{ckpt.name}/{tag}/merge.jsonl"))
    assert len(found) == 1, found
    return found[0]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _summary(workdir: Path) -> list[dict]:
    with open(workdir / "results" / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("version", ["v1_5", "v1_6"])
@pytest.mark.parametrize("bench", list(BENCHMARKS))
def test_script_end_to_end(version, bench, ckpts, workdir):
    ckpt = ckpts[version]
    res = _run(version, bench, ckpt, workdir)
    assert res.returncode == 0, res.stderr[-3000:]
    nominal = BUDGET if version == "v1_5" else BUDGET * 5
    rows = _rows(_merged(workdir, bench, ckpt, f"script_{nominal}"))
    _folder, n_questions, metric = BENCHMARKS[bench]
    assert len(rows) == n_questions
    assert len({(r["question_id"], r["prompt"]) for r in rows}) == n_questions
    for r in rows:
        assert {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"} <= set(r)
        assert r["metadata"]["method"] == "script" and r["metadata"]["budget"] == BUDGET
        tokens = r["metadata"]["visual_tokens"]
        if bench == "sqa" and not r["prompt"].startswith("<image>"):
            assert tokens == 0                               # text-only ScienceQA item
        elif version == "v1_5":
            assert tokens == BUDGET                          # one image row
        else:
            assert tokens >= 2 * BUDGET                      # base crop + >= 1 tile (+ newline tokens)
    if bench.startswith("mmbench"):
        assert all({"round_id", "options", "option_char"} <= set(r) for r in rows)
    written = [s for s in _summary(workdir) if s["benchmark"] == bench and s["checkpoint"] == ckpt.name]
    assert len(written) == 1
    assert written[0]["method"] == "script" and written[0]["budget"] == str(nominal) and written[0]["metric"] == metric
    if metric == "submission":
        assert Path(written[0]["value"]).is_file()
    else:
        assert 0.0 <= float(written[0]["value"]) <= (2000.0 if bench == "mme" else 100.0)


def test_two_chunks_killed_midway_resume_to_the_one_chunk_answers(ckpts, workdir, tmp_path):
    ckpt = ckpts["v1_5"]
    own = tmp_path / "w"
    make_eval_data(own / "data")
    one = _run("v1_5", "pope", ckpt, own, budget=3, extra_env={"CHUNKS": "1"})
    assert one.returncode == 0, one.stderr[-3000:]
    reference = _rows(_merged(own, "pope", ckpt, "script_3"))
    first_value = [s for s in _summary(own) if s["benchmark"] == "pope"][0]["value"]
    # both chunk processes die after 1 answer, leaving half a line each; the script reports the failure
    killed = _run("v1_5", "pope", ckpt, own, budget=3, extra_env={"CHUNKS": "2", CRASH_ENV: "1"})
    assert killed.returncode != 0 and "rerun to resume" in killed.stderr
    answers_dir = _merged(own, "pope", ckpt, "script_3").parent
    for idx in range(2):
        raw = (answers_dir / f"2_{idx}.jsonl").read_text()
        assert raw.count("\n") == 1 and not raw.endswith("\n")
    resumed = _run("v1_5", "pope", ckpt, own, budget=3, extra_env={"CHUNKS": "2"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    merged = _rows(_merged(own, "pope", ckpt, "script_3"))
    strip = lambda rows: [{k: v for k, v in r.items() if k != "answer_id"} for r in rows]  # noqa: E731
    assert strip(merged) == strip(reference)           # same answers, same (question) order, no duplicates
    pope_rows = [s for s in _summary(own) if s["benchmark"] == "pope"]
    # the same run (chunking is not part of its fingerprint) replaces its summary row, with the same value
    assert len(pope_rows) == 1 and pope_rows[0]["value"] == first_value


def test_missing_data_names_the_path_and_eval_md(ckpts, tmp_path):
    (tmp_path / "data").mkdir()
    res = _run("v1_5", "textvqa", ckpts["v1_5"], tmp_path)
    assert res.returncode == 1
    err = [l for l in res.stderr.splitlines() if l.startswith("error:")]
    assert len(err) == 1
    assert str(tmp_path / "data" / "textvqa" / "llava_textvqa_val_v051_ocr.jsonl") in err[0] and "EVAL.md" in err[0]


def test_budget_must_be_a_positive_integer(ckpts, tmp_path):
    for bad in ("", "abc", "0", "-4"):
        res = _run("v1_6", "pope", ckpts["v1_6"], tmp_path, budget=bad)
        assert res.returncode == 2 and "usage:" in res.stderr


def test_method_and_params_pass_through(ckpts, tmp_path):
    """METHOD=none keeps every CLIP patch; METHOD=random with --pruning-param reaches the generator."""
    ckpt = ckpts["v1_5"]
    make_eval_data(tmp_path / "data")
    vision = json.loads((ckpt / "clip" / "config.json").read_text())["vision_config"]
    patches = (vision["image_size"] // vision["patch_size"]) ** 2      # "patch" feature: CLS dropped
    full = _run("v1_5", "pope", ckpt, tmp_path, budget=576, extra_env={"METHOD": "none"})
    assert full.returncode == 0, full.stderr[-3000:]
    rows = _rows(_merged(tmp_path, "pope", ckpt, "none_576"))
    assert {r["metadata"]["visual_tokens"] for r in rows} == {patches}
    assert {r["metadata"]["method"] for r in rows} == {"none"}
    rnd = _run("v1_5", "pope", ckpt, tmp_path, budget=3, extra_env={"METHOD": "random"},
               args=GEN_ARGS + ["--pruning-param", "seed=3"])
    assert rnd.returncode == 0, rnd.stderr[-3000:]
    rows = _rows(_merged(tmp_path, "pope", ckpt, "random_3"))
    assert {r["metadata"]["visual_tokens"] for r in rows} == {3}
    assert all(r["metadata"]["params"] == {"seed": 3} for r in rows)
    bad = _run("v1_5", "pope", ckpt, tmp_path, budget=3, extra_env={"METHOD": "random"},
               args=GEN_ARGS + ["--pruning-param", "nope=1"])
    assert bad.returncode != 0 and "nope" in bad.stderr


def test_chunks_must_be_a_positive_integer(ckpts, workdir):
    res = _run("v1_5", "vizwiz", ckpts["v1_5"], workdir, extra_env={"CHUNKS": "two"})
    assert res.returncode == 1 and "CHUNKS must be a positive integer" in res.stderr


def test_batch_gives_the_batch_1_answers_and_is_checked(ckpts, tmp_path):
    """BATCH=3 on LLaVA-NeXT (4 questions: batches of 3 and 1) merges to the answers of the default batch 1; the
    run is the same (batch size is not in the fingerprint), so its summary row is replaced, not added."""
    ckpt = ckpts["v1_6"]
    make_eval_data(tmp_path / "data")
    one = _run("v1_6", "pope", ckpt, tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    merged = _merged(tmp_path, "pope", ckpt, f"script_{BUDGET * 5}")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "answer_id"} for r in rows]  # noqa: E731
    reference = strip(_rows(merged))
    for f in merged.parent.glob("*.jsonl"):
        f.unlink()
    batched = _run("v1_6", "pope", ckpt, tmp_path, extra_env={"BATCH": "3"})
    assert batched.returncode == 0, batched.stderr[-3000:]
    assert "batch=3" in batched.stderr
    assert strip(_rows(merged)) == reference
    assert len([s for s in _summary(tmp_path) if s["benchmark"] == "pope"]) == 1
    bad = _run("v1_6", "pope", ckpt, tmp_path, extra_env={"BATCH": "0"})
    assert bad.returncode == 1 and "BATCH must be a positive integer" in bad.stderr
    flag = _run("v1_6", "pope", ckpt, tmp_path, args=GEN_ARGS + ["--batch-size", "2"])
    assert flag.returncode == 1 and "use BATCH=N" in flag.stderr

"""Issue 13, weaker items: pruning parameters checked before any model loads (types and ranges, and the
negate flag/parameter contradiction)."""
from __future__ import annotations

import argparse

import pytest

from llava.eval import common, model_vqa_loader
from tests.eval_fixtures import make_pope


@pytest.mark.parametrize("param, message", [
    ("gsp_ratio=2", r"gsp_ratio must be in \[0, 1\], got 2"),
    ("tau=abc", r"parameter 'tau' of method 'script' must be a finite number, got 'abc'"),
    ("negate=maybe", r"parameter 'negate' of method 'script' must be a bool"),
])
def test_bad_pruning_params_are_refused_before_the_model_loads(tmp_path, param, message):
    make_pope(tmp_path)
    missing_model = str(tmp_path / "no-such-checkpoint")           # loading it would raise FileNotFoundError
    with pytest.raises(ValueError, match=message):
        model_vqa_loader.main(["--model-path", missing_model, "--question-file", str(tmp_path / "pope/llava_pope_test.jsonl"),
                               "--image-folder", str(tmp_path / "pope/val2014"), "--answers-file", str(tmp_path / "a.jsonl"),
                               "--device", "cpu", "--pruning-param", param])


@pytest.mark.parametrize("method, params, message", [
    ("script", {"gsp_ratio": -0.1}, r"gsp_ratio must be in \[0, 1\]"),
    ("gsp_qcrs", {"gsp_ratio": 1.5}, r"gsp_ratio must be in \[0, 1\]"),
    ("script", {"tau": 1.5}, r"tau must be in \[-1, 1\]"),
    ("gsp", {"tau": -1.01}, r"tau must be in \[-1, 1\]"),
    ("gsp_qcrs", {"gamma": -0.5}, r"gamma must be >= 0"),
    ("random", {"seed": 1.5}, r"parameter 'seed' of method 'random' must be an int"),
    ("cdpruner", {"theta": 1.0}, r"theta must be None or a number in \[0, 1\)"),
    ("trim", {"similarity": "l2"}, r"similarity must be 'cosine' or 'dot'"),
    ("trim_iqr", {"whisker": -1}, r"whisker must be a finite number >= 0"),
    ("visionzip", {"merge": "max"}, r"merge must be 'mean' or 'released'"),
    ("visionzip", {"dominant": -2}, r"dominant must be None or an int >= 0"),
    ("fastv", {"layer": -1}, r"layer must be an int >= 0"),
])
def test_pruning_config_checks_types_and_ranges_on_construction(method, params, message):
    from llava.model.pruning import PruningConfig

    with pytest.raises(ValueError, match=message):
        PruningConfig(method=method, visual_token_num=8, params=params)
    PruningConfig(method="script", visual_token_num=8, params={"gsp_ratio": 1, "tau": 0, "negate": True})


def test_negate_param_contradicting_no_negate_flag_is_refused(tmp_path):
    ap = argparse.ArgumentParser()
    common.add_generation_args(ap, max_new_tokens=8)
    base = ["--model-path", "m", "--question-file", "q", "--answers-file", "a"]
    with pytest.raises(ValueError, match="negate=true contradicts --no-negate-relevance"):
        common.build_pruning_config(ap.parse_args(base + ["--pruning-param", "negate=true", "--no-negate-relevance"]))
    agree = common.build_pruning_config(ap.parse_args(base + ["--pruning-param", "negate=false", "--no-negate-relevance"]))
    assert agree.method_params()["negate"] is False
    explicit = common.build_pruning_config(ap.parse_args(base + ["--pruning-param", "negate=false"]))
    assert explicit.method_params()["negate"] is False
    from llava.eval import run_llava

    args = run_llava.build_parser().parse_args(["--model-path", "m", "--image-file", "i", "--query", "q",
                                                "--visual-token-num", "4", "--pruning-param", "negate=true",
                                                "--no-negate-relevance"])
    with pytest.raises(ValueError, match="negate=true contradicts --no-negate-relevance"):
        run_llava.pruning_from_args(args)

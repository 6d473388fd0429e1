"""Acceptance 4: `python -m llava.eval.run_llava` works end to end on the tiny checkpoints (CPU)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llava.eval.run_llava import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("img") / "scene.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (48, 80, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_cli_subprocess_prints_answer_tokens_and_ttft(tiny_llava15_path, image_file):
    cmd = [sys.executable, "-m", "llava.eval.run_llava", "--model-path", tiny_llava15_path, "--image-file", image_file,
           "--query", "What is shown?", "--visual-token-num", "5", "--pruning-method", "script", "--device", "cpu",
           "--dtype", "float32", "--conv-mode", "vicuna_v1", "--temperature", "0", "--max-new-tokens", "4"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert "visual tokens to LLM: 5" in lines
    assert any(line.startswith("time to first token: ") and line.endswith(" ms") for line in lines)


def test_main_unpruned_next_counts_all_tokens(tiny_llava_next_path, image_file, capsys):
    result = main(["--model-path", tiny_llava_next_path, "--image-file", image_file, "--query", "Describe it.",
                   "--device", "cpu", "--max-new-tokens", "3"])
    # 80x48 -> best grid 112x56 = 2x1 tiles of 4x4 patches -> a 4x8 feature grid. Aspect 80/48 < 8/4, so
    # unpad trims columns: new width = int(80 * 4 / 48) = 6, padding (8 - 6) // 2 = 1 -> 4 rows x 6 cols,
    # plus one newline per row, plus the 16 base tokens: 16 + 4 * 7 = 44.
    assert result.visual_tokens == 16 + 4 * 7
    assert result.time_to_first_token_s > 0
    assert f"visual tokens to LLM: {16 + 4 * 7}" in capsys.readouterr().out


def test_main_missing_image_names_the_path(tiny_llava15_path, tmp_path):
    missing = str(tmp_path / "nope.jpg")
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        main(["--model-path", tiny_llava15_path, "--image-file", missing, "--query", "Q?"])


def test_tiny_cli_writes_original_llava_format(tmp_path):
    import json

    out = subprocess.run([sys.executable, "-m", "llava.model.tiny", "--out", str(tmp_path / "t"), "--arch", "llava-next"],
                         cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    assert cfg["model_type"] == "llava" and cfg["architectures"] == ["LlavaLlamaForCausalLM"]
    assert cfg["image_aspect_ratio"] == "anyres" and cfg["mm_patch_merge_type"] == "spatial_unpad"
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json"):
        assert (tmp_path / "t" / "clip" / name).is_file()


def test_main_fastv_with_layer_param(tiny_llava15_path, image_file, capsys):
    # The tiny model has 2 decoder layers, so FastV's K must be 1 (the default K=2 is refused there).
    result = main(["--model-path", tiny_llava15_path, "--image-file", image_file, "--query", "What is shown?",
                   "--visual-token-num", "3", "--pruning-method", "fastv", "--pruning-param", "layer=1",
                   "--device", "cpu", "--dtype", "float32", "--max-new-tokens", "3"])
    assert result.visual_tokens == 3
    assert "visual tokens to LLM: 3" in capsys.readouterr().out


def test_main_pruning_param_without_method_is_refused(tiny_llava15_path, image_file):
    with pytest.raises(ValueError, match="--pruning-param"):
        main(["--model-path", tiny_llava15_path, "--image-file", image_file, "--query", "Q?",
              "--pruning-param", "tau=0.1", "--device", "cpu"])

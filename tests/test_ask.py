"""llava.eval.ask end to end in a subprocess on tiny random transformers checkpoints saved offline (LLaVA and
LLaVA-NeXT with their processors; the Qwen-VL, InternVL and OneVision processors need torchvision's video
processors to be built, which the test environment lacks). The printed counts are checked against the
processor's own output (placeholders, crops) and the budget resolved by hand."""

import os
import re
import subprocess
import sys

import pytest
from transformers import AutoProcessor

import script_prune as sp
from tests.helpers import random_image, save_tiny_llava_hf

QUESTION = "What is in the picture?"


def run_ask(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "llava.eval.ask", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def processed(folder: str, images: list) -> dict:
    """The checkpoint's processor on the prompt the CLI builds (chat template, one image entry per image)."""
    processor = AutoProcessor.from_pretrained(folder)
    content = [{"type": "image"}] * len(images) + [{"type": "text", "text": QUESTION}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                           tokenize=False)
    return processor(text=[prompt], images=images, return_tensors="pt")


@pytest.mark.parametrize("arch,method,budget,sizes", [("llava", "divprune", "0.25", [(30, 30), (64, 20)]),
                                                      ("llava_next", "script", "7", [(70, 30)])])
def test_prints_answer_counts_per_row_and_time_to_first_token(tmp_path, arch, method, budget, sizes):
    """The NeXT case runs the default method (script) with the CLI's default relevance, llm_text (LLaVA has none)."""
    folder = save_tiny_llava_hf(tmp_path / "model", arch)
    paths = []
    for i, (w, h) in enumerate(sizes):
        paths.append(str(tmp_path / f"image{i}.png"))
        random_image(w, h, seed=i).save(paths[-1])
    method_args = [] if method == "script" else ["--method", method]
    result = run_ask("--model", folder, "--image", *paths, "--question", QUESTION, *method_args,
                     "--budget", budget, "--max-new-tokens", "3", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    inputs = processed(folder, [random_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)])
    image_token = AutoProcessor.from_pretrained(folder).tokenizer.convert_tokens_to_ids("<image>")
    placeholders = int((inputs["input_ids"] == image_token).sum())
    pixels = inputs["pixel_values"]  # LLaVA: (images, 3, 32, 32), one row each; NeXT: (1, crops, 3, 32, 32)
    rows = pixels.shape[0] if pixels.dim() == 4 else pixels.shape[1]
    k = sp.resolve_budget(float(budget) if "." in budget else int(budget), 16)  # 16 tokens per 32 px crop
    line = re.search(r"kept per row: (\d+) of (\d+) in (\d+) rows: (.*)", out)
    assert line, out
    assert (int(line[1]), int(line[2]), int(line[3])) == (k * rows, 16 * rows, rows)
    assert line[4].split() == [f"{k}/16"] * rows
    tokens = re.search(r"visual tokens to LLM: (\d+) of (\d+) unpruned", out)
    assert int(tokens[2]) == placeholders
    if arch == "llava":
        assert int(tokens[1]) == k * rows  # no layout tokens
    else:  # kept base tokens + kept tile tokens inside the unpadded grid + one newline per grid row holding one
        assert k < int(tokens[1]) < placeholders
    ttft = re.search(r"time to first token: ([\d.]+) ms", out)
    assert ttft and float(ttft[1]) > 0
    assert f"method: {method}" in out


def test_bad_arguments_are_refused_before_the_model_loads(tmp_path, capsys):
    from llava.eval.ask import main

    image = tmp_path / "image.png"
    random_image(20, 20).save(image)
    missing = str(tmp_path / "no-such-model")  # never read: every refusal comes first
    for args, message in ((["--method", "script", "--param", "gsp_ratio=1.5"], "gsp_ratio must be in [0, 1]"),
                          (["--method", "divprune", "--param", "tau=0.1"], "tau"),
                          (["--method", "nope"], "--method must be one of"),
                          (["--budget", "1.5"], "--budget must be"),
                          (["--budget", "0"], "--budget must be"),
                          (["--param", "novalue"], "expected key=value"),
                          ([], "give --image")):
        images = ["--image", str(image)] if args else []
        with pytest.raises(SystemExit) as exit_info:
            main(["--model", missing, *images, "--question", QUESTION, *args])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err, args


def test_video_on_an_image_only_family_is_refused_by_name(tmp_path):
    av = pytest.importorskip("av")
    import numpy as np

    folder = save_tiny_llava_hf(tmp_path / "model", "llava")
    clip = tmp_path / "clip.mp4"
    with av.open(str(clip), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(4):
            frame = np.full((32, 32, 3), 40 * i, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    from llava.eval.ask import main

    with pytest.raises(ValueError, match="--video: LlavaForConditionalGeneration takes no video \\(family llava\\)"):
        main(["--model", folder, "--video", str(clip), "--question", QUESTION, "--max-frames", "2"])

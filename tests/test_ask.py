"""llava.eval.ask end to end in a subprocess on tiny random transformers checkpoints saved offline with their
processors (tests/helpers.py: save_tiny_llava_hf, save_tiny_vlm): LLaVA, LLaVA-NeXT, OneVision, InternVL,
Qwen2.5-VL, Qwen3-VL. The printed counts are checked against the processors' own output (placeholders, crops,
grids; for the newer families the stock model's feature counts on the image / video processor's output, which
are what the processor must insert) and the budget resolved by hand. Images run without torchvision (the CLI
then builds the processor without its video processor); videos need it (marker ``torchvision``)."""

import os
import re
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch
from transformers import AutoImageProcessor, AutoProcessor
from transformers.utils import is_torchvision_available

import script_prune as sp
from tests.helpers import random_image, save_tiny_llava_hf, save_tiny_vlm, write_clip

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


def hand_kept(budget: str, n: int) -> int:
    """Tokens kept of a row of ``n``: an int budget (all of a shorter row), or floor(fraction * n), at least 1."""
    if "." not in budget:
        return min(int(budget), n)
    return max(1, int(Fraction(budget) * n))


def printed(out: str) -> tuple[int, int, list[tuple[int, int]]]:
    """The CLI's counts: visual tokens to the LLM, unpruned placeholders, (kept, length) per row."""
    tokens = re.search(r"visual tokens to LLM: (\d+) of (\d+) unpruned", out)
    line = re.search(r"kept per row: (\d+) of (\d+) in (\d+) rows: (.*)", out)
    assert tokens and line and re.search(r"time to first token: [\d.]+ ms", out), out
    rows = [tuple(int(x) for x in row.split("/")) for row in line[4].split()]
    assert (int(line[1]), int(line[2]), int(line[3])) == (sum(k for k, _ in rows), sum(n for _, n in rows), len(rows))
    return int(tokens[1]), int(tokens[2]), rows


def stock_image_rows(family: str, folder: str, images: list) -> tuple[list[int], int]:
    """Row lengths and placeholders of ``images`` (one prompt) from the checkpoint's image processor and the stock
    model: OneVision a row per anyres crop of a lone image (25 tokens; the count from transformers' own
    image_size_to_num_patches), the base crop alone of each of several images, and the packed features (newlines
    included) as placeholders; InternVL a row of 16 per tile; Qwen a row per image of t * h * w / 2^2 merged patches."""
    from transformers import AutoModelForImageTextToText

    pixels = AutoImageProcessor.from_pretrained(folder)(images, return_tensors="pt")
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    with torch.no_grad():
        if family == "llava_onevision":
            from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

            crops = ([image_size_to_num_patches(pixels["image_sizes"][0], model.config.image_grid_pinpoints, 40)]
                     if len(images) == 1 else [1] * len(images))
            packed = model.model.get_image_features(pixel_values=pixels["pixel_values"], image_sizes=pixels["image_sizes"],
                                                    batch_num_images=torch.tensor([len(images)])).pooler_output
            return [25] * sum(crops), sum(p.shape[0] for p in packed)
        if family == "internvl":
            tiles = model.model.get_image_features(pixel_values=pixels["pixel_values"]).pooler_output  # (tiles, 16, D)
            return [tiles.shape[1]] * tiles.shape[0], tiles.shape[0] * tiles.shape[1]
    rows = [int(t * h * w) // 4 for t, h, w in pixels["image_grid_thw"]]
    return rows, sum(rows)


@pytest.mark.parametrize("family,method,budget,images", [("llava_onevision", "divprune", "3", 1),
                                                         ("llava_onevision", "script", "0.25", 2),
                                                         ("internvl", "script", "0.25", 2), ("qwen2_5_vl", "script", "5", 1),
                                                         ("qwen3_vl", "divprune", "0.25", 2)])
def test_newer_families_answer_about_images_with_counts_per_row(tmp_path, family, method, budget, images):
    """One image or two of different sizes in one prompt; without torchvision (the plain test install) the CLI uses
    the processor without its video processor, with it AutoProcessor: the counts are the same either way."""
    folder = save_tiny_vlm(tmp_path / "model", family)
    sizes = [(48, 40), (24, 16)][:images]
    paths = []
    for i, (w, h) in enumerate(sizes):
        paths.append(str(tmp_path / f"image{i}.png"))
        random_image(w, h, seed=i).save(paths[-1])
    result = run_ask("--model", folder, "--image", *paths, "--question", QUESTION, "--method", method,
                     "--budget", budget, "--max-new-tokens", "3", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    tokens, unpruned, rows = printed(result.stdout)
    lengths, placeholders = stock_image_rows(family, folder, [random_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)])
    assert rows == [(hand_kept(budget, n), n) for n in lengths]
    assert unpruned == placeholders
    kept = sum(k for k, _ in rows)
    if family == "llava_onevision" and images > 1:  # each base crop is followed by one newline
        assert tokens == kept + images
    elif family == "llava_onevision":  # kept crop tokens + the newlines of the grid rows holding one
        assert len(rows) > 1 and kept < tokens < placeholders
    else:
        assert tokens == kept
    assert f"method: {method}" in result.stdout


@pytest.mark.torchvision
@pytest.mark.parametrize("family,method,budget", [("llava_onevision", "script", "4"), ("qwen2_5_vl", "divprune", "0.25"),
                                                  ("qwen3_vl", "script", "3")])
def test_video_frames_are_rows_with_the_budget_per_frame(tmp_path, family, method, budget):
    """4 frames: OneVision a row per frame (5 x 5 patches pooled to 3 x 3) and one newline per video; Qwen a row per
    temporal step of 2 frames (its video processor's grid). Reference: the checkpoint's own AutoProcessor on the
    frames (placeholders, grid) and the stock model's video features."""
    pytest.importorskip("av")
    from transformers import AutoModelForImageTextToText

    folder = save_tiny_vlm(tmp_path / "model", family)
    clip = tmp_path / "clip.mp4"
    write_clip(clip, 4)
    result = run_ask("--model", folder, "--video", str(clip), "--question", QUESTION, "--method", method,
                     "--budget", budget, "--max-new-tokens", "3", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    tokens, unpruned, rows = printed(result.stdout)

    processor = AutoProcessor.from_pretrained(folder)
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "video"},
                                                                         {"type": "text", "text": QUESTION}]}],
                                           add_generation_prompt=True, tokenize=False)
    frames = np.zeros((4, 32, 48, 3), dtype=np.uint8)  # the counts depend on the frames' number and size only
    inputs = processor(text=[prompt], videos=[frames], do_sample_frames=False,
                       video_metadata=[dict(total_num_frames=4, fps=1.0, frames_indices=[0, 1, 2, 3])],
                       return_tensors="pt")
    placeholders = int((inputs["input_ids"] == processor.video_token_id).sum())
    if family == "llava_onevision":
        model = AutoModelForImageTextToText.from_pretrained(folder).eval()
        with torch.no_grad():
            packed = model.model.get_video_features(  # (1, 4 frames * 9 + 1 newline, D)
                pixel_values_videos=inputs["pixel_values_videos"], vision_feature_layer=model.config.vision_feature_layer,
                vision_feature_select_strategy=model.config.vision_feature_select_strategy).pooler_output
        lengths = [(packed.shape[1] - 1) // 4] * 4
        assert lengths == [9] * 4 and placeholders == 4 * 9 + 1
        assert sum(k for k, _ in rows) + 1 == tokens  # the video's single newline
    else:
        (t, h, w), = inputs["video_grid_thw"].tolist()
        lengths = [h * w // 4] * t
        assert t == 2 and placeholders == sum(lengths)
        assert sum(k for k, _ in rows) == tokens
    assert unpruned == placeholders
    assert rows == [(hand_kept(budget, n), n) for n in lengths]


@pytest.mark.skipif(is_torchvision_available(), reason="the refusal is for installs without torchvision")
def test_video_without_torchvision_is_refused_naming_what_to_install(tmp_path):
    pytest.importorskip("av")
    from llava.eval.ask import main

    folder = save_tiny_vlm(tmp_path / "model", "qwen2_5_vl")
    clip = tmp_path / "clip.mp4"
    write_clip(clip, 2)
    with pytest.raises(ValueError, match=r"--video needs torchvision.*Qwen2_5_VLProcessor.*torchvision==0\.28\.0"):
        main(["--model", folder, "--video", str(clip), "--question", QUESTION])

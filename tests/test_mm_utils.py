"""Tests for llava.mm_utils against independent references.

References: numpy-built padding, a CLIP pipeline written out with PIL + numpy (bicubic resize to the
shortest edge, centre crop, x/255, (x - mean) / std with CLIP's constants), hand-computed anyres
resolutions, and transformers' own LLaVA / LLaVA-NeXT image processors (PIL backend).
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import CLIPImageProcessorPil, LlavaImageProcessorPil, LlavaNextImageProcessorPil  # noqa: E402
from transformers.models.llava_next.modeling_llava_next import (  # noqa: E402
    get_anyres_image_grid_shape as hf_grid_shape,
)

from llava.mm_utils import (  # noqa: E402
    expand2square,
    get_anyres_image_grid_shape,
    get_model_name_from_path,
    load_image,
    load_image_processor,
    mean_color,
    process_anyres_image,
    process_images,
    select_best_resolution,
    strip_short_answer_prompt,
    tokenizer_image_token,
)

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
NEXT_PINPOINTS_336 = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
NEXT_PINPOINTS_28 = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]


def _random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _clip_processor(side: int) -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})


def _clip_reference(image: Image.Image, side: int) -> np.ndarray:
    """CLIP preprocessing written out: resize shortest edge (bicubic), centre crop, rescale, normalise."""
    width, height = image.size
    if width <= height:
        new_size = (side, int(side * height / width))
    else:
        new_size = (int(side * width / height), side)
    resized = np.asarray(image.resize(new_size, resample=Image.Resampling.BICUBIC))  # (H, W, 3) uint8
    top = (resized.shape[0] - side) // 2
    left = (resized.shape[1] - side) // 2
    cropped = resized[top : top + side, left : left + side]
    scaled = (cropped.astype(np.float64) / 255.0).astype(np.float32)
    return ((scaled - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)  # (3, S, S)


# ----------------------------------------------------------------------------- expand2square
@pytest.mark.parametrize(("width", "height"), [(7, 3), (4, 9), (6, 6), (5, 2)])
def test_expand2square_matches_numpy_padding(width, height):
    image = _random_image(width, height, seed=width * 10 + height)
    color = (122, 116, 104)
    side = max(width, height)
    expected = np.empty((side, side, 3), dtype=np.uint8)
    expected[:] = color
    top, left = (side - height) // 2, (side - width) // 2
    expected[top : top + height, left : left + width] = np.asarray(image)
    out = expand2square(image, color)
    assert out.size == (side, side)
    np.testing.assert_array_equal(np.asarray(out), expected)


def test_mean_color_is_truncated_clip_mean():
    assert mean_color(_clip_processor(28)) == (122, 116, 104)


# ----------------------------------------------------------------------------- process_images
@pytest.mark.parametrize(("width", "height"), [(40, 22), (19, 33), (28, 28)])
def test_process_images_pad_matches_written_out_pipeline(width, height):
    image = _random_image(width, height, seed=width + height)
    side = 28
    out = process_images([image], _clip_processor(side), SimpleNamespace(image_aspect_ratio="pad"))
    assert out.shape == (1, 3, side, side) and out.dtype == torch.float32
    padded_side = max(width, height)
    canvas = np.empty((padded_side, padded_side, 3), dtype=np.uint8)
    canvas[:] = (122, 116, 104)
    top, left = (padded_side - height) // 2, (padded_side - width) // 2
    canvas[top : top + height, left : left + width] = np.asarray(image)
    expected = _clip_reference(Image.fromarray(canvas), side)
    np.testing.assert_allclose(out[0].numpy(), expected, rtol=0, atol=1e-6)


def test_process_images_pad_matches_transformers_llava_processor_real_336_config():
    processor = _clip_processor(336)
    hf = LlavaImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_pad=True
    )
    images = [_random_image(50, 31, seed=1), _random_image(20, 45, seed=2)]
    out = process_images(images, processor, SimpleNamespace(image_aspect_ratio="pad"))
    ref = hf(images, return_tensors="pt")["pixel_values"]
    assert out.shape == (2, 3, 336, 336)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    np.testing.assert_allclose(out[1].numpy(), _clip_reference(expand2square(images[1], (122, 116, 104)), 336), atol=1e-6)


@pytest.mark.parametrize("aspect", [None, "square"])
def test_process_images_default_is_plain_processor(aspect):
    image = _random_image(45, 30, seed=5)
    out = process_images([image, image], _clip_processor(28), SimpleNamespace(image_aspect_ratio=aspect))
    assert out.shape == (2, 3, 28, 28)
    np.testing.assert_allclose(out[0].numpy(), _clip_reference(image, 28), rtol=0, atol=1e-6)


def test_process_images_converts_grayscale_to_rgb():
    gray = Image.fromarray(np.arange(20 * 12, dtype=np.uint8).reshape(12, 20), mode="L")
    out = process_images([gray], _clip_processor(28), SimpleNamespace(image_aspect_ratio="pad"))
    ref = process_images([gray.convert("RGB")], _clip_processor(28), SimpleNamespace(image_aspect_ratio="pad"))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_process_images_rejects_bad_input():
    cfg = SimpleNamespace(image_aspect_ratio="pad")
    with pytest.raises(ValueError, match="images"):
        process_images([], _clip_processor(28), cfg)
    with pytest.raises(ValueError, match=r"images\[1\]"):
        process_images([_random_image(4, 4), "not an image"], _clip_processor(28), cfg)
    with pytest.raises(ValueError, match="image_grid_pinpoints"):
        process_images([_random_image(4, 4)], _clip_processor(28), SimpleNamespace(image_aspect_ratio="anyres"))
    with pytest.raises(ValueError, match="anyres_max_9"):
        process_images(
            [_random_image(4, 4)],
            _clip_processor(28),
            SimpleNamespace(image_aspect_ratio="anyres_max_9", image_grid_pinpoints=NEXT_PINPOINTS_28),
        )


def test_process_images_warns_for_non_pil_backend():
    class _TorchvisionLike:
        backend = "torchvision"
        image_mean = [0.5, 0.5, 0.5]

        def preprocess(self, images, return_tensors):
            return {"pixel_values": torch.zeros(len(images), 3, 2, 2)}

    with pytest.warns(UserWarning, match="PIL backend"):
        process_images([_random_image(3, 2)], _TorchvisionLike(), SimpleNamespace(image_aspect_ratio="pad"))


# ----------------------------------------------------------------------------- anyres
@pytest.mark.parametrize(
    ("size", "expected"),
    [
        # 640x480: 672x672 keeps all 307200 pixels (scale 1.05); the others keep at most 448*336
        ((640, 480), (672, 672)),
        # 1000x300: 1008x336 scale min(1.008, 1.12) keeps all 300000 pixels
        ((1000, 300), (1008, 336)),
        ((300, 1000), (336, 1008)),
        # 336x336: 336x672 and 672x336 tie on pixels (112896) and waste (112896): first one wins
        ((336, 336), (336, 672)),
        # 2000x2000: only 672x672 reaches 451584 effective pixels
        ((2000, 2000), (672, 672)),
    ],
)
def test_select_best_resolution_hand_cases(size, expected):
    assert select_best_resolution(size, NEXT_PINPOINTS_336) == expected


def test_select_best_resolution_prefers_less_waste_on_equal_effective_resolution():
    # 100x50 fits fully in both; 200x100 wastes 10000 px, 400x400 wastes 155000
    assert select_best_resolution((100, 50), [[400, 400], [200, 100]]) == (200, 100)


@pytest.mark.parametrize(
    ("size", "grid"),
    [((640, 480), (2, 2)), ((1000, 300), (3, 1)), ((300, 1000), (1, 3)), ((336, 336), (1, 2))],
)
def test_get_anyres_image_grid_shape_hand_cases(size, grid):
    assert get_anyres_image_grid_shape(size, NEXT_PINPOINTS_336, 336) == grid
    assert get_anyres_image_grid_shape(size, str(NEXT_PINPOINTS_336), 336) == grid
    assert get_anyres_image_grid_shape(size, str([tuple(p) for p in NEXT_PINPOINTS_336]), 336) == grid


def test_grid_shape_matches_transformers_on_asymmetric_pinpoints():
    # transformers takes (height, width) sizes and pinpoints and returns (rows, cols)
    pinpoints_wh = [[56, 28], [84, 28], [28, 56], [56, 84], [112, 56]]
    pinpoints_hw = [[h, w] for w, h in pinpoints_wh]
    rng = np.random.default_rng(0)
    for width, height in rng.integers(5, 300, size=(40, 2)).tolist():
        cols, rows = get_anyres_image_grid_shape((width, height), pinpoints_wh, 28)
        assert (rows, cols) == tuple(hf_grid_shape((height, width), pinpoints_hw, 28)), (width, height)


def test_grid_pinpoints_validation():
    with pytest.raises(ValueError, match="grid_pinpoints"):
        get_anyres_image_grid_shape((10, 10), "not a list", 28)
    with pytest.raises(ValueError, match="grid_pinpoints"):
        get_anyres_image_grid_shape((10, 10), [], 28)
    with pytest.raises(ValueError, match="original_size"):
        select_best_resolution((0, 10), NEXT_PINPOINTS_28)
    with pytest.raises(ValueError, match="patch_size"):
        get_anyres_image_grid_shape((10, 10), NEXT_PINPOINTS_28, 0)


@pytest.mark.parametrize(("width", "height"), [(70, 30), (30, 70), (40, 40), (13, 90), (200, 150), (29, 57)])
def test_process_anyres_image_equals_transformers_llava_next(width, height):
    image = _random_image(width, height, seed=width * height)
    ours = process_anyres_image(image, _clip_processor(28), NEXT_PINPOINTS_28)
    hf = LlavaNextImageProcessorPil(
        size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, image_grid_pinpoints=NEXT_PINPOINTS_28
    )
    ref = hf(image, return_tensors="pt")["pixel_values"][0]
    cols, rows = get_anyres_image_grid_shape((width, height), NEXT_PINPOINTS_28, 28)
    assert ours.shape == (1 + cols * rows, 3, 28, 28)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_process_anyres_image_base_view_and_first_tile_written_out():
    # 70x30: 84x28 keeps 65*28=1820 px (scale 28/30); 56x56 keeps 56*24=1344; 56x28 keeps 56*24 -> 3x1 tiles
    image = _random_image(70, 30, seed=11)
    assert select_best_resolution((70, 30), NEXT_PINPOINTS_28) == (84, 28)
    ours = process_anyres_image(image, _clip_processor(28), NEXT_PINPOINTS_28)
    assert ours.shape == (4, 3, 28, 28)
    base = image.resize((28, 28), resample=Image.Resampling.BICUBIC)
    np.testing.assert_allclose(ours[0].numpy(), _clip_reference(base, 28), atol=1e-6)
    # resize to fit 84x28: scale_h = 28/30 < scale_w = 84/70, new width = ceil(70 * 28/30) = 66, pad 9 left
    resized = np.asarray(image.resize((66, 28), resample=Image.Resampling.BICUBIC))
    canvas = np.zeros((28, 84, 3), dtype=np.uint8)
    canvas[:, 9 : 9 + 66] = resized
    for tile in range(3):
        expected = _clip_reference(Image.fromarray(canvas[:, 28 * tile : 28 * (tile + 1)].copy()), 28)
        np.testing.assert_allclose(ours[1 + tile].numpy(), expected, atol=1e-6)


def test_process_images_anyres_real_336_config_matches_transformers():
    processor = _clip_processor(336)
    cfg = SimpleNamespace(image_aspect_ratio="anyres", image_grid_pinpoints=NEXT_PINPOINTS_336)
    hf = LlavaNextImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_grid_pinpoints=NEXT_PINPOINTS_336
    )
    # both pick 1008x336 (hand check: 900x280 at scale min(1.12, 1.2) keeps all pixels) -> 1 + 3 views
    same_grid = [_random_image(1000, 300, seed=3), _random_image(900, 280, seed=4)]
    out = process_images(same_grid, processor, cfg)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 4, 3, 336, 336)
    for i, image in enumerate(same_grid):
        torch.testing.assert_close(out[i], hf(image, return_tensors="pt")["pixel_values"][0], rtol=0, atol=0)
    mixed = process_images([same_grid[0], _random_image(300, 300, seed=6)], processor, cfg)  # 1008x336, 336x672
    assert isinstance(mixed, list) and [t.shape[0] for t in mixed] == [4, 3]


# ----------------------------------------------------------------------------- loading
def test_load_image_missing_file_names_path(tmp_path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        load_image(missing)


def test_load_image_converts_to_rgb(tmp_path):
    path = tmp_path / "gray.png"
    Image.fromarray(np.full((5, 7), 200, dtype=np.uint8), mode="L").save(path)
    image = load_image(str(path))
    assert image.mode == "RGB" and image.size == (7, 5)
    assert np.asarray(image)[0, 0].tolist() == [200, 200, 200]
    with open(path, "rb") as handle:
        assert load_image(handle).mode == "RGB"
    with pytest.raises(ValueError, match="path_or_url"):
        load_image(123)


def test_load_image_processor_pins_pil_backend(tmp_path):
    saved = _clip_processor(28)
    saved.save_pretrained(tmp_path)
    loaded = load_image_processor(tmp_path)
    assert isinstance(loaded, CLIPImageProcessorPil)
    assert loaded.backend == "pil"
    assert loaded.crop_size["height"] == 28 and loaded.size["shortest_edge"] == 28


# ----------------------------------------------------------------------------- text helpers
class _CharTokenizer:
    """Toy tokenizer: one id per character (ord), optional BOS=1 in front of every call."""

    def __init__(self, add_bos: bool):
        self.bos_token_id = 1
        self.add_bos = add_bos

    def __call__(self, text: str) -> SimpleNamespace:
        return SimpleNamespace(input_ids=([1] if self.add_bos else []) + [ord(c) for c in text])


def test_tokenizer_image_token_with_bos():
    ids = tokenizer_image_token("ab<image>c<image>", _CharTokenizer(add_bos=True))
    assert ids == [1, 97, 98, -200, 99, -200]
    tensor = tokenizer_image_token("ab<image>c", _CharTokenizer(add_bos=True), return_tensors="pt")
    assert tensor.dtype == torch.long and tensor.tolist() == [1, 97, 98, -200, 99]


def test_tokenizer_image_token_without_bos_and_custom_index():
    ids = tokenizer_image_token("<image>\nx", _CharTokenizer(add_bos=False), image_token_index=-7)
    assert ids == [-7, 10, 120]
    assert tokenizer_image_token("xy", _CharTokenizer(add_bos=True)) == [1, 120, 121]


def test_tokenizer_image_token_rejects_unknown_tensor_type():
    with pytest.raises(ValueError, match="return_tensors"):
        tokenizer_image_token("a<image>", _CharTokenizer(add_bos=True), return_tensors="tf")


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("liuhaotian/llava-v1.5-7b", "llava-v1.5-7b"),
        ("/models/llava-v1.6-vicuna-13b/", "llava-v1.6-vicuna-13b"),
        ("./runs/llava-lora/checkpoint-500", "llava-lora_checkpoint-500"),
        (Path("/ckpt/llava-v1.6-mistral-7b"), "llava-v1.6-mistral-7b"),
        ("checkpoint-3", "checkpoint-3"),
    ],
)
def test_get_model_name_from_path(path, name):
    assert get_model_name_from_path(path) == name


def test_get_model_name_from_empty_path():
    with pytest.raises(ValueError, match="model_path"):
        get_model_name_from_path("/")


def test_strip_short_answer_prompt():
    question = "What is the man holding?\nAnswer the question using a single word or phrase."
    assert strip_short_answer_prompt(question) == "What is the man holding?"
    ocr = "what does it say?\nReference OCR token: STOP\nAnswer the question using a single word or phrase."
    assert strip_short_answer_prompt(ocr) == "what does it say?\nReference OCR token: STOP"
    mc = "Which one?\nA. cat\nB. dog\nAnswer with the option's letter from the given choices directly."
    assert strip_short_answer_prompt(mc) == mc
    assert strip_short_answer_prompt(mc, multiple_choice=True) == "Which one?\nA. cat\nB. dog"
    cn = "哪一个?\nA. 猫\n请直接回答选项字母。"
    assert strip_short_answer_prompt(cn, multiple_choice=True) == "哪一个?\nA. 猫"
    assert strip_short_answer_prompt("Describe the image.") == "Describe the image."
    with pytest.raises(ValueError, match="question"):
        strip_short_answer_prompt(None)

"""The lmms-eval plugin's Qwen2.5-VL, Qwen3-VL and LLaVA-1.5 / LLaVA-NeXT models (llava.lmms): each found through
lmms-eval's own registry in a fresh subprocess, run on hand-made Instances with tiny random checkpoints, and checked
against the STOCK model: the placeholder counts of the prompts are computed here by hand from the image sizes, and
the kept indices are the method's selection on the stock model's own visual features of the pixels it received.
Qwen video requests go through transformers' video processor, which needs torchvision: those tests are marked."""

import pytest
import torch

pytest.importorskip("lmms_eval")
pytest.importorskip("av")

import script_prune as sp  # noqa: E402
from script_prune.patch import LlavaFamily, Qwen2_5_VLFamily  # noqa: E402
from tests.helpers import skip_below_family_minimum, word_tokenizer, write_clip  # noqa: E402
from tests.test_lmms_plugin import RUN, TEMPLATE, run_plugin  # noqa: E402

pytestmark = [skip_below_family_minimum(Qwen2_5_VLFamily()), skip_below_family_minimum(LlavaFamily())]

#: Qwen-VL's chat template, reduced: <|vision_start|> <|image_pad|> / <|video_pad|> <|vision_end|> per visual
QWEN_TEMPLATE = TEMPLATE.replace(
    "{% if c['type'] == 'video' %}<video>",
    "{% if c['type'] == 'image' %}<|vision_start|> <|image_pad|> <|vision_end|>"
    "{% elif c['type'] == 'video' %}<|vision_start|> <|video_pad|> <|vision_end|>")
LLAVA_TEMPLATE = TEMPLATE.replace("c['type'] == 'video' %}<video>", "c['type'] == 'image' %}<image>")
QWEN_MIN, QWEN_MAX = 16, 4096  # pixels: the test images (multiples of 4) are not resized
FRAMES = 4  # two temporal steps of temporal_patch_size 2


def qwen_tokenizer(family):
    ids = (family.IMAGE, family.VIDEO, family.START, family.END)
    names = ("image_token", "video_token", "vision_start_token", "vision_end_token")
    texts = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    tokenizer = word_tokenizer({name: (text, i) for name, text, i in zip(names, texts, ids)})
    tokenizer.chat_template = QWEN_TEMPLATE
    return tokenizer


def save_qwen(path, family):
    """A tiny Qwen-VL checkpoint (patch 2, merge 2: a 4 x 4 pixel block is one LLM token) with its image processor."""
    from transformers import Qwen2VLImageProcessorPil

    family.build().save_pretrained(path)
    qwen_tokenizer(family).save_pretrained(path)
    Qwen2VLImageProcessorPil(patch_size=family.PATCH, merge_size=family.MERGE, temporal_patch_size=family.TEMPORAL,
                             size={"shortest_edge": QWEN_MIN, "longest_edge": QWEN_MAX}).save_pretrained(path)


def save_qwen_video_processor(path, family, processor_class, video_processor_class):
    """The full processor (needs torchvision), with the same patching as the image processor."""
    from transformers import AutoImageProcessor

    video = video_processor_class(patch_size=family.PATCH, merge_size=family.MERGE,
                                  temporal_patch_size=family.TEMPORAL,
                                  size={"shortest_edge": QWEN_MIN, "longest_edge": QWEN_MAX * FRAMES})
    processor_class(image_processor=AutoImageProcessor.from_pretrained(path), tokenizer=qwen_tokenizer(family),
                    video_processor=video, chat_template=QWEN_TEMPLATE).save_pretrained(path)


def save_llava(path, next_):
    """A tiny LLaVA-1.5 (32 px, patch 8: 16 tokens per image) or LLaVA-NeXT (anyres over tests.test_patch.PINPOINTS)
    checkpoint with its processor (transformers' llava-hf layout)."""
    from transformers import CLIPImageProcessorPil, LlavaNextImageProcessorPil, LlavaNextProcessor, LlavaProcessor

    from tests.test_patch import IMAGE, PINPOINTS, build_llava, build_next

    tokenizer = word_tokenizer({"image_token": ("<image>", IMAGE)})
    tokenizer.chat_template = LLAVA_TEMPLATE
    (build_next() if next_ else build_llava()).save_pretrained(path)
    size = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    options = dict(patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
                   chat_template=LLAVA_TEMPLATE)  # llava-hf's: the CLIP tower's [CLS] is dropped
    if next_:
        processor = LlavaNextProcessor(LlavaNextImageProcessorPil(**size, image_grid_pinpoints=PINPOINTS), tokenizer,
                                       **options)
    else:
        processor = LlavaProcessor(CLIPImageProcessorPil(**size), tokenizer, **options)
    processor.save_pretrained(path)
    tokenizer.save_pretrained(path)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    import tests.test_patch_qwen2_5_vl as qwen2_5
    import tests.test_patch_qwen3_vl as qwen3

    root = tmp_path_factory.mktemp("lmms-families")
    save_qwen(root / "qwen2_5_vl", qwen2_5)
    save_qwen(root / "qwen3_vl", qwen3)
    save_llava(root / "llava", next_=False)
    save_llava(root / "llava_next", next_=True)
    (root / "run.py").write_text(RUN)
    return root


def qwen_image_rows(family, call):
    """The stock model's tokens per image (one row each) of the pixels and grids the plugin's prefill received."""
    with torch.no_grad():
        return list(family.build().model.get_image_features(call["pixel_values"], call["image_grid_thw"]).pooler_output)


@pytest.mark.parametrize("name,module,budget", [("script_qwen2_5_vl", "qwen2_5_vl", "0.5"),
                                                ("script_qwen3_vl", "qwen3_vl", "3")])
def test_qwen_images_in_one_batch_with_budget_and_method(root, name, module, budget):
    """Two images (24 x 16 and 16 x 16 px: (1, 8, 12) and (1, 8, 8) patch grids, 24 and 16 tokens after the 2 x 2
    merger) answered in one batched prefill; every image is a row keeping its budget (a fraction or a count),
    chosen by divprune on the stock get_image_features."""
    import importlib

    family = importlib.import_module(f"tests.test_patch_{module}")
    docs = [{"seed": 0, "size": [24, 16]}, {"seed": 1, "size": [16, 16]}]
    result, calls = run_plugin(root, docs, f"method=divprune,budget={budget},batch_size=2", name=name, ckpt=module)
    assert name in result["models"] and result["class"].startswith("llava.lmms.models.ScriptQwen")
    refused = result["refused"]
    assert len(refused) == 4 and "gsp_ratio" in refused[0] and "nope" in refused[1] and "budget" in refused[2]
    assert len(result["answers"]) == 2 and all(isinstance(a, str) and "w7" not in a for a in result["answers"])
    assert len(calls) == 1
    call = calls[0]
    assert call["image_grid_thw"].tolist() == [[1, 8, 12], [1, 8, 8]]
    assert ((call["input_ids"] == family.IMAGE).sum(dim=1)).tolist() == [24, 16]  # one run per prompt
    assert torch.equal(call["mm_token_type_ids"], (call["input_ids"] == family.IMAGE).int())
    kept = [sp.resolve_budget(float(budget) if "." in budget else int(budget), n) for n in (24, 16)]
    assert result["visual_tokens"] == kept
    rows = qwen_image_rows(family, call)
    assert result["kept"] == [sp.select(r[None].float(), k, "divprune")[0].sort().values.tolist()
                              for r, k in zip(rows, kept)]


def test_qwen_unpruned_runs_the_stock_model_and_wrong_checkpoints_are_refused(root):
    """method=none leaves the model unpatched (nothing kept is reported); a Qwen3-VL checkpoint given to
    script_qwen2_5_vl is refused naming both model types."""
    result, calls = run_plugin(root, [{"seed": 0, "size": [16, 16]}], "method=none", name="script_qwen2_5_vl",
                               ckpt="qwen2_5_vl")
    assert result["visual_tokens"] == [] and result["kept"] is None and len(result["answers"]) == 1
    assert (calls[0]["input_ids"] == 97).sum() == 16
    import subprocess

    with pytest.raises(subprocess.CalledProcessError) as error:
        run_plugin(root, [{"seed": 0, "size": [16, 16]}], "method=none", name="script_qwen2_5_vl", ckpt="qwen3_vl",
                   capture=True)
    assert "'qwen3_vl' checkpoint" in error.value.stderr and "qwen2_5_vl" in error.value.stderr


@pytest.mark.parametrize("next_", [False, True], ids=["llava-1.5", "llava-next"])
def test_llava_images_in_one_batch_with_budget_and_method(root, next_):
    """Two images of different sizes in one batch through the checkpoint's processor. LLaVA-1.5: 16 placeholders per
    image (32 px / patch 8, squared), one row each. LLaVA-NeXT: a base row and one row per anyres crop (a 20 x 50
    image: pinpoint 32 x 64, 2 crops; 40 x 40: 64 x 64, 4 crops), the crops zero-padded to the batch's longest.
    Kept = divprune on the stock tower + projector features of every row."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    from tests.test_patch import IMAGE, PINPOINTS, build_llava, build_next, projected_rows

    ckpt = "llava_next" if next_ else "llava"
    docs = [{"seed": 0, "size": [50, 20]}, {"seed": 1, "size": [40, 40]}]
    result, calls = run_plugin(root, docs, "method=divprune,budget=5,batch_size=2", name="script_llava", ckpt=ckpt)
    assert "script_llava" in result["models"] and result["class"] == "llava.lmms.models.ScriptLlava"
    assert len(result["refused"]) == 4 and len(result["answers"]) == 2
    assert len(calls) == 1
    call = calls[0]
    pixels = call["pixel_values"]
    if next_:
        assert call["image_sizes"].tolist() == [[20, 50], [40, 40]]
        counts = [image_size_to_num_patches(s, PINPOINTS, 32) for s in ([20, 50], [40, 40])]
        assert counts == [3, 5] and pixels.shape == (2, 5, 3, 32, 32)
        assert not pixels[0, 3:].any()  # the padding the model reads past (image_sizes)
        crops = torch.cat([p[:c] for p, c in zip(pixels, counts)])  # (8, 3, 32, 32)
        model = build_next()
    else:
        assert pixels.shape == (2, 3, 32, 32)
        assert ((call["input_ids"] == IMAGE).sum(dim=1)).tolist() == [16, 16]
        assert result["visual_tokens"] == [5, 5]
        crops, model = pixels, build_llava()
    with torch.no_grad():
        rows = projected_rows(model, crops)  # (R, 16, D)
    assert result["kept"] == sp.select(rows, 5, "divprune").sort(dim=1).values.tolist()


def qwen_video_test(tmp_path, module, processor, video_processor):
    """A video of 8 frames (48 x 32 px, 4 fps) through the checkpoint's full processor: 4 frames sampled evenly are 2
    temporal steps, each a row keeping 3 tokens chosen by divprune on the stock get_video_features."""
    import importlib

    import transformers

    family = importlib.import_module(f"tests.test_patch_{module}")
    ckpt = tmp_path / module
    save_qwen(ckpt, family)
    save_qwen_video_processor(ckpt, family, getattr(transformers, processor), getattr(transformers, video_processor))
    write_clip(tmp_path / "clip.mp4", 8, seed=0, rate=4)  # 8 frames of 48 x 32 px at 4 fps
    (tmp_path / "run.py").write_text(RUN)
    result, calls = run_plugin(tmp_path, [{"video": str(tmp_path / "clip.mp4")}],
                               f"method=divprune,budget=3,max_frames_num={FRAMES}", name=f"script_{module}",
                               ckpt=module)
    call = calls[0]
    # 4 frames evenly from 8 -> 2 temporal steps of a 16 x 24 patch grid: 2 rows of 8 * 12 = 96 tokens
    assert call["video_grid_thw"].tolist() == [[2, 16, 24]]
    assert (call["input_ids"] == family.VIDEO).sum() == 2 * 96
    assert result["visual_tokens"] == [2 * 3]
    with torch.no_grad():
        video = family.build().model.get_video_features(call["pixel_values_videos"],
                                                        call["video_grid_thw"]).pooler_output[0]
    rows = video.view(2, 96, -1)
    assert result["kept"] == sp.select(rows.float(), 3, "divprune").sort(dim=1).values.tolist()
    return call


@pytest.mark.torchvision
def test_qwen2_5_vl_video_frames_are_rows(tmp_path):
    call = qwen_video_test(tmp_path, "qwen2_5_vl", "Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor")
    # temporal_patch_size / the sampled rate: 4 frames over the 2 s stream = 2 fps -> 1 s per temporal step
    assert call["second_per_grid_ts"].tolist() == pytest.approx([1.0])


@pytest.mark.torchvision
def test_qwen3_vl_video_frames_are_rows(tmp_path):
    qwen_video_test(tmp_path, "qwen3_vl", "Qwen3VLProcessor", "Qwen3VLVideoProcessor")

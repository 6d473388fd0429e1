"""The lmms-eval plugin (llava.lmms): found through lmms-eval's own entry-point registry in a fresh subprocess
(nothing of ours imported by hand there), run on hand-made Instances with a tiny random LLaVA-Video checkpoint
and a video written here; the kept frame tokens are checked against selection on the STOCK tower's features of
the frames the model received (2x2 average pooling done here, as tests/test_patch_llava_onevision.py)."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

pytest.importorskip("lmms_eval")
av = pytest.importorskip("av")

import script_prune as sp  # noqa: E402
from script_prune.patch import LlavaOnevisionFamily  # noqa: E402
from tests.helpers import skip_below_family_minimum, word_tokenizer, write_clip  # noqa: E402
from tests.test_patch_llava_onevision import IMAGE, SIZE, VIDEO, build, projected  # noqa: E402

pytestmark = skip_below_family_minimum(LlavaOnevisionFamily())

FRAMES = 3
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}{% if c['type'] == 'video' %}<video>"
            "{% else %}{{ c['text'] }}{% endif %} {% endfor %}{% endfor %}{% if add_generation_prompt %}w2: {% endif %}")


def save_checkpoint(path):
    """Tiny LLaVA-OneVision weights, a word-level tokenizer whose <video> / <image> are ids 98 / 99, a chat
    template, and the image processor's statistics; everything ``from_pretrained`` reads offline."""
    from transformers import LlavaOnevisionImageProcessorPil

    tokenizer = word_tokenizer({"video_token": ("<video>", VIDEO), "image_token": ("<image>", IMAGE)})
    tokenizer.chat_template = TEMPLATE
    build().save_pretrained(path)
    tokenizer.save_pretrained(path)
    LlavaOnevisionImageProcessorPil(size={"height": SIZE, "width": SIZE}, image_mean=[0.5, 0.4, 0.3],
                                    image_std=[0.2, 0.25, 0.3]).save_pretrained(path)


INTERNVL_TEMPLATE = TEMPLATE.replace("c['type'] == 'video' %}<video>", "c['type'] == 'image' %}<IMG_CONTEXT>")


def save_internvl_checkpoint(path):
    """Tiny InternVL (16 tokens per 16 px tile), its tokenizer (<IMG_CONTEXT> = id 99, <img> / </img>) and a
    tiling image processor (an image of 32 x 32: 2 x 2 tiles + thumbnail)."""
    from transformers import GotOcr2ImageProcessorPil

    from tests.test_patch_internvl import build as build_internvl

    tokenizer = word_tokenizer({"context_image_token": ("<IMG_CONTEXT>", IMAGE), "start_image_token": ("<img>", None),
                                "end_image_token": ("</img>", None)})
    tokenizer.chat_template = INTERNVL_TEMPLATE
    build_internvl().save_pretrained(path)
    tokenizer.save_pretrained(path)
    GotOcr2ImageProcessorPil(size={"height": 16, "width": 16}, crop_to_patches=True, min_patches=1,
                             max_patches=4).save_pretrained(path)


RUN = textwrap.dedent("""
    import json, sys, numpy as np, torch
    from PIL import Image
    from lmms_eval.api.instance import Instance
    from lmms_eval.models import get_model, list_available_models
    import script_prune as sp

    name, ckpt, out, docs, args = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), sys.argv[5]
    result = {"models": list_available_models(include_aliases=True)}
    cls = get_model(name)
    result["class"] = f"{cls.__module__}.{cls.__name__}"
    for bad in ("gsp_ratio=1.5", "nope=3", "budget=0", "method=nope"):  # refused before loading (no such checkpoint)
        try:
            cls.create_from_arg_string(f"pretrained=/no/such/checkpoint,{bad}")
        except ValueError as error:
            result.setdefault("refused", []).append(str(error))
    lm = cls.create_from_arg_string(f"pretrained={ckpt},device=cpu,dtype=float32,{args}")
    lm.task_dict = {"toy": {"test": dict(enumerate(docs))}}
    seen = []  # the tensors of every forward that carried visual inputs (the prefills)
    visual_keys = ("pixel_values", "pixel_values_videos", "mm_encoder_outputs")  # the last: stock generate() >= 5.24
    lm.model.register_forward_pre_hook(
        lambda m, a, kw: seen.append({k: v for k, v in kw.items() if isinstance(v, torch.Tensor)})
        if any(kw.get(k) is not None for k in visual_keys) else None, with_kwargs=True)

    def visual(doc):
        if "video" in doc:
            return [doc["video"]]
        pixels = np.random.RandomState(doc["seed"]).randint(0, 256, (doc["size"][1], doc["size"][0], 3), dtype=np.uint8)
        return [Image.fromarray(pixels)]

    gen = {"max_new_tokens": 3, "temperature": 0, "until": ["w7"]}
    requests = [Instance("generate_until", (f"w{10 + i} w{20 + i} w{30 + i}"[: 7 + 4 * i], dict(gen), visual, i, "toy",
                         "test"), idx=0, metadata={"task": "toy", "doc_id": i, "repeats": 1}) for i in range(len(docs))]
    result["answers"] = lm.generate_until(requests)
    result["visual_tokens"] = lm.visual_tokens
    result["kept"] = [k.tolist() for k in sp.patch.kept(lm.model)] if sp.patch.is_patched(lm.model) else None
    torch.save(seen, out + ".pt")
    json.dump(result, open(out, "w"))
""")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms")
    save_checkpoint(root / "ckpt")
    videos = []
    for i, frames in enumerate((8, 12)):
        write_clip(root / f"clip{i}.mp4", frames, seed=i, rate=4)
        videos.append(str(root / f"clip{i}.mp4"))
    save_internvl_checkpoint(root / "internvl")
    (root / "run.py").write_text(RUN)
    return root, videos


def run_plugin(root, docs, args, name="script_llava_video", ckpt="ckpt", capture=False):
    out = root / "out.json"
    subprocess.run([sys.executable, str(root / "run.py"), name, str(root / ckpt), str(out), json.dumps(docs), args],
                   check=True, cwd=root, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"}, timeout=600,
                   capture_output=capture, text=capture)
    return json.loads(out.read_text()), torch.load(str(out) + ".pt")


def test_registry_finds_the_plugin_and_budget_and_method_reach_the_model(setup):
    root, videos = setup
    result, calls = run_plugin(root, [{"video": v} for v in videos], f"method=divprune,budget=2,max_frames_num={FRAMES},batch_size=2")
    pixels = [c["pixel_values_videos"] for c in calls]
    assert {"script_llava_onevision", "script_llava_video"} <= set(result["models"])
    assert result["class"] == "llava.lmms.models.ScriptLlavaOnevision"
    refused = result["refused"]
    assert len(refused) == 4 and "gsp_ratio" in refused[0] and "nope" in refused[1] and "budget" in refused[2]
    assert "method" in refused[3]
    assert len(result["answers"]) == 2 and all(isinstance(a, str) and "w7" not in a for a in result["answers"])
    # one batched prefill of both videos (batch_size=2): 3 frames x 2 kept tokens + the video newline each
    assert len(pixels) == 1 and pixels[0].shape == (2, FRAMES, 3, SIZE, SIZE)
    assert result["visual_tokens"] == [FRAMES * 2 + 1] * 2
    # the method: divprune's selection on the stock tower's frames, 2x2 average pooled (5x5 -> 2x2 grid)
    model = build()
    with torch.no_grad():
        tokens = projected(model, pixels[0].flatten(0, 1))  # (6, 25, D)
        grid = tokens.view(2 * FRAMES, 5, 5, -1)[:, :4, :4]
        frames = grid.reshape(2 * FRAMES, 2, 2, 2, 2, -1).mean(dim=(2, 4)).reshape(2 * FRAMES, 4, -1)
    reference = sp.select(frames, 2, "divprune").sort(dim=1).values
    assert result["kept"] == reference.tolist()


def test_frames_are_the_video_decoded_and_normalised(setup):
    """The pixels the model got are the 3 evenly spaced frames, resized and normalised with the checkpoint's
    statistics (checked here with PyAV + PIL directly), and a larger budget keeps more tokens per frame."""
    from PIL import Image

    root, videos = setup
    result, calls = run_plugin(root, [{"video": videos[0]}], f"method=script,budget=3,max_frames_num={FRAMES}")
    pixels = [c["pixel_values_videos"] for c in calls]
    assert result["visual_tokens"] == [FRAMES * 3 + 1]
    with av.open(videos[0]) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    chosen = [decoded[i] for i in np.linspace(0, len(decoded) - 1, FRAMES).astype(int)]
    mean, std = np.array([0.5, 0.4, 0.3]), np.array([0.2, 0.25, 0.3])
    expected = np.stack([(np.asarray(Image.fromarray(f).resize((SIZE, SIZE), Image.BICUBIC)) / 255.0 - mean) / std
                         for f in chosen]).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(pixels[0][0].numpy(), expected, atol=1e-5)


def test_internvl_tiles_are_rows_with_the_budget_and_method(setup):
    """Two images (32 x 32 and 48 x 16) in one batch: 2 x 2 tiles + thumbnail and 3 x 1 tiles + thumbnail; with
    budget 3 per tile, 15 and 12 visual tokens reach the LLM; the kept indices are divprune's on the STOCK
    tile features (get_image_features) of the pixels the model received."""
    from tests.test_patch_internvl import build as build_internvl

    root, _ = setup
    docs = [{"seed": 0, "size": [32, 32]}, {"seed": 1, "size": [48, 16]}]
    result, calls = run_plugin(root, docs, "method=divprune,budget=3,batch_size=2", name="script_internvl",
                               ckpt="internvl")
    pixels = [c["pixel_values"] for c in calls]
    assert result["class"] == "llava.lmms.models.ScriptInternVL" and "script_internvl" in result["models"]
    assert len(result["refused"]) == 4
    assert len(pixels) == 1 and pixels[0].shape == (9, 3, 16, 16)
    assert result["visual_tokens"] == [5 * 3, 4 * 3]
    with torch.no_grad():
        rows = build_internvl().model.get_image_features(pixel_values=pixels[0]).pooler_output  # (9, 16, D)
    assert result["kept"] == sp.select(rows, 3, "divprune").sort(dim=1).values.tolist()


def test_unpruned_video_keeps_every_pooled_token(setup):
    """method=none with LLaVA-Video's average pooling: all 2 x 2 = 4 tokens of each of the 3 frames + the newline."""
    root, videos = setup
    result, _ = run_plugin(root, [{"video": videos[1]}], f"method=none,max_frames_num={FRAMES}")
    assert result["visual_tokens"] == [FRAMES * 4 + 1]
    assert result["kept"] == [[0, 1, 2, 3]] * FRAMES

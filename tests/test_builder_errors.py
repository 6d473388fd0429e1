"""Acceptance 3: bad inputs give clear ValueError / FileNotFoundError messages."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from llava.mm_utils import tokenizer_image_token
from llava.model.builder import load_pretrained_model
from llava.model.pruning import PruningConfig


@pytest.fixture(scope="module")
def llava15(tiny_llava15_path):
    return load_pretrained_model(tiny_llava15_path, torch_dtype=torch.float32)


def copy_checkpoint(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def test_budget_below_one():
    with pytest.raises(ValueError, match="visual_token_num"):
        PruningConfig(visual_token_num=0)
    with pytest.raises(ValueError, match="visual_token_num"):
        PruningConfig(visual_token_num=2.5)


def test_unknown_method_and_param():
    with pytest.raises(ValueError, match="method must be one of"):
        PruningConfig(method="no_such_method")
    with pytest.raises(ValueError, match="gsp_ratio_typo"):
        PruningConfig(method="script", params={"gsp_ratio_typo": 0.3})


@pytest.mark.parametrize("layer", [0, 2, 7])
def test_in_llm_method_with_layer_out_of_range_is_refused_clearly(llava15, layer):
    # The tiny model has 2 decoder layers: FastV's K must lie in [1, layers - 1] = [1, 1].
    _, model, _, _ = llava15
    with pytest.raises(ValueError, match=r"'layer'.*in-LLM method.*\[1, 1\]"):
        model.set_pruning(PruningConfig(method="fastv", visual_token_num=4, params={"layer": layer}))
    assert model.pruning is None
    model.set_pruning(PruningConfig(method="fastv", visual_token_num=4, params={"layer": 1}))
    assert model.pruning is not None and model.pruning.method == "fastv"
    model.set_pruning(None)


def test_prompt_without_image_token(llava15):
    tokenizer, model, _, _ = llava15
    ids = tokenizer_image_token("USER: no image here ASSISTANT:", tokenizer, return_tensors="pt")[None]
    pixels = torch.zeros(1, 3, 56, 56)
    with pytest.raises(ValueError, match="input_ids.*<image>"):
        model(ids, images=pixels)
    with pytest.raises(ValueError, match="input_ids.*<image>"):
        model.generate(ids, images=pixels, max_new_tokens=1)


def test_image_token_without_images_and_count_mismatch(llava15):
    tokenizer, model, _, _ = llava15
    ids = tokenizer_image_token("USER: <image>\nhi ASSISTANT:", tokenizer, return_tensors="pt")[None]
    with pytest.raises(ValueError, match="no images"):
        model(ids)
    with pytest.raises(ValueError, match="2 image"):
        model(ids, images=torch.zeros(2, 3, 56, 56))


def test_relevance_method_without_texts_or_tokenizer(llava15):
    tokenizer, model, _, _ = llava15
    ids = tokenizer_image_token("USER: <image>\nhi ASSISTANT:", tokenizer, return_tensors="pt")[None]
    model.set_pruning(PruningConfig(method="script", visual_token_num=4))
    model.set_query_tokenizer(None)
    try:
        with pytest.raises(ValueError, match="texts="):
            model(ids, images=torch.zeros(1, 3, 56, 56))
        with pytest.raises(ValueError, match="texts must hold one query per sample"):
            model(ids, images=torch.zeros(1, 3, 56, 56), texts=["a", "b"])
    finally:
        model.set_query_tokenizer(tokenizer)
        model.set_pruning(None)


def test_anyres_needs_image_sizes(tiny_llava_next_path):
    tokenizer, model, _, _ = load_pretrained_model(tiny_llava_next_path)
    ids = tokenizer_image_token("USER: <image>\nhi ASSISTANT:", tokenizer, return_tensors="pt")[None]
    with pytest.raises(ValueError, match="image_sizes"):
        model(ids, images=torch.zeros(1, 3, 3, 56, 56))


def test_checkpoint_missing_keys_are_listed(tiny_llava15_path, tmp_path):
    path = copy_checkpoint(tiny_llava15_path, tmp_path / "broken")
    state = load_file(f"{path}/model.safetensors")
    del state["model.mm_projector.2.weight"], state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, f"{path}/model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing weights.*model\.layers\.1\.mlp\.up_proj\.weight.*") as err:
        load_pretrained_model(path)
    assert "model.mm_projector.2.weight" in str(err.value)


def test_missing_config_and_wrong_architecture(tiny_llava15_path, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained_model(str(tmp_path))
    path = copy_checkpoint(tiny_llava15_path, tmp_path / "wrong")
    cfg = json.loads(open(f"{path}/config.json").read())
    cfg["architectures"] = ["LlavaForConditionalGeneration"]
    open(f"{path}/config.json", "w").write(json.dumps(cfg))
    with pytest.raises(ValueError, match="architectures"):
        load_pretrained_model(path)


def test_missing_vision_tower_folder(tiny_llava15_path, tmp_path):
    path = copy_checkpoint(tiny_llava15_path, tmp_path / "novision")
    shutil.rmtree(f"{path}/clip")
    cfg = json.loads(open(f"{path}/config.json").read())
    cfg["mm_vision_tower"] = str(tmp_path / "no_clip_here")
    open(f"{path}/config.json", "w").write(json.dumps(cfg))
    with pytest.raises(FileNotFoundError, match="mm_vision_tower"):
        load_pretrained_model(path)


def test_bad_loader_options(tiny_llava15_path):
    with pytest.raises(ValueError, match="attn_implementation"):
        load_pretrained_model(tiny_llava15_path, attn_implementation="magic")
    with pytest.raises(ValueError, match="torch_dtype"):
        load_pretrained_model(tiny_llava15_path, torch_dtype="float8")
    with pytest.raises(ValueError, match="model_base"):
        load_pretrained_model(tiny_llava15_path, model_base="some/base")


def test_flash_attention_needs_the_package(tiny_llava15_path):
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    with pytest.raises(ValueError, match="flash-attn"):
        load_pretrained_model(tiny_llava15_path, attn_implementation="flash_attention_2")


def test_eager_attention_gives_the_same_logits(llava15, tiny_llava15_path):
    tokenizer, model, _, _ = llava15
    _, eager, _, _ = load_pretrained_model(tiny_llava15_path, torch_dtype=torch.float32, attn_implementation="eager")
    assert eager.hf.config.text_config._attn_implementation == "eager"
    ids = tokenizer_image_token("USER: <image>\nhi ASSISTANT:", tokenizer, return_tensors="pt")[None]
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(eager(ids, images=pixels).logits, model(ids, images=pixels).logits,
                                   atol=1e-4, rtol=0)  # the parity tolerance: eager and sdpa differ by ~1e-5


def test_device_map_auto_loads_the_same_model(llava15, tiny_llava15_path):
    tokenizer, model, _, _ = llava15
    _, mapped, _, _ = load_pretrained_model(tiny_llava15_path, torch_dtype=torch.float32, device_map="auto")
    ids = tokenizer_image_token("USER: <image>\nhi ASSISTANT:", tokenizer, return_tensors="pt")[None]
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(mapped(ids, images=pixels).logits, model(ids, images=pixels).logits, atol=0, rtol=0)


def test_unused_checkpoint_weights_are_reported(tiny_llava15_path, tmp_path):
    path = copy_checkpoint(tiny_llava15_path, tmp_path / "extra")
    state = load_file(f"{path}/model.safetensors")
    state["model.vision_resampler.weight"] = torch.zeros(2)
    save_file(state, f"{path}/model.safetensors", metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="model.vision_resampler.weight"):
        load_pretrained_model(path)


def test_pruned_forward_with_autograd_enabled(tiny_llava15_path):
    """Issue 13: a user's own forward with autograd on used to crash inside the selection (torch's 'max(): functions
    with out=... arguments don't support automatic differentiation')."""
    from llava.mm_utils import process_images
    from tests.helpers import prompt_ids, random_image

    tokenizer, model, processor, _ = load_pretrained_model(
        tiny_llava15_path, pruning={"method": "script", "visual_token_num": 4})
    ids = prompt_ids(tokenizer, "What is shown?").unsqueeze(0)
    image = random_image(40, 30)
    pixels = process_images([image], processor, model.config)
    kw = dict(images=pixels, image_sizes=[image.size], texts=["What is shown?"])
    with torch.no_grad():
        expected = model(ids, **kw).logits
    out = model(ids, **kw)                                          # autograd on (a user's own forward)
    assert out.logits.requires_grad and model.last_visual_token_counts == [4]
    torch.testing.assert_close(out.logits.detach(), expected)
    out.logits.sum().backward()                                     # gradients flow through the kept tokens
    assert model.hf.model.multi_modal_projector.linear_1.weight.grad is not None


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "tokenizer.json"])
def test_corrupt_checkpoint_file_is_named(tiny_llava15_path, tmp_path, name):
    """Issue 13: safetensors' "header too large" and json errors named no file."""
    ckpt = tmp_path / "ck"
    shutil.copytree(tiny_llava15_path, ckpt)
    (ckpt / name).write_bytes(b"\x00garbage{")
    with pytest.raises(ValueError, match=f"{ckpt / name}.*corrupt"):
        load_pretrained_model(str(ckpt))

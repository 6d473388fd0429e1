"""Acceptance 1: our LLaVA (load_pretrained_model: LLaVA's API around transformers' class) equals
transformers' own LLaVA / LLaVA-NeXT fed the transformers way (the independent reference).

The reference is a separately loaded ``LlavaForConditionalGeneration`` / ``LlavaNextForConditionalGeneration``
(through ``llava.model.convert``, the key / config remap tested below); each side gets pixel values from
ITS OWN preprocessing (ours: ``llava.mm_utils.process_images`` + -200 markers; theirs:
``LlavaImageProcessorPil(do_pad=True)`` / ``LlavaNextImageProcessorPil`` + the image token repeated) and
the logits must agree to 1e-4 in float32.
"""

import pytest
import torch
from transformers import LlavaImageProcessorPil, LlavaNextImageProcessorPil

from llava.constants import IMAGE_TOKEN_INDEX
from llava.mm_utils import process_images
from llava.model.builder import load_pretrained_model
from llava.model.convert import convert_state_dict, hf_pinpoints, load_checkpoint
from tests.helpers import prompt_ids, random_image


def build_reference(path: str):
    """transformers' own class holding the checkpoint, through llava.model.convert (the key / config remap)."""
    ref, config, unexpected = load_checkpoint(path)
    assert not unexpected, unexpected
    assert not ref.training
    return ref


def expand_image_token(ids: torch.Tensor, count: int, image_token_id: int) -> torch.Tensor:
    """transformers' convention: the image token repeated once per visual feature."""
    row = ids[0].tolist()
    at = row.index(IMAGE_TOKEN_INDEX)
    return torch.tensor([row[:at] + [image_token_id] * count + row[at + 1:]])


@pytest.fixture(scope="module")
def llava15(tiny_llava15_path):
    return load_pretrained_model(tiny_llava15_path, torch_dtype=torch.float32)


@pytest.fixture(scope="module")
def llava_next(tiny_llava_next_path):
    return load_pretrained_model(tiny_llava_next_path, torch_dtype=torch.float32)


@pytest.fixture(scope="module")
def reference15(llava15, tiny_llava15_path):
    """(prompt ids, image token id, transformers LlavaForConditionalGeneration) for the 1.5 tests."""
    tokenizer, model, _, _ = llava15
    ids = prompt_ids(tokenizer, "What is in the picture?")[None]
    ref = build_reference(tiny_llava15_path)
    assert type(ref).__name__ == "LlavaForConditionalGeneration"
    return ids, ref.config.image_token_id, ref


@pytest.fixture(scope="module")
def reference_next(llava_next, tiny_llava_next_path):
    """(prompt ids, image token id, transformers LlavaNextForConditionalGeneration) for the NeXT tests."""
    tokenizer, model, _, _ = llava_next
    ids = prompt_ids(tokenizer, "Describe the image.")[None]
    ref = build_reference(tiny_llava_next_path)
    assert type(ref).__name__ == "LlavaNextForConditionalGeneration"
    return ids, ref.config.image_token_id, ref


@pytest.mark.parametrize("width,height", [(56, 56), (90, 40), (33, 77), (120, 121)])
def test_llava15_logits_match_transformers(llava15, reference15, width, height):
    tokenizer, model, processor, _ = llava15
    image = random_image(width, height, seed=width * height)
    ids, token_id, ref = reference15
    hf_processor = LlavaImageProcessorPil(
        do_pad=True, size={"shortest_edge": processor.size["shortest_edge"]}, crop_size=processor.crop_size,
        image_mean=processor.image_mean, image_std=processor.image_std,
    )
    hf_pixels = hf_processor(images=[image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ours = model(ids, images=process_images([image], processor, model.config), image_sizes=[image.size]).logits
        count = model.last_visual_token_counts[0]
        assert count == model.num_patches
        theirs = ref(input_ids=expand_image_token(ids, count, token_id), pixel_values=hf_pixels).logits
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("width,height", [(56, 56), (100, 40), (40, 100), (130, 125), (170, 50), (61, 140)])
def test_llava_next_logits_match_transformers(llava_next, reference_next, width, height):
    tokenizer, model, processor, _ = llava_next
    image = random_image(width, height, seed=width + height)
    ids, token_id, ref = reference_next
    hf_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": processor.size["shortest_edge"]}, crop_size=processor.crop_size,
        image_mean=processor.image_mean, image_std=processor.image_std,
        image_grid_pinpoints=hf_pinpoints(model.config.to_dict()),
    )
    hf_inputs = hf_processor(images=[image], return_tensors="pt")
    assert hf_inputs["image_sizes"].tolist() == [[height, width]]
    with torch.no_grad():
        pixels = process_images([image], processor, model.config)
        ours = model(ids, images=pixels, image_sizes=[image.size]).logits
        count = model.last_visual_token_counts[0]
        theirs = ref(
            input_ids=expand_image_token(ids, count, token_id),
            pixel_values=hf_inputs["pixel_values"],
            image_sizes=hf_inputs["image_sizes"],
        ).logits
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_mistral_architecture_matches_llama_on_the_same_weights(llava15, tiny_llava15_path, tmp_path):
    """LlavaMistralForCausalLM (LLaVA-1.6-mistral) loads the same format; with no sliding window a Mistral
    LLM with Llama's weights computes the same function, so logits must match."""
    import json
    import shutil

    tokenizer, model, processor, _ = llava15
    path = tmp_path / "mistral"
    shutil.copytree(tiny_llava15_path, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(architectures=["LlavaMistralForCausalLM"], sliding_window=None)
    (path / "config.json").write_text(json.dumps(cfg))
    _, mistral, _, _ = load_pretrained_model(str(path), torch_dtype=torch.float32)
    assert mistral.hf.config.text_config.model_type == "mistral"
    image = random_image(70, 50, seed=3)
    ids = prompt_ids(tokenizer, "What is it?")[None]
    pixels = process_images([image], processor, model.config)
    with torch.no_grad():
        torch.testing.assert_close(mistral(ids, images=pixels).logits, model(ids, images=pixels).logits,
                                   atol=1e-5, rtol=0)


# ------------------------------------------------------------------ llava.model.convert (the key / config remap)
def test_convert_state_dict_maps_the_original_names_onto_transformers_names():
    state = {name: torch.zeros(1) for name in (
        "model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight", "lm_head.weight",
        "model.mm_projector.0.weight", "model.mm_projector.2.bias", "model.image_newline",
        "model.vision_tower.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight", "something.else")}
    assert sorted(convert_state_dict(state)) == sorted([
        "model.language_model.embed_tokens.weight", "model.language_model.layers.0.self_attn.q_proj.weight",
        "model.language_model.norm.weight", "lm_head.weight", "model.multi_modal_projector.linear_1.weight",
        "model.multi_modal_projector.linear_2.bias", "model.image_newline",
        "model.vision_tower.encoder.layers.0.mlp.fc1.weight"])


def test_hf_pinpoints_swap_width_height():
    assert hf_pinpoints({"image_grid_pinpoints": [[56, 112], [168, 56]]}) == [[112, 56], [56, 168]]


def test_converted_next_holds_the_shipped_tower_and_15_the_clip_folders(reference_next, reference15,
                                                                        tiny_llava_next_path, tiny_llava15_path):
    from safetensors.torch import load_file

    key = "encoder.layers.0.mlp.fc1.weight"
    shipped = load_file(f"{tiny_llava_next_path}/model.safetensors")[f"model.vision_tower.vision_tower.vision_model.{key}"]
    torch.testing.assert_close(reference_next[2].model.vision_tower.state_dict()[key], shipped, atol=0, rtol=0)
    clip = load_file(f"{tiny_llava15_path}/clip/model.safetensors")[f"vision_model.{key}"]
    torch.testing.assert_close(reference15[2].model.vision_tower.state_dict()[key], clip, atol=0, rtol=0)


def test_converted_image_token_is_outside_the_vocabulary(reference15, tiny_llava15_path):
    import json

    vocab = json.loads(open(f"{tiny_llava15_path}/config.json").read())["vocab_size"]
    ref = reference15[2]
    assert ref.config.image_token_id == vocab
    assert ref.get_input_embeddings().weight.shape[0] == vocab + 1
    assert torch.count_nonzero(ref.get_input_embeddings().weight[vocab]) == 0
    assert ref.lm_head.weight.shape[0] == vocab  # logits keep the original vocabulary


def test_toy_checkpoint_converts(tmp_path):
    ref, config, unexpected = load_checkpoint("llava/toy/checkpoint")
    assert type(ref).__name__ == "LlavaForConditionalGeneration" and unexpected == []
    assert ref.config.vision_feature_layer == config["mm_vision_select_layer"]


def _copy_checkpoint(src: str, dest, edit_state=None, edit_config=None) -> str:
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dest)
    if edit_state is not None:
        state = load_file(f"{dest}/model.safetensors")
        edit_state(state)
        save_file(state, f"{dest}/model.safetensors")
    if edit_config is not None:
        cfg = json.loads((dest / "config.json").read_text())
        edit_config(cfg)
        (dest / "config.json").write_text(json.dumps(cfg))
    return str(dest)


def test_convert_refuses_missing_weights_a_partial_tower_and_other_projectors(tiny_llava15_path,
                                                                              tiny_llava_next_path, tmp_path):
    path = _copy_checkpoint(tiny_llava15_path, tmp_path / "a", edit_state=lambda s: s.pop("model.norm.weight"))
    with pytest.raises(ValueError, match="missing weights: \\['model.norm.weight'\\]"):  # the checkpoint's own name
        load_checkpoint(path)
    tower_key = "model.vision_tower.vision_tower.vision_model.post_layernorm.weight"
    path = _copy_checkpoint(tiny_llava_next_path, tmp_path / "b", edit_state=lambda s: s.pop(tower_key))
    with pytest.raises(ValueError, match=f"partial vision tower; missing: \\['{tower_key}'\\]"):
        load_checkpoint(path)
    path = _copy_checkpoint(tiny_llava15_path, tmp_path / "c",
                            edit_config=lambda c: c.update(mm_projector_type="linear"))
    with pytest.raises(ValueError, match="mm_projector_type 'linear'"):
        load_checkpoint(path)

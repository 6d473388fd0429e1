"""Acceptance 1: our LLaVA equals transformers' own LLaVA / LLaVA-NeXT (the independent reference).

The tiny checkpoint's weights are converted into ``transformers.LlavaForConditionalGeneration`` /
``LlavaNextForConditionalGeneration``; each model gets pixel values from ITS OWN preprocessing
(ours: ``llava.mm_utils.process_images``; theirs: ``LlavaImageProcessorPil(do_pad=True)`` /
``LlavaNextImageProcessorPil``) and the logits must agree to 1e-4 in float32.
"""

import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessorPil,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
)

from llava.constants import IMAGE_TOKEN_INDEX
from llava.mm_utils import process_images
from llava.model.builder import load_pretrained_model
from tests.helpers import prompt_ids, random_image

OURS_TO_HF_PREFIX = [
    ("model.vision_tower.vision_tower.vision_model.", "model.vision_tower."),
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("model.image_newline", "model.image_newline"),
    ("model.", "model.language_model."),
    ("lm_head.", "lm_head."),
]


def convert_state_dict(state: dict) -> dict:
    """Our parameter names (LLaVA's checkpoint layout) -> transformers' LLaVA layout."""
    out = {}
    for key, value in state.items():
        for ours, theirs in OURS_TO_HF_PREFIX:
            if key.startswith(ours):
                out[theirs + key[len(ours):]] = value
                break
    return out


def hf_configs(model, image_token_id: int) -> dict:
    cfg = model.config
    text = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=False,
    )
    vision = CLIPVisionConfig(**model.get_vision_tower().config.to_dict())
    return dict(text_config=text, vision_config=vision, image_token_index=image_token_id,
                vision_feature_layer=cfg.mm_vision_select_layer, vision_feature_select_strategy="default",
                projector_hidden_act="gelu", multimodal_projector_bias=True)


def hf_pinpoints(model) -> list:
    """LLaVA's image_grid_pinpoints are (width, height) pairs, transformers' are (height, width): swap them
    so both pick the same grid (it matters on ties, e.g. a square image between 1x2 and 2x1)."""
    return [[h, w] for w, h in model.config.image_grid_pinpoints]


def build_reference(model, image_token_id: int, next_arch: bool):
    kwargs = hf_configs(model, image_token_id)
    if next_arch:
        ref = LlavaNextForConditionalGeneration(LlavaNextConfig(image_grid_pinpoints=hf_pinpoints(model), **kwargs))
    else:
        ref = LlavaForConditionalGeneration(LlavaConfig(**kwargs))
    missing, unexpected = ref.load_state_dict(convert_state_dict(model.state_dict()), strict=False)
    assert not unexpected, unexpected
    assert [k for k in missing if not k.endswith("position_ids")] == []
    return ref.eval().float()


def expand_image_token(ids: torch.Tensor, count: int, image_token_id: int) -> torch.Tensor:
    """transformers' convention: the image token repeated once per visual feature."""
    row = ids[0].tolist()
    at = row.index(IMAGE_TOKEN_INDEX)
    return torch.tensor([row[:at] + [image_token_id] * count + row[at + 1:]])


def unused_token_id(tokenizer, ids: torch.Tensor) -> int:
    used = set(ids[0].tolist())
    return next(i for i in range(len(tokenizer) - 1, 0, -1) if i not in used)


@pytest.fixture(scope="module")
def llava15(tiny_llava15_path):
    return load_pretrained_model(tiny_llava15_path, torch_dtype=torch.float32)


@pytest.fixture(scope="module")
def llava_next(tiny_llava_next_path):
    return load_pretrained_model(tiny_llava_next_path, torch_dtype=torch.float32)


@pytest.fixture(scope="module")
def reference15(llava15):
    """(prompt ids, image token id, transformers LlavaForConditionalGeneration) for the 1.5 tests."""
    tokenizer, model, _, _ = llava15
    ids = prompt_ids(tokenizer, "What is in the picture?")[None]
    token_id = unused_token_id(tokenizer, ids)
    return ids, token_id, build_reference(model, token_id, next_arch=False)


@pytest.fixture(scope="module")
def reference_next(llava_next):
    """(prompt ids, image token id, transformers LlavaNextForConditionalGeneration) for the NeXT tests."""
    tokenizer, model, _, _ = llava_next
    ids = prompt_ids(tokenizer, "Describe the image.")[None]
    token_id = unused_token_id(tokenizer, ids)
    return ids, token_id, build_reference(model, token_id, next_arch=True)


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
        assert count == model.get_vision_tower().num_patches
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
        image_grid_pinpoints=hf_pinpoints(model),
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


def test_llava_next_uses_the_checkpoints_fine_tuned_vision_tower(llava_next, tiny_llava_next_path):
    """LLaVA-1.6 ships its own (fine-tuned) tower; the CLIP folder's differs (the tiny maker perturbs it)."""
    from safetensors.torch import load_file

    _, model, _, _ = llava_next
    shipped = load_file(f"{tiny_llava_next_path}/model.safetensors")
    key = "model.vision_tower.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"
    ours = model.state_dict()[key]
    torch.testing.assert_close(ours, shipped[key], atol=0, rtol=0)


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
    assert type(mistral).__name__ == "LlavaMistralForCausalLM"
    image = random_image(70, 50, seed=3)
    ids = prompt_ids(tokenizer, "What is it?")[None]
    pixels = process_images([image], processor, model.config)
    with torch.no_grad():
        torch.testing.assert_close(mistral(ids, images=pixels).logits, model(ids, images=pixels).logits,
                                   atol=1e-5, rtol=0)

"""script_prune.patch on transformers' InternVL (tiny random config, offline): tiles and thumbnail as rows.

References from the STOCK modules only: each tile's tokens from the stock get_image_features (vision
tower, pixel shuffle, projector); the unpatched model is fed the hand-shortened prompt
(tests/test_patch.py's reference_logits: contiguous positions, left padding).
"""

import pytest
import torch
from transformers import InternVLConfig, InternVLForConditionalGeneration

import script_prune as sp
from tests.test_patch import IMAGE, VISION_METHODS, cache_length, left_padded, question_mean, reference_logits

from script_prune.patch import InternVLFamily  # noqa: E402
from tests.helpers import check_vision_side_refusals, skip_below_family_minimum  # noqa: E402

pytestmark = skip_below_family_minimum(InternVLFamily())

TILE = 16  # (16 / 2)^2 patches * 0.5^2 after the pixel shuffle


def build(seed: int = 0):
    torch.manual_seed(seed)
    text = dict(model_type="qwen2", vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16,
                  patch_size=2)
    cfg = InternVLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE, vision_feature_layer=-1,
                         vision_feature_select_strategy="default", downsample_ratio=0.5)
    model = InternVLForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in model.model.language_model.layers.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.25)
    return model


def batch():
    """Prompt 0: an image of 3 tiles (2 tiles + thumbnail); prompt 1: 2 tiles; different lengths, left padded."""
    ids, mask = left_padded([[1, 5, 6] + [IMAGE] * 3 * TILE + [7, 8], [1] + [IMAGE] * 2 * TILE + [9, 10, 11]])
    return dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(5, 3, 16, 16))


@pytest.mark.parametrize("method,budget", [("divprune", 5), ("script", 0.25)])
@torch.no_grad()
def test_logits_equal_stock_model_on_hand_shortened_prompt(method, budget):
    model = build()
    inputs = batch()
    sp.patch.apply(model, method=method, budget=budget)  # script: llm_text by default
    out = model(**inputs)
    kept = sp.patch.kept(model)
    sp.patch.remove(model)
    assert sp.patch.family_of(model).row_length(model) == TILE
    rows = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output  # (5, 16, D)
    k = sp.resolve_budget(budget, TILE)
    extra = {}
    if method == "script":
        query = question_mean(model, inputs["input_ids"], inputs["attention_mask"])[[0, 0, 0, 1, 1]][:, None]
        extra = dict(image_embeds=rows, query_embeds=query)
    assert torch.equal(torch.stack(kept), sp.select(rows, k, method, **extra).sort(dim=1).values)
    runs = [torch.cat([rows[r, kept[r]] for r in range(3)]), torch.cat([rows[r, kept[r]] for r in (3, 4)])]
    ref, short, _ = reference_logits(model, inputs["input_ids"], inputs["attention_mask"], runs)
    assert out.logits.shape == ref.shape
    torch.testing.assert_close(out.logits[short.bool()], ref[short.bool()], atol=1e-4, rtol=0)
    assert cache_length(out) == short.shape[1]


@pytest.mark.parametrize("method", VISION_METHODS)
@torch.no_grad()
def test_kept_equals_select_on_the_stock_tiles_for_every_selection_method(method):
    model = build()
    inputs = batch()
    sp.patch.apply(model, method=method, budget=5)
    model(**inputs)
    kept = torch.stack(sp.patch.kept(model))
    sp.patch.remove(model)
    rows = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output  # (5, 16, D)
    query = question_mean(model, inputs["input_ids"], inputs["attention_mask"])[[0, 0, 0, 1, 1]][:, None]
    params = {"negate": False} if "negate" in sp.get_method(method).params else {}
    expected = sp.select(rows, 5, method, image_embeds=rows, query_embeds=query, **params)
    assert torch.equal(kept, expected.sort(dim=1).values)


@torch.no_grad()
def test_whole_rows_remove_and_beams():
    model = build()
    inputs = batch()
    stock = model(**inputs).logits
    stock_beams = model.generate(**inputs, max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
    sp.patch.apply(model, method="divprune", budget=TILE)
    assert torch.equal(model(**inputs).logits, stock)
    assert torch.equal(model.generate(**inputs, max_new_tokens=3, num_beams=2, num_return_sequences=2,
                                      do_sample=False), stock_beams)  # tiles repeated per prompt
    sp.patch.remove(model)
    assert torch.equal(model(**inputs).logits, stock) and "forward" not in model.__dict__
    beams_kw = dict(max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
    sp.patch.apply(model, method="divprune", budget=4)
    beams = model.generate(**inputs, **beams_kw)[:, inputs["input_ids"].shape[1]:]
    kept = sp.patch.kept(model)
    sp.patch.remove(model)
    assert [len(k) for k in kept] == [4] * 10  # 5 tiles, each prompt's repeated twice
    rows = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output  # (5, 16, D)
    first = kept[:3] + kept[6:8]  # each prompt's first copy
    runs = [torch.cat([rows[r, first[r]] for r in range(3)]), torch.cat([rows[r, first[r]] for r in (3, 4)])]
    _, short, embeds = reference_logits(model, inputs["input_ids"], inputs["attention_mask"], runs)
    assert torch.equal(beams, model.generate(inputs_embeds=embeds, attention_mask=short, **beams_kw))


@torch.no_grad()
def test_trim_merged_token_follows_each_tiles_kept_tokens():
    """A merging method on the projector input (the pixel-shuffled features); each tile's merged token, through
    the stock projector, follows that tile's kept tokens."""
    model = build()
    inputs = batch()
    sp.patch.apply(model, method="trim", budget=5)
    out = model(**inputs)
    kept = torch.stack(sp.patch.kept(model))
    sp.patch.remove(model)
    hidden = model.model.vision_tower(pixel_values=inputs["pixel_values"]).last_hidden_state[:, 1:]  # (5, 64, C)
    features = model.model.pixel_shuffle(hidden.reshape(5, 8, 8, -1), scale_factor=0.5).reshape(5, TILE, -1)
    rows = model.model.multi_modal_projector(features)
    query = question_mean(model, inputs["input_ids"], inputs["attention_mask"])[[0, 0, 0, 1, 1]][:, None]
    reduction = sp.reduce(features, 5, "trim", image_embeds=rows, query_embeds=query)
    assert torch.equal(kept, reduction.indices) and kept.shape == (5, 4)
    merged = model.model.multi_modal_projector(reduction.merged)  # (5, 1, D)
    runs = [torch.cat([torch.cat([rows[r, kept[r]], merged[r]]) for r in tiles]) for tiles in ((0, 1, 2), (3, 4))]
    ref, short, _ = reference_logits(model, inputs["input_ids"], inputs["attention_mask"], runs)
    torch.testing.assert_close(out.logits[short.bool()], ref[short.bool()], atol=1e-4, rtol=0)


@torch.no_grad()
def test_fastv_keeps_k_per_tile_and_generates():
    model = build()
    inputs = batch()
    sp.patch.apply(model, method="fastv", budget=4, layer=1)
    out = model(**inputs, use_cache=True)
    assert [len(k) for k in sp.patch.kept(model)] == [4] * 5
    assert cache_length(out) == max(5 + 3 * 4 - 1 + 1, 4 + 2 * 4)  # text + kept of the longer prompt
    assert model.generate(**inputs, max_new_tokens=3, do_sample=False).shape == (2, inputs["input_ids"].shape[1] + 3)
    sp.patch.remove(model)


def test_visionzip_and_clip_text_are_refused_naming_what_is_missing():
    """TRIM runs (test above); VisionZip and clip_text relevance are refused by apply, naming what InternVL lacks."""
    check_vision_side_refusals(build(), "internvl", {"visionzip": "\\[CLS\\] attention and keys.*not read",
                                                     "clip_text": "no CLIP joint space"})

"""script_prune.patch on transformers' LLaVA-OneVision / LLaVA-Video (tiny random config, offline).

References from the STOCK modules only: crop tokens from the stock SigLIP tower + projector, the stock
packed image layout (each packed token matched back to its crop and index, tests/test_patch.py's helpers),
video frames from the stock get_video_features (bilinear) or 2x2 average pooling of the stock projected
frames done here (LLaVA-Video's pooling); the unpatched model is fed the hand-shortened prompt.
"""

import pytest
import torch
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

import script_prune as sp
from script_prune.patch.llava_onevision import set_video_pooling
from tests import test_patch
from tests.test_patch import VISION_METHODS, left_padded, pruned_image_tokens, stock_layout_ids

from script_prune.patch import LlavaOnevisionFamily  # noqa: E402
from tests.helpers import check_vision_side_refusals, skip_below_family_minimum  # noqa: E402

pytestmark = skip_below_family_minimum(LlavaOnevisionFamily())

IMAGE, VIDEO = 99, 98
SIZE, PATCH = 40, 8  # 5 x 5 = 25 tokens per crop; frames: 3 x 3 = 9 (bilinear) or 2 x 2 = 4 (average)
PINPOINTS = [[40, 80], [80, 40], [80, 80]]


def build(seed: int = 0):
    torch.manual_seed(seed)
    text = dict(model_type="qwen2", vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0)
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, image_size=SIZE, patch_size=PATCH)
    cfg = LlavaOnevisionConfig(text_config=text, vision_config=vision, image_token_index=IMAGE, video_token_index=VIDEO,
                               image_grid_pinpoints=PINPOINTS, vision_feature_layer=-1,
                               vision_feature_select_strategy="full")
    model = LlavaOnevisionForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in model.model.language_model.layers.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.25)
        model.model.image_newline.normal_()
    return model


def projected(model, pixels):
    """Stock tower (last layer, every patch) + projector. (R, 3, S, S) -> (R, 25, D)"""
    return model.model.multi_modal_projector(model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-1])


def reference_logits(model, ids, mask, runs):
    """tests/test_patch.py's reference (each placeholder run replaced by ``runs[b]``'s next tensor, contiguous
    positions), with the video placeholders read as image ones (every run here is separated by text)."""
    logits, short, _ = test_patch.reference_logits(model, ids.masked_fill(ids == VIDEO, IMAGE), mask, list(runs))
    return logits, short


def pruned_image(model, packed, crops, kept):
    """The stock packed layout of one image keeping only ``kept`` (one tensor per crop) and the newlines of kept rows."""
    ids = stock_layout_ids(model, packed, crops)
    return pruned_image_tokens(model, packed, ids, dict(enumerate(kept)))


def anyres_batch(model):
    """Two prompts of different lengths (left padded), a 1 x 2 and a 2 x 2 tiled image. -> ids, mask, pixels,
    sizes, the stock packed features per image"""
    sizes = torch.tensor([[40, 70], [75, 75]])  # 1 x 2 tiles (+ base), 2 x 2 tiles (+ base)
    pixels = torch.randn(2, 5, 3, SIZE, SIZE)
    packed = model.model.get_image_features(pixel_values=pixels, image_sizes=sizes).pooler_output
    ids, mask = left_padded([[1, 5, 6] + [IMAGE] * packed[0].shape[0] + [7, 8],
                             [1] + [IMAGE] * packed[1].shape[0] + [9, 10, 11]])
    return ids, mask, pixels, sizes, packed


@pytest.mark.parametrize("budget", [3, 0.5])
@torch.no_grad()
def test_anyres_images_logits_equal_stock_model_on_hand_shortened_prompt(budget):
    model = build()
    ids, mask, pixels, sizes, packed = anyres_batch(model)
    sp.patch.apply(model, method="divprune", budget=budget)
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes)
    kept = sp.patch.kept(model)
    sp.patch.remove(model)
    assert [len(k) for k in kept] == [sp.resolve_budget(budget, 25)] * (3 + 5)
    crops = [projected(model, pixels[0, :3]), projected(model, pixels[1])]
    assert all(torch.equal(k, sp.select(r[None], len(k), "divprune")[0].sort().values)
               for k, r in zip(kept, [*crops[0], *crops[1]]))
    runs = [[pruned_image(model, packed[0], crops[0], kept[:3])], [pruned_image(model, packed[1], crops[1], kept[3:])]]
    ref, short = reference_logits(model, ids, mask, runs)
    assert out.logits.shape == ref.shape
    torch.testing.assert_close(out.logits[short.bool()], ref[short.bool()], atol=1e-4, rtol=0)
    assert out.cache.get_seq_length() == short.shape[1]


@pytest.mark.parametrize("method", VISION_METHODS)
@torch.no_grad()
def test_kept_equals_select_on_the_stock_crops_for_every_selection_method(method):
    model = build()
    ids, mask, pixels, sizes, _ = anyres_batch(model)
    sp.patch.apply(model, method=method, budget=4)
    model(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes)
    kept = sp.patch.kept(model)
    sp.patch.remove(model)
    rows = torch.cat([projected(model, pixels[0, :3]), projected(model, pixels[1])])  # (8, 25, D)
    embed = model.get_input_embeddings()
    query = torch.stack([embed(torch.tensor([7, 8])).mean(0), embed(torch.tensor([9, 10, 11])).mean(0)])
    params = {"negate": False} if "negate" in sp.get_method(method).params else {}
    expected = sp.select(rows, 4, method, image_embeds=rows, query_embeds=query[[0, 0, 0, 1, 1, 1, 1, 1]][:, None],
                         **params)
    assert torch.equal(torch.stack(kept), expected.sort(dim=1).values)


@pytest.mark.parametrize("pooling", ["bilinear", "average"])
@torch.no_grad()
def test_video_frames_are_rows_and_several_images_per_prompt(pooling):
    """Prompt 0: two images (base crop each, batch_num_images=2) then a 3-frame video; prompt 1: a video."""
    model = build()
    set_video_pooling(model, pooling)
    per_frame = 9 if pooling == "bilinear" else 4
    images = torch.randn(2, 5, 3, SIZE, SIZE)
    sizes = torch.tensor([[40, 70], [75, 75]])
    videos = torch.randn(2, 3, 3, SIZE, SIZE)
    video_run = [VIDEO] * (3 * per_frame + 1)
    ids, mask = left_padded([[1, 5] + [IMAGE] * 26 + [6] + [IMAGE] * 26 + [7] + video_run + [8, 9],
                             [1, 12] + video_run + [13, 14, 15]])
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=images, image_sizes=sizes,
                  batch_num_images=torch.tensor([2, 0]), pixel_values_videos=videos)
    sp.patch.apply(model, method="script", budget=2)
    out = model(**inputs)
    kept = sp.patch.kept(model)
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    sp.patch.remove(model)
    assert [len(k) for k in kept] == [2] * (2 + 3 + 3)  # two base crops, then 3 frames per video
    base = projected(model, images[:, 0])  # (2, 25, D)
    frames = projected(model, videos.flatten(0, 1))  # (6, 25, D)
    if pooling == "bilinear":
        frames = model.model.get_video_features(pixel_values_videos=videos).pooler_output[:, :-1].reshape(6, 9, -1)
    else:
        grid = frames.view(6, 5, 5, -1)[:, :4, :4]  # 2x2 windows of the 5 x 5 grid (the last row / column dropped)
        frames = grid.reshape(6, 2, 2, 2, 2, -1).mean(dim=(2, 4)).reshape(6, 4, -1)
    embed = model.get_input_embeddings()
    query = [embed(torch.tensor([8, 9])).mean(0), embed(torch.tensor([13, 14, 15])).mean(0)]
    rows = [base[0], base[1], *frames]
    for k, row, sample in zip(kept, rows, [0, 0, 0, 0, 0, 1, 1, 1]):
        assert torch.equal(k, sp.select(row[None], 2, "script", image_embeds=row[None],
                                        query_embeds=query[sample][None, None])[0].sort().values)
    newline = model.model.image_newline[None]
    video = [torch.cat([*(frames[f, kept[2 + f]] for f in range(v * 3, v * 3 + 3)), newline]) for v in range(2)]
    runs = [[torch.cat([base[0, kept[0]], newline]), torch.cat([base[1, kept[1]], newline]), video[0]], [video[1]]]
    ref, short = reference_logits(model, ids, mask, runs)
    torch.testing.assert_close(out.logits[short.bool()], ref[short.bool()], atol=1e-4, rtol=0)
    assert generated.shape == (2, ids.shape[1] + 3)


@torch.no_grad()
def test_beams_and_sampled_sequences_repeat_images_and_videos_per_prompt():
    """Prompt 0: two images (batch_num_images) and a video; prompt 1: one tiled image. Beams /
    num_return_sequences / sampling equal the unpatched model's over the hand-shortened prompt."""
    model = build()
    images, videos = torch.randn(3, 5, 3, SIZE, SIZE), torch.randn(1, 3, 3, SIZE, SIZE)
    sizes = torch.tensor([[40, 40], [40, 40], [40, 70]])
    packed = model.model.get_image_features(pixel_values=images[2:], image_sizes=sizes[2:]).pooler_output[0]
    ids, mask = left_padded([[1, 5] + [IMAGE] * 26 + [6] + [IMAGE] * 26 + [7] + [VIDEO] * (3 * 9 + 1) + [8, 9],
                             [1, 12] + [IMAGE] * packed.shape[0] + [13, 14]])
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=images, image_sizes=sizes,
                  batch_num_images=torch.tensor([2, 1]), pixel_values_videos=videos)
    beams_kw = dict(max_new_tokens=4, num_beams=2, num_return_sequences=2, do_sample=False)
    sampled_kw = dict(max_new_tokens=4, do_sample=True, top_k=5, num_return_sequences=2)
    sp.patch.apply(model, method="divprune", budget=3)
    beams = model.generate(**inputs, **beams_kw)[:, ids.shape[1]:]
    kept = sp.patch.kept(model)
    torch.manual_seed(3)
    sampled = model.generate(**inputs, **sampled_kw)[:, ids.shape[1]:]
    sp.patch.remove(model)
    assert [len(k) for k in kept] == [3] * (2 * 5 + 2 * 3)  # prompt 0: 2 bases + 3 frames; prompt 1: base + 2 tiles
    first = kept[:5] + kept[10:13]
    assert all(torch.equal(a, b) for a, b in zip(first, kept[5:10] + kept[13:]))
    base = projected(model, images[:2, 0])
    frames = model.model.get_video_features(pixel_values_videos=videos).pooler_output[:, :-1].reshape(3, 9, -1)
    newline = model.model.image_newline[None]
    runs = [[torch.cat([base[0, first[0]], newline]), torch.cat([base[1, first[1]], newline]),
             torch.cat([*(frames[f, first[2 + f]] for f in range(3)), newline])],
            [pruned_image(model, packed, projected(model, images[2, :3]), first[5:])]]
    _, short, embeds = test_patch.reference_logits(model, ids.masked_fill(ids == VIDEO, IMAGE), mask, runs)
    assert torch.equal(beams, model.generate(inputs_embeds=embeds, attention_mask=short, **beams_kw))
    torch.manual_seed(3)
    assert torch.equal(sampled, model.generate(inputs_embeds=embeds, attention_mask=short, **sampled_kw))


@torch.no_grad()
def test_whole_rows_and_remove_are_bit_identical_and_refusals():
    model = build()
    sizes = torch.tensor([[40, 70], [75, 75]])
    pixels = torch.randn(2, 5, 3, SIZE, SIZE)
    packed = model.model.get_image_features(pixel_values=pixels, image_sizes=sizes).pooler_output
    ids, mask = left_padded([[1] + [IMAGE] * packed[0].shape[0] + [7], [1, 2] + [IMAGE] * packed[1].shape[0] + [9]])
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes)
    stock = model(**inputs).logits
    sp.patch.apply(model, method="gsp", budget=25)
    assert torch.equal(model(**inputs).logits, stock)
    assert [k.tolist() for k in sp.patch.kept(model)] == [list(range(25))] * 8
    sp.patch.remove(model)
    assert torch.equal(model(**inputs).logits, stock) and "forward" not in model.__dict__
    with pytest.raises(ValueError, match="merging method 'trim'"):
        sp.patch.apply(model, method="trim", budget=4)
    with pytest.raises(ValueError, match="pooling must be one of"):
        set_video_pooling(model, "max")


def interpolated_batch(model):
    """anyres_max_2: a 75 x 75 image (2 x 2 tiles, a 10 x 10 unpadded grid: sqrt(100 / 50) > 1.1) is shrunk by the
    stock model to 7 x 7 = 49 tokens; a 40 x 70 one (1 x 2 tiles) keeps its tiles. Left padded, two prompts."""
    model.config.vision_aspect_ratio = "anyres_max_2"
    sizes = torch.tensor([[75, 75], [40, 70]])
    pixels = torch.randn(2, 5, 3, SIZE, SIZE)
    packed = model.model.get_image_features(pixel_values=pixels, image_sizes=sizes).pooler_output
    assert packed[0].shape[0] == 25 + 7 * (7 + 1)  # base + the interpolated grid with a newline per row
    ids, mask = left_padded([[1, 5] + [IMAGE] * packed[0].shape[0] + [7, 8],
                             [1, 2, 3] + [IMAGE] * packed[1].shape[0] + [9]])
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes), packed


@torch.no_grad()
def test_interpolated_grid_is_one_row_laid_out_as_the_stock_model():
    """anyres_max interpolation: the shrunk grid is one row; every token kept, the family's layout equals the stock
    packed features bit for bit; a whole-row budget runs the stock forward (bit-identical logits)."""
    model = build()
    inputs, packed = interpolated_batch(model)
    family = sp.patch.family_of(model)
    assert family.row_lengths(model, inputs) == [25, 49, 25, 25, 25]
    rows = family.encode(model, inputs)
    layout = family.layout(model, rows, torch.ones(rows.tokens.shape[:2], dtype=torch.bool))
    assert torch.equal(layout.tokens, torch.cat(list(packed))) and bool(layout.kept.all())
    stock = model(**inputs).logits
    sp.patch.apply(model, method="divprune", budget=49)
    assert torch.equal(model(**inputs).logits, stock)
    assert [len(k) for k in sp.patch.kept(model)] == [25, 49, 25, 25, 25]
    sp.patch.remove(model)


@pytest.mark.parametrize("budget", [3, 0.25])
@torch.no_grad()
def test_interpolated_grid_logits_equal_stock_model_on_hand_shortened_prompt(budget):
    model = build()
    inputs, packed = interpolated_batch(model)
    sp.patch.apply(model, method="divprune", budget=budget)
    out = model(**inputs)
    kept = sp.patch.kept(model)
    sp.patch.remove(model)
    assert [len(k) for k in kept] == [sp.resolve_budget(budget, n) for n in (25, 49, 25, 25, 25)]
    base = projected(model, inputs["pixel_values"][0, :1])[0]  # (25, D) the stock base crop
    grid = packed[0][25:].view(7, 8, -1)  # the stock interpolated grid, a newline closing each grid row
    crops = projected(model, inputs["pixel_values"][1, :3])  # (3, 25, D) base + 2 tiles
    for k, row in zip(kept, [base, grid[:, :7].reshape(49, -1), *crops]):
        assert torch.equal(k, sp.select(row[None], len(k), "divprune")[0].sort().values)
    lines = [torch.cat([grid[r, c] for c in range(7) if r * 7 + c in kept[1].tolist()] + [grid[r, 7]])
             for r in range(7) if any(r * 7 + c in kept[1].tolist() for c in range(7))]
    first = torch.cat([base[kept[0]], *[line.view(-1, grid.shape[-1]) for line in lines]])
    runs = [[first], [pruned_image(model, packed[1], crops, kept[2:])]]
    ref, short = reference_logits(model, inputs["input_ids"], inputs["attention_mask"], runs)
    torch.testing.assert_close(out.logits[short.bool()], ref[short.bool()], atol=1e-4, rtol=0)
    assert out.cache.get_seq_length() == short.shape[1]


@torch.no_grad()
def test_fastv_keeps_k_per_crop_and_frame():
    model = build()
    videos = torch.randn(1, 3, 3, SIZE, SIZE)
    ids, mask = left_padded([[1, 5] + [IMAGE] * 26 + [6] + [IMAGE] * 26 + [VIDEO] * (3 * 9 + 1) + [8, 9]])
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(2, 5, 3, SIZE, SIZE),
                  image_sizes=torch.tensor([[40, 40], [40, 40]]), batch_num_images=torch.tensor([2]),
                  pixel_values_videos=videos)
    sp.patch.apply(model, method="fastv", budget=4, layer=1)
    out = model(**inputs)
    assert [len(k) for k in sp.patch.kept(model)] == [4] * 5  # two base crops, 3 frames
    assert out.cache.get_seq_length() == 5 + 2 * (4 + 1) + 3 * 4 + 1  # text + kept + the three newlines
    sp.patch.remove(model)


def test_merging_visionzip_and_clip_text_are_refused_naming_what_is_missing():
    check_vision_side_refusals(build(), "llava_onevision", {"trim": "places no merged tokens", "trim_iqr": "not implemented",
                                                            "visionzip": "SigLIP has no \\[CLS\\]",
                                                            "clip_text": "pooled after the projector"})

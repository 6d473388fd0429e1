"""script_prune.patch on transformers' Qwen3-VL (tiny random config, offline).

The reference is built from the STOCK modules only: visual tokens and DeepStack features from the stock
get_image_features / get_video_features, 3-D positions from the stock get_rope_index on the unpruned
prompt; the stock language model is fed by hand the prompt with only the kept tokens, their original
positions, and the DeepStack features of the kept tokens alone (``visual_pos_masks`` /
``deepstack_visual_embeds`` built here), then the stock lm_head.
"""

import pytest
import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

import script_prune as sp
from tests.test_patch import left_padded
from tests.test_patch_qwen2_5_vl import (BEAMS, SAMPLED, check_kept, check_whole_rows_bit_identical, expanded_generate,
                                         pruned_forward, pruned_generate)

from script_prune.patch import Qwen3VLFamily  # noqa: E402
from script_prune.patch.family import cache_keyword, output_cache_field  # noqa: E402
from tests.helpers import check_vision_side_refusals, skip_below_family_minimum  # noqa: E402

pytestmark = skip_below_family_minimum(Qwen3VLFamily())

IMAGE, VIDEO, START, END = 97, 98, 95, 96
PATCH, MERGE, TEMPORAL = 2, 2, 2
IMAGES = [[1, 4, 6], [1, 8, 8]]  # sample 0: 6 tokens, sample 1: 16 tokens
VIDEOS = [[2, 4, 4]]  # sample 0: 2 frames of 4 tokens, a timestamp before each


def build(seed: int = 0, layers: int = 3):
    torch.manual_seed(seed)
    text = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=512, pad_token_id=0,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2],
                                 "mrope_interleaved": True})
    vision = dict(depth=3, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=PATCH,
                  spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL, num_position_embeddings=16,
                  deepstack_visual_indexes=[0, 1])
    cfg = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=VIDEO,
                        vision_start_token_id=START, vision_end_token_id=END, tie_word_embeddings=False)
    model = Qwen3VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in model.model.language_model.layers.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.25)
        for p in model.model.visual.deepstack_merger_list.parameters():  # DeepStack features that matter
            p.normal_(0.0, 0.5)
    return model


def tokens(grid) -> int:
    t, h, w = grid
    return t * h * w // (MERGE * MERGE)


def pixels(grids) -> torch.Tensor:
    return torch.randn(sum(t * h * w for t, h, w in grids), 3 * TEMPORAL * PATCH * PATCH)


def batch():
    """Sample 0: an image, then a video whose 2 frames follow timestamp tokens (40, 41); sample 1: a larger image."""
    frame = tokens([1, *VIDEOS[0][1:]])
    rows = [[1, 5, START] + [IMAGE] * tokens(IMAGES[0]) + [END, 6]
            + [40, START] + [VIDEO] * frame + [END, 41, START] + [VIDEO] * frame + [END, 7, 8, 9],
            [1, START] + [IMAGE] * tokens(IMAGES[1]) + [END, 10, 11]]
    ids, mask = left_padded(rows)
    types = ((ids == IMAGE) * 1 + (ids == VIDEO) * 2).int()
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels(IMAGES), image_grid_thw=torch.tensor(IMAGES),
                pixel_values_videos=pixels(VIDEOS), video_grid_thw=torch.tensor(VIDEOS), mm_token_type_ids=types)


def stock_rows(model, inputs):
    """(tokens, [DeepStack levels]) per row in sequence order: image 0, frame 0, frame 1, image 1."""
    images = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    video = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])

    rows = []
    for out, index, part in ((images, 0, slice(None)), (video, 0, slice(0, 4)), (video, 0, slice(4, 8)),
                             (images, 1, slice(None))):
        rows.append((out.pooler_output[index][part], [level[index][part] for level in out.deepstack_features]))
    return rows


def reference_logits(model, inputs, rows, kept):
    """The stock language model on the hand-shortened prompt (kept tokens, their original positions, DeepStack
    features of the kept tokens only), then the stock lm_head. -> logits (B, Ls, V), mask (B, Ls)"""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    full, _ = model.model.get_rope_index(ids, mm_token_type_ids=inputs["mm_token_type_ids"],
                                         image_grid_thw=inputs["image_grid_thw"],
                                         video_grid_thw=inputs["video_grid_thw"], attention_mask=mask)
    embed = model.get_input_embeddings()
    visual = iter(zip(rows, kept))
    seqs = []
    for b in range(ids.shape[0]):
        real = mask[b].nonzero().flatten().tolist()
        pieces, i = [], 0  # (embeds (n, D), positions (3, n), visual flag (n,), DeepStack levels (L, n, D) or None)
        while i < len(real):
            p = real[i]
            if int(ids[b, p]) in (IMAGE, VIDEO):
                (row, levels), keep = next(visual)
                pieces.append((row[keep], full[:, b, p + keep], torch.ones(len(keep), dtype=torch.bool),
                               torch.stack([level[keep] for level in levels])))
                i += row.shape[0]
            else:
                pieces.append((embed(ids[b, p:p + 1]), full[:, b, p:p + 1], torch.zeros(1, dtype=torch.bool), None))
                i += 1
        seqs.append(pieces)
    lengths = [sum(p[0].shape[0] for p in s) for s in seqs]
    length = max(lengths)
    embeds = torch.zeros(2, length, 32)
    short = torch.zeros(2, length, dtype=torch.long)
    positions = torch.zeros(3, 2, length, dtype=torch.long)
    visual_mask = torch.zeros(2, length, dtype=torch.bool)
    stacks = []
    for b, pieces in enumerate(seqs):
        start = length - lengths[b]
        embeds[b, start:] = torch.cat([p[0] for p in pieces])
        positions[:, b, start:] = torch.cat([p[1] for p in pieces], dim=1)
        visual_mask[b, start:] = torch.cat([p[2] for p in pieces])
        short[b, start:] = 1
        stacks += [p[3] for p in pieces if p[3] is not None]
    deepstack = list(torch.cat(stacks, dim=1))  # per level (n_visual, D), batch-major sequence order
    out = model.model.language_model(inputs_embeds=embeds, attention_mask=short, position_ids=positions,
                                     visual_pos_masks=visual_mask, deepstack_visual_embeds=deepstack, use_cache=True)
    return model.lm_head(out.last_hidden_state), short, getattr(out, output_cache_field(type(out))), positions


@pytest.mark.parametrize("method,budget", [("divprune", 0.5), ("script", 3)])
@torch.no_grad()
def test_logits_equal_stock_model_with_deepstack_pruned_by_hand(method, budget):
    model = build()
    inputs = batch()
    out, kept = pruned_forward(model, inputs, method, budget)
    rows = stock_rows(model, inputs)
    check_kept(kept, [r for r, _ in rows], method, budget)
    ref, short, cache, _ = reference_logits(model, inputs, rows, kept)
    assert out.logits.shape == ref.shape
    torch.testing.assert_close(out.logits[short.bool()], ref[short.bool()], atol=1e-4, rtol=0)
    assert getattr(out, output_cache_field(type(out))).get_seq_length() == cache.get_seq_length() == short.shape[1]
    # the short prompt = every text token (the timestamps 40, 41 between the frames included) + the kept tokens
    ids, real = inputs["input_ids"], inputs["attention_mask"].bool()
    text = (real & (ids != IMAGE) & (ids != VIDEO)).sum(1)
    assert short.sum(1).tolist() == (text + torch.tensor([sum(len(k) for k in kept[:3]), len(kept[3])])).tolist()


@torch.no_grad()
def test_greedy_decoding_equals_reference():
    model = build()
    inputs = batch()
    generated, kept = pruned_generate(model, inputs, "divprune", 0.5)
    logits, mask, cache, positions = reference_logits(model, inputs, stock_rows(model, inputs), kept)
    # greedy by hand with the stock language model, continuing from the last original position
    last, tokens, logits = positions.amax(dim=2, keepdim=True), [], logits[:, -1]  # (3, B, 1)
    key = cache_keyword(type(model.model.language_model).forward)  # the release's name of the cache argument
    for _ in range(8):
        token = logits.argmax(-1, keepdim=True)  # (B, 1)
        tokens.append(token)
        last, mask = last + 1, torch.cat([mask, torch.ones_like(token)], dim=1)
        step = model.model.language_model(inputs_embeds=model.get_input_embeddings()(token), attention_mask=mask,
                                          **{key: cache}, position_ids=last, use_cache=True)
        logits = model.lm_head(step.last_hidden_state)[:, -1]
    assert torch.equal(generated, torch.cat(tokens, dim=1))


def short_prompt(model, inputs, rows, kept):
    """The hand-shortened prompt as the stock generate() takes it: ids with placeholders at the kept tokens only,
    their original 3-D positions, and the kept tokens with their DeepStack features as precomputed encoder
    outputs (image 0, image 1; the video's frames 0 and 1). -> generate() keyword arguments"""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    full, _ = model.model.get_rope_index(ids, mm_token_type_ids=inputs["mm_token_type_ids"],
                                         image_grid_thw=inputs["image_grid_thw"],
                                         video_grid_thw=inputs["video_grid_thw"], attention_mask=mask)
    keep = mask.bool().clone()
    slots = ((ids == IMAGE) | (ids == VIDEO)).nonzero().tolist()  # scatter order = rows in sequence order
    start = 0
    for (row, _), k in zip(rows, kept):
        for i, (b, p) in enumerate(slots[start:start + row.shape[0]]):
            keep[b, p] = i in k.tolist()
        start += row.shape[0]
    length = int(keep.sum(1).max())
    short = {"input_ids": torch.zeros(2, length, dtype=torch.long), "attention_mask": torch.zeros(2, length, dtype=torch.long),
             "position_ids": torch.zeros(3, 2, length, dtype=torch.long),
             "mm_token_type_ids": torch.zeros(2, length, dtype=torch.int)}
    for b in range(2):
        index = keep[b].nonzero().flatten()
        at = slice(length - index.numel(), None)
        short["input_ids"][b, at], short["attention_mask"][b, at] = ids[b, index], 1
        short["position_ids"][:, b, at] = full[:, b, index]
        short["mm_token_type_ids"][b, at] = inputs["mm_token_type_ids"][b, index]
    output = type(model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]))
    (image0, levels0), (frame0, frame_levels0), (frame1, frame_levels1), (image1, levels1) = rows
    images = output(pooler_output=(image0[kept[0]], image1[kept[3]]),
                    deepstack_features=[(a[kept[0]], b[kept[3]]) for a, b in zip(levels0, levels1)])
    video = output(pooler_output=(torch.cat([frame0[kept[1]], frame1[kept[2]]]),),
                   deepstack_features=[(torch.cat([a[kept[1]], b[kept[2]]]),) for a, b in zip(frame_levels0, frame_levels1)])
    return {**short, "mm_encoder_outputs": {"image": images, "video": video}}


@torch.no_grad()
def test_beams_and_sampled_sequences_equal_reference():
    """Beams / num_return_sequences / sampling equal the unpatched model's generate() on the hand-shortened prompt."""
    model = build()
    inputs = batch()
    beams, sampled, kept = expanded_generate(model, inputs, "divprune", 0.5)
    rows = stock_rows(model, inputs)
    reference = short_prompt(model, inputs, rows, kept)  # generate() expands the encoder outputs in place: one each
    assert torch.equal(beams, model.generate(**reference, **BEAMS)[:, reference["input_ids"].shape[1]:])
    torch.manual_seed(3)
    reference = short_prompt(model, inputs, rows, kept)
    assert torch.equal(sampled, model.generate(**reference, **SAMPLED)[:, reference["input_ids"].shape[1]:])


@torch.no_grad()
def test_whole_rows_and_remove_are_bit_identical():
    check_whole_rows_bit_identical(build(), batch(), 16, (6, 4, 4, 16))


def test_merging_visionzip_and_clip_text_are_refused_naming_what_is_missing():
    check_vision_side_refusals(build(), "qwen3_vl", {"trim": "M-RoPE", "visionzip": "no \\[CLS\\]",
                                                     "clip_text": "no CLIP joint space"})

"""script_prune.patch on transformers' Qwen2.5-VL (tiny random config, offline).

References come from the STOCK model only: the visual tokens from its own get_image_features /
get_video_features, the 3-D positions from its own get_rope_index on the unpruned prompt; the
unpatched model is then fed, by hand, the prompt with only the kept visual tokens and the kept
tokens' original 3-D positions (position_ids passed explicitly).
"""

import pytest
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

import script_prune as sp
from tests.test_patch import VISION_METHODS, cache_length, left_padded, masked_forward

from script_prune.patch import Qwen2_5_VLFamily  # noqa: E402
from script_prune.patch.family import cache_keyword, output_cache_field  # noqa: E402
from tests.helpers import check_vision_side_refusals, skip_below_family_minimum  # noqa: E402

pytestmark = skip_below_family_minimum(Qwen2_5_VLFamily())

IMAGE, VIDEO, START, END = 97, 98, 95, 96
PATCH, MERGE, TEMPORAL = 2, 2, 2


def build(seed: int = 0, layers: int = 3):
    torch.manual_seed(seed)
    text = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]})
    vision = dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=PATCH,
                  spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL, window_size=8, fullatt_block_indexes=[1],
                  tokens_per_second=2)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=VIDEO,
                           vision_start_token_id=START, vision_end_token_id=END)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # larger decoder weights: attention reacts to positions and to which tokens are there
        for p in model.model.language_model.layers.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.25)
    return model


def pixels(grids: list[list[int]]) -> torch.Tensor:
    """Flattened patches of the given (t, h, w) grids, as the processor gives them."""
    count = sum(t * h * w for t, h, w in grids)
    return torch.randn(count, 3 * TEMPORAL * PATCH * PATCH)


def tokens(grid) -> int:
    t, h, w = grid
    return t * h * w // (MERGE * MERGE)


IMAGES = [[1, 4, 6], [1, 8, 8]]  # sample 0: 6 tokens, sample 1: 16 tokens
VIDEOS = [[2, 4, 4]]  # sample 0: 2 frames of 4 tokens


def batch():
    """Sample 0: an image then a video; sample 1: one larger image (different lengths, left padding)."""
    rows = [[1, 5, START] + [IMAGE] * tokens(IMAGES[0]) + [END, 6, START] + [VIDEO] * tokens(VIDEOS[0]) + [END, 7, 8, 9],
            [1, START] + [IMAGE] * tokens(IMAGES[1]) + [END, 10, 11]]
    ids, mask = left_padded(rows)
    types = ((ids == IMAGE) * 1 + (ids == VIDEO) * 2).int()
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels(IMAGES), image_grid_thw=torch.tensor(IMAGES),
                pixel_values_videos=pixels(VIDEOS), video_grid_thw=torch.tensor(VIDEOS),
                mm_token_type_ids=types)


def stock_rows(model, inputs) -> list[torch.Tensor]:
    """The stock visual tokens per row in sequence order: sample 0's image, its 2 frames, sample 1's image."""
    images = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
    video = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"]).pooler_output[0]
    return [images[0], video[:4], video[4:], *images[1:]]


def hand_shortened(model, inputs, rows, kept):
    """The prompt with only the kept visual tokens (in place), their original 3-D positions. -> embeds, mask, positions"""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    full, _ = model.model.get_rope_index(ids, mm_token_type_ids=inputs["mm_token_type_ids"],
                                         image_grid_thw=inputs["image_grid_thw"],
                                         video_grid_thw=inputs["video_grid_thw"], attention_mask=mask)
    embed = model.get_input_embeddings()
    visual = iter([(r, k) for r, k in zip(rows, kept)])
    seqs, poss = [], []
    for b in range(ids.shape[0]):
        pieces, positions, i = [], [], 0
        real = mask[b].nonzero().flatten().tolist()
        while i < len(real):
            p = real[i]
            if int(ids[b, p]) in (IMAGE, VIDEO):
                row, keep = next(visual)
                pieces.append(row[keep])
                positions.append(full[:, b, p + keep])
                i += row.shape[0]
            else:
                pieces.append(embed(ids[b, p:p + 1]))
                positions.append(full[:, b, p:p + 1])
                i += 1
        seqs.append(torch.cat(pieces))
        poss.append(torch.cat(positions, dim=1))
    length = max(s.shape[0] for s in seqs)
    embeds = torch.zeros(len(seqs), length, seqs[0].shape[1])
    short = torch.zeros(len(seqs), length, dtype=torch.long)
    positions = torch.zeros(3, len(seqs), length, dtype=torch.long)
    for b, (s, p) in enumerate(zip(seqs, poss)):
        embeds[b, length - s.shape[0]:] = s
        short[b, length - s.shape[0]:] = 1
        positions[:, b, length - s.shape[0]:] = p
    return embeds, short, positions


def pruned_forward(model, inputs, method, budget):
    """The patched model's output and ``kept`` on ``inputs``; the model is stock again afterwards."""
    sp.patch.apply(model, method=method, budget=budget)
    out = model(**inputs)
    kept = sp.patch.kept(model)
    sp.patch.remove(model)
    return out, kept


def pruned_generate(model, inputs, method, budget, steps=8):
    """Greedy tokens of the patched model (new tokens only) and ``kept``; the model is stock again afterwards."""
    sp.patch.apply(model, method=method, budget=budget)
    generated = model.generate(**inputs, max_new_tokens=steps, do_sample=False)
    kept = sp.patch.kept(model)
    sp.patch.remove(model)
    return generated[:, inputs["input_ids"].shape[1]:], kept


def check_kept(kept, rows, method, budget):
    """Every row keeps its resolved budget, ascending int64; divprune's kept = script_prune.select on the row."""
    assert [k.shape[0] for k in kept] == [min(sp.resolve_budget(budget, r.shape[0]), r.shape[0]) for r in rows]
    assert all(k.dtype == torch.int64 and torch.equal(k, k.sort().values) for k in kept)
    if method == "divprune":
        assert all(torch.equal(k, sp.select(r[None], k.shape[0], method)[0].sort().values) for k, r in zip(kept, rows))


def check_whole_rows_bit_identical(model, inputs, budget, lengths):
    """A budget keeping the longest row whole runs the stock forward / generate; remove() restores stock."""
    stock = model(**inputs).logits
    stock_gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    sp.patch.apply(model, method="divprune", budget=budget)
    assert torch.equal(model(**inputs).logits, stock)
    assert [k.tolist() for k in sp.patch.kept(model)] == [list(range(n)) for n in lengths]
    assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), stock_gen)
    sp.patch.remove(model)
    assert torch.equal(model(**inputs).logits, stock)
    assert "forward" not in model.__dict__


@pytest.mark.parametrize("method,budget", [("divprune", 0.5), ("script", 3), ("gsp", 0.25)])
@torch.no_grad()
def test_logits_equal_stock_model_on_hand_shortened_prompt(method, budget):
    model = build()
    inputs = batch()
    out, kept = pruned_forward(model, inputs, method, budget)
    rows = stock_rows(model, inputs)
    check_kept(kept, rows, method, budget)
    embeds, short, positions = hand_shortened(model, inputs, rows, kept)
    ref = model(inputs_embeds=embeds, attention_mask=short, position_ids=positions)
    assert out.logits.shape == ref.logits.shape
    torch.testing.assert_close(out.logits[short.bool()], ref.logits[short.bool()], atol=1e-4, rtol=0)
    assert cache_length(out) == short.shape[1]


@torch.no_grad()
def test_script_kept_equals_select_with_llm_text_relevance():
    model = build()
    inputs = batch()
    sp.patch.apply(model, method="script", budget=0.5)  # llm_text is the family's default relevance
    model(**inputs)
    kept = sp.patch.kept(model)
    sp.patch.remove(model)
    embed = model.get_input_embeddings()
    # the question: every real token after the sample's last placeholder (vision_end included)
    query = [embed(torch.tensor([END, 7, 8, 9])).mean(0), embed(torch.tensor([END, 10, 11])).mean(0)]
    for k, row, sample in zip(kept, stock_rows(model, inputs), [0, 0, 0, 1]):
        n = sp.resolve_budget(0.5, row.shape[0])
        assert torch.equal(k, sp.select(row[None], n, "script", image_embeds=row[None],
                                        query_embeds=query[sample][None, None])[0].sort().values)


@pytest.mark.parametrize("method", VISION_METHODS)
@torch.no_grad()
def test_kept_equals_select_on_the_stock_rows_for_every_selection_method(method):
    """Rows of different lengths (6, 4, 4, 16): each keeps select's choice at its resolved budget, relevance from
    the LLM's embeddings of the sample's question (not negated, llm_text's sign)."""
    model = build()
    inputs = batch()
    _, kept = pruned_forward(model, inputs, method, 0.5)
    embed = model.get_input_embeddings()
    query = [embed(torch.tensor([END, 7, 8, 9])).mean(0), embed(torch.tensor([END, 10, 11])).mean(0)]
    params = {"negate": False} if "negate" in sp.get_method(method).params else {}
    for k, row, sample in zip(kept, stock_rows(model, inputs), [0, 0, 0, 1]):
        expected = sp.select(row[None], sp.resolve_budget(0.5, row.shape[0]), method, image_embeds=row[None],
                             query_embeds=query[sample][None, None], **params)[0]
        assert torch.equal(k, expected.sort().values), method


@torch.no_grad()
def test_greedy_decoding_equals_reference():
    model = build()
    inputs = batch()
    generated, kept = pruned_generate(model, inputs, "divprune", 0.5)
    embeds, short, positions = hand_shortened(model, inputs, stock_rows(model, inputs), kept)
    reference = model.generate(inputs_embeds=embeds, attention_mask=short, position_ids=positions, max_new_tokens=8,
                               do_sample=False)
    assert torch.equal(generated, reference)


BEAMS = dict(max_new_tokens=4, num_beams=2, num_return_sequences=2, do_sample=False)
SAMPLED = dict(max_new_tokens=4, do_sample=True, top_k=5, num_return_sequences=2)


def expanded_generate(model, inputs, method, budget):
    """Beams and sampled sequences (new tokens only) of the patched model and the ``kept`` of its first prompt's
    first copy and second prompt's first copy (each prompt's rows come once per beam / returned sequence)."""
    sp.patch.apply(model, method=method, budget=budget)
    beams = model.generate(**inputs, **BEAMS)[:, inputs["input_ids"].shape[1]:]
    kept = sp.patch.kept(model)
    torch.manual_seed(3)
    sampled = model.generate(**inputs, **SAMPLED)[:, inputs["input_ids"].shape[1]:]
    sp.patch.remove(model)
    assert [len(k) for k in kept] == [3, 2, 2, 3, 2, 2, 8, 8]  # prompt 0's 3 rows twice, prompt 1's row twice
    assert all(torch.equal(a, b) for a, b in zip(kept[:3] + kept[6:7], kept[3:6] + kept[7:]))
    return beams, sampled, kept[:3] + kept[6:7]


@torch.no_grad()
def test_beams_and_sampled_sequences_equal_reference():
    """Pixels repeated per prompt (flattened patches by grid): beams / num_return_sequences equal the unpatched
    model's over the hand-shortened prompt (sampling with the same seed)."""
    model = build()
    inputs = batch()
    beams, sampled, kept = expanded_generate(model, inputs, "divprune", 0.5)
    embeds, short, positions = hand_shortened(model, inputs, stock_rows(model, inputs), kept)
    reference = dict(inputs_embeds=embeds, attention_mask=short, position_ids=positions)
    assert torch.equal(beams, model.generate(**reference, **BEAMS))
    torch.manual_seed(3)
    assert torch.equal(sampled, model.generate(**reference, **SAMPLED))
    stock = model.generate(**inputs, **BEAMS)  # a whole-row budget: the stock forward on the per-prompt expansion
    sp.patch.apply(model, method="divprune", budget=16)
    assert torch.equal(model.generate(**inputs, **BEAMS), stock)
    sp.patch.remove(model)


@torch.no_grad()
def test_decoding_without_position_ids_continues_from_rope_deltas():
    """A manual step with no position ids (nor mask: transformers 5.24's Qwen2.5-VL derives (3, B, L_total)
    positions from a 2-D mask there) takes rope_deltas: it continues at the original last position + 1."""
    model = build()
    inputs = batch()  # sample 0 alone (its image and video), unpadded
    inputs.update({key: inputs[key][:1] for key in ("input_ids", "attention_mask", "mm_token_type_ids")},
                  pixel_values=inputs["pixel_values"][:tokens(IMAGES[0]) * MERGE * MERGE],
                  image_grid_thw=inputs["image_grid_thw"][:1])
    assert bool(inputs["attention_mask"].all())
    sp.patch.apply(model, method="divprune", budget=0.5)
    first = model(**inputs, use_cache=True)
    kept = sp.patch.kept(model)
    step_ids = first.logits[:, -1].argmax(-1, keepdim=True)
    key, field = cache_keyword(type(model).forward), output_cache_field(type(first))  # the release's names
    step = model(input_ids=step_ids, **{key: getattr(first, field)}, use_cache=True)
    sp.patch.remove(model)
    rows = stock_rows(model, inputs)
    embeds, short, positions = hand_shortened(model, inputs, rows[:3], kept)
    assert torch.equal(model.model.rope_deltas, positions.amax(dim=(0, 2))[:, None] + 1 - short.shape[1])
    ref_first = model(inputs_embeds=embeds, attention_mask=short, position_ids=positions, use_cache=True)
    next_positions = positions.amax(dim=2, keepdim=True) + 1  # (3, 1, 1): the original last position + 1
    ref_step = model(inputs_embeds=model.get_input_embeddings()(step_ids), **{key: getattr(ref_first, field)},
                     position_ids=next_positions)
    torch.testing.assert_close(step.logits, ref_step.logits, atol=1e-4, rtol=0)


@torch.no_grad()
def test_whole_rows_and_remove_are_bit_identical():
    check_whole_rows_bit_identical(build(), batch(), 16, (6, 4, 4, 16))  # the longest row holds 16 tokens


def test_defaults_and_refusals():
    model = build()
    sp.patch.apply(model)  # script, llm_text, a quarter of every row
    state = model.__dict__["_script_prune_patch"]
    assert state.config.budget == 0.25 and state.config.relevance.name == "llm_text"
    sp.patch.remove(model)
    with pytest.raises(ValueError, match="merging method 'trim'.*M-RoPE"):
        sp.patch.apply(model, method="trim", budget=0.5)


@torch.no_grad()
def test_fastv_with_mrope_picks_eager_top_attention_and_decodes_like_masked_reference():
    """FastV on the M-RoPE decoder: layer K-1's eager attention of the last token ranks each row's tokens; the
    kept ones keep their 3-D positions. Reference: the stock decoder layers, cache-free, with explicit masks
    (layers < K see every token, layers >= K and decoded tokens see text + kept tokens only)."""
    K, k, steps = 2, 3, 5
    model = build(seed=2, layers=4)
    inputs = batch()
    sp.patch.apply(model, method="fastv", budget=k, layer=K)
    model(**inputs)
    kept = sp.patch.kept(model)
    generated = model.generate(**inputs, max_new_tokens=steps, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    sp.patch.remove(model)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    rows = stock_rows(model, inputs)
    placeholder = (ids == IMAGE) | (ids == VIDEO)
    embeds = model.get_input_embeddings()(ids).masked_scatter(placeholder[..., None], torch.cat(rows))
    positions, _ = model.model.get_rope_index(ids, mm_token_type_ids=inputs["mm_token_type_ids"],
                                              image_grid_thw=inputs["image_grid_thw"],
                                              video_grid_thw=inputs["video_grid_thw"], attention_mask=mask)
    model.set_attn_implementation("eager")
    attentions = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                       output_attentions=True).attentions
    model.set_attn_implementation("sdpa")
    scores = attentions[K - 1][:, :, -1].mean(dim=1)  # (B, L)
    dropped = torch.zeros_like(placeholder)
    slots = placeholder.nonzero().tolist()  # (sample, position) in scatter order = rows in sequence order
    start = 0
    for r, row in enumerate(rows):
        mine = slots[start:start + row.shape[0]]
        ranked = sorted(range(len(mine)), key=lambda i: -float(scores[mine[i][0], mine[i][1]]))
        assert kept[r].tolist() == sorted(ranked[:k])
        for i in ranked[k:]:
            dropped[mine[i][0], mine[i][1]] = True
        start += row.shape[0]
    lm = model.model.language_model
    tokens = torch.empty(2, 0, dtype=torch.long)
    length = ids.shape[1]
    for _ in range(steps):
        t = length + tokens.shape[1]
        seq = torch.cat([embeds, model.get_input_embeddings()(tokens)], dim=1)
        real = torch.cat([mask.bool(), torch.ones_like(tokens, dtype=torch.bool)], dim=1)  # (B, T)
        step_pos = positions.amax(dim=2, keepdim=True) + 1 + torch.arange(tokens.shape[1])  # (3, B, t - L)
        pos = torch.cat([positions, step_pos], dim=2)
        gone = torch.cat([dropped, torch.zeros_like(tokens, dtype=torch.bool)], dim=1)
        causal = (torch.ones(t, t, dtype=torch.bool).tril()[None] & real[:, None, :]) | torch.eye(t, dtype=torch.bool)
        early = causal & ~(gone[:, None, :] & (torch.arange(t) >= length)[None, :, None])
        late = causal & ~gone[:, None, :]
        logits = masked_forward(model, seq, pos, [early] * K + [late] * (len(lm.layers) - K))  # 3-D positions
        tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, tokens)


def test_merging_visionzip_and_clip_text_are_refused_naming_what_is_missing():
    check_vision_side_refusals(build(), "qwen2_5_vl", {"trim": "M-RoPE", "trim_iqr": "M-RoPE", "visionzip": "no \\[CLS\\]",
                                                       "clip_text": "no CLIP joint space"})


@torch.no_grad()
def test_right_padding_gives_the_left_padded_logits():
    model = build()
    left = batch()
    shift = (left["attention_mask"] == 0).sum(1)
    right = dict(left)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        right[key] = torch.stack([row.roll(-int(s)) for row, s in zip(left[key], shift)])
    out_left, kept_left = pruned_forward(model, left, "divprune", 0.5)
    out_right, kept_right = pruned_forward(model, right, "divprune", 0.5)
    assert [k.tolist() for k in kept_left] == [k.tolist() for k in kept_right]
    count = torch.tensor([10 + 3 + 2 + 2, 5 + 8])  # text + kept per prompt (rows 6 -> 3, 4 -> 2, 4 -> 2; 16 -> 8)
    width = out_left.logits.shape[1]  # both padded to the longer short prompt
    real_left = torch.arange(width)[None] >= (width - count)[:, None]
    real_right = torch.arange(width)[None] < count[:, None]
    torch.testing.assert_close(out_right.logits[real_right], out_left.logits[real_left], atol=1e-4, rtol=0)

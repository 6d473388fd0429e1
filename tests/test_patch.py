"""script_prune.patch on transformers' own LLaVA / LLaVA-NeXT classes (tiny random configs, offline).

References are built here from the STOCK model, never from the layer's output:
- logits: the unpatched model fed by hand a prompt whose placeholder runs hold only the kept visual
  tokens (taken from the stock vision tower + projector, laid out as the stock model lays them out:
  for NeXT every packed token is matched back to its crop and index, and a newline is kept iff its
  grid row keeps a token), with contiguous positions;
- kept: ``script_prune.select`` on projected features computed here from the stock modules;
- FastV: the stock decoder layers run cache-free with explicit 4-D masks (layers < K see every token,
  layers >= K and every decoded token see text + kept tokens only), scores from eager attention.
"""

import subprocess
import sys

import pytest
import torch
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
)

import script_prune as sp

IMAGE = 99  # image placeholder id (inside the vocabulary, as transformers' processors use)
VOCAB = 100


def text_config(layers: int = 3) -> LlamaConfig:
    return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       tie_word_embeddings=False, pad_token_id=0)


def vision_config(image_size: int = 32) -> CLIPVisionConfig:
    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=image_size, patch_size=8, projection_dim=16)


def sharpen(model):
    """Larger random decoder weights (std 0.25), so attention is far from uniform and logits react to
    positions and to which tokens are present."""
    with torch.no_grad():
        for p in model.model.language_model.layers.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.25)
    return model


def build_llava(image_size: int = 32, layers: int = 3, seed: int = 0) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = LlavaConfig(vision_config=vision_config(image_size), text_config=text_config(layers),
                      image_token_index=IMAGE, vision_feature_layer=-2, vision_feature_select_strategy="default")
    return sharpen(LlavaForConditionalGeneration(cfg).eval())


PINPOINTS = [[32, 64], [64, 32], [64, 64]]


def build_next(seed: int = 0, layers: int = 3) -> LlavaNextForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = LlavaNextConfig(vision_config=vision_config(), text_config=text_config(layers), image_token_index=IMAGE,
                          vision_feature_layer=-2, vision_feature_select_strategy="default",
                          image_grid_pinpoints=PINPOINTS)
    model = sharpen(LlavaNextForConditionalGeneration(cfg).eval())
    with torch.no_grad():
        model.model.image_newline.normal_()
    return model


def left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, length - len(r):] = torch.tensor(r)
        mask[b, length - len(r):] = 1
    return ids, mask


def prompts(counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of different lengths, each with one image run of ``counts[b]`` placeholders."""
    texts = [([1, 5, 6, 7], [8, 9, 10, 11, 12]), ([1, 13], [14, 15, 16])]
    return left_padded([before + [IMAGE] * n + after for (before, after), n in zip(texts, counts)])


def cache_length(output) -> int:
    """Tokens in an output's KV cache (``cache`` from transformers 5.24, ``past_key_values`` before)."""
    cache = output.cache if "cache" in type(output).__dataclass_fields__ else output.past_key_values
    return cache.get_seq_length()


# ------------------------------------------------------------------------------------------ stock pieces
def projected_rows(model, pixels: torch.Tensor) -> torch.Tensor:
    """The stock tower's layer -2 patch features through the stock projector. (R, 3, S, S) -> (R, N, D)"""
    hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    return model.model.multi_modal_projector(hidden)


def next_crops(model, pixels: torch.Tensor, sizes: torch.Tensor) -> list[torch.Tensor]:
    """The crops of every NeXT image, as the stock get_image_features takes them."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    counts = [image_size_to_num_patches(s.tolist(), PINPOINTS, 32) for s in sizes]
    return [p[:c] for p, c in zip(pixels, counts)]


def stock_image_tokens(model, pixels, sizes=None) -> list[torch.Tensor]:
    """The stock model's visual tokens per image (its own layout, newlines included)."""
    kwargs = {} if sizes is None else {"image_sizes": sizes}
    return list(model.model.get_image_features(pixel_values=pixels, **kwargs).pooler_output)


def stock_layout_ids(model, packed: torch.Tensor, rows: torch.Tensor) -> list[tuple[int, int] | None]:
    """(row, index) of every packed token, matched to the projected rows by distance; None for newlines."""
    flat = rows.reshape(-1, rows.shape[-1])
    newline = getattr(model.model, "image_newline", None)
    out = []
    for token in packed:
        if newline is not None and torch.equal(token, newline.to(token.dtype)):
            out.append(None)
            continue
        dist = (flat - token).norm(dim=1)
        best = int(dist.argmin())
        assert float(dist[best]) < 1e-4
        out.append(divmod(best, rows.shape[1]))
    return out


def pruned_image_tokens(model, packed, ids, kept_rows) -> torch.Tensor:
    """The stock layout of one image keeping only the kept (row, index) pairs and the newlines of
    grid rows that keep a token (a newline closes the grid row before it; base-only images keep theirs)."""
    kept = {(r, int(i)) for r, row in kept_rows.items() for i in row}
    chosen, line = [], []
    for token, ident in zip(packed, ids):
        if ident is None:
            if line or all(x is None or x[0] == min(kept_rows) for x in ids):
                chosen.extend(line + [token])
            line = []
        elif ident[0] == min(kept_rows) and ident in kept:
            chosen.append(token)  # base row
        elif ident in kept:
            line.append(token)
    return torch.stack(chosen + line)


def reference_logits(model, ids, mask, image_tokens: list):
    """Unpatched model on the hand-built short prompt: each placeholder run replaced by its tokens
    (``image_tokens[b]``: one tensor, or a list with one per run of sample b), left padded, contiguous
    positions. -> logits (B, Ls, V), mask (B, Ls), embeds (B, Ls, D)"""
    embed = model.get_input_embeddings()
    seqs = []
    for b in range(ids.shape[0]):
        row = ids[b][mask[b].bool()].tolist()
        runs = image_tokens[b] if isinstance(image_tokens[b], list) else [image_tokens[b]]
        pieces, i = [], 0
        while i < len(row):
            if row[i] == IMAGE:
                pieces.append(runs.pop(0))
                while i < len(row) and row[i] == IMAGE:
                    i += 1
            else:
                pieces.append(embed(torch.tensor([row[i]])))
                i += 1
        seqs.append(torch.cat(pieces))
    length = max(s.shape[0] for s in seqs)
    embeds = torch.zeros(len(seqs), length, seqs[0].shape[1])
    short = torch.zeros(len(seqs), length, dtype=torch.long)
    for b, s in enumerate(seqs):
        embeds[b, length - s.shape[0]:] = s
        short[b, length - s.shape[0]:] = 1
    positions = (short.cumsum(1) - 1).clamp(min=0)
    logits = model(inputs_embeds=embeds, attention_mask=short, position_ids=positions).logits
    return logits, short, embeds


def question_mean(model, ids, mask) -> torch.Tensor:
    """Mean LLM input embedding of each sample's tokens after its image run. (B, D)"""
    embed = model.get_input_embeddings()
    out = []
    for b in range(ids.shape[0]):
        row = ids[b][mask[b].bool()]
        last = int((row == IMAGE).nonzero().max())
        out.append(embed(row[last + 1:]).mean(dim=0))
    return torch.stack(out)


# ------------------------------------------------------------------------------------------ acceptance 1
@pytest.mark.parametrize("image_size,budget", [(32, 5), (32, 0.25), (24, 4)])
@torch.no_grad()
def test_llava_logits_equal_stock_model_on_hand_shortened_prompt(image_size, budget):
    model = build_llava(image_size)
    n = (image_size // 8) ** 2
    ids, mask = prompts([n, n])
    pixels = torch.randn(2, 3, image_size, image_size)
    sp.patch.apply(model, method="divprune", budget=budget)
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    kept = sp.patch.kept(model)
    k = budget if isinstance(budget, int) else int(budget * n)
    assert [row.tolist() for row in kept] == [sorted(set(row.tolist())) for row in kept]
    assert all(row.shape == (k,) and row.dtype == torch.int64 for row in kept)
    sp.patch.remove(model)
    rows = projected_rows(model, pixels)
    ref, short, _ = reference_logits(model, ids, mask, [rows[b, kept[b]] for b in range(2)])
    assert out.logits.shape == ref.shape
    real = short.bool()
    torch.testing.assert_close(out.logits[real], ref[real], atol=1e-4, rtol=0)
    # the cache holds text + kept tokens only
    assert cache_length(out) == int(short.sum(1).max())


@torch.no_grad()
def test_right_padded_forward_and_bfloat16():
    model = build_llava()
    ids, mask = prompts([16, 16])
    shift = (mask == 0).sum(1)
    right_ids = torch.stack([row.roll(-int(s)) for row, s in zip(ids, shift)])
    right_mask = torch.stack([row.roll(-int(s)) for row, s in zip(mask, shift)])
    pixels = torch.randn(2, 3, 32, 32)
    sp.patch.apply(model, method="divprune", budget=5)
    left = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    right = model(input_ids=right_ids, attention_mask=right_mask, pixel_values=pixels)
    # the same real tokens in the same order, the padding on each batch's own side
    kept_short = [4 + 5 + 5, 2 + 5 + 3]  # text before + kept + text after
    real_left = torch.arange(left.logits.shape[1])[None] >= (left.logits.shape[1] - torch.tensor(kept_short))[:, None]
    real_right = torch.arange(right.logits.shape[1])[None] < torch.tensor(kept_short)[:, None]
    torch.testing.assert_close(right.logits[real_right], left.logits[real_left], atol=1e-4, rtol=0)
    model.to(torch.bfloat16)
    out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels.bfloat16(), max_new_tokens=3,
                         do_sample=False)
    assert out.shape == (2, ids.shape[1] + 3) and [k.shape for k in sp.patch.kept(model)] == [(5,), (5,)]


@torch.no_grad()
def test_several_images_per_prompt_are_rows_in_sequence_order():
    model = build_llava()
    ids, mask = left_padded([[1, 5] + [IMAGE] * 16 + [6, 7] + [IMAGE] * 16 + [8, 9], [1, 13] + [IMAGE] * 16 + [14]])
    pixels = torch.randn(3, 3, 32, 32)
    sp.patch.apply(model, method="script", budget=3, relevance="llm_text")
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    kept = sp.patch.kept(model)
    sp.patch.remove(model)
    rows = projected_rows(model, pixels)
    query = question_mean(model, ids, mask)[[0, 0, 1]][:, None]  # each image's own prompt
    assert torch.equal(torch.stack(kept), sp.select(rows, 3, "script", image_embeds=rows, query_embeds=query))
    ref, short, embeds = reference_logits(model, ids, mask, [[rows[0, kept[0]], rows[1, kept[1]]], rows[2, kept[2]]])
    torch.testing.assert_close(out.logits[short.bool()], ref[short.bool()], atol=1e-4, rtol=0)
    # beams: generate() repeats each prompt with ITS images (prompt 0 holds two)
    sp.patch.apply(model, method="script", budget=3, relevance="llm_text")
    beams = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=4, num_beams=2,
                           num_return_sequences=2, do_sample=False)
    assert [k.tolist() for k in sp.patch.kept(model)] == [k.tolist() for k in [kept[0], kept[1]] * 2 + [kept[2]] * 2]
    sp.patch.remove(model)
    reference = model.generate(inputs_embeds=embeds, attention_mask=short, max_new_tokens=4, num_beams=2,
                               num_return_sequences=2, do_sample=False)
    assert torch.equal(beams[:, ids.shape[1]:], reference)


NEXT_SIZES = [[(20, 50), (64, 30)], [(40, 40), (90, 33)], [(33, 33), (50, 20)]]


@pytest.mark.parametrize("sizes,budget", [(NEXT_SIZES[0], 2), (NEXT_SIZES[1], 6), (NEXT_SIZES[2], 0.125)])
@torch.no_grad()
def test_llava_next_logits_equal_stock_model_on_hand_shortened_prompt(sizes, budget):
    model = build_next()
    sizes = torch.tensor(sizes)
    pixels = torch.randn(2, 5, 3, 32, 32)
    packed = stock_image_tokens(model, pixels, sizes)
    ids, mask = prompts([p.shape[0] for p in packed])
    sp.patch.apply(model, method="gsp", budget=budget)
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes)
    kept = sp.patch.kept(model)
    sp.patch.remove(model)
    crops = next_crops(model, pixels, sizes)
    assert len(kept) == sum(c.shape[0] for c in crops)
    image_tokens, start = [], 0
    for b in range(2):
        rows = projected_rows(model, crops[b])  # (crops, N, D)
        layout = stock_layout_ids(model, packed[b], rows)
        kept_rows = {r: kept[start + r] for r in range(rows.shape[0])}
        image_tokens.append(pruned_image_tokens(model, packed[b], layout, kept_rows))
        start += rows.shape[0]
    ref, short, _ = reference_logits(model, ids, mask, image_tokens)
    assert out.logits.shape == ref.shape
    torch.testing.assert_close(out.logits[short.bool()], ref[short.bool()], atol=1e-4, rtol=0)
    assert cache_length(out) == int(short.sum(1).max())


@pytest.mark.parametrize("arch", ["llava", "next"])
@torch.no_grad()
def test_full_budget_and_remove_are_bit_identical(arch):
    model = build_llava() if arch == "llava" else build_next()
    pixels = torch.randn(2, 3, 32, 32) if arch == "llava" else torch.randn(2, 5, 3, 32, 32)
    extra = {} if arch == "llava" else {"image_sizes": torch.tensor([[20, 50], [40, 40]])}
    counts = [16, 16] if arch == "llava" else [p.shape[0] for p in stock_image_tokens(model, pixels, extra["image_sizes"])]
    ids, mask = prompts(counts)
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, **extra)
    stock = model(**inputs).logits
    stock_gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    sp.patch.apply(model, method="gsp", budget=16)
    assert torch.equal(model(**inputs).logits, stock)
    assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), stock_gen)
    assert [k.tolist() for k in sp.patch.kept(model)][0] == list(range(16))
    sp.patch.remove(model)
    sp.patch.apply(model, method="gsp", budget=3)
    model(**inputs)
    sp.patch.remove(model)
    assert "forward" not in model.__dict__ and "_expand_inputs_for_generation" not in model.__dict__
    assert torch.equal(model(**inputs).logits, stock)
    assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), stock_gen)


@torch.no_grad()
def test_generate_greedy_and_beams_equal_reference_generate():
    model = build_llava()
    ids, mask = prompts([16, 16])
    pixels = torch.randn(2, 3, 32, 32)
    sp.patch.apply(model, method="script", budget=4, relevance="llm_text")
    greedy = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=6, do_sample=False)
    kept = sp.patch.kept(model)
    beams = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=5, num_beams=3,
                           num_return_sequences=2, do_sample=False)
    assert len(sp.patch.kept(model)) == 6  # each prompt's row once per beam
    torch.manual_seed(3)
    sampled = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=5, do_sample=True,
                             top_k=5, num_return_sequences=2)
    sp.patch.remove(model)
    rows = projected_rows(model, pixels)
    _, short, embeds = reference_logits(model, ids, mask, [rows[b, kept[b]] for b in range(2)])
    ref = model.generate(inputs_embeds=embeds, attention_mask=short, max_new_tokens=6, do_sample=False)
    assert torch.equal(greedy[:, :ids.shape[1]], ids)
    assert torch.equal(greedy[:, ids.shape[1]:], ref)
    ref_beams = model.generate(inputs_embeds=embeds, attention_mask=short, max_new_tokens=5, num_beams=3,
                               num_return_sequences=2, do_sample=False)
    assert torch.equal(beams[:, ids.shape[1]:], ref_beams)
    torch.manual_seed(3)
    ref_sampled = model.generate(inputs_embeds=embeds, attention_mask=short, max_new_tokens=5, do_sample=True,
                                 top_k=5, num_return_sequences=2)
    assert torch.equal(sampled[:, ids.shape[1]:], ref_sampled)


# ------------------------------------------------------------------------------------------ acceptance 2
VISION_METHODS = [m for m in sp.list_methods()
                  if sp.get_method(m).stage == "vision" and not sp.get_method(m).merges]


@pytest.mark.parametrize("method", VISION_METHODS)
@torch.no_grad()
def test_kept_equals_select_on_the_same_features(method):
    model = build_llava()
    ids, mask = prompts([16, 16])
    pixels = torch.randn(2, 3, 32, 32)
    sp.patch.apply(model, method=method, budget=5, relevance="llm_text")
    model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    kept = torch.stack(sp.patch.kept(model))
    sp.patch.remove(model)
    rows = projected_rows(model, pixels)
    params = {"negate": False} if "negate" in sp.get_method(method).params else {}
    expected = sp.select(rows, 5, method, image_embeds=rows, query_embeds=question_mean(model, ids, mask)[:, None],
                         **params)
    assert torch.equal(kept, expected)


@torch.no_grad()
def test_clip_text_relevance_is_negated_clip_similarity():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained("llava/toy/checkpoint/clip")
    torch.manual_seed(5)
    text = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                                      num_hidden_layers=1, num_attention_heads=4,
                                                      projection_dim=16, max_position_embeddings=77)).eval()
    projection = torch.nn.Linear(32, 16, bias=False)
    model = build_llava()
    ids, mask = prompts([16, 16])
    pixels = torch.randn(2, 3, 32, 32)
    questions = ["a red cube on the left", "how many spheres"]
    sp.patch.apply(model, method="qcrs", budget=5, relevance=sp.patch.ClipText(text, projection, tokenizer))
    sp.patch.set_query(model, questions)
    model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    kept = torch.stack(sp.patch.kept(model))
    sp.patch.remove(model)
    hidden = model.model.vision_tower(pixels, output_hidden_states=True)
    image = projection(model.model.vision_tower.post_layernorm(hidden.hidden_states[-2][:, 1:]))
    query = torch.stack([text(**tokenizer(q, return_tensors="pt")).text_embeds for q in questions])  # (2, 1, P)
    rows = projected_rows(model, pixels)
    assert torch.equal(kept, sp.select(rows, 5, "qcrs", image_embeds=image, query_embeds=query, negate=True))
    assert not torch.equal(kept, sp.select(rows, 5, "qcrs", image_embeds=image, query_embeds=query, negate=False))
    # without set_query the question is decoded from the ids after the image with llm_tokenizer
    source = sp.patch.ClipText(text, projection.weight, tokenizer, llm_tokenizer=tokenizer)
    sp.patch.apply(model, method="qcrs", budget=5, relevance=source)
    model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    decoded = torch.stack(sp.patch.kept(model))
    sp.patch.remove(model)
    questions = [tokenizer.decode(row[m.bool()][-n:].tolist(), skip_special_tokens=True).strip()
                 for row, m, n in zip(ids, mask, (5, 3))]
    query = torch.stack([text(**tokenizer(q, return_tensors="pt")).text_embeds for q in questions])
    assert torch.equal(decoded, sp.select(rows, 5, "qcrs", image_embeds=image, query_embeds=query, negate=True))
    sp.patch.apply(model, method="qcrs", budget=5, relevance=sp.patch.ClipText(text, projection, tokenizer))
    with pytest.raises(ValueError, match="set_query"):
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    with pytest.raises(ValueError, match="list of strings"):
        sp.patch.set_query(model, "one string")


@torch.no_grad()
def test_trim_merged_token_follows_the_kept_tokens_llava():
    """A merging method: kept = script_prune.reduce's indices on the vision features (the projector input),
    and the stock projector of reduce's merged token comes right after each image's kept tokens."""
    model = build_llava()
    ids, mask = prompts([16, 16])
    pixels = torch.randn(2, 3, 32, 32)
    sp.patch.apply(model, method="trim", budget=5, relevance="llm_text")
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    kept = torch.stack(sp.patch.kept(model))
    sp.patch.remove(model)
    features = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]  # (2, N, C)
    rows = model.model.multi_modal_projector(features)
    reduction = sp.reduce(features, 5, "trim", image_embeds=rows, query_embeds=question_mean(model, ids, mask)[:, None])
    assert torch.equal(kept, reduction.indices) and kept.shape == (2, 4)
    merged = model.model.multi_modal_projector(reduction.merged)  # (2, 1, D)
    ref, short, _ = reference_logits(model, ids, mask, [torch.cat([rows[b, kept[b]], merged[b]]) for b in range(2)])
    torch.testing.assert_close(out.logits[short.bool()], ref[short.bool()], atol=1e-4, rtol=0)


@torch.no_grad()
def test_trim_iqr_keeps_a_different_count_per_row_equal_to_reduce_row_by_row():
    """TRIM-IQR's kept count is data dependent: each row is reduced on its own (script_prune.reduce with a
    batch of one), rows of one batch keep different counts, and the logits equal the hand-shortened prompt."""
    for seed in range(30):
        model = build_llava(seed=seed)
        ids, mask = prompts([16, 16])
        torch.manual_seed(seed)
        pixels = torch.randn(2, 3, 32, 32)
        sp.patch.apply(model, method="trim_iqr", budget=12, relevance="llm_text")
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        kept = sp.patch.kept(model)
        counts = sp.patch.visual_tokens(model)
        sp.patch.remove(model)
        if kept[0].numel() != kept[1].numel():
            break
    else:
        pytest.fail("no seed gave rows with different TRIM-IQR counts")
    features = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]  # (2, N, C)
    rows = model.model.multi_modal_projector(features)
    query = question_mean(model, ids, mask)[:, None]
    tokens = []
    for b in range(2):
        reduction = sp.reduce(features[b:b + 1], 12, "trim_iqr", image_embeds=rows[b:b + 1], query_embeds=query[b:b + 1])
        assert torch.equal(kept[b], reduction.indices[0])
        tokens.append(torch.cat([rows[b, kept[b]], model.model.multi_modal_projector(reduction.merged)[0]]))
    assert counts == [t.shape[0] for t in tokens]
    with pytest.raises(ValueError, match="differ across the batch"):  # why the layer goes row by row
        sp.reduce(features, 12, "trim_iqr", image_embeds=rows, query_embeds=query)
    ref, short, _ = reference_logits(model, ids, mask, tokens)
    torch.testing.assert_close(out.logits[short.bool()], ref[short.bool()], atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["script", "trim", "divprune"])
def test_autograd_forward_prunes_like_no_grad_and_gradients_reach_the_projector(method):
    """With autograd on (a user's own forward), selection sees detached tensors: same logits as under no_grad,
    and the loss's gradients flow through the kept tokens into the projector."""
    model = build_llava()
    ids, mask = prompts([16, 16])
    pixels = torch.randn(2, 3, 32, 32)
    sp.patch.apply(model, method=method, budget=5, relevance="llm_text")
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    torch.testing.assert_close(out.logits.detach(), expected, atol=0, rtol=0)
    out.logits.sum().backward()
    assert model.model.multi_modal_projector.linear_1.weight.grad is not None
    sp.patch.remove(model)


@torch.no_grad()
def test_visionzip_uses_eager_clip_attention_and_merges_after_the_kept_tokens():
    model = build_llava()
    attn = model.model.vision_tower.encoder.layers[0].self_attn
    attn.q_proj.weight.mul_(6.0)  # a sharp [CLS] attention: its softmax ranks patches unlike its logits
    attn.k_proj.weight.mul_(6.0)
    ids, mask = prompts([16, 16])
    pixels = torch.randn(2, 3, 32, 32)
    sp.patch.apply(model, method="visionzip", budget=10, dominant=6, contextual=4)
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    kept = torch.stack(sp.patch.kept(model))
    sp.patch.remove(model)
    tower = model.model.vision_tower
    tower.set_attn_implementation("eager")
    hidden = tower(pixels, output_hidden_states=True, output_attentions=True)
    tower.set_attn_implementation("sdpa")
    features = hidden.hidden_states[-2][:, 1:]  # (2, N, C): the output of layer L-2 (index 0 of 2 here)
    cls_attention = hidden.attentions[0][:, :, 0, 1:].mean(dim=1)  # (2, N) eager softmax of that layer
    layer = tower.encoder.layers[0]
    heads = model.config.vision_config.num_attention_heads
    keys = layer.self_attn.k_proj(layer.layer_norm1(hidden.hidden_states[0]))  # the layer's keys (2, 1 + N, C)
    keys = keys.view(2, 17, heads, -1).mean(dim=2)[:, 1:]  # (2, N, hd) mean over heads
    reduction = sp.reduce(features, 10, "visionzip", cls_attention=cls_attention, keys=keys, dominant=6, contextual=4)
    assert torch.equal(kept, reduction.indices)
    rows = model.model.multi_modal_projector(features)
    merged = model.model.multi_modal_projector(reduction.merged)
    ref, short, _ = reference_logits(model, ids, mask, [torch.cat([rows[b, kept[b]], merged[b]]) for b in range(2)])
    torch.testing.assert_close(out.logits[short.bool()], ref[short.bool()], atol=1e-4, rtol=0)


@torch.no_grad()
def test_trim_merged_tokens_in_the_next_layout():
    """NeXT: the base crop's merged token follows its kept tokens; the tiles' merged tokens follow the grid."""
    model = build_next()
    sizes = torch.tensor([[20, 50], [40, 40]])
    pixels = torch.randn(2, 5, 3, 32, 32)
    packed = stock_image_tokens(model, pixels, sizes)
    ids, mask = prompts([p.shape[0] for p in packed])
    sp.patch.apply(model, method="trim", budget=3, relevance="llm_text")
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes)
    kept = sp.patch.kept(model)
    sp.patch.remove(model)
    crops = next_crops(model, pixels, sizes)
    question = question_mean(model, ids, mask)
    image_tokens, start = [], 0
    for b in range(2):
        features = model.model.vision_tower(crops[b], output_hidden_states=True).hidden_states[-2][:, 1:]
        rows = model.model.multi_modal_projector(features)
        reduction = sp.reduce(features, 3, "trim", image_embeds=rows,
                              query_embeds=question[b].expand(rows.shape[0], 1, -1))
        assert [x.tolist() for x in kept[start:start + rows.shape[0]]] == reduction.indices.tolist()
        merged = model.model.multi_modal_projector(reduction.merged)[:, 0]  # (crops, D)
        layout = stock_layout_ids(model, packed[b], rows)
        kept_rows = {r: kept[start + r] for r in range(rows.shape[0])}
        grid = pruned_image_tokens(model, packed[b], layout, kept_rows)
        base = rows[0, kept[start]]
        image_tokens.append(torch.cat([base, merged[:1], grid[base.shape[0]:], merged[1:]]))
        start += rows.shape[0]
    ref, short, _ = reference_logits(model, ids, mask, image_tokens)
    torch.testing.assert_close(out.logits[short.bool()], ref[short.bool()], atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------ FastV
def eager_scores(model, embeds, mask, positions, layer: int) -> torch.Tensor:
    """Mean-over-heads attention of each row's last token at decoder layer ``layer``: transformers' eager
    attention (output_attentions) of the unpruned prompt. -> (B, L)"""
    model.set_attn_implementation("eager")
    try:
        out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    return out.attentions[layer][:, :, -1, :].mean(dim=1)


def masked_forward(model, embeds, positions, allowed: list[torch.Tensor]) -> torch.Tensor:
    """The stock decoder layers without a cache, layer i with the boolean (B, T, T) mask allowed[i]."""
    lm = model.model.language_model
    hidden = embeds
    rope = lm.rotary_emb(hidden, position_ids=positions)
    for layer, ok in zip(lm.layers, allowed):
        bias = torch.zeros(ok.shape, dtype=hidden.dtype).masked_fill(~ok, torch.finfo(hidden.dtype).min)[:, None]
        hidden = layer(hidden, attention_mask=bias, position_embeddings=rope, position_ids=positions)
    return model.lm_head(lm.norm(hidden))


def visual_identities(model, arch, pixels, sizes, packed) -> list[list]:
    """Per sample, the (global row, index) of every placeholder token in the stock layout (None: newline)."""
    out, offset = [], 0
    crops = [pixels[b:b + 1] for b in range(len(packed))] if arch == "llava" else next_crops(model, pixels, sizes)
    for b, tokens in enumerate(packed):
        rows = projected_rows(model, crops[b])
        ids = stock_layout_ids(model, tokens, rows)
        out.append([None if x is None else (x[0] + offset, x[1]) for x in ids])
        offset += rows.shape[0]
    return out


@pytest.mark.parametrize("arch", ["llava", "next"])
@torch.no_grad()
def test_fastv_picks_eager_top_attention_and_decodes_like_masked_reference(arch):
    K, k, steps, layers = 2, 4, 6, 4
    if arch == "llava":
        model, pixels, sizes, extra = build_llava(layers=layers, seed=2), torch.randn(2, 3, 32, 32), None, {}
    else:
        model, pixels = build_next(layers=layers, seed=2), torch.randn(2, 5, 3, 32, 32)
        sizes = torch.tensor([[20, 50], [40, 40]])
        extra = {"image_sizes": sizes}
    packed = stock_image_tokens(model, pixels, sizes)
    ids, mask = prompts([p.shape[0] for p in packed])
    sp.patch.apply(model, method="fastv", budget=k, layer=K)
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, **extra)
    kept = sp.patch.kept(model)
    generated = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=steps,
                               do_sample=False, **extra)[:, ids.shape[1]:]
    assert [x.tolist() for x in sp.patch.kept(model)] == [x.tolist() for x in kept]
    sp.patch.remove(model)
    # the unpruned prompt as the stock model builds it; which row / index each placeholder holds
    embeds = model.get_input_embeddings()(ids).masked_scatter((ids == IMAGE)[..., None], torch.cat(packed))
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    scores = eager_scores(model, embeds, mask, positions, K - 1)  # (B, L)
    identities = visual_identities(model, arch, pixels, sizes, packed)
    dropped = torch.zeros_like(mask, dtype=torch.bool)
    for b in range(2):
        at = (ids[b] == IMAGE).nonzero().flatten().tolist()
        for row in sorted({x[0] for x in identities[b] if x is not None}):
            mine = [(pos, x[1]) for pos, x in zip(at, identities[b]) if x is not None and x[0] == row]
            ranked = sorted(mine, key=lambda pi: -float(scores[b, pi[0]]))
            assert kept[row].tolist() == sorted(i for _, i in ranked[:k])
            for pos, _ in ranked[k:]:
                dropped[b, pos] = True
    assert cache_length(out) == int((mask.bool() & ~dropped).sum(1).max())
    # greedy decoding, recomputed from scratch every step
    tokens = torch.empty(2, 0, dtype=torch.long)
    length = ids.shape[1]
    for _ in range(steps):
        t = length + tokens.shape[1]
        seq = torch.cat([embeds, model.get_input_embeddings()(tokens)], dim=1)
        real = torch.cat([mask.bool(), torch.ones_like(tokens, dtype=torch.bool)], dim=1)  # (B, T)
        pos = (real.long().cumsum(1) - 1).clamp(min=0)
        gone = torch.cat([dropped, torch.zeros_like(tokens, dtype=torch.bool)], dim=1)  # (B, T)
        causal = torch.ones(t, t, dtype=torch.bool).tril()[None] & real[:, None, :]
        causal |= torch.eye(t, dtype=torch.bool)[None]
        early = causal & ~(gone[:, None, :] & (torch.arange(t) >= length)[None, :, None])  # decoded queries skip dropped
        late = causal & ~gone[:, None, :]
        logits = masked_forward(model, seq, pos, [early] * K + [late] * (layers - K))
        tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, tokens)


# ------------------------------------------------------------------------------------------ acceptance 3
def test_errors_name_the_problem(monkeypatch):
    model = build_llava()
    with pytest.raises(ValueError, match="LlamaForCausalLM.*LlavaForConditionalGeneration.*LlavaNext"):
        sp.patch.apply(LlamaForCausalLM(text_config()), method="gsp", budget=4)
    with pytest.raises(ValueError, match="method must be one of"):
        sp.patch.apply(model, method="nope", budget=4)
    for bad in (0, -3, 1.5, 1.0, True, "8", None):
        with pytest.raises(ValueError, match="budget"):
            sp.patch.apply(model, method="gsp", budget=bad)
    with pytest.raises(ValueError, match="parameters \\['tua'\\]"):
        sp.patch.apply(model, method="gsp", budget=4, tua=0.3)
    with pytest.raises(ValueError, match="parameter 'tau' of method 'gsp' must be a finite number"):
        sp.patch.apply(model, method="gsp", budget=4, tau="high")
    monkeypatch.setattr(type(sp.patch.family_of(model)), "provides", ())
    with pytest.raises(ValueError, match="visionzip.*needs inputs \\['cls_attention', 'keys'\\]"):
        sp.patch.apply(model, method="visionzip", budget=4)
    with pytest.raises(ValueError, match="needs query relevance.*no relevance source.*llm_text"):
        sp.patch.apply(model, method="script", budget=4)
    with pytest.raises(ValueError, match="clip_text.*text tower"):
        sp.patch.apply(model, method="script", budget=4, relevance="clip_text")
    with pytest.raises(ValueError, match="'layer'.*\\[1, 2\\]"):
        sp.patch.apply(model, method="fastv", budget=4, layer=3)
    assert not sp.patch.is_patched(model)
    sp.patch.apply(model, method="gsp", budget=4)
    with pytest.raises(ValueError, match="no prefill"):
        sp.patch.kept(model)
    ids, mask = prompts([16, 16])
    with pytest.raises(ValueError, match="2-D .* attention mask.*static"):
        model.generate(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(2, 3, 32, 32), max_new_tokens=2,
                       cache_implementation="static")
    with pytest.raises(ValueError, match="already patched.*remove"):
        sp.patch.apply(model, method="gsp", budget=4)
    sp.patch.remove(model)
    with pytest.raises(ValueError, match="not patched"):
        sp.patch.remove(model)


def test_import_script_prune_does_not_import_transformers():
    code = "import sys, script_prune; assert 'transformers' not in sys.modules; script_prune.patch; " \
           "assert 'transformers' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_budget_resolver():
    assert sp.resolve_budget(64, 576) == 64
    assert sp.resolve_budget(0.25, 576) == 144
    assert sp.resolve_budget(0.29, 100) == 29
    assert sp.resolve_budget(0.001, 100) == 1
    assert sp.keeps_all(576, 576) and not sp.keeps_all(575, 576)


def test_a_family_refuses_transformers_older_than_it_was_tested_on():
    from script_prune.patch import (InternVLFamily, LlavaFamily, LlavaNextFamily, LlavaOnevisionFamily,
                                    Qwen2_5_VLFamily, Qwen3VLFamily, check_transformers_version)

    tested = {Qwen2_5_VLFamily(): "5.19", Qwen3VLFamily(): "5.19", LlavaOnevisionFamily(): "5.24",
              InternVLFamily(): "5.24"}  # the Qwen families: also vLLM 0.32's pin, 5.19.0
    for family, minimum in tested.items():
        with pytest.raises(RuntimeError, match=rf"supports Model on transformers >= {minimum} .*installed 5\.6\.0"):
            check_transformers_version(family, "Model", installed="5.6.0")
        check_transformers_version(family, "Model", installed=f"{minimum}.0")  # the tested release passes
        check_transformers_version(family, "Model", installed="5.24.0")
    for family in (LlavaFamily(), LlavaNextFamily()):  # the whole declared range
        check_transformers_version(family, "Model", installed="5.6.0")

"""llava_arch.LlavaAdapter (what load_pretrained_model returns): LLaVA's API on transformers' own classes.

Reference: a separately loaded transformers model (``llava.model.convert``) fed the transformers way, by
hand: its own image processor, the image token repeated as often as ITS stock ``get_image_features``
gives tokens, left padding; pruned with ``script_prune.patch.apply`` directly (relevance ``ClipText`` of
the CLIP folder, the question set with ``set_query``). What this checks is the adapter's plumbing (markers,
pixels, sizes, query, counts, set_pruning); the layer itself is checked against an unpatched model in
test_patch.py. Folds the LLaVA-level checks of the former test_pruning_hook.py / test_fastv.py.
"""

import pytest
import torch
from transformers import LlavaImageProcessorPil, LlavaNextImageProcessorPil

import script_prune as sp
from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.conversation import conv_templates
from llava.mm_utils import process_images, strip_short_answer_prompt, tokenizer_image_token
from llava.model.builder import load_pretrained_model
from llava.model.convert import hf_pinpoints, load_checkpoint
from llava.model.multimodal_encoder.clip_encoder import CLIPRelevanceEncoder
from llava.model.pruning import PruningConfig
from tests.helpers import prompt_ids, random_image

SIZES = {"llava-1.5": [(56, 56), (90, 40)], "llava-next": [(56, 56), (100, 40), (61, 140), (130, 125)]}


@pytest.fixture(scope="module", params=["llava-1.5", "llava-next"])
def pair(request, tiny_llava15_path, tiny_llava_next_path):
    """(arch, load_pretrained_model's 4-tuple, reference transformers model, its image processor, CLIP path)."""
    path = tiny_llava15_path if request.param == "llava-1.5" else tiny_llava_next_path
    loaded = load_pretrained_model(path, torch_dtype=torch.float32)
    ref, config, _ = load_checkpoint(path)
    proc = loaded[2]
    common = dict(size={"shortest_edge": proc.size["shortest_edge"]}, crop_size=proc.crop_size,
                  image_mean=proc.image_mean, image_std=proc.image_std)
    if request.param == "llava-next":
        hf_proc = LlavaNextImageProcessorPil(image_grid_pinpoints=hf_pinpoints(config), **common)
    else:
        hf_proc = LlavaImageProcessorPil(do_pad=True, **common)
    return request.param, loaded, ref, hf_proc, config["mm_vision_tower"]


def reference_inputs(ref, hf_proc, tokenizer, questions, images):
    """transformers-style inputs: the image token repeated per stock visual token, left padding."""
    pixels = hf_proc(images=images, return_tensors="pt")
    kwargs = {"pixel_values": pixels["pixel_values"]}
    if "image_sizes" in pixels:
        kwargs["image_sizes"] = pixels["image_sizes"]
    with torch.no_grad():
        counts = [f.shape[0] for f in ref.model.get_image_features(**kwargs).pooler_output]
    rows = []
    for question, count in zip(questions, counts):
        row = prompt_ids(tokenizer, question).tolist()
        at = row.index(IMAGE_TOKEN_INDEX)
        rows.append(row[:at] + [ref.config.image_token_id] * count + row[at + 1:])
    length = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, length - len(r):], mask[b, length - len(r):] = torch.tensor(r), 1
    return {"input_ids": ids, "attention_mask": mask, **kwargs}, counts


def our_inputs(tokenizer, questions):
    rows = [prompt_ids(tokenizer, q) for q in questions]
    length = max(r.numel() for r in rows)
    ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, length - r.numel():], mask[b, length - r.numel():] = r, 1
    return ids, mask


QUESTIONS = ["What is in the picture?", "Which colour is the large shape on the left?"]


def test_unpruned_batch_logits_and_counts_equal_the_reference(pair):
    arch, (tokenizer, model, processor, _), ref, hf_proc, _ = pair
    images = [random_image(*SIZES[arch][-1], seed=1), random_image(*SIZES[arch][0], seed=2)]
    ids, mask = our_inputs(tokenizer, QUESTIONS)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, images=process_images(images, processor, model.config),
                     image_sizes=[im.size for im in images], texts=QUESTIONS).logits
        inputs, counts = reference_inputs(ref, hf_proc, tokenizer, QUESTIONS, images)
        # ours pads on the right (LLaVA's tokenizer_padding_side): compare the real positions
        theirs = ref(**inputs).logits
    assert model.last_visual_token_counts == counts
    for b in range(2):
        n = int(inputs["attention_mask"][b].sum())
        torch.testing.assert_close(ours[b, :n], theirs[b, -n:], atol=1e-4, rtol=0)


@pytest.mark.parametrize("method,budget,params", [("script", 5, {}), ("divprune", 3, {}), ("trim", 4, {}),
                                                  ("trim_iqr", 6, {}), ("visionzip", 5, {}),
                                                  ("fastv", 6, {"layer": 1})])
def test_pruned_batch_generate_equals_the_patched_reference(pair, method, budget, params):
    arch, (tokenizer, model, processor, _), ref, hf_proc, clip = pair
    images = [random_image(*SIZES[arch][-1], seed=3), random_image(*SIZES[arch][0], seed=4)]
    ids, mask = our_inputs(tokenizer, QUESTIONS)
    if method == "trim_iqr":  # a data-dependent count: one prompt (the old per-image behaviour)
        ids, mask, images = ids[:1, -int(mask[0].sum()):], mask[:1, -int(mask[0].sum()):], images[:1]
    cfg = PruningConfig(method=method, visual_token_num=budget, params=params)
    model.set_pruning(cfg)
    relevance = CLIPRelevanceEncoder.from_pretrained(clip) if cfg.needs_relevance else None
    sp.patch.apply(ref, method, budget=budget, relevance=relevance, **cfg.method_params())
    try:
        gen = dict(max_new_tokens=4, do_sample=False)
        got = model.generate(ids, attention_mask=mask, images=process_images(images, processor, model.config),
                             image_sizes=[im.size for im in images], texts=QUESTIONS[: len(images)], **gen)
        inputs, unpruned = reference_inputs(ref, hf_proc, tokenizer, QUESTIONS[: len(images)], images)
        sp.patch.set_query(ref, [strip_short_answer_prompt(q) for q in QUESTIONS[: len(images)]])
        expected = ref.generate(**inputs, **gen)[:, inputs["input_ids"].shape[1]:]
        expected_counts = sp.patch.visual_tokens(ref)
    finally:
        model.set_pruning(None)
        sp.patch.remove(ref)
    assert got.tolist() == expected.tolist()
    assert model.last_visual_token_counts == expected_counts
    assert all(c < u for c, u in zip(expected_counts, unpruned))  # it did prune


def test_budget_at_or_above_row_length_is_exactly_unpruned(pair):
    arch, (tokenizer, model, processor, _), *_ = pair
    image = random_image(*SIZES[arch][-1], seed=5)
    ids = prompt_ids(tokenizer, QUESTIONS[0])[None]
    pixels = process_images([image], processor, model.config)
    with torch.no_grad():
        stock = model(ids, images=pixels, image_sizes=[image.size]).logits
        model.set_pruning(PruningConfig(method="script", visual_token_num=model.num_patches))
        full = model(ids, images=pixels, image_sizes=[image.size], texts=QUESTIONS[:1]).logits
        model.set_pruning(None)
    assert torch.equal(stock, full)


def test_query_from_the_prompt_when_no_texts(pair):
    """Without texts the question is decoded from the ids after the image, the role tail and the short-answer
    line removed: the same answer as with texts=[that question]."""
    arch, (tokenizer, model, processor, _), *_ = pair
    question = "Is there a dog?\nAnswer the question using a single word or phrase."
    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message(conv.roles[0], "<image>\n" + question)
    conv.append_message(conv.roles[1], None)
    ids = tokenizer_image_token(conv.get_prompt(), tokenizer, return_tensors="pt")[None]
    image = random_image(*SIZES[arch][-1], seed=6)
    pixels = process_images([image], processor, model.config)
    model.set_pruning(PruningConfig(method="script", visual_token_num=4))
    try:
        kwargs = dict(images=pixels, image_sizes=[image.size], max_new_tokens=3, do_sample=False)
        implicit = model.generate(ids, **kwargs)
        explicit = model.generate(ids, texts=[question], **kwargs)
        assert model._query_texts(None, ids, torch.ones_like(ids, dtype=torch.bool)) == ["Is there a dog?"]
    finally:
        model.set_pruning(None)
    assert implicit.tolist() == explicit.tolist()


def test_labels_are_expanded_with_ignore_index_over_visual_tokens(pair):
    arch, (tokenizer, model, processor, _), ref, hf_proc, _ = pair
    image = random_image(*SIZES[arch][0], seed=7)
    ids = prompt_ids(tokenizer, QUESTIONS[0])[None]
    labels = ids.clone()
    with torch.no_grad():
        ours = model(ids, images=process_images([image], processor, model.config), image_sizes=[image.size],
                     labels=labels).loss
        inputs, _ = reference_inputs(ref, hf_proc, tokenizer, QUESTIONS[:1], [image])
        expected = inputs["input_ids"].masked_fill(inputs["input_ids"] == ref.config.image_token_id, IGNORE_INDEX)
        theirs = ref(**inputs, labels=expected).loss
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_set_pruning_none_restores_the_stock_model_and_refusals_keep_the_setting(pair):
    arch, (tokenizer, model, processor, _), *_ = pair
    model.set_pruning(PruningConfig(method="script", visual_token_num=3))
    assert sp.patch.is_patched(model.hf) and model.pruning.method == "script"
    with pytest.raises(ValueError, match="'layer'"):
        model.set_pruning(PruningConfig(method="fastv", visual_token_num=3, params={"layer": 7}))
    assert model.pruning.method == "script"
    model.set_pruning(None)
    assert not sp.patch.is_patched(model.hf) and model.pruning is None
    assert "forward" not in model.hf.__dict__


def test_marker_count_mismatch_and_missing_images_are_refused(pair):
    arch, (tokenizer, model, processor, _), *_ = pair
    ids = prompt_ids(tokenizer, "What?")[None]
    image = random_image(56, 56)
    pixels = process_images([image, image], processor, model.config)
    with pytest.raises(ValueError, match="1 <image> token"):
        model.generate(ids, images=pixels, image_sizes=[image.size] * 2, max_new_tokens=1)
    with pytest.raises(ValueError, match="no images were given"):
        model.generate(ids, max_new_tokens=1)


def test_bfloat16_model_prunes_and_generates(tiny_llava15_path):
    tokenizer, model, processor, _ = load_pretrained_model(tiny_llava15_path, torch_dtype=torch.bfloat16,
                                                           pruning=PruningConfig(method="script", visual_token_num=4))
    image = random_image(60, 50)
    out = model.generate(prompt_ids(tokenizer, "What?")[None], images=process_images([image], processor, model.config),
                         image_sizes=[image.size], texts=["What?"], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 3) and model.last_visual_token_counts == [4]


def test_fastv_beam_search_keeps_the_budget_for_every_beam(pair):
    """FastV with beams through LLaVA's API: each prompt's rows are repeated per beam, every beam keeps the
    budget, counts are one per prompt, and the output equals the patched reference's beam search."""
    arch, (tokenizer, model, processor, _), ref, hf_proc, _ = pair
    images = [random_image(*SIZES[arch][-1], seed=8), random_image(*SIZES[arch][0], seed=9)]
    ids, mask = our_inputs(tokenizer, QUESTIONS)
    model.set_pruning(PruningConfig(method="fastv", visual_token_num=3, params={"layer": 1}))
    sp.patch.apply(ref, "fastv", budget=3, layer=1)
    try:
        gen = dict(max_new_tokens=3, num_beams=2, do_sample=False)
        got = model.generate(ids, attention_mask=mask, images=process_images(images, processor, model.config),
                             image_sizes=[im.size for im in images], **gen)
        rows = model.kept_tokens()
        inputs, _ = reference_inputs(ref, hf_proc, tokenizer, QUESTIONS, images)
        expected = ref.generate(**inputs, **gen)[:, inputs["input_ids"].shape[1]:]
    finally:
        model.set_pruning(None)
        sp.patch.remove(ref)
    assert got.tolist() == expected.tolist()
    assert len(rows) % 2 == 0 and all(r.numel() <= 3 for r in rows)  # every prompt's rows once per beam
    assert len(model.last_visual_token_counts) == 2


def test_mistral_llm_prunes_like_llama_on_the_same_weights(tiny_llava15_path, tmp_path):
    """LlavaMistralForCausalLM checkpoints (no sliding window) load with a Mistral LLM; with Llama's weights it
    computes the same function, pruned by the layer (script and FastV) as well."""
    import json
    import shutil

    path = tmp_path / "mistral"
    shutil.copytree(tiny_llava15_path, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(architectures=["LlavaMistralForCausalLM"], sliding_window=None)
    (path / "config.json").write_text(json.dumps(cfg))
    tokenizer, llama, processor, _ = load_pretrained_model(tiny_llava15_path, torch_dtype=torch.float32)
    _, mistral, _, _ = load_pretrained_model(str(path), torch_dtype=torch.float32)
    assert mistral.hf.config.text_config.model_type == "mistral"
    image = random_image(70, 50, seed=3)
    ids = prompt_ids(tokenizer, "What is it?")[None]
    pixels = process_images([image], processor, llama.config)
    for cfg in (PruningConfig(method="script", visual_token_num=5), PruningConfig(method="fastv", visual_token_num=5,
                                                                                   params={"layer": 1})):
        outs = []
        for model in (llama, mistral):
            model.set_pruning(cfg)
            outs.append(model.generate(ids, images=pixels, image_sizes=[image.size], texts=["What is it?"],
                                       max_new_tokens=4, do_sample=False))
            model.set_pruning(None)
        assert outs[0].tolist() == outs[1].tolist()


def test_a_prompt_llava_would_truncate_is_named_and_kept_whole(pair):
    # LLaVA cuts the expanded prompt to tokenizer_model_max_length; the adapter keeps it whole and says so
    arch, (tokenizer, model, processor, _), *_ = pair
    image = random_image(56, 56)
    ids = prompt_ids(tokenizer, "What?")[None]
    pixels = process_images([image], processor, model.config)
    expanded = model.prepare_inputs(ids, None, pixels, [image.size], None)["input_ids"].shape[1]
    limit = model.config.tokenizer_model_max_length
    try:
        model.config.tokenizer_model_max_length = expanded - 1
        with pytest.warns(UserWarning, match=f"holds {expanded} tokens.*tokenizer_model_max_length={expanded - 1}"):
            out = model.prepare_inputs(ids, None, pixels, [image.size], None)
        assert out["input_ids"].shape[1] == expanded
        model.config.tokenizer_model_max_length = expanded
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model.prepare_inputs(ids, None, pixels, [image.size], None)
    finally:
        model.config.tokenizer_model_max_length = limit

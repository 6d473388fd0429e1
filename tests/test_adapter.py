"""llava.model.adapter: LLaVA's API (generate(ids, images=, image_sizes=, texts=), -200 markers, set_pruning,
last_visual_token_counts) on transformers' own classes patched by script_prune.patch.

Reference: the original re-implementation (``load_pretrained_model``, parity-tested against transformers in
test_model_parity) on the same checkpoint; the stock transformers forward itself checks that the adapter's
placeholder runs have the lengths the images fill (it raises on a mismatch).
"""

import pytest
import torch

import script_prune as sp
from llava.conversation import conv_templates
from llava.mm_utils import process_images, tokenizer_image_token
from llava.model.adapter import load_adapter
from llava.model.builder import load_pretrained_model
from llava.model.pruning import PruningConfig
from tests.helpers import prompt_ids, random_image

SIZES = {"llava-1.5": [(56, 56), (90, 40)], "llava-next": [(56, 56), (100, 40), (61, 140), (130, 125)]}


@pytest.fixture(scope="module", params=["llava-1.5", "llava-next"])
def pair(request, tiny_llava15_path, tiny_llava_next_path):
    path = tiny_llava15_path if request.param == "llava-1.5" else tiny_llava_next_path
    return request.param, load_pretrained_model(path, torch_dtype=torch.float32), load_adapter(path, torch_dtype=torch.float32)


def batch(tokenizer, questions):
    """Left-padded (B, L) ids + mask of vicuna_v1 prompts."""
    rows = [prompt_ids(tokenizer, q) for q in questions]
    length = max(r.numel() for r in rows)
    ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, length - r.numel():], mask[b, length - r.numel():] = r, 1
    return ids, mask


def test_unpruned_logits_equal_the_reimplementation(pair):
    arch, (tokenizer, ours, processor, _), (_, adapted, _, _) = pair
    ids = prompt_ids(tokenizer, "What is in the picture?")[None]
    for width, height in SIZES[arch]:
        image = random_image(width, height, seed=width)
        pixels = process_images([image], processor, ours.config)
        with torch.no_grad():
            expected = ours(ids, images=pixels, image_sizes=[image.size]).logits
            got = adapted(ids, images=pixels, image_sizes=[image.size]).logits
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        assert adapted.last_visual_token_counts == ours.last_visual_token_counts


@pytest.mark.parametrize("method,budget,params", [("script", 5, {}), ("divprune", 3, {}), ("random", 4, {}),
                                                  ("trim", 4, {}), ("fastv", 6, {"layer": 1})])
def test_pruned_batch_generate_equals_the_reimplementation(pair, method, budget, params):
    arch, (tokenizer, ours, processor, _), (_, adapted, _, _) = pair
    images = [random_image(*SIZES[arch][-1], seed=1), random_image(*SIZES[arch][0], seed=2)]
    questions = ["What is in the picture?", "Which colour is the large shape on the left?"]
    ids, mask = batch(tokenizer, questions)
    pixels = process_images(images, processor, ours.config)
    cfg = PruningConfig(method=method, visual_token_num=budget, params=params)
    ours.set_pruning(cfg)
    adapted.set_pruning(cfg)
    try:
        kwargs = dict(images=pixels, image_sizes=[im.size for im in images], texts=questions, attention_mask=mask,
                      max_new_tokens=4, do_sample=False)
        expected = ours.generate(ids, **kwargs)
        got = adapted.generate(ids, **kwargs)
    finally:
        ours.set_pruning(None)
        adapted.set_pruning(None)
    assert got.tolist() == expected.tolist()
    assert adapted.last_visual_token_counts == ours.last_visual_token_counts
    assert adapted.last_visual_token_counts[1] < adapted.last_visual_token_counts[0] or arch == "llava-1.5"


def test_set_pruning_none_restores_the_stock_model_and_refusals_keep_the_setting(pair):
    arch, (tokenizer, _, processor, _), (_, adapted, _, _) = pair
    adapted.set_pruning(PruningConfig(method="script", visual_token_num=3))
    assert sp.patch.is_patched(adapted.hf) and adapted.pruning.method == "script"
    with pytest.raises(ValueError, match="'layer'"):
        adapted.set_pruning(PruningConfig(method="fastv", visual_token_num=3, params={"layer": 7}))
    adapted.set_pruning(None)
    assert not sp.patch.is_patched(adapted.hf) and adapted.pruning is None
    assert "forward" not in adapted.hf.__dict__


def test_query_from_the_prompt_when_no_texts(pair):
    """Without texts the question is decoded from the ids after the image (role tail and the short-answer line
    removed), as the re-implementation does: both pick the same tokens."""
    arch, (tokenizer, ours, processor, _), (_, adapted, _, _) = pair
    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message(conv.roles[0], "<image>\nIs there a dog?\nAnswer the question using a single word or phrase.")
    conv.append_message(conv.roles[1], None)
    ids = tokenizer_image_token(conv.get_prompt(), tokenizer, return_tensors="pt")[None]
    image = random_image(*SIZES[arch][-1], seed=5)
    pixels = process_images([image], processor, ours.config)
    for model in (ours, adapted):
        model.set_pruning(PruningConfig(method="script", visual_token_num=4))
    try:
        expected = ours.generate(ids, images=pixels, image_sizes=[image.size], max_new_tokens=3, do_sample=False)
        got = adapted.generate(ids, images=pixels, image_sizes=[image.size], max_new_tokens=3, do_sample=False)
    finally:
        for model in (ours, adapted):
            model.set_pruning(None)
    assert got.tolist() == expected.tolist()


def test_marker_count_mismatch_and_missing_images_are_refused(pair):
    arch, (tokenizer, ours, processor, _), (_, adapted, _, _) = pair
    ids = prompt_ids(tokenizer, "What?")[None]
    image = random_image(56, 56)
    pixels = process_images([image, image], processor, ours.config)
    with pytest.raises(ValueError, match="1 <image> token"):
        adapted.generate(ids, images=pixels, image_sizes=[image.size] * 2, max_new_tokens=1)
    with pytest.raises(ValueError, match="no images were given"):
        adapted.generate(ids, max_new_tokens=1)

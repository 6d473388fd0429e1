"""FastV inside the LLM (llava.model.fastv): which tokens the later layers see, the score row, the picks,
the shortened KV cache used by decoding, batches with left padding, and the unpruned limit.

References are independent of llava.model.fastv: the score row comes from transformers' own EAGER attention
(``output_attentions``) of an unpruned forward; the picks are top-k of that row; decoding is checked against a
cache-free layer-by-layer forward written here with explicit 4D masks.
"""

import copy

import pytest
import torch

import llava.model.fastv as fastv_module
from llava.mm_utils import process_images
from llava.model.builder import load_pretrained_model
from llava.model.hf_compat import output_cache
from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM
from llava.model.pruning import PruningConfig
from tests.helpers import prompt_ids, random_image

K = 2
BUDGET = 5


def left_pad(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), length, dtype=torch.long)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, length - len(s):] = s
        mask[b, length - len(s):] = 1
    return ids, mask


@pytest.fixture(scope="module")
def deep(tiny_llava15_path):
    """The tiny LLaVA-1.5 with a 4-layer grouped-query LLM (4 heads, 2 key/value heads): vision tower,
    projector, embeddings and head from the checkpoint, new random decoder layers."""
    tokenizer, base, processor, _ = load_pretrained_model(tiny_llava15_path, torch_dtype=torch.float32)
    config = copy.deepcopy(base.config)
    config.num_hidden_layers, config.num_key_value_heads = 4, 2
    torch.manual_seed(1)
    model = LlavaLlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("model.layers.") and p.dim() > 1:
                p.normal_(0.0, 0.25)
    shared = {k: v for k, v in base.state_dict().items() if not k.startswith("model.layers.")}
    missing = model.load_state_dict(shared, strict=False).missing_keys
    assert all(k.startswith("model.layers.") for k in missing)
    model.eval().set_query_tokenizer(tokenizer)
    # Eager attention everywhere in this model, so the FastV runs and the eager references share numerics
    # (these random layers amplify sdpa-vs-eager rounding); sdpa is exercised by the tiny-checkpoint tests.
    model.set_attn_implementation("eager")
    return tokenizer, model, processor


def single_inputs(tokenizer, processor, model, question="What is in the picture?", size=(60, 50), seed=0):
    ids = prompt_ids(tokenizer, question)[None]
    pixels = process_images([random_image(*size, seed=seed)], processor, model.config)
    return ids, pixels


def eager_reference_attention(model, ids, pixels, layer: int) -> torch.Tensor:
    """Mean-over-heads attention probabilities of the last token at decoder layer ``layer`` (0-based) of the
    UNPRUNED model -> (L,): that layer's input is captured in an unpruned forward and fed to transformers'
    own eager attention (LlamaAttention with eager_attention_forward returns its probabilities) with an
    explicit causal mask."""
    model.set_pruning(None)
    assert model.config._attn_implementation == "eager"
    target = model.get_model().layers[layer]
    seen = {}
    hook = target.register_forward_pre_hook(
        lambda m, args, kwargs: seen.update(x=args[0] if args else kwargs["hidden_states"],
                                            rope=kwargs["position_embeddings"]), with_kwargs=True)
    try:
        with torch.no_grad():
            model(ids, images=pixels)
    finally:
        hook.remove()
    length = seen["x"].shape[1]
    causal = torch.zeros(length, length).masked_fill(~torch.ones(length, length).tril().bool(),
                                                     torch.finfo(torch.float32).min)[None, None]
    with torch.no_grad():
        _, probs = target.self_attn(target.input_layernorm(seen["x"]), position_embeddings=seen["rope"],
                                    attention_mask=causal)
    return probs[0, :, -1, :].mean(dim=0)


class LayerSpy:
    """Records each decoder layer's input hidden states / RoPE (cos, sin) and output hidden states."""

    def __init__(self, model):
        self.inputs, self.positions, self.outputs = {}, {}, {}
        self.handles = []
        for i, layer in enumerate(model.get_model().layers):
            self.handles.append(layer.register_forward_pre_hook(self._pre(i), with_kwargs=True))
            self.handles.append(layer.register_forward_hook(self._post(i)))

    def _pre(self, i):
        def hook(module, args, kwargs):
            self.inputs.setdefault(i, []).append((args[0] if args else kwargs["hidden_states"]).detach().clone())
            self.positions.setdefault(i, []).append(kwargs["position_embeddings"])
        return hook

    def _post(self, i):
        def hook(module, args, output):
            self.outputs.setdefault(i, []).append(output.detach().clone())
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def test_score_row_equals_eager_attention_and_later_layers_see_only_the_picks(deep, monkeypatch):
    tokenizer, model, processor = deep
    ids, pixels = single_inputs(tokenizer, processor, model)
    reference = eager_reference_attention(model, ids, pixels, layer=K - 1)  # (L,)

    rows = []
    original = fastv_module.last_token_attention
    monkeypatch.setattr(fastv_module, "last_token_attention", lambda *a: rows.append(original(*a)) or rows[-1])
    model.set_pruning(PruningConfig(method="fastv", visual_token_num=BUDGET, params={"layer": K}))
    spy = LayerSpy(model)
    try:
        with torch.no_grad():
            model(ids, images=pixels)
    finally:
        spy.remove()
        model.set_pruning(None)

    # (b) the row computed from q/k equals eager's mean-over-heads probabilities
    assert len(rows) == 1
    torch.testing.assert_close(rows[0][0], reference, atol=1e-6, rtol=1e-5)

    # (c) the picks are the top-k of the reference row over the image span
    start = int((ids[0] == -200).nonzero()[0, 0])
    n_image = model.get_vision_tower().num_patches
    image_scores = reference[start:start + n_image]
    top = image_scores.sort(descending=True).values
    assert float(top[BUDGET - 1] - top[BUDGET]) > 1e-5, "reference scores tie at the cut: test is ill-posed"
    picks = (image_scores.topk(BUDGET).indices + start).sort().values
    length = reference.shape[0]
    expected = torch.cat([torch.arange(start), picks, torch.arange(start + n_image, length)])  # (text + k,)

    # (a) layers < K see all L tokens; layers >= K see text + kept, exactly layer K-1's output rows at the picks
    for i in range(K):
        assert spy.inputs[i][0].shape[1] == length
    for i in range(K, model.config.num_hidden_layers):
        assert spy.inputs[i][0].shape[1] == length - n_image + BUDGET
        cos, sin = model.get_model().rotary_emb(spy.inputs[i][0], expected[None])  # RoPE at the ORIGINAL positions
        assert torch.equal(spy.positions[i][0][0], cos) and torch.equal(spy.positions[i][0][1], sin)
    assert torch.equal(spy.inputs[K][0][0], spy.outputs[K - 1][0][0, expected])
    assert model.last_visual_token_counts == [BUDGET]


def _reference_decode_logits(model, prompt_embeds: torch.Tensor, kept: torch.Tensor, new_ids: list[int]) -> torch.Tensor:
    """Cache-free reference of FastV decoding with a shortened cache, written from the semantics:
    layers < K: prompt tokens see the whole prompt (causal), decoded tokens see only the kept prompt tokens
    and earlier decoded tokens; layers >= K run on kept prompt + decoded tokens. Original positions.
    Eager attention with explicit additive 4D masks. Returns the last-position logits (V,)."""
    llm = model.get_model()
    embeds = torch.cat([prompt_embeds, llm.embed_tokens(torch.tensor([new_ids]))], dim=1) if new_ids else prompt_embeds
    length, total = prompt_embeds.shape[1], embeds.shape[1]
    positions = torch.arange(total)[None]
    allowed = torch.ones(total, total).tril().bool()
    dropped = torch.ones(length, dtype=torch.bool)
    dropped[kept] = False
    allowed[length:, :length] &= ~dropped  # decoded tokens do not see dropped prompt tokens
    neg = torch.finfo(embeds.dtype).min
    mask = torch.zeros(total, total).masked_fill(~allowed, neg)[None, None]
    assert model.config._attn_implementation == "eager"
    h = embeds
    rope = llm.rotary_emb(h, positions)
    for layer in llm.layers[:K]:
        h = layer(h, attention_mask=mask, position_embeddings=rope, position_ids=positions)
    keep = torch.cat([kept, torch.arange(length, total)])
    h, pos = h[:, keep], positions[:, keep]
    n = keep.shape[0]
    mask2 = torch.zeros(n, n).masked_fill(~torch.ones(n, n).tril().bool(), neg)[None, None]
    rope = llm.rotary_emb(h, pos)
    for layer in llm.layers[K:]:
        h = layer(h, attention_mask=mask2, position_embeddings=rope, position_ids=pos)
    return model.lm_head(llm.norm(h))[0, -1]


def test_decoding_uses_the_shortened_cache(deep):
    tokenizer, model, processor = deep
    ids, pixels = single_inputs(tokenizer, processor, model, question="Describe it.", size=(50, 70), seed=3)
    reference_row = eager_reference_attention(model, ids, pixels, layer=K - 1)
    start = int((ids[0] == -200).nonzero()[0, 0])
    n_image = model.get_vision_tower().num_patches
    picks = (reference_row[start:start + n_image].topk(BUDGET).indices + start).sort().values
    length = reference_row.shape[0]
    kept = torch.cat([torch.arange(start), picks, torch.arange(start + n_image, length)])

    model.set_pruning(PruningConfig(method="fastv", visual_token_num=BUDGET, params={"layer": K}))
    try:
        with torch.no_grad():
            out = model(ids, images=pixels, use_cache=True)
            cache = output_cache(out)
            # (d) every layer's cache holds the shortened prompt
            assert cache.get_seq_length() == kept.shape[0]
            assert all(layer.keys.shape[2] == kept.shape[0] for layer in cache.layers)
            steps = 4
            gen = model.generate(ids, images=pixels, do_sample=False, max_new_tokens=steps, min_new_tokens=steps,
                                 output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        _, _, _, _, prompt_embeds, _ = model.prepare_inputs_labels_for_multimodal(ids, None, None, None, None, pixels)
    finally:
        model.set_pruning(None)
    new = gen.sequences[0].tolist()
    with torch.no_grad():
        for t in range(steps):
            ref = _reference_decode_logits(model, prompt_embeds, kept, new[:t])
            torch.testing.assert_close(gen.logits[t][0], ref, atol=1e-4, rtol=1e-4)
            ref[tokenizer.eos_token_id] = float("-inf")  # min_new_tokens keeps generate from ending
            assert int(ref.argmax()) == new[t]


@pytest.mark.parametrize("arch", ["llava-1.5", "llava-next"])
def test_generate_batch_left_padding_matches_single(arch, tiny_llava15_path, tiny_llava_next_path):
    path = tiny_llava15_path if arch == "llava-1.5" else tiny_llava_next_path
    tokenizer, model, processor, _ = load_pretrained_model(path, torch_dtype=torch.float32)
    budget = 3
    model.set_pruning(PruningConfig(method="fastv", visual_token_num=budget, params={"layer": 1}))
    questions = ["What is it?", "Describe the picture in many words, with the colours and the shapes?"]
    images = [random_image(60, 50, seed=1), random_image(40, 90, seed=2)]
    seqs = [prompt_ids(tokenizer, q) for q in questions]
    ids, mask = left_pad(seqs)
    pixels = process_images(images, processor, model.config)
    kwargs = dict(do_sample=False, max_new_tokens=4, min_new_tokens=4, output_logits=True,
                  return_dict_in_generate=True, pad_token_id=0)
    batch = model.generate(ids, attention_mask=mask, images=pixels, image_sizes=[im.size for im in images], **kwargs)
    counts = model.last_visual_token_counts
    rows = model.last_visual_rows
    # expected kept per sample: min(tokens, budget) per image row (crop) + NeXT newlines (always kept)
    expected = []
    for b in range(2):
        r = rows[b]
        per_crop = torch.bincount(r[r >= 0])
        expected.append(int(per_crop[per_crop > 0].clamp(max=budget).sum()) + int((r == -2).sum()))
    assert counts == expected
    if arch == "llava-1.5":
        assert counts == [budget, budget]
    for b in range(2):
        one = pixels[b:b + 1] if isinstance(pixels, torch.Tensor) else [pixels[b]]
        single = model.generate(seqs[b][None], images=one, image_sizes=[images[b].size], **kwargs)
        assert model.last_visual_token_counts == [counts[b]]
        assert batch.sequences[b].tolist() == single.sequences[0].tolist()
        for t in range(4):
            torch.testing.assert_close(batch.logits[t][b], single.logits[t][0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llava-1.5", "llava-next"])
def test_budget_at_least_row_length_is_exactly_unpruned(arch, tiny_llava15_path, tiny_llava_next_path):
    path = tiny_llava15_path if arch == "llava-1.5" else tiny_llava_next_path
    tokenizer, model, processor, _ = load_pretrained_model(path, torch_dtype=torch.float32)
    image = random_image(70, 40, seed=5)
    ids = prompt_ids(tokenizer, "What is it?")[None]
    pixels = process_images([image], processor, model.config)
    with torch.no_grad():
        unpruned = model(ids, images=pixels, image_sizes=[image.size]).logits
        n = model.get_vision_tower().num_patches
        model.set_pruning(PruningConfig(method="fastv", visual_token_num=n, params={"layer": 1}))
        pruned = model(ids, images=pixels, image_sizes=[image.size]).logits
    assert torch.equal(pruned, unpruned)


def test_layer_out_of_range_and_labels_are_refused(deep):
    tokenizer, model, processor = deep
    for layer in (0, 4, 2.0):
        with pytest.raises(ValueError, match="layer"):
            model.set_pruning(PruningConfig(method="fastv", visual_token_num=BUDGET, params={"layer": layer}))
    ids, pixels = single_inputs(tokenizer, processor, model)
    model.set_pruning(PruningConfig(method="fastv", visual_token_num=BUDGET, params={"layer": K}))
    try:
        with pytest.raises(ValueError, match="labels"):
            model(ids, images=pixels, labels=ids.clamp(min=0))
    finally:
        model.set_pruning(None)


def test_mistral_llm_runs_fastv_like_llama_on_the_same_weights(tiny_llava15_path, tmp_path):
    """LLaVA-1.6-mistral's class goes through the same FastV path: with Llama's weights and no sliding window
    it must generate what the Llama class generates."""
    import json
    import shutil

    path = tmp_path / "mistral"
    shutil.copytree(tiny_llava15_path, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(architectures=["LlavaMistralForCausalLM"], sliding_window=None)
    (path / "config.json").write_text(json.dumps(cfg))
    setting = PruningConfig(method="fastv", visual_token_num=3, params={"layer": 1})
    tokenizer, llama, processor, _ = load_pretrained_model(tiny_llava15_path, torch_dtype=torch.float32, pruning=setting)
    _, mistral, _, _ = load_pretrained_model(str(path), torch_dtype=torch.float32, pruning=setting)
    assert type(mistral).__name__ == "LlavaMistralForCausalLM"
    ids = prompt_ids(tokenizer, "What is it?")[None]
    pixels = process_images([random_image(50, 60, seed=4)], processor, llama.config)
    kwargs = dict(do_sample=False, max_new_tokens=3, min_new_tokens=3, output_logits=True,
                  return_dict_in_generate=True, pad_token_id=0)
    a, b = llama.generate(ids, images=pixels, **kwargs), mistral.generate(ids, images=pixels, **kwargs)
    assert a.sequences.tolist() == b.sequences.tolist()
    assert llama.last_visual_token_counts == mistral.last_visual_token_counts == [3]
    for x, y in zip(a.logits, b.logits):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)


def test_beam_search_keeps_the_budget_for_every_beam(tiny_llava15_path, monkeypatch):
    """generate() repeats each prompt for its beams: every copy is pruned like the prompt itself."""
    tokenizer, model, processor, _ = load_pretrained_model(
        tiny_llava15_path, torch_dtype=torch.float32,
        pruning=PruningConfig(method="fastv", visual_token_num=3, params={"layer": 1}))
    keeps = []
    original = fastv_module.fastv_keep_mask
    monkeypatch.setattr(fastv_module, "fastv_keep_mask", lambda *a: keeps.append(original(*a)) or keeps[-1])
    ids = prompt_ids(tokenizer, "What is it?")[None]
    pixels = process_images([random_image(50, 60, seed=6)], processor, model.config)
    model.generate(ids, images=pixels, num_beams=3, num_return_sequences=2, max_new_tokens=3, pad_token_id=0)
    assert len(keeps) == 1 and keeps[0].shape[0] == 3
    n_image = model.get_vision_tower().num_patches
    assert keeps[0].sum(dim=1).tolist() == [ids.shape[1] - 1 + 3] * 3  # text (without <image>) + budget
    assert bool((keeps[0] == keeps[0][:1]).all())
    assert model.last_visual_token_counts == [3] and n_image > 3

"""Host syncs of the pruning layer (issue #19): a pruned prefill waits for the device once more than the
stock model's own forward on the same (short) prompt, and a decoding step not at all more than stock.

Counted with ``script_prune.counting`` (every aten op that makes the host wait on an accelerator, counted
on the CPU). The reference is the unpatched transformers model run on the hand-shortened prompt the
patched model feeds its LLM (in-LLM methods: on the whole prompt, which their LLM receives), so the stock
code's own syncs (mask construction, ...) cancel out.
"""

from __future__ import annotations

import pytest
import torch

import script_prune as sp
from script_prune import fused
from script_prune.counting import count_ops
from tests import test_patch_qwen2_5_vl as qwen
from tests.test_patch import IMAGE, build_llava, build_next, cache_length, prompts, stock_image_tokens

METHODS = [("divprune", {}, "torch"), ("script", {}, "triton"), ("uniform", {}, "torch")]


def cache_of(output):
    return output.cache if "cache" in type(output).__dataclass_fields__ else output.past_key_values


def cache_kw(output) -> str:
    return "cache" if "cache" in type(output).__dataclass_fields__ else "past_key_values"


def short_prompt(model, ids, mask, pixels, kept):
    """The prompt the patched LLaVA-1.5 model's LLM receives, built by hand: each placeholder run replaced by
    its row's kept tokens (ascending), left padded, contiguous positions. -> embeds, mask, positions."""
    tokens = stock_image_tokens(model, pixels)
    embed = model.get_input_embeddings()
    seqs = []
    for b in range(ids.shape[0]):
        row = ids[b][mask[b].bool()]
        image = row == IMAGE
        first = int(image.nonzero()[0])
        seqs.append(torch.cat([embed(row[:first]), tokens[b][kept[b]], embed(row[first + int(image.sum()):])]))
    length = max(s.shape[0] for s in seqs)
    embeds = torch.zeros(len(seqs), length, seqs[0].shape[1])
    short = torch.zeros(len(seqs), length, dtype=torch.long)
    for b, s in enumerate(seqs):
        embeds[b, length - s.shape[0]:] = s
        short[b, length - s.shape[0]:] = 1
    return embeds, short, (short.cumsum(1) - 1).clamp(min=0)


@pytest.mark.parametrize("method,params,backend", METHODS)
@torch.no_grad()
def test_pruned_prefill_adds_one_host_sync_and_decoding_none(method, params, backend):
    model = build_llava()
    ids, mask = prompts([16, 16])
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    sp.patch.apply(model, method=method, budget=5, relevance="llm_text", **params)
    with fused.greedy_backend(backend):  # script: the fused walk (Triton's interpreter here), which never waits
        with count_ops() as patched:
            out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, use_cache=True)
    kept = sp.patch.kept(model)
    assert [k.shape[0] for k in kept] == [5, 5]
    step = out.logits[:, -1].argmax(-1, keepdim=True)
    long_mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
    with count_ops() as patched_step:
        model(input_ids=step, attention_mask=long_mask, use_cache=True, **{cache_kw(out): cache_of(out)})
    sp.patch.remove(model)

    embeds, short, positions = short_prompt(model, ids, mask, pixels, kept)
    with count_ops() as stock:
        ref = model(inputs_embeds=embeds, attention_mask=short, position_ids=positions, use_cache=True)
    torch.testing.assert_close(out.logits[:, -1], ref.logits[:, -1], rtol=1e-4, atol=1e-4)  # the same prompt
    short_step = torch.cat([short, torch.ones(2, 1, dtype=short.dtype)], dim=1)
    with count_ops() as stock_step:
        model(input_ids=step, attention_mask=short_step, position_ids=positions[:, -1:] + 1, use_cache=True,
              **{cache_kw(ref): cache_of(ref)})

    assert patched.syncs - stock.syncs <= 1, (dict(patched.sync_ops), dict(stock.sync_ops))
    assert patched_step.syncs <= stock_step.syncs, (dict(patched_step.sync_ops), dict(stock_step.sync_ops))


@torch.no_grad()
def test_next_prefill_syncs_at_most_one_more_than_the_stock_pixel_forward():
    # NeXT reads image sizes on the host (as the stock forward does, several times): the pruned prefill of a
    # vision-side method waits for the device at most once more than the stock forward with pixels
    model = build_next()
    sizes = torch.tensor([[32, 64], [64, 64]])
    pixels = torch.randn(2, 5, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    counts = [t.shape[0] for t in stock_image_tokens(model, pixels, sizes)]
    ids, mask = prompts(counts)
    with count_ops() as stock:
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes, use_cache=True)
    sp.patch.apply(model, method="divprune", budget=6, relevance="llm_text")
    with count_ops() as patched:
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes, use_cache=True)
    assert sum(sp.patch.visual_tokens(model)) < sum(counts)
    assert patched.syncs <= stock.syncs + 1, (dict(patched.sync_ops), dict(stock.sync_ops))


IN_LLM = [("fastv", 0.25, {"layer": 2}), ("pdrop", 8, {"layers": (1, 2, 3)}), ("sparsevlm", 8, {"layers": (0, 1, 2)}),
          ("sparsevlm", 8, {"layers": (0, 1, 2), "recycle": False})]


@pytest.mark.parametrize("method,budget,params", IN_LLM)
@torch.no_grad()
def test_in_llm_prefill_adds_one_host_sync_and_decoding_none(method, budget, params):
    # FastV / PDrop / SparseVLM prune at one or three stages inside the LLM: the prefill waits for the device at
    # most once more than the stock model fed the same whole prompt (its input embeddings), a decoding step no
    # more than the stock step on that prompt's cache
    model = build_llava(layers=5, seed=2)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    tokens = stock_image_tokens(model, pixels)
    ids, mask = prompts([t.shape[0] for t in tokens])
    embeds = model.get_input_embeddings()(ids).masked_scatter((ids == IMAGE)[..., None], torch.cat(tokens))
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    long_mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
    with count_ops() as stock:
        ref = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True)
    step = ref.logits[:, -1].argmax(-1, keepdim=True)
    with count_ops() as stock_step:
        model(input_ids=step, attention_mask=long_mask, position_ids=positions[:, -1:] + 1, use_cache=True,
              **{cache_kw(ref): cache_of(ref)})

    sp.patch.apply(model, method=method, budget=budget, **params)
    with count_ops() as patched:
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, use_cache=True)
    with count_ops() as patched_step:
        model(input_ids=step, attention_mask=long_mask, use_cache=True, **{cache_kw(out): cache_of(out)})
    visual = sp.patch.visual_tokens(model)
    sp.patch.remove(model)
    assert sum(visual) < sum(t.shape[0] for t in tokens)  # pruned inside the LLM: a shorter cache
    assert cache_length(out) < ids.shape[1] + 1
    assert patched.syncs - stock.syncs <= 1, (dict(patched.sync_ops), dict(stock.sync_ops))
    assert patched_step.syncs <= stock_step.syncs, (dict(patched_step.sync_ops), dict(stock_step.sync_ops))


@pytest.mark.skipif(qwen.pytestmark.args[0], reason=qwen.pytestmark.kwargs["reason"])
@pytest.mark.parametrize("method,budget,params", IN_LLM[:3])
@torch.no_grad()
def test_qwen2_5_vl_in_llm_stages_add_no_host_sync(method, budget, params):
    # Qwen2.5-VL's family reads its grids on the host (encode, M-RoPE positions) more often than the stock forward,
    # for every method alike: the in-LLM prefill (stages on rows of unequal length) waits no more often than the
    # vision-side prefill of the same batch, i.e. its stages add none
    model = qwen.build(seed=2, layers=5)
    inputs = qwen.batch()
    counts = []
    for name, k, extra in [("uniform", budget, {}), (method, budget, params)]:
        sp.patch.apply(model, method=name, budget=k, **extra)
        with count_ops() as seen:
            model(**inputs, use_cache=True)
        counts.append(seen)
        sp.patch.remove(model)
    vision_side, in_llm = counts
    assert in_llm.syncs <= vision_side.syncs, (dict(in_llm.sync_ops), dict(vision_side.sync_ops))


@torch.no_grad()
def test_next_prefill_reads_image_sizes_once(monkeypatch):
    # the family needs the sizes on the host for its row lengths and again to encode: one read per prefill (each
    # prefill reads afresh), for a vision-side and an in-LLM method
    model = build_next()
    sizes = torch.tensor([[32, 64], [64, 64]])
    pixels = torch.randn(2, 5, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    ids, mask = prompts([t.shape[0] for t in stock_image_tokens(model, pixels, sizes)])
    reads = []
    tolist = torch.Tensor.tolist

    def counted(self, *args, **kwargs):
        reads.append(self is sizes)
        return tolist(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "tolist", counted)
    for method, params in [("divprune", {"relevance": "llm_text"}), ("pdrop", {"layers": (1, 2)})]:
        sp.patch.apply(model, method=method, budget=6, **params)
        for _ in range(2):
            reads.clear()
            model(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes, use_cache=True)
            assert sum(reads) == 1, method
        sp.patch.remove(model)


@pytest.mark.skipif(qwen.pytestmark.args[0], reason=qwen.pytestmark.kwargs["reason"])
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("method", ["uniform", "divprune"])
@torch.no_grad()
def test_qwen_vision_side_prefill_waits_at_most_once_more_than_stock(family, method):
    # the stock forward with pixels reads its grids on the host several times (encoder, rope index, placeholder
    # checks); the pruned prefill reads the grids and placeholder kinds once (before selection: the row lengths
    # set the budgets), then the one resolve, plus the stock encoder's and rope index's own reads. Qwen2.5-VL
    # skips the stock placeholder checks (its short prompt goes in as embeddings): at most one wait more than
    # the stock forward. Qwen3-VL's short prompt goes in as ids with the kept features (DeepStack), so the stock
    # checks run there too and the grid read and the resolve are two more.
    from tests import test_patch_qwen3_vl as qwen3

    module = qwen if family == "qwen2_5_vl" else qwen3
    model, inputs = module.build(seed=2), module.batch()
    with count_ops() as stock:
        model(**inputs, use_cache=True)
    sp.patch.apply(model, method=method, budget=0.5)
    with count_ops() as patched:
        model(**inputs, use_cache=True)
    visual = sp.patch.visual_tokens(model)
    sp.patch.remove(model)
    assert sum(visual) < int(sp.patch.family_of(model).placeholder_mask(model, inputs["input_ids"]).sum())
    extra = 1 if family == "qwen2_5_vl" else 2
    assert patched.syncs <= stock.syncs + extra, (dict(patched.sync_ops), dict(stock.sync_ops))

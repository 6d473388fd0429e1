"""SparseVLM and PDrop (and FastV as their one-stage case) inside the LLM, through script_prune.patch.

References: schedules and recycling counts by hand from the releases' numbers; density-peak clustering and
the raters in float64 loops; the model-level runs against tests/inllm_reference.py (float64 copy of the
stock model, explicit sequences and masks, no cache), which decodes greedily the way a cache shortened after
every stage must.
"""

import copy

import pytest
import torch

import script_prune as sp
from script_prune import inllm
from script_prune.patch import Qwen2_5_VLFamily
from tests import test_patch_qwen2_5_vl as qwen
from tests import test_patch_qwen3_vl as qwen3
from tests.inllm_reference import Sequence, dpc_reference, raters_reference, reference_generate
from tests.test_patch import (IMAGE, build_llava, build_next, next_crops, projected_rows, prompts, stock_image_tokens,
                               stock_layout_ids)

STEPS = 4


# ------------------------------------------------------------------------------------------ pure pieces
def test_schedules_and_accounting_by_hand():
    sparse = {"layers": (2, 6, 15), "recycle": True}
    assert inllm.stage_plan("sparsevlm", 192, 576, 32, sparse) == [(3, 300), (7, 200), (16, 110)]
    assert inllm.stage_plan("sparsevlm", 128, 576, 32, sparse) == [(3, 303), (7, 110), (16, 36)]
    assert inllm.stage_plan("sparsevlm", 64, 576, 32, sparse) == [(3, 66), (7, 30), (16, 17)]
    # 32 on 576: the 64 schedule halved (floor); 72 of 288 is 144 of 576: the 192 schedule * 72 / 192
    assert inllm.stage_plan("sparsevlm", 32, 576, 32, sparse) == [(3, 33), (7, 15), (16, 8)]
    assert inllm.stage_plan("sparsevlm", 72, 288, 32, sparse) == [(3, 112), (7, 75), (16, 41)]
    # recycling: 276 dropped -> 83 clustered into 9; then 309 -> 200 drops 109 -> 33 into 4; 204 -> 110 drops 94 -> 29 into 3
    assert [inllm.recycle_count(d) for d in (276, 109, 94, 5, 0)] == [(83, 9), (33, 4), (29, 3), (2, 1), (0, 0)]
    assert inllm.stage_counts("sparsevlm", 192, 576, 32, sparse) == [(3, 300, 83, 9), (7, 200, 33, 4), (16, 110, 29, 3)]
    # layers 0-2 see 576, 3-6 300 + 9, 7-15 200 + 4, 16-31 110 + 3 (without recycling: no merged tokens)
    assert inllm.average_visual_tokens("sparsevlm", 192, 576, 32, sparse) == (3 * 576 + 4 * 309 + 9 * 204 + 16 * 113) / 32
    plain = {**sparse, "recycle": False}
    assert inllm.average_visual_tokens("sparsevlm", 192, 576, 32, plain) == (3 * 576 + 4 * 300 + 9 * 200 + 16 * 110) / 32
    pdrop = {"layers": None, "ratio": 0.5}
    # average 270 = (8 * 576 + 8 c + 8 c / 2 + 8 c / 4) / 32 -> c = 288: PDrop's 50 / 25 / 12.5 %
    assert inllm.stage_plan("pdrop", 270, 576, 32, pdrop) == [(8, 288), (16, 144), (24, 72)]
    assert inllm.average_visual_tokens("pdrop", 270, 576, 32, pdrop) == 270
    # average 200 with drops after 2 / 6 / 12: (2 * 576 + 4 c + 6 c / 2 + 20 c / 4) / 32 = 200 -> c = 5248 / 12 = 437.3
    assert inllm.stage_plan("pdrop", 200, 576, 32, {"layers": (2, 6, 12), "ratio": 0.5}) == [(2, 437), (6, 219), (12, 109)]
    with pytest.raises(ValueError, match="budget 64 .*out of reach for pdrop.*after layer 8.*average 144"):
        inllm.stage_plan("pdrop", 64, 576, 32, pdrop)
    assert inllm.stage_plan("fastv", 64, 576, 32, {"layer": 2}) == [(2, 64)]


def test_flops_follow_the_schedule_layer_by_layer():
    from llava.eval import flops as F

    def macs(n):  # 4nd^2 + 2n^2d + 3ndm of LLaMA-7B
        return 4 * n * 4096**2 + 2 * n * n * 4096 + 3 * n * 4096 * 11008

    shape = F.get_shape("llava-v1.5-7b")
    by_hand = (3 * macs(576) + 4 * macs(309) + 9 * macs(204) + 16 * macs(113)) / 1e12
    assert F.method_tflops(shape, "sparsevlm", 192) == pytest.approx(by_hand, rel=1e-12)
    by_hand = (8 * macs(576) + 8 * macs(288) + 8 * macs(144) + 8 * macs(72)) / 1e12
    assert F.method_tflops(shape, "pdrop", 270) == pytest.approx(by_hand, rel=1e-12)
    next_shape = F.get_shape("llava-v1.6-vicuna-7b")  # 5 crops of 576, 64 per crop: drops after 2 / 6 / 12
    counts = [75, 37, 19]  # (64 * 32 - 2 * 576) / (4 + 6 / 2 + 20 / 4) = 74.7
    by_hand = (2 * macs(2880) + 4 * macs(5 * counts[0]) + 6 * macs(5 * counts[1]) + 20 * macs(5 * counts[2])) / 1e12
    assert F.method_tflops(next_shape, "pdrop", 64, params={"layers": (2, 6, 12)}) == pytest.approx(by_hand, rel=1e-12)


def test_dpc_merge_equals_float64_loops():
    torch.manual_seed(0)
    centres = torch.randn(3, 5) * 4
    x = torch.cat([centres[i] + 0.3 * torch.randn(4, 5) for i in range(3)])[torch.randperm(12)]  # (12, 5)
    other = torch.randn(7, 5)
    batch = torch.zeros(2, 12, 5)
    batch[0], batch[1, :7] = x, other
    valid = torch.zeros(2, 12, dtype=torch.bool)
    valid[0], valid[1, :7] = True, True
    merged, ok, centre = inllm.dpc_merge(batch, valid, torch.tensor([3, 2]))
    for row, (points, c) in enumerate(((x, 3), (other, 2))):
        ref_merged, ref_centres = dpc_reference(points, c)
        assert centre[row, :c].tolist() == ref_centres
        assert ok[row].tolist() == [True] * c + [False] * (3 - c)
        torch.testing.assert_close(merged[row, :c].double(), ref_merged, atol=1e-5, rtol=0)


def test_raters_equal_float64_loops():
    torch.manual_seed(1)
    visual, text = torch.randn(2, 6, 8), torch.randn(2, 5, 8)
    visual_ok = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    text_ok = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    got = inllm.sparsevlm_raters(visual, text, visual_ok, text_ok)
    for b in range(2):
        v, t = int(visual_ok[b].sum()), int(text_ok[b].sum())
        embeds = torch.cat([visual[b, :v], text[b, :t]])
        assert got[b, :t].tolist() == raters_reference(embeds, list(range(v)), list(range(v, v + t)))
        assert not got[b, t:].any()


def test_params_are_checked_by_name():
    for method, bad, match in [("sparsevlm", {"layers": (2, 6)}, "3 layers"), ("sparsevlm", {"layers": (6, 2, 9)},
                               "strictly increasing"), ("sparsevlm", {"recycle": 1}, "bool"),
                               ("pdrop", {"ratio": 1.5}, "lambda.*\\(0, 1\\)"), ("pdrop", {"layers": (3, 3)}, "strictly increasing")]:
        with pytest.raises(ValueError, match=match):
            sp.check_params(method, bad)
    model = build_llava(layers=4)
    with pytest.raises(ValueError, match="'layers' of in-LLM method 'sparsevlm' must be strictly increasing in \\[0, 3\\]"):
        sp.patch.apply(model, method="sparsevlm", budget=4)  # the 32-layer defaults on a 4-layer LLM
    with pytest.raises(ValueError, match="'layers' of in-LLM method 'pdrop' .*\\[0, 3\\].*got \\(1, 4\\)"):
        sp.patch.apply(model, method="pdrop", budget=4, layers=(1, 4))
    with pytest.raises(ValueError, match="got \\(1, 2, 2\\) \\(the defaults scaled to this depth"):
        sp.patch.apply(build_llava(layers=3), method="pdrop", budget=4)  # 8 / 16 / 24 of 32 on 3 layers
    assert not sp.patch.is_patched(model)


# ------------------------------------------------------------------------------------------ LLaVA
def llava_case(seed: int = 2, layers: int = 5):
    model = build_llava(layers=layers, seed=seed)
    pixels = torch.randn(2, 3, 32, 32)
    packed = stock_image_tokens(model, pixels)
    ids, mask = prompts([p.shape[0] for p in packed])
    return model, dict(input_ids=ids, attention_mask=mask, pixel_values=pixels)


def llava_sequences(model64, inputs) -> list[tuple[Sequence, torch.Tensor]]:
    """Each sample's whole prompt for the reference (float64), with its first decoding position."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    packed = stock_image_tokens(model64, inputs["pixel_values"].double())
    out = []
    for b in range(ids.shape[0]):
        sample = ids[b][mask[b].bool()]
        embeds = model64.get_input_embeddings()(sample).clone()
        visual = (sample == IMAGE).nonzero().flatten().tolist()
        embeds[visual] = packed[b]
        row = [b if i in visual else -1 for i in range(len(sample))]
        index = [visual.index(i) if i in visual else -1 for i in range(len(sample))]
        text = [i for i in range(max(visual) + 1, len(sample))]
        flags = dict(zip(text, raters_reference(embeds, visual, text)))
        rater = [flags.get(i, False) for i in range(len(sample))]
        positions = torch.arange(len(sample))
        out.append((Sequence(embeds, positions, row, index, rater, list(range(len(sample)))),
                    torch.tensor([len(sample)])))
    return out


def patched_run(model, inputs, method, budget, params):
    sp.patch.apply(model, method=method, budget=budget, **params)
    try:
        logits = model(**inputs).logits[:, -1]
        kept = [k.tolist() for k in sp.patch.kept(model)]
        visual = sp.patch.visual_tokens(model)
        generated = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    finally:
        sp.patch.remove(model)
    return logits, kept, visual, generated


def check_against_reference(model, inputs, sequences, row_of_sample, method, budget, params, row_length=None,
                            layout_tokens=(0, 0)):
    """``layout_tokens``: per sample, placeholder slots that are no row's tokens (NeXT newlines; they stay and count
    as visual tokens of the sample, the reference counts row entries)."""
    logits, kept, visual, generated = patched_run(model, inputs, method, budget, params)
    model64 = copy.deepcopy(model).double()
    for b, (seq, next_position) in enumerate(sequences):
        tokens, ref_kept, ref_visual, ref_logits = reference_generate(model64, method, params, budget, seq, STEPS,
                                                                      next_position, row_length)
        for r in row_of_sample[b]:
            assert kept[r] == ref_kept[r], (b, r)
        assert visual[b] == ref_visual + layout_tokens[b]
        torch.testing.assert_close(logits[b].double(), ref_logits, atol=2e-4, rtol=0)
        assert generated[b].tolist() == tokens


CASES = [("pdrop", 8, {"layers": (1, 2, 3)}), ("pdrop", 0.5, {"layers": (2, 3, 4), "ratio": 0.4}),
         ("sparsevlm", 8, {"layers": (0, 1, 2), "recycle": False}), ("sparsevlm", 8, {"layers": (0, 1, 2)}),
         ("sparsevlm", 0.25, {"layers": (1, 2, 3)}), ("fastv", 0.25, {"layer": 2}),
         ("pdrop", 4, {"layers": (0, 2, 4)}), ("sparsevlm", 6, {"layers": (1, 3, 4)})]  # first / last layer


@pytest.mark.parametrize("method,budget,params", CASES)
@torch.no_grad()
def test_llava_picks_logits_and_decoding_equal_the_float64_reference(method, budget, params):
    model, inputs = llava_case()
    sequences = llava_sequences(copy.deepcopy(model).double(), inputs)
    check_against_reference(model, inputs, sequences, [[0], [1]], method, budget, params)


@pytest.mark.parametrize("method,params", [("pdrop", {"layers": (1, 2, 3)}), ("sparsevlm", {"layers": (0, 1, 2)})])
@torch.no_grad()
def test_eager_and_sdpa_pick_alike_and_a_batch_of_two_equals_single_runs(method, params):
    model, inputs = llava_case(seed=3)
    _, kept, visual, generated = patched_run(model, inputs, method, 6, params)
    model.set_attn_implementation("eager")
    _, kept_eager, visual_eager, generated_eager = patched_run(model, inputs, method, 6, params)
    model.set_attn_implementation("sdpa")
    assert kept_eager == kept and visual_eager == visual and torch.equal(generated_eager, generated)
    for b in range(2):
        real = inputs["attention_mask"][b].bool()
        single = dict(input_ids=inputs["input_ids"][b:b + 1, real], attention_mask=inputs["attention_mask"][b:b + 1, real],
                      pixel_values=inputs["pixel_values"][b:b + 1])
        _, kept_one, visual_one, generated_one = patched_run(model, single, method, 6, params)
        assert kept_one == [kept[b]] and visual_one == [visual[b]]
        assert torch.equal(generated_one[0], generated[b])


# ------------------------------------------------------------------------------------------ LLaVA-NeXT (cut rows)
def next_sequences(model64, inputs) -> list[tuple[Sequence, torch.Tensor]]:
    """As llava_sequences for a LLaVA-NeXT batch: every visual token's (row, index) matched to the stock tower's
    crops, newlines as layout tokens (row -1)."""
    ids, mask, sizes = inputs["input_ids"], inputs["attention_mask"], inputs["image_sizes"]
    pixels = inputs["pixel_values"].double()
    packed = stock_image_tokens(model64, pixels, sizes)
    out, first_row = [], 0
    for b, crops in enumerate(next_crops(model64, pixels, sizes)):
        rows = projected_rows(model64, crops)  # (R_b, N, D)
        sample = ids[b][mask[b].bool()]
        embeds = model64.get_input_embeddings()(sample).clone()
        visual = (sample == IMAGE).nonzero().flatten().tolist()
        embeds[visual] = packed[b]
        ident = dict(zip(visual, stock_layout_ids(model64, packed[b], rows)))  # None: a newline
        row = [first_row + ident[i][0] if ident.get(i) else -1 for i in range(len(sample))]
        index = [ident[i][1] if ident.get(i) else -1 for i in range(len(sample))]
        text = list(range(max(visual) + 1, len(sample)))
        flags = dict(zip(text, raters_reference(embeds, visual, text)))
        rater = [flags.get(i, False) for i in range(len(sample))]
        out.append((Sequence(embeds, torch.arange(len(sample)), row, index, rater, list(range(len(sample)))),
                    torch.tensor([len(sample)])))
        first_row += rows.shape[0]
    return out


@pytest.mark.parametrize("method,budget,params", [("sparsevlm", 12, {"layers": (0, 1, 2)}),
                                                  ("pdrop", 0.75, {"layers": (1, 2, 3)}), ("fastv", 6, {"layer": 2})])
@torch.no_grad()
def test_llava_next_rows_cut_by_unpadding_equal_the_float64_reference(method, budget, params):
    """Wide / tall images whose unpadding leaves 8 of a tile row's 16 tokens in the prompt: the plan is that of
    16-token rows, a cut row keeps at most what it holds and recycles only the tokens it really drops."""
    model = build_next(layers=5, seed=2)
    model.generation_config.eos_token_id = None  # the reference decodes on past an end token
    torch.manual_seed(7)
    pixels, sizes = torch.randn(2, 5, 3, 32, 32), torch.tensor([[12, 64], [64, 24]])
    ids, mask = prompts([p.shape[0] for p in stock_image_tokens(model, pixels, sizes)])
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes)
    sequences = next_sequences(copy.deepcopy(model).double(), inputs)
    assert [[s.row.count(r) for r in range(6) if r in s.row] for s, _ in sequences] == [[16, 8, 8], [16, 16, 16]]
    newlines = [int((ids[b][mask[b].bool()] == IMAGE).sum()) - sum(r >= 0 for r in s.row) for b, (s, _) in enumerate(sequences)]
    check_against_reference(model, inputs, sequences, [[0, 1, 2], [3, 4, 5]], method, budget, params, row_length=16,
                            layout_tokens=newlines)


# ------------------------------------------------------------------------------------------ Qwen2.5-VL (M-RoPE)
def mrope_sequences(module, model64, inputs) -> list[tuple[Sequence, torch.Tensor]]:
    """As llava_sequences for the Qwen-VL batches: 3-D positions from the stock get_rope_index; Qwen3-VL's
    stock DeepStack levels of every visual token as the sequence's additions."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    double = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    rows = module.stock_rows(model64, double)
    stacked = isinstance(rows[0], tuple)  # Qwen3-VL: (tokens, [DeepStack levels])
    levels = [torch.stack(r[1]) for r in rows] if stacked else None  # (levels, n, D) per row
    rows = [r[0] for r in rows] if stacked else rows
    positions, _ = model64.model.get_rope_index(ids, mm_token_type_ids=inputs["mm_token_type_ids"],
                                                image_grid_thw=inputs["image_grid_thw"],
                                                video_grid_thw=inputs["video_grid_thw"], attention_mask=mask)
    placeholder = (ids == module.IMAGE) | (ids == module.VIDEO)
    full = model64.get_input_embeddings()(ids).masked_scatter(placeholder[..., None], torch.cat(rows))
    if stacked:
        dense = torch.zeros(levels[0].shape[0], *full.shape, dtype=full.dtype)
        additions = dense.masked_scatter(placeholder[None, ..., None], torch.cat(levels, dim=1))
    row_id = torch.cat([torch.full((r.shape[0],), i) for i, r in enumerate(rows)])
    index_in = torch.cat([torch.arange(r.shape[0]) for r in rows])
    slots = placeholder.nonzero().tolist()
    where = {tuple(s): j for j, s in enumerate(slots)}
    out = []
    for b in range(ids.shape[0]):
        real = mask[b].nonzero().flatten().tolist()
        embeds = full[b, real]
        row = [int(row_id[where[(b, p)]]) if (b, p) in where else -1 for p in real]
        index = [int(index_in[where[(b, p)]]) if (b, p) in where else -1 for p in real]
        visual = [i for i, r in enumerate(row) if r >= 0]
        text = [i for i in range(max(visual) + 1, len(real))]
        flags = dict(zip(text, raters_reference(embeds, visual, text)))
        rater = [flags.get(i, False) for i in range(len(real))]
        pos = positions[:, b, real]
        seq = Sequence(embeds, pos, row, index, rater, list(range(len(real))),
                       additions=additions[:, b, real] if stacked else None)
        out.append((seq, pos.amax(dim=1, keepdim=True) + 1))
    return out


@pytest.mark.skipif(qwen.pytestmark.args[0], reason=qwen.pytestmark.kwargs["reason"])
@pytest.mark.parametrize("method,budget,params", [("pdrop", 0.6, {"layers": (1, 2, 3)}),
                                                  ("sparsevlm", 0.5, {"layers": (0, 1, 2)}),
                                                  ("fastv", 0.5, {"layer": 2})])
@torch.no_grad()
def test_qwen2_5_vl_rows_of_unequal_length_equal_the_float64_reference(method, budget, params):
    model = qwen.build(seed=2, layers=5)
    inputs = qwen.batch()
    sequences = mrope_sequences(qwen, copy.deepcopy(model).double(), inputs)
    check_against_reference(model, inputs, sequences, [[0, 1, 2], [3]], method, budget, params)


@pytest.mark.skipif(qwen3.pytestmark.args[0], reason=qwen3.pytestmark.kwargs["reason"])
@pytest.mark.parametrize("method,budget,params", [("fastv", 0.5, {"layer": 1}), ("pdrop", 0.6, {"layers": (1, 2, 3)}),
                                                  ("sparsevlm", 0.5, {"layers": (0, 1, 2)})])
@torch.no_grad()
def test_qwen3_vl_deepstack_follows_the_kept_tokens(method, budget, params):
    """The prune comes before DeepStack's last addition (after layer 1): the later levels must land on the kept
    tokens (a merged token: its centre's), as in the reference that adds them entry by entry."""
    model = qwen3.build(seed=2, layers=5)
    inputs = qwen3.batch()
    sequences = mrope_sequences(qwen3, copy.deepcopy(model).double(), inputs)
    check_against_reference(model, inputs, sequences, [[0, 1, 2], [3]], method, budget, params)


@torch.no_grad()
def test_llava_next_and_internvl_keep_the_hand_counted_schedule_and_decode():
    """Families with layout tokens (NeXT newlines) and tiles: PDrop's final count per row by hand, and the cache
    holds text + layout + the visual tokens left (every layer the same)."""
    from packaging.version import Version
    import transformers

    from tests.test_patch import build_next, cache_length
    from tests import test_patch_internvl as internvl

    model = build_next(layers=5, seed=2)  # 16 tokens per crop; budget 6, drops after 1 / 2 / 3 of 5 layers:
    pixels, sizes = torch.randn(2, 5, 3, 32, 32), torch.tensor([[20, 50], [40, 40]])  # (6 * 5 - 16) / 2 = 7 -> 7, 4, 2
    packed = stock_image_tokens(model, pixels, sizes)
    ids, mask = prompts([p.shape[0] for p in packed])
    cases = [(model, dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes), 6, (1, 2, 3), 2,
              None)]  # NeXT: the visual tokens also count the newlines kept
    if sp.patch.InternVLFamily.min_transformers is None or Version(transformers.__version__) >= Version(
            sp.patch.InternVLFamily.min_transformers):  # InternVL: on the releases its family supports
        cases.append((internvl.build(), internvl.batch(), 8, (1, 2), 3, [9, 6]))  # 16 per tile, 3 layers: (8*3-16)/1.5
    for model, inputs, budget, layers, final, expected_visual in cases:  # -> 5, 3; 3 tiles then 2
        sp.patch.apply(model, method="pdrop", budget=budget, layers=layers)
        out = model(**inputs, use_cache=True)
        kept, visual = sp.patch.kept(model), sp.patch.visual_tokens(model)
        placeholder = sp.patch.family_of(model).placeholder_mask(model, inputs["input_ids"]) & inputs["attention_mask"].bool()
        text = (inputs["attention_mask"].bool() & ~placeholder).sum(dim=1).tolist()
        assert all(len(k) == final for k in kept)
        assert expected_visual is None or visual == expected_visual
        assert cache_length(out) == max(t + v for t, v in zip(text, visual))
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert generated.shape == (2, inputs["input_ids"].shape[1] + 3)
        sp.patch.remove(model)

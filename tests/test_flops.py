"""FLOPs formulas: the paper's published rows (golden values from the paper's tables) and
an independent count by torch's FlopCounterMode on real transformers modules."""

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from llava.eval import flops as F


def _three_decimals(value: float) -> set[float]:
    """The two ways a table prints a value with 3 decimals: rounded and truncated."""
    return {round(value, 3), math.floor(value * 1000) / 1000}


@pytest.mark.parametrize(
    "n, expected",
    [(576, 3.817), (192, 1.253), (128, 0.833), (64, 0.415), (32, 0.208), (16, 0.103), (2880, 20.825)],
)
def test_paper_rows_llama7b(n, expected):
    # Tables 2 and 3 of the paper. The printed value is the formula's value rounded or truncated
    # to 3 decimals (the paper mixes both: 0.20750 -> 0.208 but 0.41554 -> 0.415).
    value = F.paper_tflops(n, F.LLAMA_7B)
    assert expected in _three_decimals(value)
    assert abs(value - expected) < 1e-3


def test_hand_computed_576():
    d, m, n, layers = 4096, 11008, 576, 32
    by_hand = layers * (4 * n * d * d + 2 * n * n * d + 3 * n * d * m) / 1e12
    assert F.paper_tflops(576) == pytest.approx(by_hand, rel=1e-12)


@pytest.mark.parametrize(
    "n, paper_row, formula",
    [(640, 4.627, 4.252), (320, 2.314, 2.099), (160, 1.156, 1.043)],
)
def test_next_rows_are_proportional_scaling(n, paper_row, formula):
    # The paper's LLaVA-NeXT rows are 20.825 * n / 2880; the formula itself gives less.
    assert paper_row in _three_decimals(F.paper_proportional_tflops(n, 2880))
    assert paper_row in _three_decimals(20.825 * n / 2880)
    assert round(F.paper_tflops(n), 3) == formula


def test_next_shape_budget_semantics():
    shape = F.get_shape("llava-v1.6-vicuna-7b")
    assert shape.full_visual_tokens == 2880
    assert shape.visual_tokens(64) == 320
    assert round(F.method_tflops(shape, "script", 576), 3) == 20.825
    assert round(F.method_tflops(shape, "script", 64), 3) == 2.099


def test_fastv_is_layer_aware():
    shape = F.get_shape("llava-v1.6-vicuna-7b")
    d, m = 4096, 11008
    per_layer = lambda n: 4 * n * d * d + 2 * n * n * d + 3 * n * d * m  # noqa: E731
    by_hand = (2 * per_layer(2880) + 30 * per_layer(320)) / 1e12
    assert F.method_tflops(shape, "fastv", 64) == pytest.approx(by_hand, rel=1e-12)
    assert F.method_tflops(shape, "fastv", 64) > F.method_tflops(shape, "script", 64)
    # K = 0 degenerates to pruning before the LLM.
    assert F.fastv_tflops(2880, 320, k=0) == pytest.approx(F.paper_tflops(320))


def test_kv_cache_matches_table6():
    # Table 6: 2880 visual tokens -> 1440 MB, 320 -> 160 MB (fp16, MiB).
    assert F.kv_cache_bytes(F.LLAMA_7B, 2880, 2) / 2**20 == pytest.approx(1440.0)
    assert F.kv_cache_bytes(F.LLAMA_7B, 320, 2) / 2**20 == pytest.approx(160.0)


def test_bad_inputs():
    with pytest.raises(ValueError, match="shape"):
        F.get_shape("llava-v9")
    with pytest.raises(ValueError, match="n"):
        F.paper_tflops(-1)
    with pytest.raises(ValueError, match="budget_per_crop"):
        F.get_shape("tiny").visual_tokens(0)
    with pytest.raises(ValueError, match="n_kept"):
        F.fastv_tflops(10, 20)


def _counted_macs(module, *args, **kwargs) -> float:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(*args, **kwargs)
    return counter.get_total_flops() / 2  # FlopCounterMode counts 2 FLOPs per multiply-add


def test_llm_layer_formula_matches_flop_counter():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=64, intermediate_size=176, num_attention_heads=4,
                      num_key_value_heads=4, num_hidden_layers=1, attn_implementation="eager")
    layer = LlamaDecoderLayer(cfg, layer_idx=0).eval()
    n = 37
    x = torch.randn(1, n, 64)
    pos = torch.arange(n)[None]
    rope = LlamaRotaryEmbedding(cfg)(x, pos)
    counted = _counted_macs(layer, x, attention_mask=None, position_ids=pos, position_embeddings=rope)
    assert counted == pytest.approx(F.llm_layer_macs(n, 64, 176), rel=1e-9)


def test_vision_tower_and_projector_match_flop_counter():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    vs = F.TINY_VISION
    cfg = CLIPVisionConfig(hidden_size=vs.hidden, intermediate_size=vs.intermediate,
                           num_hidden_layers=vs.layers, num_attention_heads=vs.heads,
                           image_size=vs.image_size, patch_size=vs.patch_size)
    cfg._attn_implementation = "eager"  # explicit matmuls, so the counter sees the attention products
    model = CLIPVisionModel(cfg).eval()
    pixels = torch.randn(3, 3, vs.image_size, vs.image_size)
    counted = _counted_macs(model, pixel_values=pixels)
    assert counted == pytest.approx(F.vision_tower_macs(vs, crops=3), rel=1e-9)

    shape = F.get_shape("tiny")
    proj = torch.nn.Sequential(torch.nn.Linear(vs.hidden, 64), torch.nn.GELU(), torch.nn.Linear(64, 64))
    counted = _counted_macs(proj, torch.randn(1, 16, vs.hidden))
    assert counted == pytest.approx(F.projector_macs(shape, 16), rel=1e-9)


def test_full_breakdown_labels_and_totals():
    shape = F.get_shape("llava-v1.5-7b")
    out = F.full_prefill_breakdown(shape, n_visual=64, n_text=60)
    for entry in out.values():
        assert entry["convention"]
    assert out["llm_visual_only"]["tmacs"] == pytest.approx(F.paper_tflops(64))
    expected_total = (out["vision_tower"]["tmacs"] + out["projector"]["tmacs"]
                      + out["llm_all_tokens"]["tmacs"])
    assert out["total"]["tmacs"] == pytest.approx(expected_total)
    assert out["llm_all_tokens"]["tmacs"] > out["llm_visual_only"]["tmacs"]

"""Efficiency tool: JSON schema on the tiny shape, KV cache against the hand formula, the prompt
really carries the pruned token count, VisionZip's attention inputs against transformers' eager
attention weights, FLOPs-only mode, bad input."""

import json

import pytest
import torch

from llava.eval import efficiency as E
from llava.eval import flops as F

REQUIRED = {"shape", "method", "budget", "tflops"}
MEASURED = {"prefill_ms", "decode_ms_per_token", "kv_cache_mb", "peak_mem_mb", "select_ms"}


@pytest.fixture(scope="module")
def tiny_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("eff") / "rows.json"
    E.main(["--random-weights", "--shape", "tiny", "--methods", "script,random,trim,fastv", "--budgets", "4",
            "--repeats", "1", "--warmup", "0", "--decode-tokens", "2", "--text-tokens", "10", "--json", str(out)])
    return json.loads(out.read_text())


def test_json_schema(tiny_rows):
    assert [r["method"] for r in tiny_rows] == ["none", "script", "random", "trim", "fastv"]
    for row in tiny_rows:
        assert REQUIRED <= set(row)
        assert row["measured"]
        assert MEASURED <= set(row)
        # FastV selects inside the prefill: no separate selection time
        in_llm = {"select_ms"} if row["method"] == "fastv" else set()
        assert all(row[k] >= 0 for k in MEASURED - in_llm)
        assert all(row[k] is None for k in in_llm)


def test_sequence_and_kv_cache_match_hand_formula(tiny_rows):
    # tiny LLM: 2 layers, 4 KV heads x 16 dims, float32; prompt = 10 text tokens + visual tokens.
    shape = F.get_shape("tiny")
    assert shape.tokens_per_crop == 16
    # visual tokens entering the LLM, and held in the KV cache after the prefill
    entering = {"none": 16, "script": 4, "random": 4, "trim": 4, "fastv": 16}  # trim: budget-1 kept + 1 merged
    cached = {"none": 16, "script": 4, "random": 4, "trim": 4, "fastv": 4}  # FastV shortens every layer's cache
    for row in tiny_rows:
        assert row["measured"], row
        m = row["method"]
        assert row["llm_visual_tokens"] == entering[m]
        assert row["seq_len"] == 10 + entering[m]
        assert row["cached_positions"] == 10 + cached[m]
        by_hand = 2 * 2 * 4 * 16 * (10 + cached[m]) * 4 / 2**20
        assert row["kv_cache_mb"] == pytest.approx(by_hand)


def test_budget_is_per_crop_for_next_shapes(tmp_path):
    # 5 crops (base + 2x2 tiles) of 16 tokens, budget 3 per crop: 15 tokens reach the LLM (FastV: after layer K)
    rows = E.main(["--random-weights", "--shape", "tiny-next", "--methods", "divprune,fastv", "--budgets", "3",
                   "--repeats", "1", "--warmup", "0", "--decode-tokens", "2", "--text-tokens", "10",
                   "--vision-repeats", "1"])
    by_method = {r["method"]: r for r in rows}
    assert by_method["none"]["llm_visual_tokens"] == 80 and by_method["none"]["cached_positions"] == 90
    assert by_method["divprune"]["llm_visual_tokens"] == 15 and by_method["divprune"]["cached_positions"] == 25
    assert by_method["fastv"]["llm_visual_tokens"] == 80 and by_method["fastv"]["cached_positions"] == 25
    assert by_method["divprune"]["visual_tokens"] == 15


def test_fastv_flops_layer_aware(tiny_rows):
    fastv = next(r for r in tiny_rows if r["method"] == "fastv")
    script = next(r for r in tiny_rows if r["method"] == "script")
    # tiny has 2 layers and FastV prunes after layer 2: no LLM layer of the full model sees the pruned sequence.
    assert fastv["tflops"] == pytest.approx(next(r for r in tiny_rows if r["method"] == "none")["tflops"])
    assert fastv["tflops"] > script["tflops"]
    # the 2-layer LLM that ran has no layer after K=2: it ran FastV at K=1 and says so
    assert fastv["fastv_k_run"] == 1 and "K=1" in fastv["note"]


def test_flops_only_needs_no_model(capsys):
    rows = E.main(["--flops-only", "--shape", "llava-v1.5-7b", "--budgets", "192,64", "--methods", "script"])
    assert [round(r["tflops"], 3) for r in rows] == [3.817, 1.253, 0.416]  # 0.41554 (paper prints 0.415)
    assert all("prefill_ms" not in r for r in rows)
    assert "FLOPs (T)" in capsys.readouterr().out


def test_visionzip_inputs_match_eager_attention():
    from transformers import CLIPVisionModel

    from llava.eval.efficiency import _clip_vision_config

    cfg = _clip_vision_config(F.TINY_VISION)
    cfg._attn_implementation = "eager"
    torch.manual_seed(3)
    clip = CLIPVisionModel(cfg).eval()
    vs = F.TINY_VISION
    pixels = torch.randn(2, 3, vs.image_size, vs.image_size)
    with torch.no_grad():
        vis = E.clip_vision_outputs(clip, pixels)
        got = E.clip_attention_inputs(clip, vis)
        ref = clip(pixel_values=pixels, output_attentions=True, output_hidden_states=True)
    # hidden_states[-2] is produced by the second-to-last encoder layer
    torch.testing.assert_close(vis.features, ref.hidden_states[-2][:, 1:])
    attn = ref.attentions[-2]  # (R, H, T, T)
    torch.testing.assert_close(got["cls_attention"], attn[:, :, 0, 1:].mean(1), rtol=1e-5, atol=1e-6)
    assert got["keys"].shape == (2, vs.patches, vs.hidden // vs.heads)


def test_filled_weights_are_finite_and_varied():
    pipe = E.random_pipeline("tiny", 1, with_text_tower=True)
    for module in (pipe.llm, pipe.projector):
        for name, p in module.named_parameters():
            assert torch.isfinite(p).all(), name
            if p.ndim > 1:
                assert p.std() > 0, name
                assert not torch.equal(p[0], p[-1]), name  # rows differ (no short period)


def test_checkpoint_pipeline_runs(tiny_llava15_path, tmp_path):
    out = tmp_path / "ckpt.json"
    rows = E.main(["--model-path", tiny_llava15_path, "--methods", "script", "--budgets", "4", "--repeats", "1",
                   "--warmup", "0", "--decode-tokens", "2", "--text-tokens", "8", "--json", str(out)])
    assert [r["method"] for r in rows] == ["none", "script"]
    assert rows[1]["llm_visual_tokens"] == 4 and rows[0]["llm_visual_tokens"] == rows[0]["visual_tokens"]
    assert json.loads(out.read_text())[1]["prefill_ms"] > 0


def test_bad_input():
    with pytest.raises(ValueError, match="methods"):
        E.BenchSettings(methods=["nope"], budgets=[4])
    with pytest.raises(ValueError, match="budgets"):
        E.BenchSettings(methods=["script"], budgets=[0])
    with pytest.raises(ValueError, match="repeats"):
        E.BenchSettings(methods=["script"], budgets=[4], repeats=0)
    with pytest.raises(SystemExit):
        E.main(["--flops-only", "--shape", "nope"])
    with pytest.raises(SystemExit):
        E.main(["--model-path", "/does/not/exist"])

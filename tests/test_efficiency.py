"""Efficiency tool on the public pruning layer: JSON schema, the KV cache against the hand formula, the visual tokens
reaching the LLM against the resolved budget for every family (tiny widths, CPU), the real shapes' sizes against
their published parameter counts and placeholder arithmetic (built on the meta device), FLOPs by hand, the layer's
stage timer, FLOPs-only mode, a checkpoint, bad input."""

import json

import pytest
import torch

import script_prune as sp
from llava.eval import efficiency as E
from llava.eval import flops as F
from tests.helpers import skip_below_family_minimum

REQUIRED = {"shape", "method", "budget", "tflops"}
MEASURED = {"prefill_ms", "llm_prefill_ms", "vision_ms", "decode_ms_per_token", "kv_cache_mb", "peak_mem_mb"}
RUN = ["--random-weights", "--repeats", "1", "--warmup", "0", "--decode-tokens", "3", "--text-tokens", "10"]


def kv_mb_by_hand(llm: F.LLMShape, layers: int, positions: int, bytes_per_value: int = 4) -> float:
    """2 (K and V) x layers x kv_heads x head_dim x positions x bytes, in MiB."""
    return 2 * layers * llm.kv_heads * (llm.hidden // llm.heads) * positions * bytes_per_value / 2**20


@pytest.fixture(scope="module")
def tiny_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("eff") / "rows.json"
    E.main([*RUN, "--shape", "tiny", "--methods", "script,random,trim,fastv", "--budgets", "4", "--json", str(out)])
    return json.loads(out.read_text())


def test_json_schema(tiny_rows):
    assert [r["method"] for r in tiny_rows] == ["none", "script", "random", "trim", "fastv"]
    for row in tiny_rows:
        assert REQUIRED <= set(row) and MEASURED <= set(row), row
        assert row["measured"]
        assert all(row[k] > 0 for k in MEASURED), row
    by = {r["method"]: r for r in tiny_rows}
    # the stages come from the layer's timer for pruned rows; FastV selects inside the LLM stage
    assert by["script"]["select_ms"] > 0 and by["script"]["stage_source"] == "script_prune.patch.set_stage_timer"
    assert by["fastv"]["select_ms"] is None and by["none"]["select_ms"] is None
    assert by["none"]["stage_source"].startswith("stock model")


def test_sequence_and_kv_cache_match_hand_formula(tiny_rows):
    # tiny: 2 LLM layers, 4 KV heads x 16 dims, float32; 10 text tokens + 16 visual tokens (one 4 x 4 crop)
    shape = F.get_shape("tiny")
    assert shape.tokens_per_crop == 16
    in_cache = {"none": 16, "script": 4, "random": 4, "trim": 4, "fastv": 4}  # trim: 3 kept + 1 merged
    for row in tiny_rows:
        m = row["method"]
        assert row["text_positions"] == 10 and row["seq_len"] == 26
        assert row["llm_visual_tokens"] == in_cache[m]
        assert row["cached_positions"] == 10 + in_cache[m]
        assert row["kv_cache_mb"] == pytest.approx(kv_mb_by_hand(shape.llm, 2, 10 + in_cache[m]))


# (shape, rows, tokens per row, layout tokens (NeXT: a newline per row of the 8 x 8 tile grid; video: one newline),
#  extra text positions)
def needs_family(shape_name: str) -> pytest.MarkDecorator:
    """Skip below the transformers release the shape's family was tested on (``Family.min_transformers``)."""
    name = {"llava_video": "llava_onevision"}.get(E.SHAPE_FAMILY[shape_name], E.SHAPE_FAMILY[shape_name])
    return skip_below_family_minimum(next(f for f in sp.patch.FAMILIES if f.name == name))


FAMILIES = [pytest.param(name, *rest, marks=needs_family(name)) for name, *rest in
            [("tiny-next", 5, 16, 8, 0), ("tiny-video", 3, 4, 1, 0), ("tiny-internvl", 5, 16, 0, 0),
             ("tiny-qwen-vl", 1, 16, 0, 2)]]


@pytest.mark.parametrize("name,rows,per_row,layout,markers", FAMILIES)
def test_every_family_reaches_the_llm_with_the_resolved_budget(name, rows, per_row, layout, markers):
    shape = F.get_shape(name)
    assert (shape.crops, shape.tokens_per_crop) == (rows, per_row)
    out = E.main([*RUN, "--shape", name, "--methods", "divprune,fastv", "--budgets", "3", "--layers", "3"])
    by = {r["method"]: r for r in out}
    assert by["none"]["llm_visual_tokens"] == rows * per_row + layout  # the stock placeholder count
    assert by["fastv"]["fastv_layer_run"] == 2  # K = 2 fits the 3-layer LLM
    for method in ("divprune", "fastv"):
        row = by[method]
        assert row["measured"], row
        assert row["kept_tokens"] == rows * sp.resolve_budget(3, per_row)  # 3 per row
        if name != "tiny-next":  # NeXT keeps a grid row's newline only when the row keeps a token (data dependent)
            assert row["llm_visual_tokens"] == 3 * rows + layout
    for row in out:
        assert row["text_positions"] == 10 + markers  # Qwen2.5-VL: vision start / end around the image
        assert row["cached_positions"] == row["text_positions"] + row["llm_visual_tokens"]
        assert row["kv_cache_mb"] == pytest.approx(kv_mb_by_hand(shape.llm, 3, row["cached_positions"]))
    assert by["fastv"]["tflops"] > by["divprune"]["tflops"]  # its first K layers see every token


# published parameter counts (model cards) and placeholder counts by hand
REAL = [("llava-v1.5-7b", "LlavaForConditionalGeneration", 7.06e9, 24 * 24),
        ("llava-v1.6-vicuna-7b", "LlavaNextForConditionalGeneration", 7.06e9, 576 + 48 * 49),
        ("llava-video-7b", "LlavaOnevisionForConditionalGeneration", 8.03e9, 64 * 169 + 1),
        ("internvl3-8b", "InternVLForConditionalGeneration", 7.94e9, 5 * 256),
        ("qwen2.5-vl-7b", "Qwen2_5_VLForConditionalGeneration", 8.29e9, 32 * 32)]


@pytest.mark.parametrize("name,cls,params,placeholders", REAL)
def test_real_shapes_have_the_published_size_and_token_counts(name, cls, params, placeholders):
    shape = F.get_shape(name)
    config = E.model_config(shape, shape.llm.layers, shape.vision.layers)
    model = E.build_model(config, "meta")  # shapes only, no memory
    assert type(model).__name__ == cls
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=0.005)
    inputs, count = E.visual_prompt(shape, E.SHAPE_FAMILY[name], config, 60, torch.Generator().manual_seed(0),
                                    torch.device("cpu"), torch.float32)
    assert count == placeholders
    assert inputs["input_ids"].shape == (1, 60 + count + 2 * (name == "qwen2.5-vl-7b"))


def test_flops_of_the_new_shapes_by_hand():
    # Qwen2.5-7B LLM of InternVL3-8B: d = 3584, m = 18944, 28 layers, 4 KV heads of 128 -> k/v width 512
    d, m, kv = 3584, 18944, 512
    per_layer = lambda n: 2 * n * d * d + 2 * n * d * kv + 2 * n * n * d + 3 * n * d * m  # noqa: E731
    internvl = F.get_shape("internvl3-8b")
    assert internvl.full_visual_tokens == 1280 and internvl.visual_tokens(64) == 320
    assert F.method_tflops(internvl, "script", 256) == pytest.approx(28 * per_layer(1280) / 1e12, rel=1e-12)
    assert F.method_tflops(internvl, "fastv", 64) == pytest.approx((2 * per_layer(1280) + 26 * per_layer(320)) / 1e12,
                                                                   rel=1e-12)
    video = F.get_shape("llava-video-7b")
    assert video.full_visual_tokens == 64 * 169
    assert F.method_tflops(video, "divprune", 32) == pytest.approx(28 * per_layer(64 * 32) / 1e12, rel=1e-12)
    qwen = F.get_shape("qwen2.5-vl-7b")
    assert qwen.full_visual_tokens == 1024
    # projector inputs: 4 patches per merged token; Qwen2.5-VL's merger 5120 -> 5120 -> 3584 over 1024 vectors
    assert qwen.projector_inputs == 1024 and F.projector_macs(qwen, 1024) == 1024 * (5120 * 5120 + 5120 * 3584)


def test_in_llm_method_without_a_flops_rule_gets_none_not_a_wrong_number(monkeypatch):
    monkeypatch.delitem(F.IN_LLM_LAYER_TOKENS, "fastv")
    settings = E.BenchSettings(methods=["fastv"], budgets=[64])
    row = E.flops_row(F.get_shape("llava-v1.5-7b"), "fastv", 64, settings, full=True)
    assert row["tflops"] is None and "IN_LLM_LAYER_TOKENS" in row["tflops_convention"]
    assert "?" in E.format_table([row])


@needs_family("tiny-internvl")
def test_stage_timer_reports_the_pruned_prefill_stages_in_order():
    bench = E.random_bench("tiny-internvl", layers=3, text_tokens=6)
    model, seen = bench.model, []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __enter__(self):
            seen.append(self.name)

        def __exit__(self, *exc):
            seen.append("/" + self.name)

    with torch.no_grad():
        for method, params, stages in (("divprune", {}, ["vision", "select", "llm"]),
                                       ("fastv", {"layer": 1}, ["vision", "llm"])):
            sp.patch.apply(model, method=method, budget=3, **params)
            sp.patch.set_stage_timer(model, Recorder)
            model(**bench.inputs)
            assert seen == [s for name in stages for s in (name, "/" + name)], method
            seen.clear()
            sp.patch.set_stage_timer(model, None)
            model(**bench.inputs)
            assert seen == []
            sp.patch.remove(model)
        sp.patch.apply(model, method="divprune", budget=16)  # whole rows: the stock forward, no stages
        sp.patch.set_stage_timer(model, Recorder)
        model(**bench.inputs)
        assert seen == []
        with pytest.raises(ValueError, match="timer"):
            sp.patch.set_stage_timer(model, "not callable")
        sp.patch.remove(model)


def test_fastv_flops_layer_aware(tiny_rows):
    by = {r["method"]: r for r in tiny_rows}
    # tiny has 2 layers and FastV prunes after layer 2: no LLM layer of the full model sees the pruned sequence.
    assert by["fastv"]["tflops"] == pytest.approx(by["none"]["tflops"])
    assert by["fastv"]["tflops"] > by["script"]["tflops"]
    # the 2-layer LLM that ran has no layer after K=2: it ran FastV at K=1 and says so
    assert by["fastv"]["fastv_layer_run"] == 1 and "K=1" in by["fastv"]["note"]


def test_flops_only_needs_no_model(capsys):
    rows = E.main(["--flops-only", "--shape", "llava-v1.5-7b", "--budgets", "192,64", "--methods", "script"])
    assert [round(r["tflops"], 3) for r in rows] == [3.817, 1.253, 0.416]  # 0.41554 (paper prints 0.415)
    assert all("prefill_ms" not in r for r in rows)
    assert "FLOPs (T)" in capsys.readouterr().out


@needs_family("tiny-qwen-vl")
def test_refused_method_gets_a_row_saying_why():
    rows = E.main([*RUN, "--shape", "tiny-qwen-vl", "--methods", "visionzip", "--budgets", "3", "--no-baseline"])
    assert rows[0]["measured"] is False and "visionzip" in rows[0]["note"]


def test_filled_weights_are_finite_and_varied():
    bench = E.random_bench("tiny", 1)
    for name, p in bench.model.named_parameters():
        assert torch.isfinite(p).all(), name
        if p.ndim > 1:
            assert p.std() > 0, name
            assert not torch.equal(p[0], p[-1]), name  # rows differ (no short period)


def test_checkpoint_runs(tiny_llava15_path, tmp_path):
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
    with pytest.raises(ValueError, match="decode_tokens"):
        E.BenchSettings(methods=["script"], budgets=[4], decode_tokens=1)
    with pytest.raises(ValueError, match="layers"):
        E.random_bench("tiny", 0)
    with pytest.raises(SystemExit):
        E.main(["--flops-only", "--shape", "nope"])
    with pytest.raises(SystemExit):
        E.main(["--model-path", "/does/not/exist"])


def test_attention_implementation_reaches_every_sub_model_and_flash_needs_flash_attn(monkeypatch):
    bench = E.random_bench("tiny-next", 1, attn_implementation="eager")
    configs = [bench.model.config, bench.model.config.text_config, bench.model.config.vision_config]
    assert [c._attn_implementation for c in configs] == ["eager"] * 3
    assert E.random_bench("tiny-next", 1).model.config.text_config._attn_implementation == "sdpa"  # the default
    monkeypatch.setattr("transformers.utils.is_flash_attn_2_available", lambda: False)
    with pytest.raises(ValueError, match="flash_attention_2.*needs the flash_attn package"):
        E.random_bench("tiny-next", 1, attn_implementation="flash_attention_2")
    with pytest.raises(ValueError, match="attn_implementation must be one of"):
        E.check_attn_implementation("flex")


def test_method_params_reach_the_flops_rule_and_are_checked():
    # PDrop at 64 per crop needs earlier drop points than its default 8 / 16 / 24 (docs/methods.md)
    rows = E.main(["--flops-only", "--shape", "llava-v1.6-vicuna-7b", "--methods", "pdrop", "--budgets", "64",
                   "--param", "pdrop:layers=[2,6,12]"])
    shape = F.get_shape("llava-v1.6-vicuna-7b")
    by_hand = F.layers_tflops(F.layer_tokens(shape, "pdrop", 64, {"layers": (2, 6, 12)}), shape.llm)
    assert rows[1]["tflops"] == pytest.approx(by_hand, rel=1e-12)
    assert E.method_param_args(["pdrop:layers=[2,6]", "pdrop:ratio=0.4"]) == {"pdrop": {"layers": [2, 6], "ratio": 0.4}}
    with pytest.raises(ValueError, match="METHOD:KEY=VALUE"):
        E.method_param_args(["layers=[2,6]"])
    with pytest.raises(ValueError, match="ratio"):
        E.BenchSettings(methods=["pdrop"], budgets=[64], params={"pdrop": {"ratio": 2.0}})

"""The vLLM plugin's torch-only parts (no vLLM needed): the exact M-RoPE offset channels, request settings,
the version gate. The plugin end to end: tests/vllm_plugin (its own environment, scripts/vllm_env.sh)."""

import pytest
import torch

from script_vllm import check_vllm_version
from script_vllm import positions as mrope
from script_vllm.settings import Settings, parse


def test_grid_offsets_hand_computed():
    # 2 frames of 2 x 3 merged tokens, raster order (frame, row, column); frame step 2.5 -> 0, 2 (truncated)
    expected = [[0] * 6 + [2] * 6, [0, 0, 0, 1, 1, 1] * 2, [0, 1, 2] * 4]
    assert mrope.grid_offsets(2, 2, 3, 2.5).tolist() == expected
    assert mrope.grid_offsets(1, 2, 2, 1.0).tolist() == [[0, 0, 0, 0], [0, 0, 1, 1], [0, 1, 0, 1]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_offsets_survive_the_embedding_dtype_exactly(dtype):
    offsets = torch.tensor([[0, 255, 256, 257, 4095, 65535], [1, 2, 300, 511, 512, 1000], [7, 0, 65534, 3, 9, 256]])
    channels = mrope.encode(offsets, dtype)
    assert channels.dtype == dtype and channels.shape == (6, mrope.CHANNELS)
    assert int(channels.float().max()) <= 255  # every channel an integer bfloat16 holds exactly
    assert torch.equal(mrope.decode(channels), offsets)
    with pytest.raises(ValueError, match="cannot be carried"):
        mrope.encode(torch.tensor([[65536], [0], [0]]), dtype)


def test_settings_parse_and_per_row_counts():
    assert parse({}) is None
    settings = parse({"script_budget": 0.25, "script_params": {"tau": 0.3}})
    assert (settings.method, settings.budget, settings.params) == ("script", 0.25, {"tau": 0.3})
    assert [settings.kept(n) for n in (24, 7, 3)] == [6, 1, 1]  # floor(0.25 n), at least 1
    assert parse({"script_budget": 30, "script_method": "divprune"}).kept(24) == 24  # at most the row
    carried = Settings("script", 5, {"tau": 0.3}, (4, 9, 2))
    assert Settings.decode_optional(Settings.encode_optional(carried)) == carried
    assert Settings.decode_optional(Settings.encode_optional(None)) is None


@pytest.mark.parametrize("kwargs, words", [
    ({"script_budget": 0}, "script_budget"),
    ({"script_budget": 1.5}, "script_budget"),
    ({"script_budget": 4, "script_method": "nope"}, "script_method"),
    ({"script_budget": 4, "script_method": "fastv"}, "not supported in vLLM"),
    ({"script_budget": 4, "script_method": "trim"}, "not supported in vLLM"),
    ({"script_budget": 4, "script_method": "visionzip"}, "not supported in vLLM"),
    ({"script_method": "script"}, "without 'script_budget'"),
    ({"script_budget": 4, "script_params": {"bogus": 1}}, "bogus"),
    ({"script_budget": 4, "script_params": [1]}, "script_params"),
])
def test_bad_settings_refused_by_name(kwargs, words):
    with pytest.raises(ValueError, match=words):
        parse(kwargs)


def test_unsupported_vllm_release_refused_by_name():
    check_vllm_version("0.32.0")
    with pytest.raises(RuntimeError, match="supports vLLM 0.32.0.*installed 0.33.0"):
        check_vllm_version("0.33.0")

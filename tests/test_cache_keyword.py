"""Upstream API drift surfaces as a failure: the cache argument's name (read in one place,
``script_prune.patch.family.cache_keyword`` / ``output_cache_field``), our deprecation policy, FastV's cache."""

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.cache_utils import DynamicCache

from llava.mm_utils import process_images
from llava.model.builder import load_pretrained_model
from llava.model.pruning import PruningConfig
from script_prune.patch.family import cache_keyword, output_cache_field
from script_prune.patch.prefill import output_cache
from tests.helpers import prompt_ids, random_image

REPO = Path(__file__).resolve().parents[1]


def test_cache_keyword_and_output_field_read_the_signature():
    from dataclasses import dataclass

    def new(hidden, cache=None, use_cache=False): ...

    def old(hidden, past_key_values=None, use_cache=False): ...

    assert cache_keyword(new) == "cache" and cache_keyword(old) == "past_key_values"

    @dataclass
    class NewOutput:
        cache: object = None

    @dataclass
    class OldOutput:
        past_key_values: object = None

    assert output_cache_field(NewOutput) == "cache" and output_cache_field(OldOutput) == "past_key_values"


def test_installed_release_takes_the_keyword_we_read_everywhere():
    """5.24 renamed the cache argument and output field to ``cache``; every place the layer hands or reads the cache
    (decoder layers of the supported LLMs, the mask function, the outputs) must agree with the release's own rule."""
    import transformers
    from packaging.version import Version
    from transformers.masking_utils import create_causal_mask
    from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaModel
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    expected = "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"
    for fn in (LlamaDecoderLayer.forward, Qwen2DecoderLayer.forward, LlamaModel.forward, create_causal_mask):
        assert cache_keyword(fn) == expected, fn
    for output in (BaseModelOutputWithPast, CausalLMOutputWithPast):
        assert output_cache_field(output) == expected, output


def test_the_keyword_we_read_fills_the_cache_handed_over():
    """Behaviour, not names: a cache passed under ``cache_keyword`` is the one the model writes and returns (the
    deprecated name would be ignored when the new one exists, leaving it empty)."""
    from transformers import LlamaConfig, LlamaModel

    model = LlamaModel(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1)).eval()
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(input_ids=torch.arange(7)[None], use_cache=True, **{cache_keyword(LlamaModel.forward): cache})
    assert cache.get_seq_length() == 7
    assert output_cache(out) is cache


def test_our_deprecations_are_errors_and_a_dependencys_own_are_not():
    """The pytest policy (pyproject.toml filterwarnings): a FutureWarning / DeprecationWarning attributed to our
    modules fails the run; one that a dependency raises about itself stays a warning."""
    for category in (FutureWarning, DeprecationWarning):
        for module in ("llava.model.llava_arch", "script_prune.patch.in_llm", "test_adapter"):
            with pytest.raises(category):
                warnings.warn_explicit("old API", category, "x.py", 1, module=module)
        with pytest.warns(category):
            warnings.warn_explicit("old API", category, "x.py", 1, module="transformers.utils.generic")


def _fastv_inputs(path):
    tokenizer, model, processor, _ = load_pretrained_model(path, torch_dtype=torch.float32)
    ids = prompt_ids(tokenizer, "What is shown?")[None]
    pixels = process_images([random_image(40, 56, seed=1)], processor, model.config)
    model.set_pruning(PruningConfig(method="fastv", visual_token_num=3, params={"layer": 1}))
    return model, ids, pixels


def test_fastv_cache_holds_text_plus_kept_in_every_layer(tiny_llava15_path):
    model, ids, pixels = _fastv_inputs(tiny_llava15_path)
    n_text = ids.shape[1] - 1  # the one <image> marker is replaced by the visual tokens
    with torch.no_grad():
        out = model(ids, images=pixels, use_cache=True)
    cache = output_cache(out)
    assert [layer.keys.shape[2] for layer in cache.layers] == [n_text + 3] * len(cache.layers)


@pytest.mark.parametrize("method", ["fastv", "script"])
def test_cli_prints_no_warning(method, tiny_llava15_path, tmp_path):
    """`run_llava` shows every warning once (-W default) and transformers' logged notices: none may appear."""
    image = tmp_path / "scene.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (48, 80, 3), dtype=np.uint8)).save(image)
    cmd = [sys.executable, "-W", "default", "-m", "llava.eval.run_llava", "--model-path", tiny_llava15_path,
           "--image-file", str(image), "--query", "What is shown?", "--visual-token-num", "3", "--pruning-method",
           method, "--device", "cpu", "--dtype", "float32", "--max-new-tokens", "3"]
    if method == "fastv":
        cmd += ["--pruning-param", "layer=1"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert "visual tokens to LLM: 3" in out.stdout
    noisy = [line for line in out.stderr.splitlines() if "warn" in line.lower() or "deprecat" in line.lower()]
    assert noisy == [], "\n".join(noisy)


def test_fastv_prefill_refuses_a_cache_the_decoder_did_not_fill(tiny_llava15_path):
    """What transformers 5.24 did to FastV: the decoder layers read the cache under a new name and silently
    ignore the one they are given. Simulated by a keyword no release reads (the next rename): the layers run
    without the cache, and the prefill must stop with a clear error instead of returning an unfilled cache."""
    from script_prune.patch.prefill import STATE_ATTR

    model, ids, pixels = _fastv_inputs(tiny_llava15_path)
    model.hf.__dict__[STATE_ATTR].extra["layer_cache_keyword"] = "kv_cache_after_the_next_rename"
    with pytest.raises(RuntimeError, match=r"layer 0 of the KV cache was not filled, expected \d+ \("):
        with torch.no_grad():
            model(ids, images=pixels, use_cache=True)

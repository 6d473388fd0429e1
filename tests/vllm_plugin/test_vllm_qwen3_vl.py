"""Cross-engine reference for Qwen3-VL: vLLM with the Script plugin vs transformers' own Qwen3-VL under
script_prune.patch (tests/vllm_plugin/common.py), tiny random checkpoint built offline.

Qwen3-VL adds DeepStack (vision features added to the first decoder layers' hidden states at the visual
positions: the plugin prunes them with the tokens' indices, the reference with the same keep mask) and one
placeholder run per video frame with its timestamp text before it (the text stays, every frame is a row).
"""

from __future__ import annotations

import pytest

from script_vllm.tiny import SPECIAL, WORDS, build_qwen3_vl
from tests.vllm_plugin.common import (check_against_reference, engine, generate, hf_inputs, image, load_hf,
                                      placeholder_runs, prompt, reference, request, video_frames)

LANDSCAPE, PORTRAIT = image(192, 128, 0), image(128, 192, 1)  # 24 visual tokens each (6 x 4 / 4 x 6), patch 16
VIDEO = video_frames(96, 128)  # 2 temporal steps (frames) of 12 tokens, each after its timestamp
VISUAL = {SPECIAL.index("<|image_pad|>"), SPECIAL.index("<|video_pad|>")}
SECONDS = len(SPECIAL) + WORDS.index("seconds")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(build_qwen3_vl(tmp_path_factory.mktemp("tiny_qwen3_vl")))


@pytest.fixture(scope="module")
def hf(checkpoint):
    from transformers import Qwen3VLForConditionalGeneration

    return load_hf(Qwen3VLForConditionalGeneration, checkpoint)


@pytest.fixture(scope="module")
def llm(checkpoint):
    llm = engine(checkpoint)
    yield llm
    del llm


CASES = [  # (images, method, budget, params)
    ([LANDSCAPE], "script", 0.5, {}),
    ([PORTRAIT], "divprune", 5, {}),
    ([PORTRAIT], "script", 0.25, {"tau": 0.3}),
    ([LANDSCAPE, PORTRAIT], "script", 6, {}),
]


@pytest.mark.parametrize("images, method, budget, params", CASES)
def test_images_greedy_tokens_equal_transformers_reference(llm, hf, images, method, budget, params):
    text = prompt("what is the color of the object in the left ?", images=len(images))
    kwargs = dict(script_budget=budget, script_method=method, **({"script_params": params} if params else {}))
    out = generate(llm, [request(text, images, **kwargs)])[0]
    rows = check_against_reference(out, hf, text, images, method=method, budget=budget, params=params)
    assert placeholder_runs(out.prompt_token_ids, VISUAL) == rows


@pytest.mark.parametrize("budget", [0.5, 3])
def test_video_frames_pruned_per_frame_timestamps_stay(llm, hf, budget):
    text = prompt("what is in the video ?", images=0, video=True)
    unpruned, pruned = generate(llm, [request(text, [], VIDEO), request(text, [], VIDEO, script_budget=budget)])
    rows = check_against_reference(pruned, hf, text, [], VIDEO, budget=budget)
    assert rows == [max(1, int(budget * 12)) if budget < 1 else budget] * 2
    assert placeholder_runs(pruned.prompt_token_ids, VISUAL) == rows  # one run per frame
    # the unpruned prompt is transformers' own; pruning removes placeholders only (timestamps and brackets stay)
    full = hf_inputs(hf[1], text, [], VIDEO)["input_ids"][0].tolist()
    assert unpruned.prompt_token_ids == full
    text_only = [t for t in full if t not in VISUAL]
    assert [t for t in pruned.prompt_token_ids if t not in VISUAL] == text_only
    assert pruned.prompt_token_ids.count(SECONDS) == 2  # "<0.2 seconds>" "<1.2 seconds>": one per frame


def test_budget_keeping_all_tokens_equals_the_unpruned_model(llm, hf):
    text = prompt("describe the image .", images=1, video=True)
    stock, _, _ = reference(hf, text, [PORTRAIT], VIDEO)
    plain, keep_all = generate(llm, [request(text, [PORTRAIT], VIDEO),
                                     request(text, [PORTRAIT], VIDEO, script_budget=24)])
    assert list(plain.outputs[0].token_ids) == stock
    assert list(keep_all.outputs[0].token_ids) == stock
    assert plain.prompt_token_ids == keep_all.prompt_token_ids


def test_image_and_video_in_one_prompt(llm, hf):
    text = prompt("where is the red cat ?", images=1, video=True)
    out = generate(llm, [request(text, [LANDSCAPE], VIDEO, script_budget=0.25)])[0]
    rows = check_against_reference(out, hf, text, [LANDSCAPE], VIDEO, budget=0.25)
    assert rows == [6, 3, 3]
    assert placeholder_runs(out.prompt_token_ids, VISUAL) == rows

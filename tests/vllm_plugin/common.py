"""What the vLLM plugin's tests share: inputs, requests, and the transformers-native reference.

The reference is ``script_prune.patch`` applied to transformers' own class of the family (the tiny random
checkpoint the engine serves, loaded by transformers), greedy ``generate`` on the unpruned prompt: it prunes
the same rows with the same method, budget and ``llm_text`` relevance, independently of vLLM's code paths
(processor, encoder, scheduler, positions, kernels).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

import script_prune.patch as patch

MAX_TOKENS = 6
CHUNK = 32  # tokens per engine step: every prompt of the tests is longer, so its prefill is chunked
VIDEO_FPS = 2.0


def prompt(question: str, images: int = 1, video: bool = False) -> str:
    visual = "<|vision_start|><|image_pad|><|vision_end|>" * images
    if video:
        visual += "<|vision_start|><|video_pad|><|vision_end|>"
    return f"<|im_start|>user\n{visual}{question}<|im_end|>\n<|im_start|>assistant\n"


def image(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8))


def video_frames(height: int, width: int, seed: int = 5) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (4, height, width, 3), dtype=np.uint8)  # (T, H, W, 3)


def video_metadata(frames: np.ndarray) -> dict:
    count = frames.shape[0]
    return dict(total_num_frames=count, fps=VIDEO_FPS, duration=count / VIDEO_FPS, video_backend="opencv",
                frames_indices=list(range(count)), do_sample_frames=False)


def load_hf(cls: type, checkpoint: str, dtype: torch.dtype = torch.float32):
    """transformers' own model and processor of ``checkpoint``; generate() does not stop at EOS (vLLM's
    ``ignore_eos``)."""
    from transformers import AutoProcessor

    model = cls.from_pretrained(checkpoint, dtype=dtype).eval()
    model.generation_config.eos_token_id = None
    return model, AutoProcessor.from_pretrained(checkpoint)


def engine(checkpoint: str, dtype: str = "float32", **kwargs):
    """vLLM on ``checkpoint`` (the plugin loads itself): eager, greedy-deterministic, prefill chunked in CHUNK-token
    steps, up to 2 images and a video per prompt; ``kwargs`` override."""
    from vllm import LLM

    options = dict(max_model_len=1024, enforce_eager=True, seed=0, max_num_batched_tokens=CHUNK,
                   enable_chunked_prefill=True, enable_prefix_caching=True,
                   limit_mm_per_prompt={"image": 2, "video": 1})
    return LLM(model=checkpoint, dtype=dtype, **{**options, **kwargs})


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
              budget=None, params: dict | None = None) -> tuple[list[int], int, list[int]]:
    """Greedy tokens of transformers' model under ``script_prune.patch`` (unpatched when ``method`` is None),
    the pruned prompt's length, and the kept tokens per visual row."""
    model, processor = hf
    inputs = hf_inputs(processor, text, images, video)
    ids = inputs["input_ids"]  # (1, L) the unpruned prompt
    visual = int(((ids == model.config.image_token_id) | (ids == model.config.video_token_id)).sum())
    if method is not None:
        patch.apply(model, method=method, budget=budget, **(params or {}))
    try:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
        rows = [visual] if method is None else [len(k) for k in patch.kept(model)]
    finally:
        if method is not None:
            patch.remove(model)
    return out[0, ids.shape[1]:].tolist(), ids.shape[1] - visual + sum(rows), rows


def check_against_reference(out, hf, text: str, images: list, video=None, method: str = "script", budget=None,
                            params: dict | None = None) -> list[int]:
    """vLLM's output ``out`` has the reference's greedy tokens and pruned prompt length; returns its kept tokens
    per visual row (for the caller's checks of the prompt's placeholder runs)."""
    expected, length, rows = reference(hf, text, images, video, method=method, budget=budget, params=params)
    assert len(out.prompt_token_ids) == length, (method, budget)
    assert list(out.outputs[0].token_ids) == expected, (method, budget)
    return rows


def placeholder_runs(token_ids: list[int], tokens: set[int]) -> list[int]:
    """Lengths of the runs of visual placeholders in a prompt, in order."""
    runs, previous = [], None
    for token in token_ids:
        if token in tokens:
            if previous in tokens and previous == token:
                runs[-1] += 1
            else:
                runs.append(1)
        previous = token
    return runs


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

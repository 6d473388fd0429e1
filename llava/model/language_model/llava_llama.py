"""``LlavaLlamaForCausalLM`` (the architecture name of LLaVA-1.5 / 1.6-vicuna checkpoints): transformers' own
``LlavaForConditionalGeneration`` / ``LlavaNextForConditionalGeneration`` with a Llama LLM (``llava.model.convert``)."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from ..convert import build_hf_model


class LlavaConfig(PretrainedConfig):
    """config.json of an original LLaVA checkpoint (the LLM's keys + LLaVA's ``mm_*`` keys), as attributes.
    Its own model_type keeps it apart from transformers' (differently laid out) "llava"."""

    model_type = "llava_llama"


def LlavaLlamaForCausalLM(config: LlavaConfig, dtype: torch.dtype = torch.float32):  # noqa: N802 (LLaVA's class name)
    """An empty transformers LLaVA model for ``config`` (weights: ``llava.model.convert.load_converted``)."""
    return build_hf_model({**config.to_dict(), "architectures": ["LlavaLlamaForCausalLM"]}, config.mm_vision_tower, dtype)

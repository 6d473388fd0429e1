"""``LlavaMistralForCausalLM`` (LLaVA-1.6-mistral): transformers' own LLaVA classes with a Mistral LLM."""

from __future__ import annotations

import torch

from ..convert import build_hf_model
from .llava_llama import LlavaConfig


class LlavaMistralConfig(LlavaConfig):
    model_type = "llava_mistral"


def LlavaMistralForCausalLM(config: LlavaMistralConfig, dtype: torch.dtype = torch.float32):  # noqa: N802
    """An empty transformers LLaVA model with a MistralConfig LLM for ``config``."""
    return build_hf_model({**config.to_dict(), "architectures": ["LlavaMistralForCausalLM"]}, config.mm_vision_tower,
                          dtype)

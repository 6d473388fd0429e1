"""LLaVA on Mistral/Mistral-Instruct: ``LlavaMistralForCausalLM`` (LLaVA-1.6-mistral)."""

from __future__ import annotations

from torch import nn
from transformers import MistralConfig, MistralForCausalLM, MistralModel
from transformers.models.mistral.modeling_mistral import MistralPreTrainedModel

from ..llava_arch import LlavaCausalLMMixin, LlavaMetaForCausalLM, LlavaMetaModel


class LlavaMistralConfig(MistralConfig):
    """MistralConfig + LLaVA's ``mm_*`` keys. Its own model_type avoids transformers' (different) "llava" type."""

    model_type = "llava_mistral"


class LlavaMistralModel(LlavaMetaModel, MistralModel):
    config_class = LlavaMistralConfig


class LlavaMistralForCausalLM(LlavaCausalLMMixin, MistralForCausalLM, LlavaMetaForCausalLM):
    config_class = LlavaMistralConfig

    def __init__(self, config: LlavaMistralConfig) -> None:
        MistralPreTrainedModel.__init__(self, config)
        self.model = LlavaMistralModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

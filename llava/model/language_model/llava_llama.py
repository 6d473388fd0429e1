"""LLaVA on Llama/Vicuna: ``LlavaLlamaForCausalLM`` (checkpoint architecture name of LLaVA-1.5 / 1.6-vicuna)."""

from __future__ import annotations

from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel
from transformers.models.llama.modeling_llama import LlamaPreTrainedModel

from ..llava_arch import LlavaCausalLMMixin, LlavaMetaForCausalLM, LlavaMetaModel


class LlavaConfig(LlamaConfig):
    """LlamaConfig + LLaVA's ``mm_*`` keys. Its own model_type avoids transformers' (different) "llava" type."""

    model_type = "llava_llama"


class LlavaLlamaModel(LlavaMetaModel, LlamaModel):
    config_class = LlavaConfig


class LlavaLlamaForCausalLM(LlavaCausalLMMixin, LlamaForCausalLM, LlavaMetaForCausalLM):
    config_class = LlavaConfig

    def __init__(self, config: LlavaConfig) -> None:
        LlamaPreTrainedModel.__init__(self, config)
        self.model = LlavaLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

from .llava_llama import LlavaConfig, LlavaLlamaForCausalLM, LlavaLlamaModel
from .llava_mistral import LlavaMistralConfig, LlavaMistralForCausalLM, LlavaMistralModel

__all__ = [
    "LlavaConfig",
    "LlavaLlamaForCausalLM",
    "LlavaLlamaModel",
    "LlavaMistralConfig",
    "LlavaMistralForCausalLM",
    "LlavaMistralModel",
]

from .llava_llama import LlavaConfig, LlavaLlamaForCausalLM
from .llava_mistral import LlavaMistralConfig, LlavaMistralForCausalLM

__all__ = ["LlavaConfig", "LlavaLlamaForCausalLM", "LlavaMistralConfig", "LlavaMistralForCausalLM"]

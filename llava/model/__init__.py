"""LLaVA-1.5 / LLaVA-NeXT models in LLaVA's original layout, on current transformers."""

from .language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM
from .language_model.llava_mistral import LlavaMistralConfig, LlavaMistralForCausalLM
from .pruning import PruningConfig

__all__ = ["LlavaConfig", "LlavaLlamaForCausalLM", "LlavaMistralConfig", "LlavaMistralForCausalLM", "PruningConfig"]

"""LLaVA-1.5 / LLaVA-NeXT checkpoints in LLaVA's original layout, as transformers' own LLaVA classes."""

from .language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM
from .language_model.llava_mistral import LlavaMistralConfig, LlavaMistralForCausalLM
from .pruning import PruningConfig

__all__ = ["LlavaConfig", "LlavaLlamaForCausalLM", "LlavaMistralConfig", "LlavaMistralForCausalLM", "PruningConfig"]

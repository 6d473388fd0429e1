"""LLaVA on Mistral/Mistral-Instruct: ``LlavaMistralForCausalLM`` (LLaVA-1.6-mistral)."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from transformers import MistralConfig, MistralForCausalLM, MistralModel
from transformers.models.mistral.modeling_mistral import MistralPreTrainedModel

from ..llava_arch import LlavaMetaForCausalLM, LlavaMetaModel


class LlavaMistralConfig(MistralConfig):
    """MistralConfig + LLaVA's ``mm_*`` keys. Its own model_type avoids transformers' (different) "llava" type."""

    model_type = "llava_mistral"


class LlavaMistralModel(LlavaMetaModel, MistralModel):
    config_class = LlavaMistralConfig


class LlavaMistralForCausalLM(MistralForCausalLM, LlavaMetaForCausalLM):
    config_class = LlavaMistralConfig

    def __init__(self, config: LlavaMistralConfig) -> None:
        MistralPreTrainedModel.__init__(self, config)
        self.model = LlavaMistralModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        images: Any = None,
        image_sizes: Any = None,
        texts: Sequence[str] | None = None,
        visual_rows: torch.Tensor | None = None,
        **kwargs: Any,
    ):
        """MistralForCausalLM.forward with ``images`` spliced in at IMAGE_TOKEN_INDEX positions of ``input_ids``."""
        llm_inputs = self._multimodal_forward_inputs(
            input_ids, attention_mask, position_ids, past_key_values, labels, inputs_embeds, images, image_sizes, texts
        )
        if visual_rows is not None and "visual_rows" not in llm_inputs:  # generate() hands it to every step
            llm_inputs["visual_rows"] = visual_rows
        output = super().forward(**llm_inputs, use_cache=use_cache, **kwargs)
        self._record_llm_kept_visual()
        return output

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.Tensor | None = None,
        images: Any = None,
        image_sizes: Any = None,
        texts: Sequence[str] | None = None,
        **kwargs: Any,
    ):
        """Generate from ``inputs`` (B, L) prompt ids (left padding + ``attention_mask`` for B > 1) and images.

        Returns only the new tokens (as LLaVA does: the prompt goes in as embeddings)."""
        if "inputs_embeds" in kwargs:
            raise ValueError("pass prompt ids as `inputs` (with <image> tokens), not inputs_embeds")
        if inputs is None:
            inputs = kwargs.pop("input_ids", None)
        attention_mask = kwargs.pop("attention_mask", None)
        kwargs.pop("position_ids", None)  # recomputed from the spliced attention mask
        if images is None:
            self._multimodal_forward_inputs(inputs, attention_mask, None, None, None, None, None, None, None)
            self._last_visual_token_counts = [0] * (0 if inputs is None else inputs.shape[0])
            return super().generate(inputs, attention_mask=attention_mask, **kwargs)
        _, _, mask, _, embeds, _ = self.prepare_inputs_labels_for_multimodal(
            inputs, None, attention_mask, None, None, images, image_sizes, texts, padding_side="left"
        )
        visual_rows = self._llm_pruning_rows()
        if visual_rows is not None:
            kwargs["visual_rows"] = visual_rows  # FastV: used by the prefill, ignored by decoding steps
        output = super().generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
        self._counts_per_prompt(inputs.shape[0])
        return output

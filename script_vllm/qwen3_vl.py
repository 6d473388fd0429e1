"""Qwen3-VL in vLLM with query-conditioned visual-token pruning (registered over the built-in class).

An image is one placeholder run of ``h * w / 4`` tokens; a video is ``t`` runs, one per frame (temporal grid
step), each after its timestamp text (which stays); offsets from a run's first position are (0, row, column),
the model's M-RoPE rule. An encoder output row is the visual token followed by its DeepStack features (vLLM's
layout): selection reads the visual token only, and the kept rows carry their DeepStack features with them, so
both are pruned with the same indices. The shared machinery: pruning.py.
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor

from vllm.model_executor.models.qwen3_vl import (Qwen3VLDummyInputsBuilder, Qwen3VLForConditionalGeneration,
                                                 Qwen3VLMultiModalProcessor, Qwen3VLProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY

from . import positions as mrope
from .pruning import ScriptModelMixin, ScriptProcessingInfoMixin, ScriptProcessorMixin


class ScriptQwen3VLProcessingInfo(ScriptProcessingInfoMixin, Qwen3VLProcessingInfo):
    pass


class ScriptQwen3VLMultiModalProcessor(ScriptProcessorMixin, Qwen3VLMultiModalProcessor):
    def placeholder_tail(self, modality: str) -> list[int]:
        """A video expanded inside the prompt's own ``<|vision_start|>``/``<|vision_end|>`` (transformers >= 5.10)
        ends with its last frame's ``<|vision_end|>``, before the prompt's."""
        if modality == "video" and self._expands_only_video_token(self.info.get_hf_processor()):
            return [self.info.get_hf_config().vision_end_token_id]
        return []


@MULTIMODAL_REGISTRY.register_processor(ScriptQwen3VLMultiModalProcessor, info=ScriptQwen3VLProcessingInfo,
                                        dummy_inputs=Qwen3VLDummyInputsBuilder)
class ScriptQwen3VLForConditionalGeneration(ScriptModelMixin, Qwen3VLForConditionalGeneration):
    """Qwen3-VL whose requests may prune their visual tokens (``mm_processor_kwargs``, see settings.py)."""

    def run_lengths(self, modality: str, grid: list[int]) -> list[int]:
        t, h, w = grid
        return [h * w // self.config.vision_config.spatial_merge_size ** 2] * t

    def item_offsets(self, modality: str, grid: list[int], item_input: Mapping[str, Any], i: int) -> Tensor:
        merge = self.config.vision_config.spatial_merge_size
        return mrope.grid_offsets(1, grid[1] // merge, grid[2] // merge, 1.0).repeat(1, grid[0])  # (3, t * n)

    def selection_width(self) -> int:
        return self.visual_dim

"""Qwen2.5-VL in vLLM with query-conditioned visual-token pruning (registered over the built-in class).

An image is one placeholder run of ``h * w / 4`` tokens; a video is one run of ``t`` frames (temporal grid steps)
of ``h * w / 4`` tokens each, pruned per frame; offsets from the run's first position are (frame x seconds per
step x tokens per second, row, column), the model's M-RoPE rule. The shared machinery: pruning.py.
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor

from vllm.model_executor.models.qwen2_5_vl import (Qwen2_5_VLDummyInputsBuilder, Qwen2_5_VLForConditionalGeneration,
                                                   Qwen2_5_VLMultiModalProcessor, Qwen2_5_VLProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY

from . import positions as mrope
from .pruning import ScriptModelMixin, ScriptProcessingInfoMixin, ScriptProcessorMixin


class ScriptQwen2_5_VLProcessingInfo(ScriptProcessingInfoMixin, Qwen2_5_VLProcessingInfo):
    pass


class ScriptQwen2_5_VLMultiModalProcessor(ScriptProcessorMixin, Qwen2_5_VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(ScriptQwen2_5_VLMultiModalProcessor, info=ScriptQwen2_5_VLProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class ScriptQwen2_5_VLForConditionalGeneration(ScriptModelMixin, Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL whose requests may prune their visual tokens (``mm_processor_kwargs``, see settings.py)."""

    def run_lengths(self, modality: str, grid: list[int]) -> list[int]:
        t, h, w = grid
        return [t * h * w // self.config.vision_config.spatial_merge_size ** 2]

    def item_offsets(self, modality: str, grid: list[int], item_input: Mapping[str, Any], i: int) -> Tensor:
        merge = self.config.vision_config.spatial_merge_size
        seconds = item_input.get("second_per_grid_ts") if modality == "video" else None
        factor = self.t_factor(None if seconds is None else float(seconds[i])) if modality == "video" else 1.0
        return mrope.grid_offsets(grid[0], grid[1] // merge, grid[2] // merge, factor)

    def t_factor(self, second_per_grid: float | None) -> float:
        """Temporal position step of a video's grid steps (seconds per step x tokens per second)."""
        tokens_per_second = getattr(self.config.vision_config, "tokens_per_second", 1.0)
        return (1.0 if second_per_grid is None else float(second_per_grid)) * tokens_per_second

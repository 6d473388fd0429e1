"""InternVL3 (``InternVLForConditionalGeneration``): every 448 x 448 tile and the thumbnail is a row.

The processor cuts an image into tiles plus a thumbnail; each is one entry of ``pixel_values`` and,
after the vision tower and a 0.5 pixel shuffle, ``(448 / 14)^2 * 0.25`` = 256 tokens in one contiguous
placeholder run (a fixed 896 x 896 input: 4 tiles + thumbnail = 1,280 tokens, as the paper's Table 10).
The LLM uses 1-D RoPE, so LLaVA's layout applies: every row's kept tokens in order, merged tokens after
them (``project`` = the stock projector on pixel-shuffled features).
"""

from __future__ import annotations


from torch import Tensor, nn

from .llava import LlavaFamily


class InternVLFamily(LlavaFamily):
    name = "internvl"
    min_transformers = "5.24"  # 5.6 fails the family tests (hook points moved since)
    class_names = ("InternVLForConditionalGeneration",)
    default_relevance = "llm_text"
    provides = ()  # InternViT: no vision-attention inputs are read (VisionZip refused)
    missing = {
        "attention": "InternViT's [CLS] attention and keys of the selected layer are not read (tiles are "
                     "pixel-shuffled 4:1 after the tower, so a [CLS] score per LLM token is not defined)",
        "clip_text": "InternViT has no CLIP joint space (no post_layernorm / visual_projection to a text tower)",
    }

    def row_length(self, model: nn.Module) -> int:
        """Tokens per tile: (image_size / patch_size)^2 patches, times downsample_ratio^2 after pixel shuffle."""
        vision = model.config.vision_config
        side = (vision.image_size[0] // vision.patch_size[0]) * model.config.downsample_ratio
        return int(side * side)

    def images_per_prompt(self, model: nn.Module, input_ids: Tensor) -> Tensor:
        """(B,) ``pixel_values`` entries of every prompt (tiles + thumbnails: one per 256 placeholders), which
        generate() repeats per prompt for beams / num_return_sequences."""
        return self.placeholder_mask(model, input_ids).sum(dim=1) // self.row_length(model)

    def vision_post_layernorm(self, model: nn.Module) -> nn.Module | None:
        return None  # no CLIP joint space: relevance 'clip_text' is refused

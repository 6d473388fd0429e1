"""LLaVA-1.5 layout (``LlavaForConditionalGeneration``): one visual row per image, no layout tokens."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from .family import LAYOUT_TOKEN, Family, Layout, VisualRows

FEATURE_KEYS = ("vision_feature_layer", "vision_feature_select_strategy", "image_sizes")


@contextmanager
def capture_projector(model: nn.Module) -> Iterator[dict[str, Tensor]]:
    """Record the multimodal projector's input (selected vision features) and output (LLM tokens)."""
    store: dict[str, Tensor] = {}

    def hook(module, args, output):
        store["features"], store["tokens"] = args[0], output

    handle = model.model.multi_modal_projector.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def projected_rows(model: nn.Module, call: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """The stock ``get_image_features`` on the call's pixels -> (vision features (R, N, C), tokens (R, N, D))."""
    kwargs = {key: call[key] for key in FEATURE_KEYS if call.get(key) is not None}
    with capture_projector(model) as store:
        model.model.get_image_features(pixel_values=call["pixel_values"], **kwargs)
    return store["features"], store["tokens"]


def tokens_per_crop(model: nn.Module) -> int:
    """Projected tokens of one crop: (image_size / patch_size)^2, plus [CLS] for the "full" strategy."""
    vision = model.config.vision_config
    side = vision.image_size // vision.patch_size
    return side * side + (model.config.vision_feature_select_strategy == "full")


class LlavaFamily(Family):
    name = "llava"
    class_names = ("LlavaForConditionalGeneration",)

    def row_length(self, model: nn.Module) -> int:
        return tokens_per_crop(model)

    def num_rows(self, model: nn.Module, call: dict[str, Any]) -> int:
        return int(call["pixel_values"].shape[0])

    def encode(self, model: nn.Module, call: dict[str, Any]) -> VisualRows:
        features, tokens = projected_rows(model, call)  # (R, N, C), (R, N, D)
        rows, n = tokens.shape[:2]
        arange = torch.arange(rows, device=tokens.device)
        return VisualRows(tokens, features, arange, torch.full((rows,), n, device=tokens.device))

    def layout(self, model: nn.Module, rows: VisualRows, keep: Tensor, merged: Tensor | None = None) -> Layout:
        """Each image's N tokens in row order, kept = ``keep`` (R, N); merged tokens (R, e, D) after them."""
        r, n, d = rows.tokens.shape
        device = rows.tokens.device
        tokens, kept = rows.tokens, keep  # (R, N', D), (R, N')
        row = torch.arange(r, device=device)[:, None].expand(r, n)
        index = torch.arange(n, device=device).expand(r, n)
        if merged is not None:
            e = merged.shape[1]
            tokens = torch.cat([tokens, merged.to(tokens.dtype)], dim=1)
            kept = torch.cat([kept, kept.new_ones(r, e)], dim=1)
            row = torch.cat([row, row.new_full((r, e), LAYOUT_TOKEN)], dim=1)
            index = torch.cat([index, index.new_full((r, e), -1)], dim=1)
        image = torch.arange(r, device=device)[:, None].expand_as(row)
        return Layout(tokens.reshape(-1, d), kept.reshape(-1), row.reshape(-1), index.reshape(-1), image.reshape(-1))

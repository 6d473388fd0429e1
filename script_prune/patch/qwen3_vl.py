"""Qwen3-VL (``Qwen3VLForConditionalGeneration``): Qwen2.5-VL's rows and positions, plus DeepStack.

Every video frame is its own placeholder run (the processor puts its timestamp text before it), so a
video of ``t`` temporal steps gives ``t`` items of one row each; the timestamps are text and stay.
DeepStack: the vision tower's intermediate features are added to the hidden states at the visual
positions after the first LLM layers; they are pruned with the same keep mask as the tokens (in-LLM methods:
the decoder loop adds them itself and they follow the tokens each stage keeps, see ``decoder_additions``). The short
prompt goes to the stock forward as ``input_ids`` (placeholders only at kept positions) with the kept
tokens and DeepStack features as precomputed ``mm_encoder_outputs``, so the stock code scatters both.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .family import Layout, VisualRows, device_index
from .qwen2_5_vl import Qwen2_5_VLFamily


class Qwen3VLFamily(Qwen2_5_VLFamily):
    name = "qwen3_vl"
    class_names = ("Qwen3VLForConditionalGeneration",)
    visual_keys = ("pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw", "mm_token_type_ids")

    def video_items(self, grid: list[int]) -> list[list[int]]:
        """One item per temporal step: frames are separate runs, timestamps between them."""
        t, h, w = grid
        return [[1, h, w]] * t

    def split_items(self, pooled: tuple[Tensor, ...], kind: str, video_grids: list[list[int]]) -> list[Tensor]:
        """Per video -> per frame (``t`` equal parts); images unchanged."""
        if kind == "image":
            return list(pooled)
        return [frame for video, (t, _, _) in zip(pooled, video_grids) for frame in video.view(t, -1, video.shape[-1])]

    def encode(self, model: nn.Module, call: dict[str, Any], needs: frozenset[str] = frozenset()) -> VisualRows:
        """Qwen2.5-VL's rows plus ``extra["deepstack"]`` (L, R, N, D): each DeepStack level laid out as the rows."""
        rows = super().encode(model, call, needs)
        outputs, items = rows.extra["outputs"], rows.extra["items"]
        levels = len(model.config.vision_config.deepstack_visual_indexes)
        stacks = [self.item_rows(items, {kind: None if out is None else out.deepstack_features[level]
                                         for kind, out in outputs.items()}, rows.extra["video_grids"])
                  for level in range(levels)]
        rows.extra["deepstack"] = torch.stack([torch.nn.utils.rnn.pad_sequence(s, batch_first=True) for s in stacks])
        return rows

    def decoder_additions(self, model: nn.Module, rows: VisualRows, layout: Layout) -> Tensor:
        """The DeepStack levels of every placeholder. # -> (levels, T, D)"""
        return rows.extra["deepstack"][:, layout.row, layout.index]

    def llm_inputs(self, model: nn.Module, rows: VisualRows, layout: Layout, index: Tensor,
                   mask: Tensor, kept_per_row: list[int] | None) -> dict[str, Any]:
        """The short prompt as ``input_ids`` (B, Ls) with the kept tokens and DeepStack features (same keep mask)
        as ``mm_encoder_outputs`` per modality, replacing the short ``inputs_embeds``. The kept count of each
        modality comes from ``kept_per_row`` (host), so the kept entries are gathered without a device read."""
        if kept_per_row is None:
            raise ValueError(f"{self.name} takes selection methods only (kept tokens per row from the budget)")
        config = model.config
        pad = config.text_config.pad_token_id
        pad = 0 if pad is None else int(pad)
        ids = rows.extra["input_ids"].gather(1, index).masked_fill(mask == 0, pad)  # (B, Ls)
        items = rows.extra["items"]
        row_kinds = [kind for kind, (t, _, _) in items for _ in range(t)]  # (R,) host
        is_video = device_index([kind == "video" for kind, _ in items], layout.kept.device)
        entry_video = is_video[layout.image].bool()  # (T,)
        deepstack = rows.extra["deepstack"]  # (L, R, N, D)
        encoded = {}
        for kind, flag in (("image", False), ("video", True)):
            if rows.extra["outputs"][kind] is None:
                continue
            count = sum(c for c, k in zip(kept_per_row, row_kinds) if k == kind)
            chosen = layout.kept & (entry_video == flag)  # (T,) kept entries of this modality
            order = torch.sort((~chosen).to(torch.uint8), stable=True).indices[:count]  # (n,) in scatter order
            features = deepstack[:, layout.row[order], layout.index[order]]  # (L, n, D)
            encoded[kind] = type(rows.extra["outputs"][kind])(  # the stock output class, with DeepStack
                pooler_output=(layout.tokens[order],), deepstack_features=[(level,) for level in features])
        return {"input_ids": ids, "inputs_embeds": None, "mm_encoder_outputs": encoded}

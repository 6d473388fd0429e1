"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): images and video frames as rows, 3-D M-RoPE kept.

Rows: every image is one row of ``h * w / 4`` tokens (its ``image_grid_thw`` after the 2x2 merger);
every video gives one row per temporal grid step (``video_grid_thw[0]`` rows of ``h * w / 4``), so the
budget is per frame. Rows differ in length, so the default budget is a fraction of each row.
Items (images / videos) are taken in sequence order from the placeholder tokens.

Positions: the unpruned prompt's 3-D positions (``get_rope_index``, or the 4-row position ids
generate() hands the prefill) are gathered at the kept tokens, so every kept token and every text
token keeps its original (t, h, w) position; ``rope_deltas`` is set from the short prompt so that
decoding without position ids continues at the original positions too (generate() continues from
the last prompt position itself). Merging methods are refused (a merged token has no position).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn

from .family import Family, Layout, VisualRows, device_index, read_once

#: mm_token_type_ids values of transformers' Qwen processors
IMAGE_TYPE, VIDEO_TYPE = 1, 2


class Qwen2_5_VLFamily(Family):
    name = "qwen2_5_vl"
    min_transformers = "5.19"  # tested: 5.19.0 (vLLM 0.32's pin) and 5.24; 5.6 fails the family tests
    class_names = ("Qwen2_5_VLForConditionalGeneration",)
    default_relevance = "llm_text"
    default_budget = 0.25
    merging = False
    missing = {
        "merging": "a merged token has no original (t, h, w) position for its M-RoPE",
        "attention": "its ViT has no [CLS] token (windowed attention, 2x2 patch merger), so there is no [CLS] "
                     "attention for VisionZip",
        "clip_text": "its ViT has no CLIP joint space (no post_layernorm / visual_projection to a text tower)",
    }
    visual_inputs = ("pixel_values", "pixel_values_videos")
    visual_keys = ("pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw", "second_per_grid_ts",
                   "mm_token_type_ids")

    # -- items and rows ------------------------------------------------------------------------
    def video_items(self, grid: list[int]) -> list[list[int]]:
        """Placeholder items of one video grid (t, h, w): the whole video is one run in Qwen2.5-VL."""
        return [grid]

    def items(self, model: nn.Module, call: dict[str, Any]) -> list[tuple[str, list[int]]]:
        """(kind, grid (t, h, w)) of every placeholder item, in sequence (scatter) order over the batch; the
        grids and the prompt's placeholder kinds come to the host in one read, once per prefill."""
        return self.host_grids(model, call)[0]

    def host_grids(self, model: nn.Module, call: dict[str, Any]) -> tuple[list[tuple[str, list[int]]], list[list[int]]]:
        """-> (the placeholder items as :meth:`items`, ``video_grid_thw`` as lists), read once per prefill."""
        keys = ("input_ids", "image_grid_thw", "video_grid_thw")
        return read_once(("qwen_grids", *(id(call.get(key)) for key in keys)), lambda: self.read_grids(model, call))

    def read_grids(self, model: nn.Module, call: dict[str, Any]) -> tuple[list[tuple[str, list[int]]], list[list[int]]]:
        config = model.config
        ids = call["input_ids"]  # (B, L)
        grids = {kind: call.get(key) for kind, key in (("image", "image_grid_thw"), ("video", "video_grid_thw"))}
        kinds = (ids == config.image_token_id).long() + 2 * (ids == config.video_token_id).long()  # (B, L) 0/1/2
        parts = [g.reshape(-1).long() for g in grids.values() if g is not None]
        host = torch.cat([*(p.to(kinds.device) for p in parts), kinds.reshape(-1)]).tolist()  # the one host sync
        split, triples = {}, {}
        for kind, grid in grids.items():
            flat, host = (host[:grid.numel()], host[grid.numel():]) if grid is not None else ([], host)
            triples[kind] = [flat[i:i + 3] for i in range(0, len(flat), 3)]
            split[kind] = [item for g in triples[kind] for item in (self.video_items(g) if kind == "video" else [g])]
        placeholders = [value for value in host if value]  # kinds of the placeholder tokens in sequence order
        merge = config.vision_config.spatial_merge_size ** 2
        out, position, taken = [], 0, {"image": 0, "video": 0}
        while position < len(placeholders):
            kind = "image" if placeholders[position] == 1 else "video"
            if taken[kind] >= len(split[kind]):
                raise ValueError(f"the prompt holds more {kind} placeholder runs than {kind}_grid_thw describes")
            grid = split[kind][taken[kind]]
            taken[kind] += 1
            out.append((kind, grid))
            position += grid[0] * grid[1] * grid[2] // merge
        return out, triples["video"]

    def row_length(self, model: nn.Module) -> int:
        return 1  # rows vary: row_lengths of the call decide

    def row_lengths(self, model: nn.Module, call: dict[str, Any]) -> list[int]:
        merge = model.config.vision_config.spatial_merge_size ** 2
        return [h * w // merge for _, (t, h, w) in self.items(model, call) for _ in range(t)]

    def num_rows(self, model: nn.Module, call: dict[str, Any]) -> int:
        return len(self.row_lengths(model, call))

    def visual_blocks(self, model: nn.Module, call: dict[str, Any]) -> dict[str, tuple[list[int], list[int]]]:
        """Per image / video: its ``t * h * w`` rows of flattened patches and one row of ``*_grid_thw`` /
        ``second_per_grid_ts``, with the prompt of its (first) placeholder run."""
        items = self.items(model, call)
        merge = model.config.vision_config.spatial_merge_size ** 2
        prompts = self.item_prompts(model, call["input_ids"], [t * h * w // merge for _, (t, h, w) in items])
        out: dict[str, tuple[list[int], list[int]]] = {}
        for kind, pixels, keys in (("image", "pixel_values", ("image_grid_thw",)),
                                   ("video", "pixel_values_videos", ("video_grid_thw", "second_per_grid_ts"))):
            grid = call.get(f"{kind}_grid_thw")
            if grid is None:
                continue
            grids = grid.tolist()
            runs = [p for (k, _), p in zip(items, prompts) if k == kind]  # one per placeholder run of this kind
            firsts = [sum(len(self.video_items(g)) if kind == "video" else 1 for g in grids[:i]) for i in range(len(grids))]
            owner = [runs[i] for i in firsts]  # prompt of every image / video
            out[pixels] = ([t * h * w for t, h, w in grids], owner)
            out.update({key: ([1] * len(grids), owner) for key in keys if isinstance(call.get(key), Tensor)})
        return out

    def vision_post_layernorm(self, model: nn.Module) -> nn.Module | None:
        return None  # rows hold LLM-space tokens only: relevance 'clip_text' is refused

    def features(self, model: nn.Module, call: dict[str, Any], kind: str) -> Any:
        """The stock image / video features of the call (``BaseModelOutputWithPooling``), or None."""
        pixels = call.get("pixel_values" if kind == "image" else "pixel_values_videos")
        if pixels is None:
            return None
        grid = call[f"{kind}_grid_thw"]
        get = model.model.get_image_features if kind == "image" else model.model.get_video_features
        return get(pixels, grid, return_dict=True)

    def encode(self, model: nn.Module, call: dict[str, Any], needs: frozenset[str] = frozenset()) -> VisualRows:
        """Rows in sequence order, right-padded to the longest: tokens (R, N, D), ``lengths`` (R,)."""
        items, video_grids = self.host_grids(model, call)
        outputs = {kind: self.features(model, call, kind) for kind in ("image", "video")}
        rows = self.item_rows(items, {kind: None if out is None else out.pooler_output for kind, out in outputs.items()},
                              video_grids)
        device = rows[0].device
        lengths = device_index([r.shape[0] for r in rows], device)  # (R,)
        row_image = device_index([i for i, (_, grid) in enumerate(items) for _ in range(grid[0])], device)  # (R,)
        tokens = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)  # (R, N, D)
        image_lengths = torch.zeros(len(items), dtype=torch.long, device=device).index_add_(0, row_image, lengths)
        extra = {"items": items, "outputs": outputs, "input_ids": call["input_ids"], "video_grids": video_grids}
        return VisualRows(tokens, tokens, row_image, image_lengths, lengths=lengths, extra=extra)

    def item_rows(self, items: list[tuple[str, list[int]]], per_kind: dict[str, Any],
                  video_grids: list[list[int]]) -> list[Tensor]:
        """Per-image / per-video tensors of the stock features -> one (n_r, D) tensor per row, sequence order."""
        pooled = {kind: [] if value is None else self.split_items(value, kind, video_grids)
                  for kind, value in per_kind.items()}
        taken = {"image": 0, "video": 0}
        rows: list[Tensor] = []
        for kind, (t, _, _) in items:
            tokens = pooled[kind][taken[kind]]  # (t * h * w / 4, D) raster order, frame-major
            taken[kind] += 1
            rows += list(tokens.view(t, -1, tokens.shape[-1]))
        return rows

    def split_items(self, pooled: tuple[Tensor, ...], kind: str, video_grids: list[list[int]]) -> list[Tensor]:
        """The stock per-image / per-video tokens -> per placeholder item (Qwen2.5-VL: unchanged)."""
        return list(pooled)

    def layout(self, model: nn.Module, rows: VisualRows, keep: Tensor, merged: Tensor | None = None) -> Layout:
        """Every row's valid tokens in row order (the scatter order), kept = ``keep`` (R, N)."""
        if merged is not None:
            raise ValueError(f"{self.name} does not place merged tokens (no M-RoPE position)")
        r, n, _ = rows.tokens.shape
        device = keep.device
        merge = model.config.vision_config.spatial_merge_size ** 2
        total = sum(t * h * w // merge for _, (t, h, w) in rows.extra["items"])  # valid entries (host)
        row = torch.repeat_interleave(torch.arange(r, device=device), rows.lengths, output_size=total)  # (T,)
        index = torch.arange(total, device=device) - (rows.lengths.cumsum(0) - rows.lengths)[row]  # (T,)
        return Layout(rows.tokens[row, index], keep[row, index], row, index, rows.row_image[row])

    # -- positions -----------------------------------------------------------------------------
    def rope_index(self, model: nn.Module, call: dict[str, Any]) -> Tensor:
        """The unpruned prompt's 3-D positions (3, B, L) from the stock ``get_rope_index``."""
        input_ids = call["input_ids"]
        kwargs = {key: call.get(key) for key in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts",
                                                   "attention_mask")}
        if "mm_token_type_ids" in inspect.signature(model.model.get_rope_index).parameters:
            types = call.get("mm_token_type_ids")
            if types is None:  # as the processors build it: 1 on image placeholders, 2 on video ones
                types = ((input_ids == model.config.image_token_id) * IMAGE_TYPE
                         + (input_ids == model.config.video_token_id) * VIDEO_TYPE).int()
            kwargs["mm_token_type_ids"] = types
        return model.model.get_rope_index(input_ids, **kwargs)[0]

    def positions(self, model: nn.Module, call: dict[str, Any], index: Tensor, mask: Tensor) -> Tensor:
        """The kept tokens' original 3-D positions (3, B, Ls); sets ``rope_deltas`` for the short prompt."""
        given = call.get("position_ids")
        full = given[-3:] if given is not None and given.dim() == 3 else self.rope_index(model, call)  # (3, B, L)
        short = full.to(index.device).gather(2, index[None].expand(3, -1, -1)) * mask[None]  # (3, B, Ls)
        self.continue_from(model, short, mask)
        return short

    def continue_from(self, model: nn.Module, positions: Tensor, mask: Tensor) -> None:
        """``rope_deltas`` (B, 1) = last position + 1 - real tokens: decoding without position ids continues
        from the short prompt's last original position. positions (3, B, Ls), mask (B, Ls)."""
        last = positions.masked_fill(mask[None] == 0, -1).amax(dim=(0, 2))  # (B,)
        model.model.rope_deltas = (last + 1 - mask.sum(dim=1))[:, None]

    def decode_shift(self, model: nn.Module, real: Tensor, short_mask: Tensor) -> Tensor:
        return torch.zeros_like(short_mask[:, :1])  # positions continue from rope_deltas / generate()'s own

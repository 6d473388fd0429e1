"""LLaVA-OneVision / LLaVA-Video (``LlavaOnevisionForConditionalGeneration``): crops and video frames as rows.

Images: as LLaVA-NeXT, the base crop and every anyres tile are rows; a prompt with several images
(``batch_num_images`` > 1) gives one base row per image (the stock model does not tile them). An
image whose unpadded tile grid the stock model would shrink by interpolation (``anyres_max_9``) is
refused: its tokens are then mixtures of tile tokens, not rows of them.

Video: every frame is a row, so the budget is per frame; one ``image_newline`` ends every video (always
kept). Two poolings of a frame's ``s x s`` projected tokens (SigLIP-so400m/14 at 384: s = 27):

- ``"bilinear"`` (default, transformers' port): bilinear resize to ``ceil(s/2)^2`` = 14 x 14 = 196 tokens
  per frame, plus one newline per video (64 frames: 12,545 placeholders);
- ``"average"`` (the original LLaVA-Video and lmms-eval's ``llava_vid``): 2x2 average pooling to
  ``floor(s/2)^2`` = 13 x 13 = 169 tokens per frame (the paper's 64 x 169), plus the same one newline per
  video here. The prompt must then hold ``169 * frames + 1`` video placeholders, and even a budget that
  keeps whole frames runs the shortened prefill (the stock forward only knows bilinear pooling).
  Choose it with :func:`set_video_pooling`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .family import LAYOUT_TOKEN, Layout, VisualRows
from .llava import capture_projector
from .llava_next import LlavaNextFamily, tile_grid

POOLING_ATTR = "_script_prune_video_pooling"
POOLINGS = ("bilinear", "average")
FEATURE_KEYS = ("vision_feature_layer", "vision_feature_select_strategy")


def set_video_pooling(model: nn.Module, pooling: str) -> None:
    """Pool video frames with ``"bilinear"`` (transformers, 196 tokens) or ``"average"`` (LLaVA-Video, 169)."""
    if pooling not in POOLINGS:
        raise ValueError(f"video pooling must be one of {POOLINGS}, got {pooling!r}")
    model.__dict__[POOLING_ATTR] = pooling


def video_pooling(model: nn.Module) -> str:
    return model.__dict__.get(POOLING_ATTR, "bilinear")


def average_pool(tokens: Tensor) -> Tensor:
    """2x2 average pooling of square frames (F, s*s, D) -> (F, floor(s/2)^2, D)."""
    frames, count, dim = tokens.shape
    side = math.isqrt(count)
    grid = tokens.view(frames, side, side, dim).permute(0, 3, 1, 2)  # (F, D, s, s)
    return nn.functional.avg_pool2d(grid, 2).flatten(2).transpose(1, 2)  # (F, s'^2, D)


class LlavaOnevisionFamily(LlavaNextFamily):
    name = "llava_onevision"
    min_transformers = "5.24"  # 5.6 fails the family tests (hook points moved since)
    class_names = ("LlavaOnevisionForConditionalGeneration",)
    default_relevance = "llm_text"
    provides = ()
    merging = False
    visual_inputs = ("pixel_values", "pixel_values_videos")
    visual_keys = ("pixel_values", "image_sizes", "pixel_values_videos", "image_sizes_videos", "batch_num_images")

    def stock_layout(self, model: nn.Module) -> bool:
        return video_pooling(model) == "bilinear"

    def images_per_prompt(self, model: nn.Module, input_ids: Tensor) -> Tensor:
        raise ValueError(f"{self.name}: beam search / num_return_sequences with pixels is not supported by "
                         "script_prune.patch yet (per-prompt inputs batch_num_images / videos)")

    def vision_post_layernorm(self, model: nn.Module) -> nn.Module | None:
        return None  # rows hold LLM-space tokens only: relevance 'clip_text' is refused

    def side(self, model: nn.Module) -> int:
        vision = model.config.vision_config
        return vision.image_size // vision.patch_size

    def crop_tokens(self, model: nn.Module) -> int:
        """Tokens of one image crop: s*s SigLIP patches (no [CLS]; "default" drops the first)."""
        return self.side(model) ** 2 - (model.config.vision_feature_select_strategy == "default")

    def frame_tokens(self, model: nn.Module) -> int:
        half = self.side(model) / 2
        return (math.ceil(half) if video_pooling(model) == "bilinear" else math.floor(half)) ** 2

    def crops(self, model: nn.Module, call: dict[str, Any]) -> tuple[list[list[int]], list[int]]:
        """NeXT's crops per image, but one (the base) for images of a prompt holding several."""
        if call.get("pixel_values") is None:
            return [], []
        sizes, crops = super().crops(model, call)
        counts = call.get("batch_num_images")
        if counts is not None:
            single = [int(n) == 1 for n in torch.as_tensor(counts).tolist() for _ in range(int(n))]
            crops = [c if one else 1 for c, one in zip(crops, single)]
        return sizes, crops

    def images(self, model: nn.Module, call: dict[str, Any]) -> tuple[list[int], list[Tensor | None], list[int]]:
        """Crops, unpadded tile grid (CPU, None without tiles) and placeholder count of every image."""
        sizes, crops = self.crops(model, call)
        n = self.crop_tokens(model)
        newline = int(model.model.image_newline is not None)
        grids = [self.grid(model, size, n, torch.device("cpu")) if c > 1 else None for size, c in zip(sizes, crops)]
        counts = [n + (newline if g is None else g.shape[0] * (g.shape[1] + newline)) for g in grids]
        return crops, grids, counts

    def items(self, model: nn.Module, call: dict[str, Any]) -> list[tuple[str, int]]:
        """(kind, index within its kind) of every image / video, in sequence order (one host sync)."""
        config = model.config
        ids = call["input_ids"][self.placeholder_mask(model, call["input_ids"])].tolist()
        lengths = {"image": self.images(model, call)[2], "video": []}
        videos = call.get("pixel_values_videos")
        if videos is not None:
            lengths["video"] = [videos.shape[1] * self.frame_tokens(model) + 1] * videos.shape[0]
        out, position, taken = [], 0, {"image": 0, "video": 0}
        while position < len(ids):
            kind = "image" if ids[position] == config.image_token_id else "video"
            index = taken[kind]
            if index >= len(lengths[kind]):
                raise ValueError(f"the prompt holds more {kind} placeholder runs than {kind}s were given")
            taken[kind] += 1
            out.append((kind, index))
            position += lengths[kind][index]
        return out

    def row_lengths(self, model: nn.Module, call: dict[str, Any]) -> list[int]:
        _, crops = self.crops(model, call)
        videos = call.get("pixel_values_videos")
        frames = 0 if videos is None else videos.shape[1]
        return [n for kind, i in self.items(model, call)
                for n in ([self.crop_tokens(model)] * crops[i] if kind == "image" else [self.frame_tokens(model)] * frames)]

    def num_rows(self, model: nn.Module, call: dict[str, Any]) -> int:
        return len(self.row_lengths(model, call))

    def encode(self, model: nn.Module, call: dict[str, Any], needs: frozenset[str] = frozenset()) -> VisualRows:
        """Image crops and video frames, right-padded to one N, in sequence order."""
        kwargs = {key: call[key] for key in FEATURE_KEYS if call.get(key) is not None}
        pools: list[Tensor] = []
        if call.get("pixel_values") is not None:
            extra = {key: call[key] for key in ("image_sizes", "batch_num_images") if call.get(key) is not None}
            with capture_projector(model) as store:
                model.model.get_image_features(pixel_values=call["pixel_values"], **extra, **kwargs)
            pools.append(store["tokens"])  # (crops, n_i, D)
        videos = call.get("pixel_values_videos")
        if videos is not None:
            with capture_projector(model) as store:
                pooled = model.model.get_video_features(pixel_values_videos=videos, **kwargs).pooler_output
            frames = (pooled[:, :-1].reshape(-1, self.frame_tokens(model), pooled.shape[-1])
                      if video_pooling(model) == "bilinear" else average_pool(store["tokens"]))  # (V * F, n_f, D)
            pools.append(frames)
        device = pools[0].device
        width = max(p.shape[1] for p in pools)
        pool = torch.cat([nn.functional.pad(p, (0, 0, 0, width - p.shape[1])) for p in pools])  # (C + V * F, N, D)
        crops, grids, counts = self.images(model, call)
        first_video = sum(crops)
        starts = [sum(crops[:i]) for i in range(len(crops))]
        layout_items, order, lengths, row_image, image_lengths = [], [], [], [], []
        for item, (kind, i) in enumerate(self.items(model, call)):
            if kind == "image":
                n, grid = pools[0].shape[1], None if grids[i] is None else grids[i].to(device)
                rows = list(range(starts[i], starts[i] + crops[i]))
                image_lengths.append(counts[i])
            else:
                n, frames = self.frame_tokens(model), videos.shape[1]
                grid, rows = None, list(range(first_video + i * frames, first_video + (i + 1) * frames))
                image_lengths.append(frames * n + 1)
            layout_items.append((kind, len(order), len(rows), n, grid))
            order += rows
            lengths += [n] * len(rows)
            row_image += [item] * len(rows)
        tokens = pool[torch.tensor(order, device=device)]  # (R, N, D)
        as_tensor = lambda values: torch.tensor(values, device=device)  # noqa: E731
        return VisualRows(tokens, tokens, as_tensor(row_image), as_tensor(image_lengths), lengths=as_tensor(lengths),
                          extra={"items": layout_items})

    def grid(self, model: nn.Module, size: list[int], n: int, device: torch.device) -> Tensor:
        """NeXT's unpadded tile grid (flat ``tile * n + i``); refused where the stock model would interpolate it."""
        grid = tile_grid(model, size, n, device)
        limit = int(model.config.vision_aspect_ratio.removeprefix("anyres_max_"))
        if math.sqrt(grid.numel() / (limit * n)) > 1.1:
            raise ValueError(f"{self.name}: an image of size {list(size)} gives a tile grid the stock model shrinks "
                             f"by interpolation ({model.config.vision_aspect_ratio}); its tokens are not tile tokens, "
                             "so script_prune.patch cannot prune it by row (use a smaller image or fewer pinpoints)")
        return grid

    def layout(self, model: nn.Module, rows: VisualRows, keep: Tensor, merged: Tensor | None = None) -> Layout:
        """Per item: an image as NeXT (base row, the unpadded grid with a newline per row that keeps a token);
        a video as its frames in order, then one newline (always kept)."""
        r, width, d = rows.tokens.shape
        device = keep.device
        flat_keep = keep.reshape(-1)  # (R * N,)
        ids, kept, images = [], [], []
        for item, (kind, first, count, n, grid) in enumerate(rows.extra["items"]):
            body = (torch.arange(first, first + count, device=device)[:, None] * width
                    + torch.arange(n, device=device)[None])  # (count, n) flat ids of the item's rows
            if grid is None:  # base crop only, or a video's frames: then one newline
                cells = torch.cat([body.reshape(-1), body.new_full((1,), -1)])
                cells_kept = torch.cat([flat_keep[cells[:-1]], cells.new_ones(1, dtype=torch.bool)])
            else:
                tiles = (first + 1 + grid // n) * width + grid % n  # (H', W') flat ids of the tile tokens
                tiles_kept = flat_keep[tiles]
                tiles = torch.cat([tiles, tiles.new_full((tiles.shape[0], 1), -1)], dim=1)
                tiles_kept = torch.cat([tiles_kept, tiles_kept.any(dim=1, keepdim=True)], dim=1)
                cells = torch.cat([body[0], tiles.reshape(-1)])
                cells_kept = torch.cat([flat_keep[body[0]], tiles_kept.reshape(-1)])
            ids.append(cells)
            kept.append(cells_kept)
            images.append(torch.full_like(cells, item))
        ids_t = torch.cat(ids)  # (T,)
        mark, safe = ids_t < 0, ids_t.clamp(min=0)
        tokens = rows.tokens.reshape(-1, d)[safe]
        tokens = torch.where(mark[:, None], model.model.image_newline.to(tokens.dtype), tokens)
        return Layout(tokens, torch.cat(kept), torch.where(mark, LAYOUT_TOKEN, safe // width),
                      torch.where(mark, -1, safe % width), torch.cat(images))

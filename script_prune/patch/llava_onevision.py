"""LLaVA-OneVision / LLaVA-Video (``LlavaOnevisionForConditionalGeneration``): crops and video frames as rows.

Images: as LLaVA-NeXT, the base crop and every anyres tile are rows; a prompt with several images
(``batch_num_images`` > 1) gives one base row per image (the stock model does not tile them). An
image whose unpadded tile grid the stock model shrinks by bilinear interpolation (``anyres_max_9``: more
than 1.1^2 x 9 crops' worth of tokens) gives two rows: its base crop and the interpolated grid (its tokens
mix tile tokens, so the grid is one row, read from the stock packed features; the budget applies to it
as to any row, a fraction keeps the same share of it as of a crop).

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
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .family import LAYOUT_TOKEN, Layout, VisualRows
from .llava import capture_projector
from .llava_next import LlavaNextFamily, tile_grid

POOLING_ATTR = "_script_prune_video_pooling"
POOLINGS = ("bilinear", "average")
FEATURE_KEYS = ("vision_feature_layer", "vision_feature_select_strategy")


@dataclass
class ImageRows:
    """How one image becomes rows. crops: its pixel crops (base + tiles); lengths: tokens of each row;
    cells: (2, H', W') long, (row offset from the base row, index in that row) of every grid cell in the stock
    packed order, None for a base crop alone; shrunk: (H'', W'') when the stock model interpolates the unpadded
    tile grid (``anyres_max_K``: its rows are then the base crop and the interpolated grid), else None;
    placeholders: its placeholder tokens in the unpruned prompt."""

    crops: int
    lengths: list[int]
    cells: Tensor | None
    shrunk: tuple[int, int] | None
    placeholders: int


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
    missing = {
        "merging": "its layout places no merged tokens (anyres tile grids with newlines, video frames) - not "
                   "implemented",
        "attention": "SigLIP has no [CLS] token, so there is no [CLS] attention for VisionZip",
        "clip_text": "SigLIP's patch features have no CLIP post_layernorm / visual_projection joint space here, and "
                     "video frames are pooled after the projector",
    }
    visual_inputs = ("pixel_values", "pixel_values_videos")
    visual_keys = ("pixel_values", "image_sizes", "pixel_values_videos", "image_sizes_videos", "batch_num_images")

    def stock_layout(self, model: nn.Module) -> bool:
        return video_pooling(model) == "bilinear"

    def visual_blocks(self, model: nn.Module, call: dict[str, Any]) -> dict[str, tuple[list[int], list[int]]]:
        """One row per image (``pixel_values``, ``image_sizes``) and per video (``pixel_values_videos``,
        ``image_sizes_videos``) with the prompt of its placeholder run; ``batch_num_images``: one per prompt."""
        items = self.items(model, call)
        lengths = self.item_lengths(model, call, items)
        prompts = self.item_prompts(model, call["input_ids"], lengths)
        owner = {kind: [p for (k, _), p in zip(items, prompts) if k == kind] for kind in ("image", "video")}
        kinds = {"pixel_values": "image", "image_sizes": "image", "pixel_values_videos": "video",
                 "image_sizes_videos": "video"}
        out = {key: ([1] * len(owner[kind]), owner[kind]) for key, kind in kinds.items()
               if isinstance(call.get(key), Tensor)}
        if isinstance(call.get("batch_num_images"), Tensor):
            batch = call["input_ids"].shape[0]
            out["batch_num_images"] = ([1] * batch, list(range(batch)))
        return out

    def vision_post_layernorm(self, model: nn.Module) -> nn.Module | None:
        return None  # rows hold LLM-space tokens only: relevance 'clip_text' is refused (``missing``)

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

    def shrunk_shape(self, model: nn.Module, call: dict[str, Any], height: int, width: int) -> tuple[int, int] | None:
        """The (H'', W'') the stock model interpolates an unpadded tile grid of (height, width) tokens to
        (``anyres_max_K``: more than 1.1^2 x K crops' worth of tokens), None when it keeps the grid."""
        aspect = call.get("vision_aspect_ratio") or model.config.vision_aspect_ratio
        limit = int(aspect.removeprefix("anyres_max_"))
        ratio = math.sqrt(height * width / (limit * self.side(model) ** 2))
        return (int(height // ratio), int(width // ratio)) if ratio > 1.1 else None

    def images(self, model: nn.Module, call: dict[str, Any]) -> list[ImageRows]:
        """How every image becomes rows (host-side geometry, no vision tower)."""
        sizes, crops = self.crops(model, call)
        n = self.crop_tokens(model)
        out = []
        for size, count in zip(sizes, crops):
            if count == 1:  # base crop only, then one newline
                out.append(ImageRows(count, [n], None, None, n + 1))
                continue
            grid = tile_grid(model, size, n, torch.device("cpu"))  # (H', W') flat tile * n + i
            shrunk = self.shrunk_shape(model, call, *grid.shape)
            if shrunk is None:  # the tiles are rows; the grid picks (row offset, index) of each cell
                cells = torch.stack([1 + grid // n, grid % n])
                out.append(ImageRows(count, [n] * count, cells, None, n + grid.shape[0] * (grid.shape[1] + 1)))
            else:  # the interpolated grid is one row (row-major); its tokens mix tile tokens
                h, w = shrunk
                cells = torch.stack([torch.ones(h, w, dtype=torch.long), torch.arange(h * w).view(h, w)])
                out.append(ImageRows(count, [n, h * w], cells, shrunk, n + h * (w + 1)))
        return out

    def items(self, model: nn.Module, call: dict[str, Any]) -> list[tuple[str, int]]:
        """(kind, index within its kind) of every image / video, in sequence order (one host sync)."""
        config = model.config
        ids = call["input_ids"][self.placeholder_mask(model, call["input_ids"])].tolist()
        lengths = {"image": [image.placeholders for image in self.images(model, call)], "video": []}
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

    def item_lengths(self, model: nn.Module, call: dict[str, Any], items: list[tuple[str, int]]) -> list[int]:
        """Placeholder tokens of every item of ``items``."""
        images = self.images(model, call)
        videos = call.get("pixel_values_videos")
        frame_run = 0 if videos is None else videos.shape[1] * self.frame_tokens(model) + 1
        return [images[i].placeholders if kind == "image" else frame_run for kind, i in items]

    def row_lengths(self, model: nn.Module, call: dict[str, Any]) -> list[int]:
        images = self.images(model, call)
        videos = call.get("pixel_values_videos")
        frames = 0 if videos is None else videos.shape[1]
        return [n for kind, i in self.items(model, call)
                for n in (images[i].lengths if kind == "image" else [self.frame_tokens(model)] * frames)]

    def num_rows(self, model: nn.Module, call: dict[str, Any]) -> int:
        return len(self.row_lengths(model, call))

    def stock_images(self, model: nn.Module, call: dict[str, Any], images: list[ImageRows]) -> list[list[Tensor]]:
        """Every image's rows from the stock ``get_image_features``: its crops' projected tokens (the projector
        output), or for an interpolated grid the base crop and the grid's tokens read from the packed output."""
        kwargs = {key: call[key] for key in (*FEATURE_KEYS, "image_sizes", "batch_num_images", "vision_aspect_ratio")
                  if call.get(key) is not None}
        with capture_projector(model) as store:
            packed = model.model.get_image_features(pixel_values=call["pixel_values"], **kwargs).pooler_output
        crops = torch.split(store["tokens"], [image.crops for image in images])  # per image (c, n, D)
        out = []
        for image, tokens, flat in zip(images, crops, packed):
            if image.shrunk is None:
                out.append(list(tokens))
            else:  # packed: base crop, then H'' grid rows of W'' tokens and a newline each
                h, w = image.shrunk
                grid = flat[tokens.shape[1]:].view(h, w + 1, -1)[:, :w].reshape(h * w, -1)  # (H'' W'', D)
                out.append([tokens[0], grid])
        return out

    def encode(self, model: nn.Module, call: dict[str, Any], needs: frozenset[str] = frozenset()) -> VisualRows:
        """Image crops (or base crop + interpolated grid) and video frames, right-padded to one N, sequence order."""
        images = self.images(model, call)
        image_rows = self.stock_images(model, call, images) if images else []
        videos = call.get("pixel_values_videos")
        frames: list[Tensor] = []
        if videos is not None:
            kwargs = {key: call[key] for key in FEATURE_KEYS if call.get(key) is not None}
            with capture_projector(model) as store:
                pooled = model.model.get_video_features(pixel_values_videos=videos, **kwargs).pooler_output
            frames = list(pooled[:, :-1].reshape(-1, self.frame_tokens(model), pooled.shape[-1])
                          if video_pooling(model) == "bilinear" else average_pool(store["tokens"]))  # V * F x (n_f, D)
        rows: list[Tensor] = []
        layout_items, row_image, image_lengths = [], [], []
        for item, (kind, i) in enumerate(self.items(model, call)):
            if kind == "image":
                mine, cells = image_rows[i], images[i].cells
                image_lengths.append(images[i].placeholders)
            else:
                count = videos.shape[1]
                mine, cells = frames[i * count:(i + 1) * count], None
                image_lengths.append(count * self.frame_tokens(model) + 1)
            layout_items.append((len(rows), [r.shape[0] for r in mine], cells))
            rows += mine
            row_image += [item] * len(mine)
        tokens = nn.utils.rnn.pad_sequence(rows, batch_first=True)  # (R, N, D)
        device = tokens.device
        lengths = torch.tensor([r.shape[0] for r in rows], device=device)
        return VisualRows(tokens, tokens, torch.tensor(row_image, device=device),
                          torch.tensor(image_lengths, device=device), lengths=lengths, extra={"items": layout_items})

    def layout(self, model: nn.Module, rows: VisualRows, keep: Tensor, merged: Tensor | None = None) -> Layout:
        """Per item: an image as NeXT (base row, then its grid row-major with a newline per grid row that keeps a
        token; an interpolated grid is one row laid out the same way); a base crop alone or a video's frames in
        order, then one newline (always kept)."""
        r, width, d = rows.tokens.shape
        device = keep.device
        flat_keep = keep.reshape(-1)  # (R * N,)
        ids, kept, images = [], [], []
        for item, (first, lengths, cells) in enumerate(rows.extra["items"]):
            if cells is None:  # base crop only, or a video's frames: then one newline
                body = torch.cat([torch.arange(n, device=device) + (first + j) * width for j, n in enumerate(lengths)])
                grid = body.new_full((1, 1), -1)
                grid_kept = torch.ones(1, 1, dtype=torch.bool, device=device)
            else:
                body = torch.arange(lengths[0], device=device) + first * width
                grid = (first + cells[0].to(device)) * width + cells[1].to(device)  # (H', W') flat ids of the cells
                grid_kept = flat_keep[grid]
                grid = torch.cat([grid, grid.new_full((grid.shape[0], 1), -1)], dim=1)
                grid_kept = torch.cat([grid_kept, grid_kept.any(dim=1, keepdim=True)], dim=1)
            cells_ids = torch.cat([body, grid.reshape(-1)])
            ids.append(cells_ids)
            kept.append(torch.cat([flat_keep[body], grid_kept.reshape(-1)]))
            images.append(torch.full_like(cells_ids, item))
        ids_t = torch.cat(ids)  # (T,)
        mark, safe = ids_t < 0, ids_t.clamp(min=0)
        tokens = rows.tokens.reshape(-1, d)[safe]
        tokens = torch.where(mark[:, None], model.model.image_newline.to(tokens.dtype), tokens)
        return Layout(tokens, torch.cat(kept), torch.where(mark, LAYOUT_TOKEN, safe // width),
                      torch.where(mark, -1, safe % width), torch.cat(images))

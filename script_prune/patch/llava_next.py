"""LLaVA-NeXT layout (``LlavaNextForConditionalGeneration``): anyres crops as rows.

Every image gives a base row and one row per anyres tile (each N tokens, the budget applies per
row). The tiles' kept tokens are placed on the tile grid, the grid is unpadded as transformers
does (its own ``unpad_image`` on a grid of token positions), and one ``image_newline`` ends every
grid row that still holds a kept token. An image with no tiles keeps its base row plus one newline.
Kept tile tokens that fall in the unpadded-away border never reach the LLM (nor do they unpruned).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
    unpad_image,
)

from .family import LAYOUT_TOKEN, Layout, VisualRows, device_index, read_once
from .llava import LlavaFamily, projected_rows


def tile_grid(model: nn.Module, size: list[int], n: int, device: torch.device) -> Tensor:
    """Flat positions ``tile * n + i`` of the unpadded tile grid of one image of ``size`` [height, width]
    -> (H', W') long."""
    config = model.config
    side = config.vision_config.image_size // config.vision_config.patch_size
    grid_h, grid_w = get_anyres_image_grid_shape(size, config.image_grid_pinpoints, config.vision_config.image_size)
    cell = torch.arange(grid_h * grid_w * n, device=device).view(grid_h, grid_w, side, side)  # (tile row, col, i, j)
    grid = cell.permute(0, 2, 1, 3).reshape(1, grid_h * side, grid_w * side)
    return unpad_image(grid, size)[0]


class LlavaNextFamily(LlavaFamily):
    """LLaVA's vision side and projector (inherited) with anyres crops as rows and NeXT's layout."""

    name = "llava_next"
    class_names = ("LlavaNextForConditionalGeneration",)

    def crops(self, model: nn.Module, call: dict[str, Any]) -> tuple[list[list[int]], list[int]]:
        """Image sizes [height, width] on the host (one read of ``image_sizes`` per prefill) and the crops (base +
        tiles) of every image."""
        sizes = call.get("image_sizes")
        if sizes is None:
            raise ValueError("LlavaNextForConditionalGeneration needs image_sizes with pixel_values")
        host = read_once(("image_sizes", id(sizes)), sizes.tolist) if isinstance(sizes, Tensor) else sizes
        sizes = [list(s) for s in host]
        crops = [image_size_to_num_patches(s, model.config.image_grid_pinpoints,
                                           model.config.vision_config.image_size) for s in sizes]
        return sizes, crops

    def num_rows(self, model: nn.Module, call: dict[str, Any]) -> int:
        return sum(self.crops(model, call)[1])

    def encode(self, model: nn.Module, call: dict[str, Any], needs: frozenset[str] = frozenset()) -> VisualRows:
        sizes, crops = self.crops(model, call)
        features, tokens, inputs = projected_rows(model, call, needs)  # (R, N, C), (R, N, D) over all crops
        n = tokens.shape[1]
        grids = [tile_grid(model, s, n, tokens.device) if c > 1 else None for s, c in zip(sizes, crops)]
        newline = int(model.model.image_newline is not None)
        lengths = [n + (newline if g is None else g.shape[0] * (g.shape[1] + newline)) for g in grids]
        device = tokens.device
        row_image = device_index([image for image, c in enumerate(crops) for _ in range(c)], device)  # (R,)
        return VisualRows(tokens, features, row_image, device_index(lengths, device), inputs=inputs,
                          extra={"crops": crops, "grids": grids})

    def layout(self, model: nn.Module, rows: VisualRows, keep: Tensor, merged: Tensor | None = None) -> Layout:
        """Per image: base row tokens (+ its merged tokens), then the unpadded tile grid row-major with a newline
        per non-empty grid row, then the tiles' merged tokens in tile order."""
        r, n, d = rows.tokens.shape
        e = 0 if merged is None else merged.shape[1]
        newline = model.model.image_newline
        flat_keep = keep.reshape(-1)  # (R * N,)
        merged_ids = torch.arange(r * n, r * n + r * e, device=keep.device).view(r, e)  # ids of merged tokens
        ids, kept, images = [], [], []  # per image: ids into tokens ++ merged, -1 for a newline; kept flags
        start = 0
        for image, (crops, grid) in enumerate(zip(rows.extra["crops"], rows.extra["grids"])):
            base = torch.arange(start * n, (start + 1) * n, device=keep.device)
            if grid is None:  # base only: its row, then one newline
                cells = base.new_full((1, int(newline is not None)), -1)
                cells_kept = torch.ones_like(cells, dtype=torch.bool)
            else:
                cells = grid + (start + 1) * n  # (H', W') flat ids of the tile tokens
                cells_kept = flat_keep[cells]
                if newline is not None:
                    cells = torch.cat([cells, cells.new_full((cells.shape[0], 1), -1)], dim=1)
                    cells_kept = torch.cat([cells_kept, cells_kept.any(dim=1, keepdim=True)], dim=1)
            tile_merged = merged_ids[start + 1: start + crops].reshape(-1)
            parts = [base, merged_ids[start], cells.reshape(-1), tile_merged]
            ids += parts
            kept += [flat_keep[base], torch.ones(e, dtype=torch.bool, device=keep.device), cells_kept.reshape(-1),
                     torch.ones_like(tile_merged, dtype=torch.bool)]
            images.append(torch.full((sum(p.shape[0] for p in parts),), image, device=keep.device))
            start += crops
        ids_t = torch.cat(ids)  # (T',)
        pool = rows.tokens.reshape(-1, d)
        if merged is not None:
            pool = torch.cat([pool, merged.reshape(-1, d).to(pool.dtype)])
        mark, safe = ids_t < 0, ids_t.clamp(min=0)
        tokens = pool[safe]  # (T', D)
        if newline is not None:
            tokens = torch.where(mark[:, None], newline.to(tokens.dtype), tokens)
        own = ~mark & (safe < r * n)  # a token of a row (not a newline, not merged)
        return Layout(tokens, torch.cat(kept), torch.where(own, safe // n, LAYOUT_TOKEN),
                      torch.where(own, safe % n, -1), torch.cat(images))

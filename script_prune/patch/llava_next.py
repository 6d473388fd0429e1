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

from .family import LAYOUT_TOKEN, Family, Layout, VisualRows
from .llava import projected_rows, tokens_per_crop


def tile_grid(model: nn.Module, image_size: Tensor, n: int) -> Tensor:
    """Flat positions ``tile * n + i`` of the unpadded tile grid of one image -> (H', W') long (CPU)."""
    config = model.config
    side = config.vision_config.image_size // config.vision_config.patch_size
    size = image_size.tolist()
    grid_h, grid_w = get_anyres_image_grid_shape(size, config.image_grid_pinpoints, config.vision_config.image_size)
    cell = torch.arange(grid_h * grid_w * n).view(grid_h, grid_w, side, side)  # (tile row, tile col, i, j)
    grid = cell.permute(0, 2, 1, 3).reshape(1, grid_h * side, grid_w * side)
    return unpad_image(grid, size)[0]


class LlavaNextFamily(Family):
    name = "llava_next"
    class_names = ("LlavaNextForConditionalGeneration",)

    def row_length(self, model: nn.Module) -> int:
        return tokens_per_crop(model)

    def crops(self, model: nn.Module, call: dict[str, Any]) -> tuple[Tensor, list[int]]:
        """Image sizes (I, 2) (height, width) on the CPU and the crops (base + tiles) of every image."""
        sizes = call.get("image_sizes")
        if sizes is None:
            raise ValueError("LlavaNextForConditionalGeneration needs image_sizes with pixel_values")
        sizes = torch.as_tensor(sizes).cpu()
        crops = [image_size_to_num_patches(s.tolist(), model.config.image_grid_pinpoints,
                                           model.config.vision_config.image_size) for s in sizes]
        return sizes, crops

    def num_rows(self, model: nn.Module, call: dict[str, Any]) -> int:
        return sum(self.crops(model, call)[1])

    def encode(self, model: nn.Module, call: dict[str, Any]) -> VisualRows:
        sizes, crops = self.crops(model, call)
        features, tokens = projected_rows(model, call)  # (R, N, C), (R, N, D) over all crops of all images
        n = tokens.shape[1]
        grids = [tile_grid(model, s, n) if c > 1 else None for s, c in zip(sizes, crops)]
        newline = int(model.model.image_newline is not None)
        lengths = [n + (newline if g is None else g.shape[0] * (g.shape[1] + newline)) for g in grids]
        device = tokens.device
        row_image = torch.repeat_interleave(torch.arange(len(crops)), torch.tensor(crops)).to(device)
        return VisualRows(tokens, features, row_image, torch.tensor(lengths, device=device),
                          extra={"crops": crops, "grids": grids})

    def layout(self, model: nn.Module, rows: VisualRows, keep: Tensor) -> Layout:
        """Per image: base row tokens, then the unpadded tile grid row-major with a newline per non-empty row."""
        n, d = rows.row_length, rows.tokens.shape[2]
        device = rows.tokens.device
        newline = model.model.image_newline
        flat_tokens, flat_keep = rows.tokens.reshape(-1, d), keep.reshape(-1)  # (R * N, D), (R * N,)
        parts: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
        start = 0
        for crops, grid in zip(rows.extra["crops"], rows.extra["grids"]):
            base = torch.arange(start * n, (start + 1) * n, device=device)  # flat ids in (R * N)
            ids = [base]
            marks = [torch.zeros(n, dtype=torch.bool, device=device)]
            mark_kept = [flat_keep[base]]
            if grid is None:
                if newline is not None:
                    ids.append(base[:1])
                    marks.append(torch.ones(1, dtype=torch.bool, device=device))
                    mark_kept.append(torch.ones(1, dtype=torch.bool, device=device))
            else:
                cells = grid.to(device) + (start + 1) * n  # (H', W') flat ids of the tile tokens
                kept_cells = flat_keep[cells]  # (H', W')
                if newline is not None:
                    cells = torch.cat([cells, cells[:, :1]], dim=1)
                    kept_cells = torch.cat([kept_cells, kept_cells.any(dim=1, keepdim=True)], dim=1)
                is_mark = torch.zeros_like(cells, dtype=torch.bool)
                if newline is not None:
                    is_mark[:, -1] = True
                ids.append(cells.reshape(-1))
                marks.append(is_mark.reshape(-1))
                mark_kept.append(kept_cells.reshape(-1))
            ids_t, marks_t = torch.cat(ids), torch.cat(marks)
            tokens = torch.where(marks_t[:, None], newline.to(flat_tokens.dtype) if newline is not None
                                 else flat_tokens[ids_t], flat_tokens[ids_t])
            row = torch.where(marks_t, LAYOUT_TOKEN, ids_t // n)
            index = torch.where(marks_t, -1, ids_t % n)
            parts.append((tokens, torch.cat(mark_kept), row, index))
            start += crops
        return Layout(*(torch.cat(p) for p in zip(*parts)))

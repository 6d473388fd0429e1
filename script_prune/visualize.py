"""Pictures of what a pruning method keeps: heat maps and kept-token masks on the patch grid.

Draws from an image, score vectors and index lists only (no model; never imports ``llava``).
Every panel is composited as an RGB array with numpy first (dropped patches dimmed, heat maps
alpha-blended) and then placed pixel-for-pixel in one PNG, so what is drawn can be read back:
:func:`render_panels` returns each panel's pixel box in the saved file.

Token order convention: token ``i`` of an ``(h, w)`` grid sits at row ``i // w``, column ``i % w``
(row-major, as the ViT flattens patches). For LLaVA-NeXT, crop 0 is the base image (the whole
image resized to one crop) and crops ``1..cols*rows`` are the tiles of the high-resolution view
in row-major tile order; :func:`tiles_to_grid` assembles the tiles into one grid over the image.

matplotlib is imported lazily (``pip install matplotlib``, extra ``[viz]``).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

DIM_FACTOR = 0.25  # brightness left on dropped patches
HEAT_ALPHA = 0.55  # weight of the colour map over the image
TITLE_PX = 34  # room above each panel for its title
GAP_PX = 8


def _require_matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "script_prune.visualize needs matplotlib: pip install matplotlib "
            "(or pip install 'script-prune[viz]')"
        ) from err
    return plt


def _to_numpy(x: Any, name: str) -> np.ndarray:
    """Tensor / array / list -> numpy array (detached, on CPU)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().float().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"{name} must be array-like, got {type(x).__name__}") from err


def _check_grid_hw(grid_hw: Sequence[int]) -> tuple[int, int]:
    if len(grid_hw) != 2 or any(int(v) != v or v < 1 for v in grid_hw):
        raise ValueError(f"grid_hw must be two positive ints (rows, cols), got {grid_hw!r}")
    return int(grid_hw[0]), int(grid_hw[1])


def kept_mask(indices: Any, grid_hw: Sequence[int]) -> np.ndarray:
    """Boolean (h, w) mask of the kept tokens; ``indices`` are flat row-major token indices."""
    h, w = _check_grid_hw(grid_hw)
    idx = _to_numpy(indices, "indices").reshape(-1)
    if idx.size and not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"indices must be integers, got dtype {idx.dtype}")
    if idx.size and (idx.min() < 0 or idx.max() >= h * w):
        raise ValueError(f"indices must lie in [0, {h * w}) for grid_hw={(h, w)}, got range "
                         f"[{idx.min()}, {idx.max()}]")
    mask = np.zeros(h * w, dtype=bool)
    mask[idx.astype(np.int64)] = True
    return mask.reshape(h, w)


def score_grid(scores: Any, grid_hw: Sequence[int], normalize: bool = True) -> np.ndarray:
    """(N,) scores -> (h, w) float grid, min-max normalised to [0, 1] when ``normalize``."""
    h, w = _check_grid_hw(grid_hw)
    s = _to_numpy(scores, "scores").astype(np.float64).reshape(-1)
    if s.size != h * w:
        raise ValueError(f"scores must have {h * w} values for grid_hw={(h, w)}, got {s.size}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    if normalize:
        lo, hi = s.min(), s.max()
        s = (s - lo) / (hi - lo) if hi > lo else np.zeros_like(s)
    return s.reshape(h, w)


def tiles_to_grid(per_tile: Any, tile_grid: Sequence[int], tokens_per_side: int) -> np.ndarray:
    """Assemble per-tile token values into one grid over the tiled image.

    per_tile: (cols*rows, P*P) values (bool or float), tiles in row-major tile order, tokens
    row-major inside a tile. tile_grid: (cols, rows) as LLaVA's ``get_anyres_image_grid_shape``
    returns it. Returns (rows*P, cols*P)."""
    cols, rows = _check_grid_hw(tile_grid)
    p = int(tokens_per_side)
    v = _to_numpy(per_tile, "per_tile")
    if v.shape != (cols * rows, p * p):
        raise ValueError(f"per_tile must have shape ({cols * rows}, {p * p}) for tile_grid={(cols, rows)} "
                         f"and tokens_per_side={p}, got {tuple(v.shape)}")
    # (rows, cols, P, P) -> (rows, P, cols, P) -> (rows*P, cols*P)
    return v.reshape(rows, cols, p, p).transpose(0, 2, 1, 3).reshape(rows * p, cols * p)


def _as_rgb_image(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = _to_numpy(image, "image")
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3):
        raise ValueError(f"image must be a PIL image or an (H, W, 3) / (3, H, W) array, got shape {arr.shape}")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if np.issubdtype(arr.dtype, np.floating):
        arr = np.clip(arr * 255.0 if arr.max() <= 1.0 else arr, 0, 255)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def fit_image(image: Any, size_wh: tuple[int, int]) -> np.ndarray:
    """Resize (squash) an image to ``size_wh``; returns (H, W, 3) uint8."""
    return np.asarray(_as_rgb_image(image).resize(size_wh, Image.BICUBIC), dtype=np.uint8)


def pad_to_canvas(image: Any, size_wh: tuple[int, int]) -> np.ndarray:
    """Resize keeping the aspect ratio and centre it on a black canvas of ``size_wh`` (how
    LLaVA-NeXT fits an image to its best resolution before cutting tiles)."""
    img = _as_rgb_image(image)
    cw, ch = size_wh
    scale = min(cw / img.width, ch / img.height)
    nw, nh = max(1, min(cw, round(img.width * scale))), max(1, min(ch, round(img.height * scale)))
    canvas = Image.new("RGB", (cw, ch), (0, 0, 0))
    canvas.paste(img.resize((nw, nh), Image.BICUBIC), ((cw - nw) // 2, (ch - nh) // 2))
    return np.asarray(canvas, dtype=np.uint8)


def _upsample(grid: np.ndarray, shape_hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour upsampling of an (h, w) grid to exactly ``shape_hw`` pixels."""
    h, w = grid.shape
    rows = (np.arange(shape_hw[0]) * h // shape_hw[0]).clip(0, h - 1)
    cols = (np.arange(shape_hw[1]) * w // shape_hw[1]).clip(0, w - 1)
    return grid[rows[:, None], cols[None, :]]


def compose_kept(image_rgb: np.ndarray, mask: np.ndarray, dim: float = DIM_FACTOR) -> np.ndarray:
    """Image with dropped patches dimmed to ``dim`` brightness; kept patches unchanged."""
    keep = _upsample(mask.astype(bool), image_rgb.shape[:2])
    factor = np.where(keep, 1.0, dim)[..., None]
    return (image_rgb.astype(np.float64) * factor).round().astype(np.uint8)


def compose_heatmap(image_rgb: np.ndarray, grid: np.ndarray, alpha: float = HEAT_ALPHA,
                    cmap: str = "jet") -> np.ndarray:
    """Image alpha-blended with a colour map of a [0, 1] grid (red high, blue low with 'jet')."""
    plt = _require_matplotlib()
    colours = plt.get_cmap(cmap)(_upsample(np.clip(grid, 0, 1), image_rgb.shape[:2]))[..., :3] * 255.0
    out = (1 - alpha) * image_rgb.astype(np.float64) + alpha * colours
    return out.round().clip(0, 255).astype(np.uint8)


@dataclass
class Panel:
    """One picture of the figure: an (H, W, 3) uint8 image and the (h, w) grid it shows."""

    title: str
    pixels: np.ndarray
    grid: np.ndarray  # bool mask (kind "kept") or [0, 1] floats (kind "heat")
    kind: str  # "kept" | "heat" | "image"
    bbox: tuple[int, int, int, int] | None = None  # (left, top, width, height) in the saved PNG


@dataclass
class FigureResult:
    """What was drawn: the PNG path and the panels, with their pixel boxes in the PNG."""

    path: str
    panels: list[Panel] = field(default_factory=list)
    size_wh: tuple[int, int] = (0, 0)

    def panel(self, title: str) -> Panel:
        for p in self.panels:
            if p.title == title:
                return p
        raise KeyError(f"no panel titled {title!r}; have {[p.title for p in self.panels]}")


def render_panels(panels: Sequence[Panel], out_path: str | os.PathLike, ncols: int | None = None,
                  suptitle: str | None = None, dpi: int = 100) -> FigureResult:
    """Place panels on a grid (row-major, ``ncols`` per row) at 1:1 pixel scale and save one PNG.

    The file is written to a temporary name and moved into place (never half-written)."""
    if not panels:
        raise ValueError("panels must be a non-empty sequence")
    plt = _require_matplotlib()
    ncols = len(panels) if ncols is None else int(ncols)
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    nrows = -(-len(panels) // ncols)
    col_w = [max(p.pixels.shape[1] for p in panels[c::ncols]) for c in range(ncols)]
    row_h = [max(p.pixels.shape[0] for p in panels[r * ncols:(r + 1) * ncols]) for r in range(nrows)]
    top_px = TITLE_PX if suptitle else 0
    fig_w = sum(col_w) + GAP_PX * (ncols + 1)
    fig_h = top_px + sum(h + TITLE_PX for h in row_h) + GAP_PX * (nrows + 1)
    fig = plt.figure(figsize=(fig_w / dpi, fig_h / dpi), dpi=dpi)
    try:
        if suptitle:
            fig.text(0.5, 1 - (TITLE_PX / 2) / fig_h, suptitle, ha="center", va="center", fontsize=10)
        placed = []
        for k, p in enumerate(panels):
            r, c = divmod(k, ncols)
            left = GAP_PX * (c + 1) + sum(col_w[:c])
            top = top_px + GAP_PX * (r + 1) + sum(row_h[:r]) + TITLE_PX * (r + 1)
            ph, pw = p.pixels.shape[:2]
            ax = fig.add_axes((left / fig_w, 1 - (top + ph) / fig_h, pw / fig_w, ph / fig_h))
            ax.imshow(p.pixels, interpolation="nearest", aspect="auto")
            ax.set_axis_off()
            fig.text((left + pw / 2) / fig_w, 1 - (top - TITLE_PX / 2) / fig_h, p.title,
                     ha="center", va="center", fontsize=8)
            placed.append(Panel(p.title, p.pixels, p.grid, p.kind, (left, top, pw, ph)))
        out_path = os.fspath(out_path)
        out_dir = os.path.dirname(os.path.abspath(out_path))
        os.makedirs(out_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".png", dir=out_dir)
        os.close(fd)
        try:
            fig.savefig(tmp, dpi=dpi, format="png")
            os.replace(tmp, out_path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    finally:
        plt.close(fig)
    return FigureResult(out_path, placed, (fig_w, fig_h))


def _panel_size(grid_hw: tuple[int, int], panel_px: int) -> tuple[int, int]:
    """(W, H) pixels with a whole number of pixels per patch, longest side about ``panel_px``."""
    cell = max(4, panel_px // max(grid_hw))
    return grid_hw[1] * cell, grid_hw[0] * cell


def _kept_title(name: str, n_kept: int, n_merged: int) -> str:
    return f"{name}: {n_kept} kept" + (f" + {n_merged} merged" if n_merged else "")


def pruning_figure(image: Any, grid_hw: Sequence[int], kept: Mapping[str, Any], out_path: str | os.PathLike,
                   relevance: Any = None, redundancy: Any = None, merged: Mapping[str, int] | None = None,
                   query: str | None = None, panel_px: int = 336, ncols: int | None = None) -> FigureResult:
    """One PNG for a single-crop model (LLaVA-1.5): the image, (a) query-relevance heat map,
    (b) GSP redundancy map, (c) the kept tokens of each method (dropped patches dimmed).

    kept: method name -> flat token indices on ``grid_hw``; merged: method -> number of extra
    merged tokens (shown in the title, they have no position); relevance / redundancy: (N,) scores."""
    hw = _check_grid_hw(grid_hw)
    if not kept and relevance is None and redundancy is None:
        raise ValueError("pass at least one of kept, relevance, redundancy")
    base = fit_image(image, _panel_size(hw, panel_px))
    panels = [Panel("image", base, np.ones(hw, dtype=bool), "image")]
    if relevance is not None:
        g = score_grid(relevance, hw)
        panels.append(Panel("query relevance", compose_heatmap(base, g), g, "heat"))
    if redundancy is not None:
        g = score_grid(redundancy, hw)
        panels.append(Panel("GSP redundancy", compose_heatmap(base, g), g, "heat"))
    merged = merged or {}
    for name, idx in kept.items():
        m = kept_mask(idx, hw)
        panels.append(Panel(_kept_title(name, int(m.sum()), merged.get(name, 0)), compose_kept(base, m), m, "kept"))
    title = f"query: {query}" if query else None
    return render_panels(panels, out_path, ncols=ncols, suptitle=title)


def next_crops_figure(image: Any, tile_grid: Sequence[int], tokens_per_side: int, kept: Mapping[str, Any],
                      out_path: str | os.PathLike, relevance: Any = None, redundancy: Any = None,
                      merged: Mapping[str, int] | None = None, query: str | None = None,
                      panel_px: int = 336, tiles_image: Any = None) -> FigureResult:
    """One PNG for LLaVA-NeXT: top row the base crop, bottom row the tiles assembled over the
    image (fitted to the tile canvas as LLaVA-NeXT does), one column per map / method.

    tile_grid: (cols, rows) of tiles; kept: method -> per-crop index lists (1 + cols*rows lists,
    crop 0 = base; a (crops, k) array works too); relevance / redundancy: (crops, P*P) scores.
    tiles_image: the image exactly as tiled (e.g. LLaVA's resize-and-pad to the best resolution); by
    default ``image`` is fitted to the tile canvas here (aspect kept, black padding, centred)."""
    cols, rows = _check_grid_hw(tile_grid)
    p = int(tokens_per_side)
    if p < 1:
        raise ValueError(f"tokens_per_side must be >= 1, got {tokens_per_side}")
    n_crops = 1 + cols * rows
    base_hw, tiles_hw = (p, p), (rows * p, cols * p)
    base_img = fit_image(image, _panel_size(base_hw, panel_px))
    tiles_img = pad_to_canvas(image if tiles_image is None else tiles_image,
                              _panel_size(tiles_hw, panel_px * max(cols, rows)))
    top = [Panel("base crop", base_img, np.ones(base_hw, dtype=bool), "image")]
    bottom = [Panel(f"tiles {cols}x{rows}", tiles_img, np.ones(tiles_hw, dtype=bool), "image")]

    def per_crop(values: Any, name: str) -> list[Any]:
        seq = list(values) if not hasattr(values, "shape") else [values[i] for i in range(values.shape[0])]
        if len(seq) != n_crops:
            raise ValueError(f"{name} must have one entry per crop ({n_crops} = 1 base + {cols}x{rows} tiles), "
                             f"got {len(seq)}")
        return seq

    for label, scores in (("query relevance", relevance), ("GSP redundancy", redundancy)):
        if scores is None:
            continue
        crops = per_crop(scores, label)
        gb = score_grid(crops[0], base_hw)
        tiles = np.stack([score_grid(c, (p, p), normalize=False) for c in crops[1:]])
        gt = tiles_to_grid(tiles.reshape(cols * rows, p * p), (cols, rows), p)
        gt = score_grid(gt.reshape(-1), tiles_hw)  # normalise over the whole tiled image
        top.append(Panel(f"{label} (base)", compose_heatmap(base_img, gb), gb, "heat"))
        bottom.append(Panel(f"{label} (tiles)", compose_heatmap(tiles_img, gt), gt, "heat"))
    merged = merged or {}
    for name, idx in kept.items():
        crops = per_crop(idx, f"kept[{name!r}]")
        mb = kept_mask(crops[0], base_hw)
        mt = tiles_to_grid(np.stack([kept_mask(c, (p, p)).reshape(-1) for c in crops[1:]]), (cols, rows), p)
        n_total = int(mb.sum() + mt.sum())
        top.append(Panel(f"{name} (base)", compose_kept(base_img, mb), mb, "kept"))
        bottom.append(Panel(_kept_title(f"{name} (tiles)", n_total, merged.get(name, 0)) + " in all",
                            compose_kept(tiles_img, mt), mt, "kept"))
    title = f"query: {query}" if query else None
    return render_panels(top + bottom, out_path, ncols=len(top), suptitle=title)


# --------------------------------------------------------------------------- Fig. 9: redundancy across thresholds

#: The thresholds of the paper's Fig. 9 (App. E, "Redundancy Visualization Across Thresholds").
FIG9_TAUS = (0.1, 0.3, 0.5, 0.7, 0.9)
MASK_RED = (220, 40, 40)  # redundant patches (r >= tau)
MASK_BLUE = (40, 90, 220)  # distinctive patches (r < tau)
MASK_ALPHA = 0.5


def compose_mask(image_rgb: np.ndarray, mask: np.ndarray, alpha: float = MASK_ALPHA) -> np.ndarray:
    """Image tinted red where ``mask`` is True and blue elsewhere (Fig. 9's colours). (H, W, 3) uint8."""
    up = _upsample(mask.astype(bool), image_rgb.shape[:2])[..., None]
    colours = np.where(up, np.array(MASK_RED, dtype=np.float64), np.array(MASK_BLUE, dtype=np.float64))
    out = (1 - alpha) * image_rgb.astype(np.float64) + alpha * colours
    return out.round().clip(0, 255).astype(np.uint8)


def threshold_masks(redundancy: Any, grid_hw: Sequence[int], taus: Sequence[float] = FIG9_TAUS) -> dict[float, np.ndarray]:
    """Binary masks ``r >= tau`` (redundant patches) of a (N,) redundancy map, one (h, w) bool per tau."""
    g = score_grid(redundancy, grid_hw, normalize=False)
    return {float(t): g >= float(t) for t in taus}


def redundancy_threshold_figure(image: Any, grid_hw: Sequence[int], redundancy: Any, out_path: str | os.PathLike,
                                taus: Sequence[float] = FIG9_TAUS, title: str | None = None,
                                panel_px: int = 240) -> FigureResult:
    """Fig. 9 for one image: the image, the redundancy heat map and one binary mask per ``tau``.

    redundancy: (N,) per-patch redundancy in [-1, 1] (mean cosine with the 8-connected neighbours,
    ``script_prune.redundancy.neighbour_mean_similarity``). The heat map uses the absolute scale
    [0, 1] (jet: red = 1, blue = 0; negative values as 0), so its colours and the masks read alike;
    mask panels tint the redundant patches (``r >= tau``) red and the others blue.
    """
    hw = _check_grid_hw(grid_hw)
    if not taus:
        raise ValueError("taus must be a non-empty sequence of thresholds")
    raw = score_grid(redundancy, hw, normalize=False)
    base = fit_image(image, _panel_size(hw, panel_px))
    panels = [Panel("image", base, np.ones(hw, dtype=bool), "image"),
              Panel(f"r: blue 0 .. red 1 (min {raw.min():.2f}, max {raw.max():.2f})",
                    compose_heatmap(base, np.clip(raw, 0.0, 1.0)), raw, "heat")]
    n = hw[0] * hw[1]
    for tau, mask in threshold_masks(redundancy, hw, taus).items():
        panels.append(Panel(f"tau={tau:g}: {int(mask.sum())}/{n} redundant", compose_mask(base, mask), mask, "kept"))
    return render_panels(panels, out_path, ncols=len(panels), suptitle=title)

"""Pictures: the kept-token mask drawn in the saved PNG (read back pixel by pixel) equals the
selected indices; LLaVA-NeXT tiles land where the tile layout says; the CLI runs from saved
tensors and from a tiny checkpoint."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from script_prune import visualize as V

COLOUR = (200, 180, 160)  # a uniform image makes "kept" vs "dimmed" unambiguous in the PNG


def _uniform_image(w: int, h: int) -> Image.Image:
    return Image.new("RGB", (w, h), COLOUR)


def _read_back(png_path, bbox, grid_hw) -> np.ndarray:
    """Independent read-back: sample the PNG at each patch centre of the panel box and call the
    patch kept when the pixel is closer to the image colour than to its dimmed colour."""
    img = np.asarray(Image.open(png_path).convert("RGB"), dtype=np.float64)
    left, top, width, height = bbox
    h, w = grid_hw
    mask = np.zeros((h, w), dtype=bool)
    ref = np.array(COLOUR, dtype=np.float64)
    for r in range(h):
        for c in range(w):
            y = int(top + (r + 0.5) * height / h)
            x = int(left + (c + 0.5) * width / w)
            px = img[y, x]
            mask[r, c] = np.abs(px - ref).sum() < np.abs(px - V.DIM_FACTOR * ref).sum()
    return mask


def _mask_from_indices(indices, h, w) -> np.ndarray:
    mask = np.zeros((h, w), dtype=bool)
    for i in indices:
        mask[i // w, i % w] = True
    return mask


def test_kept_mask_row_major_and_bad_input():
    m = V.kept_mask(torch.tensor([0, 5, 11]), (3, 4))
    assert m.shape == (3, 4)
    assert m.sum() == 3 and m[0, 0] and m[1, 1] and m[2, 3]
    with pytest.raises(ValueError, match="indices"):
        V.kept_mask([12], (3, 4))
    with pytest.raises(ValueError, match="grid_hw"):
        V.kept_mask([0], (0, 4))


def test_drawn_mask_equals_selected_indices(tmp_path):
    h = w = 6
    gen = torch.Generator().manual_seed(0)
    kept = {
        "script": torch.randperm(h * w, generator=gen)[:9].sort().values,
        "random": torch.randperm(h * w, generator=gen)[:5].sort().values,
    }
    out = tmp_path / "fig.png"
    res = V.pruning_figure(_uniform_image(120, 90), (h, w), kept, out,
                           relevance=torch.rand(h * w, generator=gen),
                           redundancy=torch.rand(h * w, generator=gen), query="is there a cat?",
                           panel_px=96)
    assert out.exists() and out.stat().st_size > 0
    titles = [p.title for p in res.panels]
    assert titles[:3] == ["image", "query relevance", "GSP redundancy"]
    for name, idx in kept.items():
        panel = next(p for p in res.panels if p.title.startswith(name + ":"))
        expected = _mask_from_indices(idx.tolist(), h, w)
        np.testing.assert_array_equal(_read_back(out, panel.bbox, (h, w)), expected)
    # the plain image panel reads back as all kept (nothing dimmed)
    assert _read_back(out, res.panels[0].bbox, (h, w)).all()


def test_heatmap_orders_colours(tmp_path):
    # 'jet' maps low scores to blue and high to red: the hottest patch is the reddest.
    scores = np.arange(16, dtype=float)
    res = V.pruning_figure(_uniform_image(64, 64), (4, 4), {}, tmp_path / "h.png", relevance=scores, panel_px=64)
    img = np.asarray(Image.open(tmp_path / "h.png").convert("RGB"), dtype=float)
    left, top, wd, ht = res.panel("query relevance").bbox
    lo = img[int(top + ht / 8), int(left + wd / 8)]
    hi = img[int(top + 7 * ht / 8), int(left + 7 * wd / 8)]
    assert hi[0] - hi[2] > lo[0] - lo[2] + 50


def test_tiles_to_grid_layout():
    # two tiles side by side (cols=2, rows=1), 2x2 tokens each
    per_tile = np.array([[0, 1, 2, 3], [10, 11, 12, 13]])
    grid = V.tiles_to_grid(per_tile, (2, 1), 2)
    np.testing.assert_array_equal(grid, [[0, 1, 10, 11], [2, 3, 12, 13]])
    with pytest.raises(ValueError, match="per_tile"):
        V.tiles_to_grid(per_tile, (1, 1), 2)


def test_next_crops_mapped_onto_image(tmp_path):
    cols, rows, p = 2, 1, 4  # wide image: 2 tiles side by side
    gen = torch.Generator().manual_seed(1)
    per_crop = [torch.randperm(p * p, generator=gen)[:5].sort().values for _ in range(1 + cols * rows)]
    out = tmp_path / "next.png"
    res = V.next_crops_figure(_uniform_image(200, 100), (cols, rows), p, {"script": per_crop}, out,
                              relevance=torch.rand(3, p * p, generator=gen), panel_px=64)
    base = res.panel("script (base)")
    tiles = next(x for x in res.panels if x.title.startswith("script (tiles)"))
    np.testing.assert_array_equal(_read_back(out, base.bbox, (p, p)), _mask_from_indices(per_crop[0].tolist(), p, p))
    expected = np.concatenate([_mask_from_indices(per_crop[1].tolist(), p, p),
                               _mask_from_indices(per_crop[2].tolist(), p, p)], axis=1)
    np.testing.assert_array_equal(_read_back(out, tiles.bbox, (rows * p, cols * p)), expected)
    with pytest.raises(ValueError, match="one entry per crop"):
        V.next_crops_figure(_uniform_image(8, 8), (2, 1), p, {"x": per_crop[:2]}, tmp_path / "bad.png")


def test_cli_from_saved_tensors(tmp_path):
    import script_prune as sp
    from llava.eval import visualize as cli

    gen = torch.Generator().manual_seed(2)
    feats = torch.randn(1, 25, 8, generator=gen)
    path = tmp_path / "feats.pt"
    torch.save({"features": feats, "image": torch.full((50, 50, 3), 0, dtype=torch.uint8) + torch.tensor(COLOUR,
                dtype=torch.uint8), "query": "what is here?"}, path)
    out = tmp_path / "fig.png"
    res = cli.main(["--features", str(path), "--budget", "6", "--methods", "gsp,uniform", "--out", str(out),
                    "--panel-px", "100"])
    assert out.exists()
    for method in ("gsp", "uniform"):
        expected = _mask_from_indices(sp.select(feats[0], 6, method).tolist(), 5, 5)
        panel = next(p for p in res.panels if p.title.startswith(method + ":"))
        np.testing.assert_array_equal(_read_back(out, panel.bbox, (5, 5)), expected)
    with pytest.raises(SystemExit):  # query methods need embeddings the file lacks
        cli.main(["--features", str(path), "--budget", "6", "--methods", "script", "--out", str(out)])
    with pytest.raises(SystemExit):
        cli.main(["--features", str(tmp_path / "missing.pt"), "--out", str(out)])


def test_cli_from_tiny_checkpoint(tiny_llava15_path, tmp_path):
    import script_prune as sp
    from llava.eval import visualize as cli

    image = tmp_path / "img.png"
    _uniform_image(64, 64).save(image)
    out, feats = tmp_path / "fig.png", tmp_path / "feats.pt"
    res = cli.main(["--model-path", tiny_llava15_path, "--image-file", str(image), "--query", "Is there a cat?",
                    "--budget", "4", "--methods", "script,random", "--out", str(out), "--save-features", str(feats)])
    assert out.exists() and out.stat().st_size > 0
    saved = torch.load(feats, weights_only=True)
    tokens = saved["tokens"]  # (1, N, D) projected tokens of the tiny model
    side = int(tokens.shape[1] ** 0.5)
    expected = {
        "script": sp.select(tokens[0], 4, "script", image_embeds=saved["image_embeds"][0],
                            query_embeds=saved["query_embeds"], negate=True),
        "random": sp.select(tokens[0], 4, "random"),
    }
    for method, idx in expected.items():
        panel = next(p for p in res.panels if p.title.startswith(method + ":"))
        np.testing.assert_array_equal(_read_back(out, panel.bbox, (side, side)),
                                      _mask_from_indices(idx.tolist(), side, side))
    assert "query relevance" in [p.title for p in res.panels]


def test_cli_from_tiny_next_checkpoint(tiny_llava_next_path, tmp_path):
    """LLaVA-NeXT: a square image gets the 2x2 tile grid (no padding); every crop's drawn mask equals its
    selected indices, and the tiles land in row-major tile order on the assembled grid."""
    import script_prune as sp
    from llava.eval import visualize as cli

    image = tmp_path / "img.png"
    _uniform_image(112, 112).save(image)
    out, feats = tmp_path / "fig.png", tmp_path / "feats.pt"
    res = cli.main(["--model-path", tiny_llava_next_path, "--image-file", str(image), "--query", "a cat?",
                    "--budget", "5", "--methods", "divprune", "--out", str(out), "--save-features", str(feats)])
    saved = torch.load(feats, weights_only=True)
    cols, rows = saved["tile_grid"]
    tokens = saved["tokens"]  # (1 + cols*rows, N, D)
    assert (cols, rows) == (2, 2) and tokens.shape[0] == 5
    side = int(tokens.shape[1] ** 0.5)
    masks = [_mask_from_indices(sp.select(tokens[c], 5, "divprune").tolist(), side, side) for c in range(5)]
    base = res.panel("divprune (base)")
    np.testing.assert_array_equal(_read_back(out, base.bbox, (side, side)), masks[0])
    tiles = next(p for p in res.panels if p.title.startswith("divprune (tiles)"))
    expected = np.block([[masks[1], masks[2]], [masks[3], masks[4]]])
    np.testing.assert_array_equal(_read_back(out, tiles.bbox, (2 * side, 2 * side)), expected)

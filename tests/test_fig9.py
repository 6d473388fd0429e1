"""Fig. 9 (App. E): per-patch redundancy = mean cosine with the existing 8-connected neighbours, masks r >= tau,
one PNG; the masks are read back from the saved pixels."""

import numpy as np
import pytest
import torch
from PIL import Image

from script_prune import visualize as V
from script_prune.redundancy import neighbour_mean_similarity

GREY = (128, 128, 128)


def _loop_map(x: torch.Tensor, h: int, w: int) -> np.ndarray:
    """float64 reference: for every patch, average the cosine over the neighbours that exist."""
    x = x.double()
    out = np.zeros((x.shape[0], h * w))
    for b in range(x.shape[0]):
        for r in range(h):
            for c in range(w):
                sims = []
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        rr, cc = r + dy, c + dx
                        if (dy or dx) and 0 <= rr < h and 0 <= cc < w:
                            a, v = x[b, r * w + c], x[b, rr * w + cc]
                            sims.append(float(a @ v / (a.norm() * v.norm())))
                out[b, r * w + c] = sum(sims) / len(sims)
    return out


@pytest.mark.parametrize("h, w", [(4, 6), (1, 5), (5, 1), (3, 3)])
def test_map_matches_float64_loop(h, w):
    x = torch.randn(2, h * w, 7, generator=torch.Generator().manual_seed(h * 10 + w))
    got = neighbour_mean_similarity(x, (h, w))
    assert got.dtype == torch.float32 and got.shape == (2, h * w)
    np.testing.assert_allclose(got.numpy(), _loop_map(x, h, w), atol=1e-6)


def test_map_hand_values_at_borders():
    # 2 x 2 grid, tokens e0, e0, e1, -e0: every token neighbours the three others
    x = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]]])
    got = neighbour_mean_similarity(x, (2, 2))[0]
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, 0.0, -2.0 / 3.0]))


def _panel_mask(png, bbox, grid_hw) -> np.ndarray:
    """Redundant (red tint) vs distinct (blue tint) at each patch centre of a mask panel."""
    img = np.asarray(Image.open(png).convert("RGB"), dtype=np.float64)
    left, top, width, height = bbox
    h, w = grid_hw
    mask = np.zeros((h, w), dtype=bool)
    for r in range(h):
        for c in range(w):
            px = img[int(top + (r + 0.5) * height / h), int(left + (c + 0.5) * width / w)]
            mask[r, c] = px[0] > px[2]
    return mask


def test_figure_masks_drawn_at_each_tau(tmp_path):
    h, w = 5, 6
    redundancy = np.linspace(-0.2, 1.0, h * w)
    out = tmp_path / "fig9.png"
    res = V.redundancy_threshold_figure(Image.new("RGB", (60, 50), GREY), (h, w), redundancy, out, panel_px=120)
    assert out.exists() and Image.open(out).size == res.size_wh
    masks = [p for p in res.panels if p.title.startswith("tau=")]
    assert [p.title.split(":")[0] for p in masks] == [f"tau={t:g}" for t in V.FIG9_TAUS]
    for tau, panel in zip(V.FIG9_TAUS, masks):
        expected = redundancy.reshape(h, w) >= tau
        np.testing.assert_array_equal(panel.grid, expected)
        np.testing.assert_array_equal(_panel_mask(out, panel.bbox, (h, w)), expected)
        assert f"{int(expected.sum())}/{h * w} redundant" in panel.title


def test_cli_draws_fig9_from_saved_features(tmp_path):
    from llava.eval import visualize as cli

    feats = torch.randn(1, 16, 8, generator=torch.Generator().manual_seed(3))
    path = tmp_path / "feats.pt"
    torch.save({"features": feats}, path)
    out = tmp_path / "fig9.png"
    res = cli.main(["--features", str(path), "--redundancy-taus", "0.1,0.5", "--out", str(out)])
    assert out.exists() and len(res.panels) == 4  # image, heat map, two masks
    expected = neighbour_mean_similarity(feats, (4, 4))[0].numpy().reshape(4, 4)
    np.testing.assert_allclose(res.panels[1].grid, expected, atol=1e-6)
    np.testing.assert_array_equal(res.panels[3].grid, expected >= 0.5)
    with pytest.raises(SystemExit):
        cli.main(["--features", str(path), "--redundancy-taus", "0.1,abc", "--out", str(out)])

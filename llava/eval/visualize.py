"""Draw what each pruning method keeps for one image and query (one PNG).

    # from a checkpoint
    python -m llava.eval.visualize --model-path PATH --image-file img.jpg \
        --query "Is there a person in the image?" --budget 64 --methods script,qcsp,gsp,random --out fig.png
    # from saved tensors (no model): a file written by --save-features, or by hand (format below)
    python -m llava.eval.visualize --features feats.pt --budget 64 --methods script,random --out fig.png
    # the paper's Fig. 9: redundancy map and binary masks at tau = 0.1 ... 0.9 (no pruning method drawn)
    python -m llava.eval.visualize --model-path PATH --image-file img.jpg --redundancy-taus 0.1,0.3,0.5,0.7,0.9 \
        --out fig9.png

The figure shows (a) the query-relevance heat map (``script_prune.query_relevance``, negated as LLaVA's
pruning does), (b) the GSP redundancy map (``script_prune.redundancy_scores`` over the projected tokens),
(c) the kept tokens of every method with the dropped patches dimmed. LLaVA-NeXT: the base crop on top,
the anyres tiles mapped back onto the (resized and padded) image below.

Selection runs as the model's pruning layer runs it (``script_prune.patch``: selection methods on the
projected tokens, merging methods on the vision-tower features; LLaVA's ``negate`` convention); with
``--model-path`` the tensors come from the layer's own view of the image (``model.visual_rows``, the
``clip_text`` source's ``model.clip_embeddings``).

Features file (``torch.save`` of a dict): ``features`` (R, N, C) selected-layer patch features, ``tokens``
(R, N, D) projected tokens (optional: default ``features``), optional ``image_embeds`` (R, N, E),
``query_embeds`` (M, E), ``cls_attention`` (R, N), ``keys`` (R, N, Dk), ``query`` (str), ``image``
((H, W, 3) uint8), ``tile_grid`` ((cols, rows), LLaVA-NeXT: R = 1 + cols*rows), ``tiles_image``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

import script_prune as sp
from script_prune import visualize as V

TENSOR_KEYS = ("features", "tokens", "image_embeds", "query_embeds", "cls_attention", "keys")


@dataclass
class VisualInputs:
    """Everything the figure needs for one image: R rows (1, or 1 + tiles for LLaVA-NeXT)."""

    features: torch.Tensor  # (R, N, C) vision-tower features (merging methods reduce these)
    tokens: torch.Tensor  # (R, N, D) projected tokens (selection methods select on these)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # image_embeds, query_embeds, cls_attention, keys
    query: str | None = None
    image: Any = None  # PIL image or (H, W, 3) array shown under the grid
    tile_grid: tuple[int, int] | None = None  # (cols, rows) for LLaVA-NeXT
    tiles_image: Any = None  # the image as tiled (resize-and-pad to the best resolution)

    @property
    def tokens_per_side(self) -> int:
        side = math.isqrt(self.tokens.shape[1])
        if side * side != self.tokens.shape[1]:
            raise ValueError(f"tokens per row must be a square number (a patch grid), got {self.tokens.shape[1]}")
        return side


def method_params(method: str) -> dict[str, Any]:
    """Default parameters as LLaVA's pruning passes them (negate relevance when the method has it)."""
    from llava.model.pruning import PruningConfig

    return PruningConfig(method=method).method_params()


def kept_indices(inputs: VisualInputs, method: str, budget: int) -> tuple[torch.Tensor, int]:
    """(R, k) kept positions per row and the number of merged extra tokens per row."""
    spec = sp.get_method(method)
    n = inputs.tokens.shape[1]
    if sp.keeps_all(budget, n):
        return torch.arange(n).expand(inputs.tokens.shape[0], -1), 0
    if spec.stage == "llm" and "scores" not in inputs.extras:
        raise ValueError(f"method {method!r} acts inside the LLM (it needs the LLM's attention 'scores'); "
                         "it cannot be drawn from vision-side tensors")
    missing = [k for k in spec.inputs if k not in inputs.extras]
    if missing:
        raise ValueError(f"method {method!r} needs inputs {missing}, which are not available")
    kwargs = {k: inputs.extras[k] for k in spec.inputs}
    params = method_params(method)
    if spec.merges:
        red = sp.reduce(inputs.features.float(), budget, method, **kwargs, **params)
        return red.indices, 0 if red.merged is None else red.merged.shape[1]
    return sp.select(inputs.tokens.float(), budget, method, **kwargs, **params), 0


def relevance_map(inputs: VisualInputs) -> torch.Tensor | None:
    """(R, N) query relevance in [0, 1] (negated, as LLaVA's pruning uses it), or None without embeddings."""
    if "image_embeds" not in inputs.extras or "query_embeds" not in inputs.extras:
        return None
    return sp.query_relevance(inputs.extras["image_embeds"].float(), inputs.extras["query_embeds"].float(),
                              negate=True)


def draw(inputs: VisualInputs, methods: Sequence[str], budget: int, out_path: str,
         panel_px: int = 336) -> V.FigureResult:
    """Compute maps and kept tokens, then draw one PNG (LLaVA-1.5 grid or LLaVA-NeXT base + tiles)."""
    kept, merged = {}, {}
    for m in methods:
        idx, extra = kept_indices(inputs, m, budget)
        kept[m], merged[m] = idx, extra * idx.shape[0]
    relevance = relevance_map(inputs)
    redundancy = sp.redundancy_scores(inputs.tokens.float())  # (R, N)
    side = inputs.tokens_per_side
    image = inputs.image if inputs.image is not None else np.full((side, side, 3), 128, dtype=np.uint8)
    rows = inputs.tokens.shape[0]
    if inputs.tile_grid is None:
        if rows != 1:
            raise ValueError(f"without tile_grid the tensors must hold one row (LLaVA-1.5), got {rows}")
        return V.pruning_figure(image, (side, side), {m: k[0] for m, k in kept.items()}, out_path,
                                relevance=None if relevance is None else relevance[0], redundancy=redundancy[0],
                                merged=merged, query=inputs.query, panel_px=panel_px)
    cols, grid_rows = inputs.tile_grid
    if rows != 1 + cols * grid_rows:
        raise ValueError(f"tile_grid {inputs.tile_grid} means {1 + cols * grid_rows} rows, got {rows}")
    return V.next_crops_figure(image, (cols, grid_rows), side, kept, out_path, relevance=relevance,
                               redundancy=redundancy, merged=merged, query=inputs.query, panel_px=panel_px,
                               tiles_image=inputs.tiles_image)


def draw_redundancy_thresholds(inputs: VisualInputs, taus: Sequence[float], out_path: str, on: str = "features",
                               panel_px: int = 240) -> V.FigureResult:
    """Fig. 9 (App. E): per-patch redundancy = mean cosine with the existing 8-connected neighbours
    (``script_prune.redundancy.neighbour_mean_similarity``) of the first image row (the base crop for
    LLaVA-NeXT), drawn as a heat map and as binary masks ``r >= tau`` for each ``tau``.

    on: ``"features"`` (the vision tower's selected-layer CLIP-ViT features, as the paper) or ``"tokens"``
    (the projected tokens GSP scores)."""
    from script_prune.redundancy import neighbour_mean_similarity

    if on not in ("features", "tokens"):
        raise ValueError(f"--redundancy-on must be 'features' or 'tokens', got {on!r}")
    x = (inputs.features if on == "features" else inputs.tokens)[:1].float()  # (1, N, C)
    side = math.isqrt(x.shape[1])
    if side * side != x.shape[1]:
        raise ValueError(f"tokens per row must be a square number (a patch grid), got {x.shape[1]}")
    redundancy = neighbour_mean_similarity(x, (side, side))[0]  # (N,)
    image = inputs.image if inputs.image is not None else np.full((side, side, 3), 128, dtype=np.uint8)
    title = f"redundancy of the {'CLIP-ViT features' if on == 'features' else 'projected tokens'} " \
            "(mean cosine with the 8-connected neighbours); red: r >= tau"
    return V.redundancy_threshold_figure(image, (side, side), redundancy, out_path, taus=taus, title=title,
                                         panel_px=panel_px)


def parse_taus(text: str) -> list[float]:
    """"0.1,0.3" -> [0.1, 0.3]; each a number in [-1, 1]."""
    try:
        taus = [float(t) for t in text.split(",") if t.strip()]
    except ValueError as err:
        raise ValueError(f"--redundancy-taus expects comma-separated numbers, got {text!r}") from err
    if not taus or any(not -1.0 <= t <= 1.0 for t in taus):
        raise ValueError(f"--redundancy-taus expects thresholds in [-1, 1], got {text!r}")
    return taus


# ----------------------------------------------------------------------------------------- sources
def load_features_file(path: str) -> VisualInputs:
    """Read a features file (see the module docstring)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"features file {path!r} does not exist")
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or "features" not in data:
        raise ValueError(f"features file {path!r} must hold a dict with at least 'features' (R, N, C)")
    features = torch.as_tensor(data["features"])
    if features.dim() == 2:
        features = features[None]
    if features.dim() != 3:
        raise ValueError(f"features must be (R, N, C), got shape {tuple(features.shape)}")
    tokens = torch.as_tensor(data.get("tokens", features))
    tokens = tokens[None] if tokens.dim() == 2 else tokens
    extras = {k: torch.as_tensor(data[k]) for k in TENSOR_KEYS[2:] if data.get(k) is not None}
    grid = data.get("tile_grid")
    return VisualInputs(features=features, tokens=tokens, extras=extras, query=data.get("query"),
                        image=data.get("image"), tile_grid=None if grid is None else tuple(int(v) for v in grid),
                        tiles_image=data.get("tiles_image"))


@torch.inference_mode()
def inputs_from_model(model_path: str, image_file: str, query: str, methods: Sequence[str],
                      device: str = "cpu") -> VisualInputs:
    """Run the checkpoint's vision side on one image: features, projected tokens, relevance and attention inputs."""
    from llava.mm_utils import (expand2square, get_anyres_image_grid_shape, load_image, mean_color,
                                parse_grid_pinpoints, process_images, processor_input_size, resize_and_pad_image,
                                select_best_resolution, strip_short_answer_prompt)
    from llava.model.builder import load_pretrained_model

    image = load_image(image_file)
    _, model, processor, _ = load_pretrained_model(model_path, device=device)
    cfg = model.config
    pixels = process_images([image], processor, cfg)
    needs = [name for m in methods for name in sp.get_method(m).inputs if name in ("cls_attention", "keys")]
    rows = model.visual_rows(pixels, [image.size], needs)  # the layer's view of the image (Family.encode)
    clean_query = strip_short_answer_prompt(query)
    # the relevance panel is always drawn, so the CLIP text side is always loaded
    extras: dict[str, torch.Tensor] = {**model.clip_embeddings(rows.vision_features, clean_query), **rows.inputs}
    aspect = getattr(cfg, "image_aspect_ratio", None)
    shown, tile_grid, tiles_image = image, None, None
    if aspect == "pad":
        shown = expand2square(image, mean_color(processor))
    elif aspect == "anyres":
        size = processor_input_size(processor)  # the side the vision tower sees
        tile_grid = get_anyres_image_grid_shape(image.size, cfg.image_grid_pinpoints, size)
        best = select_best_resolution(image.size, parse_grid_pinpoints(cfg.image_grid_pinpoints))
        tiles_image = resize_and_pad_image(image, best)
    return VisualInputs(features=rows.vision_features.float().cpu(), tokens=rows.tokens.float().cpu(),
                        extras={k: v.float().cpu() for k, v in extras.items()}, query=clean_query,
                        image=np.asarray(shown.convert("RGB")), tile_grid=tile_grid,
                        tiles_image=None if tiles_image is None else np.asarray(tiles_image))


def save_features(inputs: VisualInputs, path: str) -> None:
    """Write a features file (atomically) that ``--features`` reads back."""
    data: dict[str, Any] = {"features": inputs.features, "tokens": inputs.tokens, **inputs.extras,
                            "query": inputs.query}
    for key in ("image", "tiles_image"):
        value = getattr(inputs, key)
        if value is not None:
            data[key] = torch.from_numpy(np.array(value, dtype=np.uint8, copy=True))
    if inputs.tile_grid is not None:
        data["tile_grid"] = list(inputs.tile_grid)
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(data, tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llava.eval.visualize", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model-path", help="LLaVA checkpoint folder")
    src.add_argument("--features", help="saved tensors (torch.save dict, see the module docstring)")
    p.add_argument("--image-file", help="image (required with --model-path; optional with --features)")
    p.add_argument("--query", default=None, help="the question (relevance)")
    p.add_argument("--budget", type=int, default=64, help="tokens kept per image row / NeXT crop")
    p.add_argument("--methods", default="script,random", help="comma-separated script_prune methods")
    p.add_argument("--pruning-method", default=None, help="one method (alias of --methods)")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--save-features", default=None, help="also write the tensors used to this .pt file")
    p.add_argument("--panel-px", type=int, default=None, help="panel size in px (default 336; 240 for Fig. 9)")
    p.add_argument("--redundancy-taus", default=None, metavar="T1,T2,...",
                   help="draw the paper's Fig. 9 instead (e.g. 0.1,0.3,0.5,0.7,0.9): redundancy map + masks r >= tau")
    p.add_argument("--redundancy-on", default="features", choices=("features", "tokens"),
                   help="Fig. 9 on the CLIP-ViT features (default, as the paper) or on the projected tokens")
    p.add_argument("--device", default="cpu")
    return p


def main(argv: Sequence[str] | None = None) -> V.FigureResult:
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        methods = [args.pruning_method] if args.pruning_method else [m for m in args.methods.split(",") if m]
        unknown = [m for m in methods if m not in sp.list_methods()]
        if unknown or not methods:
            raise ValueError(f"methods must be among {sp.list_methods()}, got {methods}")
        taus = parse_taus(args.redundancy_taus) if args.redundancy_taus is not None else None
        if args.budget < 1:
            raise ValueError(f"budget must be >= 1, got {args.budget}")
        if args.model_path:
            if not args.image_file:
                raise ValueError("--image-file is required with --model-path")
            inputs = inputs_from_model(args.model_path, args.image_file, args.query or "", methods, args.device)
        else:
            inputs = load_features_file(args.features)
            if args.image_file:
                from llava.mm_utils import load_image

                inputs.image = load_image(args.image_file)
            if args.query:
                inputs.query = args.query
        if args.save_features:
            save_features(inputs, args.save_features)
        if taus is not None:
            result = draw_redundancy_thresholds(inputs, taus, args.out, on=args.redundancy_on,
                                                panel_px=args.panel_px or 240)
        else:
            result = draw(inputs, methods, args.budget, args.out, panel_px=args.panel_px or 336)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    print(f"wrote {result.path} ({result.size_wh[0]}x{result.size_wh[1]} px, {len(result.panels)} panels)",
          file=sys.stderr)
    return result


if __name__ == "__main__":
    main()

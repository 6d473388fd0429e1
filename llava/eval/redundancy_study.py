"""The paper's Table 1 (Sec. 3.2): full-graph, local-window, bipartite and random redundancy estimation.

    # toy checkpoint (default), 20 generated toy scenes, CPU
    python -m llava.eval.redundancy_study --out redundancy_study.json
    # any LLaVA checkpoint on a GPU, your images, with accuracies from answer files
    python -m llava.eval.redundancy_study --model-path liuhaotian/llava-v1.5-7b --images val2014/ --limit 200 \
        --device cuda --answers full=ans/full.jsonl --answers bipartite=ans/gsp.jsonl \
        --pope-dir playground/data/eval/pope/coco --question-file playground/data/eval/pope/llava_pope_test.jsonl
    # saved features, no model: a (B, N, D) tensor or a dict with 'tokens' (or 'features')
    python -m llava.eval.redundancy_study --features feats.pt

All four estimators (``script_prune.redundancy``) score the *same* features (by default the projected
visual tokens of ``model.visual_rows(images)``, what GSP scores inside the model) with Eq. 9 and the same
``tau`` / ``gamma``; each keeps the ``K = N - floor(ratio * N)`` least redundant tokens per image row.

Columns (one row per estimator; "Exhaustive" = the full graph):

- ``Sim. (%)``: similarity pairs the estimator computes over the ``N (N - 1) / 2`` unordered pairs.
- ``Time``: median over ``--repeats`` x images of the wall time (ms) of scoring + top-K selection of one
  image row (batch 1, after ``--warmup`` runs; CUDA synchronised).
- ``IOU@K``: mean over images of ``|kept ∩ kept_full| / |kept ∪ kept_full|``.
- ``Acc.``: from ``--answers NAME=answers.jsonl`` (answers produced elsewhere with that estimator),
  scored with LLaVA's POPE scorer (``--pope-dir`` + ``--question-file``: mean accuracy over the three
  POPE categories) or the toy scorer (``--toy-questions DIR``: mean accuracy over the toy bench's six
  question types); "-" without answers.
- ``Speedup``: median time of the full graph / the estimator's.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from llava.eval.io_utils import atomic_write_json
from script_prune import redundancy as R

ROW_NAMES = {"full": "Exhaustive", "local": "Local window", "bipartite": "Bipartite", "random": "Random"}
TOY_CHECKPOINT = Path(__file__).resolve().parents[1] / "toy" / "checkpoint"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


# ------------------------------------------------------------------------------------------ features
def toy_images(n: int, seed: int = 0) -> list[Any]:
    """``n`` toy test scenes (``llava.toy.scenes.make_scene``), as PIL images."""
    from llava.toy.scenes import make_scene

    return [make_scene(seed, "test", i).image for i in range(n)]


def image_files(paths: Sequence[str], limit: int | None) -> list[str]:
    """Image files from files and folders (folders: sorted, by suffix), at most ``limit``."""
    files: list[str] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            files.extend(str(f) for f in sorted(path.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(str(path))
        else:
            raise FileNotFoundError(f"--images: {p} is neither a file nor a folder")
    if not files:
        raise ValueError(f"--images: no image files in {list(paths)}")
    return files[:limit] if limit else files


@torch.inference_mode()
def model_features(model_path: str, images: list[Any], device: str, source: str = "tokens",
                   batch: int = 8) -> torch.Tensor:
    """Visual features of ``images`` through the checkpoint's public methods. -> (R, N, D) float32.

    ``source="tokens"``: the projected visual tokens; ``"vision"``: the vision tower's selected-layer features,
    both as the pruning layer sees them (``model.visual_rows``). LLaVA-NeXT images give one row per crop
    (base + tiles).
    """
    from llava.mm_utils import load_image, process_images
    from llava.model.builder import load_pretrained_model

    _, model, processor, _ = load_pretrained_model(model_path, device=device)
    model.eval()
    rows = []
    for start in tqdm(range(0, len(images), batch), desc="features", unit="batch", file=sys.stderr):
        chunk = [load_image(i) if isinstance(i, str) else i.convert("RGB") for i in images[start:start + batch]]
        pixels = process_images(chunk, processor, model.config)
        visual = model.visual_rows(pixels, [image.size for image in chunk])
        rows.append((visual.tokens if source == "tokens" else visual.vision_features).float())  # (R, N, D)
    return torch.cat(rows)


def load_feature_file(path: str) -> torch.Tensor:
    """A (B, N, D) tensor, or a dict holding one under 'tokens' or 'features'. -> float32."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--features {path}: no such file")
    data = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(data, dict):
        key = next((k for k in ("tokens", "features") if k in data), None)
        if key is None:
            raise ValueError(f"--features {path}: a dict needs 'tokens' or 'features', has {sorted(data)}")
        data = data[key]
    x = torch.as_tensor(data)
    if x.dim() == 2:
        x = x[None]
    if x.dim() != 3 or not x.is_floating_point():
        raise ValueError(f"--features {path}: expected float (B, N, D), got {x.dtype} {tuple(x.shape)}")
    return x.float()


def parse_grid(text: str | None, n: int) -> tuple[int, int]:
    """"HxW" -> (h, w) with h * w == n; None -> the square grid."""
    if text is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"{n} tokens per row are no square grid; pass --grid HxW")
        return side, side
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError as err:
        raise ValueError(f"--grid expects HxW, got {text!r}") from err
    if h < 1 or w < 1 or h * w != n:
        raise ValueError(f"--grid {text}: h * w must equal the {n} tokens per row")
    return h, w


# ------------------------------------------------------------------------------------------ study
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_estimator(name: str, features: torch.Tensor, grid_hw: tuple[int, int], k: int, tau: float, gamma: float,
                   repeats: int, warmup: int, seed: int = 0) -> float:
    """Median ms of scoring + top-K of one image row, over ``repeats`` x rows (after ``warmup`` runs)."""
    rows = features.shape[0]
    for _ in range(warmup):
        R.kept_set(R.estimator_scores(name, features[:1], grid_hw, tau, gamma, seed), k)
    _sync(features.device)
    times = []
    for r in range(repeats):  # measurement loop: one timed call per image row
        for i in range(rows):
            row = features[i : i + 1]  # (1, N, D)
            t0 = time.perf_counter()
            R.kept_set(R.estimator_scores(name, row, grid_hw, tau, gamma, seed + r), k)
            _sync(features.device)
            times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times)


def study(features: torch.Tensor, grid_hw: tuple[int, int], prune_ratio: float = 0.9, tau: float = 0.2,
          gamma: float = 1.0, repeats: int = 20, warmup: int = 3, seed: int = 0,
          estimators: Sequence[str] = R.ESTIMATORS, accuracy: dict[str, float] | None = None,
          progress: bool = True) -> dict:
    """Table 1's numbers for ``features # (B, N, D)``: rows keyed by estimator, plus the settings."""
    if "full" not in estimators:
        raise ValueError("the full graph is the reference of IOU@K and Speedup; keep 'full' among the estimators")
    b, n, _ = features.shape
    k = R.keep_count(n, prune_ratio)
    reference = R.kept_set(R.full_graph_scores(features, tau, gamma), k)  # (B, N) bool
    rows: dict[str, dict] = {}
    for name in tqdm(estimators, desc="estimators", disable=not progress, file=sys.stderr):
        kept = R.kept_set(R.estimator_scores(name, features, grid_hw, tau, gamma, seed), k)  # (B, N)
        ms = time_estimator(name, features, grid_hw, k, tau, gamma, repeats, warmup, seed)
        share = R.similarity_pair_share(name, grid_hw)
        rows[name] = {"method": ROW_NAMES[name], "sim_pairs": R.similarity_pairs(name, grid_hw),
                      "sim_percent": 100.0 * float(share), "time_ms": ms,
                      "iou_at_k": float(R.iou(kept, reference).mean()),
                      "acc": None if not accuracy or name not in accuracy else accuracy[name]}
    for r in rows.values():
        r["speedup"] = rows["full"]["time_ms"] / r["time_ms"] if r["time_ms"] > 0 else float("inf")
    return {"images": b, "tokens_per_row": n, "grid_hw": list(grid_hw), "prune_ratio": prune_ratio, "k": k,
            "tau": tau, "gamma": gamma, "repeats": repeats, "device": str(features.device),
            "torch_threads": torch.get_num_threads(), "rows": rows}


def format_table(result: dict) -> str:
    """Table 1's layout: Method, Sim. (%), Time (ms), IOU@K, Acc., Speedup."""
    head = f"{'Method':<14}{'Sim. (%)':>10}{'Time (ms)':>11}{'IOU@K':>8}{'Acc.':>8}{'Speedup':>9}"
    lines = [head, "-" * len(head)]
    for r in result["rows"].values():
        acc = "-" if r["acc"] is None else f"{r['acc']:.2f}"
        lines.append(f"{r['method']:<14}{r['sim_percent']:>10.2f}{r['time_ms']:>11.3f}{r['iou_at_k']:>8.2f}"
                     f"{acc:>8}{r['speedup']:>8.2f}x")
    lines.append(f"({result['images']} image rows of {result['tokens_per_row']} tokens, grid "
                 f"{result['grid_hw'][0]}x{result['grid_hw'][1]}, {100 * result['prune_ratio']:g}% pruned: "
                 f"K = {result['k']}; tau {result['tau']}, gamma {result['gamma']}; {result['device']})")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ accuracy
def answer_accuracy(answers_file: str, pope_dir: str | None, question_file: str | None,
                    toy_questions: str | None) -> float:
    """Acc. (%) of one answer file: POPE (mean accuracy over the categories) or the toy scorer."""
    if toy_questions:
        from llava.toy.bench import score
        from llava.toy.scenes import CATEGORIES

        result = score(Path(toy_questions), Path(answers_file))
        return sum(result[c] for c in CATEGORIES) / len(CATEGORIES)
    if pope_dir and question_file:
        from llava.eval.eval_pope import CATEGORIES, score_pope

        result = score_pope(pope_dir, question_file, answers_file)
        return sum(result[c]["accuracy"] for c in CATEGORIES) / len(CATEGORIES)
    raise ValueError("--answers needs a scorer: --pope-dir and --question-file (POPE), or --toy-questions DIR")


def parse_answers(items: Sequence[str], estimators: Sequence[str]) -> dict[str, str]:
    """["bipartite=path", ...] -> {estimator: path}; names must be estimators."""
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or name not in estimators or not path:
            raise ValueError(f"--answers expects NAME=PATH with NAME one of {list(estimators)}, got {item!r}")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--answers {name}: no such file {path}")
        out[name] = path
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llava.eval.redundancy_study", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model-path", default=None, help=f"LLaVA checkpoint (default: the toy, {TOY_CHECKPOINT})")
    src.add_argument("--features", default=None, help="saved (B, N, D) features instead of a model")
    p.add_argument("--images", nargs="+", default=None, help="image files / folders (default: toy scenes)")
    p.add_argument("--scenes", type=int, default=20, help="toy scenes used when no --images (default 20)")
    p.add_argument("--limit", type=int, default=None, help="at most this many images")
    p.add_argument("--source", choices=("tokens", "vision"), default="tokens",
                   help="projected tokens (default, what GSP scores) or vision-tower features")
    p.add_argument("--grid", default=None, help="token grid HxW (default: square)")
    p.add_argument("--prune-ratio", type=float, default=0.9, help="share of tokens pruned (default 0.9)")
    p.add_argument("--tau", type=float, default=0.2, help="Eq. 9 threshold (default 0.2, as GSP)")
    p.add_argument("--gamma", type=float, default=1.0, help="Eq. 9 scale (default 1.0, as GSP)")
    p.add_argument("--estimators", default=",".join(R.ESTIMATORS), help="comma-separated, 'full' required")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0, help="random row's seed")
    p.add_argument("--answers", action="append", default=[], metavar="NAME=PATH", help="answers for Acc.")
    p.add_argument("--pope-dir", default=None, help="POPE annotation dir (coco_pope_*.json)")
    p.add_argument("--question-file", default=None, help="POPE question file")
    p.add_argument("--toy-questions", default=None, help="toy question dir (questions.jsonl, answers.jsonl, pope/)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default="redundancy_study.json", help="JSON written here (atomic)")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        estimators = [e.strip() for e in args.estimators.split(",") if e.strip()]
        bad = [e for e in estimators if e not in R.ESTIMATORS]
        if bad or "full" not in estimators:
            raise ValueError(f"--estimators must be among {list(R.ESTIMATORS)} and include 'full', got {estimators}")
        if not 0.0 <= args.prune_ratio < 1.0:
            raise ValueError(f"--prune-ratio must be in [0, 1), got {args.prune_ratio}")
        for flag, v, low in (("--repeats", args.repeats, 1), ("--warmup", args.warmup, 0), ("--scenes", args.scenes, 1)):
            if v < low:
                raise ValueError(f"{flag} must be >= {low}, got {v}")
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"--threads must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        answers = parse_answers(args.answers, estimators)
        accuracy = {name: answer_accuracy(path, args.pope_dir, args.question_file, args.toy_questions)
                    for name, path in answers.items()}
        if args.features:
            if args.images:
                raise ValueError("--images has no use with --features")
            features = load_feature_file(args.features)[: args.limit]
        else:
            model_path = args.model_path or str(TOY_CHECKPOINT)
            if args.images:
                images: list[Any] = image_files(args.images, args.limit)
            elif args.model_path is None:
                images = toy_images(args.limit or args.scenes)
            else:
                raise ValueError("--images is required with --model-path (the toy scenes only suit the toy)")
            features = model_features(model_path, images, args.device, args.source)
        features = features.to(args.device)
        grid = parse_grid(args.grid, features.shape[1])
        result = study(features, grid, args.prune_ratio, args.tau, args.gamma, args.repeats, args.warmup,
                       args.seed, estimators, accuracy)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    result["source"] = {"features": args.features} if args.features else {
        "model_path": args.model_path or str(TOY_CHECKPOINT), "images": args.images or f"toy scenes x{args.scenes}",
        "feature_source": args.source}
    result["answers"] = answers
    result["table"] = format_table(result)
    atomic_write_json(args.out, result)
    print(result["table"])
    print(f"wrote {args.out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()

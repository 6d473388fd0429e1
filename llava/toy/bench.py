"""Accuracy bench of the pruning methods on the toy test split, through LLaVA's eval pipeline.

    python -m llava.toy.bench [--model-path llava/toy/checkpoint] [--data DIR] [--out DIR]
        [--methods script,divprune,...] [--fractions 1,1/3,1/9,1/18,1/36] [--limit N] [--scenes 50] [--device cpu]
        [--batch-size N]

For every method of ``script_prune.list_methods()`` (the in-LLM ones with ``TOY_PARAMS``) and every kept fraction of the visual tokens
(144 tokens: 144, 48, 16, 8, 4) it answers the test questions with ``llava.eval.model_vqa_loader`` (the
same loader, prompt and greedy decoding as the real benchmarks), scores the existence categories with
the POPE scorer ``llava.eval.eval_pope`` (accuracy per category) and colour / count / relation by exact
match after EvalAI normalisation, then prints a table laid out like the paper's: one block per budget,
accuracy per question type, ``Acc.`` (mean over the six types) and ``Relative`` (mean over the types of
accuracy / unpruned accuracy). ``--limit N`` keeps the first N questions of each type (smoke tests).
Results go to ``OUT/answers/<method>@<budget>.jsonl`` and ``OUT/results.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from fractions import Fraction
from pathlib import Path

from llava.toy.scenes import CATEGORIES, EXISTENCE_CATEGORIES

TOY_DIR = Path(__file__).resolve().parent
DEFAULT_CHECKPOINT = TOY_DIR / "checkpoint"
DEFAULT_FRACTIONS = ("1", "1/3", "1/9", "1/18", "1/36")
TEST_SCENES = 50
#: Parameters of the multi-stage in-LLM methods for the toy LLM (3 decoder layers; their defaults are for 32):
#: SparseVLM prunes the outputs of layers 0 / 1 / 2 (2, 6, 15 of 32 scaled down), PDrop drops before layers
#: 0 / 1 / 2 (a later first drop cannot reach these budgets as a 3-layer average).
TOY_PARAMS: dict[str, tuple[str, ...]] = {"sparsevlm": ("layers=[0,1,2]",), "pdrop": ("layers=[0,1,2]",)}


def parse_fractions(text: str) -> list[Fraction]:
    """"1,1/3,1/9" -> [1, 1/3, 1/9]; each must lie in (0, 1]."""
    out = []
    for item in text.split(","):
        try:
            f = Fraction(item.strip())
        except (ValueError, ZeroDivisionError) as err:
            raise ValueError(f"--fractions: expected fractions like 1/3, got {item!r}") from err
        if not 0 < f <= 1:
            raise ValueError(f"--fractions: each fraction must be in (0, 1], got {item!r}")
        out.append(f)
    return out


def budgets_for(n_tokens: int, fractions: list[Fraction]) -> list[int]:
    """Kept token counts: round(n * f), at least 1."""
    return [max(1, round(n_tokens * f)) for f in fractions]


def visual_token_count(model_path: str | os.PathLike) -> int:
    """Patch tokens per image of a LLaVA-1.5 checkpoint: (image_size / patch_size)^2 of its CLIP."""
    from llava.model.builder import read_config_dict
    from llava.model.multimodal_encoder.clip_encoder import resolve_vision_tower_path

    cfg = read_config_dict(model_path)
    clip_cfg = json.loads((Path(resolve_vision_tower_path(cfg["mm_vision_tower"], model_path)) / "config.json").read_text())
    vision = clip_cfg.get("vision_config", clip_cfg)
    return (vision["image_size"] // vision["patch_size"]) ** 2


def ensure_test_split(data_dir: Path, n_scenes: int = TEST_SCENES, seed: int = 0) -> Path:
    """The test split folder, written with :func:`llava.toy.data.write_split` if absent."""
    if n_scenes < 1:
        raise ValueError(f"--scenes must be >= 1, got {n_scenes}")
    split = data_dir / "test"
    if (split / "questions.jsonl").is_file():
        have = len(list((split / "images").glob("*.png")))
        if have != n_scenes:
            raise ValueError(f"{split} holds a test split of {have} scenes, not --scenes {n_scenes}; "
                             "pass another --data folder (or remove that one)")
    else:
        from llava.toy.data import write_split

        write_split(data_dir, "test", n_scenes, seed=seed)
    return split


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def sliced_split(split: Path, out: Path, limit: int | None) -> Path:
    """Question file + POPE labels + answers with the first ``limit`` questions of each type (or all)."""
    questions = _read_jsonl(split / "questions.jsonl")
    answers = {a["question_id"]: a for a in _read_jsonl(split / "answers.jsonl")}
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--limit must be >= 1, got {limit}")
        kept, seen = [], {c: 0 for c in CATEGORIES}
        for q in questions:
            if seen[q["category"]] < limit:
                seen[q["category"]] += 1
                kept.append(q)
        questions = kept
    dest = out / "questions"
    (dest / "pope").mkdir(parents=True, exist_ok=True)
    _write_jsonl(dest / "questions.jsonl", questions)
    _write_jsonl(dest / "answers.jsonl", [answers[q["question_id"]] for q in questions])
    for cat in EXISTENCE_CATEGORIES:
        _write_jsonl(dest / "pope" / f"coco_pope_{cat}.json",
                     [{"question_id": q["question_id"], "image": q["image"], "text": q["text"],
                       "label": answers[q["question_id"]]["answer"]} for q in questions if q["category"] == cat])
    return dest


def exact_match_accuracy(answer_rows: list[dict], truth: dict, category: str) -> float:
    """Accuracy (%) of the answers to ``category`` questions, EvalAI-normalised exact match."""
    from llava.eval.vqa_normalize import normalize_answer

    rows = [a for a in answer_rows if truth[a["question_id"]]["category"] == category]
    if not rows:
        raise ValueError(f"no answers for category {category!r}")
    hits = [normalize_answer(a["text"]) == normalize_answer(truth[a["question_id"]]["answer"]) for a in rows]
    return 100.0 * sum(hits) / len(hits)


def score(questions_dir: Path, answers_file: Path) -> dict:
    """Per-type accuracy (%) plus POPE F1s and the visual token count the answers report."""
    from llava.eval.eval_pope import score_pope

    pope = score_pope(str(questions_dir / "pope"), str(questions_dir / "questions.jsonl"), str(answers_file))
    truth = {a["question_id"]: a for a in _read_jsonl(questions_dir / "answers.jsonl")}
    rows = _read_jsonl(answers_file)
    result = {c: pope[c]["accuracy"] for c in EXISTENCE_CATEGORIES}
    result.update({c: exact_match_accuracy(rows, truth, c) for c in CATEGORIES if c not in EXISTENCE_CATEGORIES})
    result["pope_f1"] = {c: pope[c]["f1"] for c in EXISTENCE_CATEGORIES}
    tokens = [r.get("metadata", {}).get("visual_tokens") for r in rows]
    result["visual_tokens"] = max(tokens) if tokens and None not in tokens else None
    return result


def run_config(model_path: str, questions_dir: Path, images: Path, answers_file: Path, method: str, budget: int,
               device: str, batch_size: int = 1) -> float:
    """Answer the question file with model_vqa_loader; returns seconds taken."""
    from llava.eval import model_vqa_loader

    if answers_file.exists():
        answers_file.unlink()      # a fresh run (the loader would otherwise resume)
    t0 = time.time()
    model_vqa_loader.main(["--model-path", model_path, "--question-file", str(questions_dir / "questions.jsonl"),
                           "--image-folder", str(images), "--answers-file", str(answers_file),
                           "--pruning-method", method, "--visual-token-num", str(budget),
                           "--device", device, "--dtype", "float32", "--max_new_tokens", "8", "--num-workers", "0",
                           "--batch-size", str(batch_size),
                           *[arg for param in TOY_PARAMS.get(method, ()) for arg in ("--pruning-param", param)]])
    return time.time() - t0


def format_table(results: dict, n_tokens: int) -> str:
    """The paper's layout: a block per budget, one row per method, columns per question type, Acc., Relative."""
    cols = list(CATEGORIES)
    head = f"{'Method':<16}" + "".join(f"{c:>12}" for c in cols) + f"{'Acc.':>8}{'Relative':>10}"
    base = results["none"][str(n_tokens)]
    lines = [head, "-" * len(head), f"Upper bound, {n_tokens} tokens (100%)", _row("LLaVA-toy", base, base, cols)]
    budgets = sorted({int(b) for m, per in results.items() if m != "none" for b in per}, reverse=True)
    for b in budgets:
        lines.append(f"Retain {b} tokens (-{100 * (1 - b / n_tokens):.1f}%)")
        for method, per in results.items():
            if method != "none" and str(b) in per:
                lines.append(_row(method, per[str(b)], base, cols))
    return "\n".join(lines)


def _row(name: str, r: dict, base: dict, cols: list[str]) -> str:
    acc = sum(r[c] for c in cols) / len(cols)
    rel = sum(r[c] / base[c] for c in cols if base[c] > 0) / sum(base[c] > 0 for c in cols)
    return f"{name:<16}" + "".join(f"{r[c]:>12.1f}" for c in cols) + f"{acc:>8.1f}{100 * rel:>9.1f}%"


def main(argv: list[str] | None = None) -> dict:
    import script_prune as sp

    ap = argparse.ArgumentParser(description="Toy accuracy bench of every pruning method (CPU).")
    ap.add_argument("--model-path", default=str(DEFAULT_CHECKPOINT))
    ap.add_argument("--data", default=None, help="toy data folder (default: OUT/data)")
    ap.add_argument("--out", default="toy_bench", help="output folder")
    ap.add_argument("--methods", default=None, help="comma-separated (default: all of script_prune.list_methods())")
    ap.add_argument("--fractions", default=",".join(DEFAULT_FRACTIONS), help="kept fractions, 1 = unpruned")
    ap.add_argument("--limit", type=int, default=None, help="first N questions of each type only")
    ap.add_argument("--scenes", type=int, default=TEST_SCENES,
                    help=f"test split size in scenes (one question per type each; default {TEST_SCENES})")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=1, help="questions per generate call (answers do not change)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)

    methods = sp.list_methods() if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in sp.list_methods()]
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; choose from {sp.list_methods()}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    split = ensure_test_split(Path(args.data) if args.data else out / "data", args.scenes)
    questions_dir = sliced_split(split, out, args.limit)
    n_tokens = visual_token_count(args.model_path)
    budgets = budgets_for(n_tokens, parse_fractions(args.fractions))
    (out / "answers").mkdir(exist_ok=True)
    results: dict = {"none": {}}
    timings: dict = {}
    skipped: dict[str, str] = {}
    configs = [("none", n_tokens)] + [(m, b) for m in methods for b in budgets if b < n_tokens]
    for method, budget in configs:
        answers_file = out / "answers" / f"{method}@{budget}.jsonl"
        try:
            seconds = run_config(args.model_path, questions_dir, split / "images", answers_file, method, budget,
                                 args.device, args.batch_size)
        except ValueError as err:     # e.g. an LLM-stage method the model does not support yet
            if method == "none":
                raise
            skipped[method] = str(err)
            print(f"[toy bench] {method}@{budget} skipped: {err}", flush=True)
            continue
        results.setdefault(method, {})[str(budget)] = score(questions_dir, answers_file)
        timings[f"{method}@{budget}"] = seconds
    table = format_table(results, n_tokens)
    if skipped:
        table += "\n" + "\n".join(f"(not run) {m}: {e}" for m, e in skipped.items())
    summary = {"model_path": str(args.model_path), "n_tokens": n_tokens, "budgets": budgets,
               "questions": len(_read_jsonl(questions_dir / "questions.jsonl")), "results": results,
               "seconds": timings, "skipped": skipped, "table": table}
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out / "results.json")
    print(table)
    return summary


if __name__ == "__main__":
    main()

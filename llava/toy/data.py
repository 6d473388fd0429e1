"""Write toy splits in LLaVA's file formats.

For a split ``S`` under ``root``:
- ``S/images/<image_id>.png``
- ``S/questions.jsonl``: LLaVA question file, one ``{"question_id", "image", "text", "category"}`` per line
  (``text`` ends with LLaVA's short-answer line), read by ``llava.eval.model_vqa_loader``;
- ``S/answers.jsonl``: ``{"question_id", "answer", "category"}`` (ground truth of every question);
- ``S/pope/coco_pope_<category>.json``: POPE label files (one ``{"question_id", "image", "text", "label"}``
  per line, in question-file order) for the existence categories ``random`` / ``popular`` / ``adversarial``;
- ``S/captions.jsonl``: ``{"image", "caption"}`` (CLIP stage);
- ``S/conversations.json``: LLaVA's training format, a JSON list of
  ``{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", ...}, ...]}``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from llava.toy.scenes import EXISTENCE_CATEGORIES, Scene, SceneConfig, caption, make_scene, with_short_answer_prompt

DEFAULT_IMAGE_TOKEN_TEXT = "<image>"


@dataclass(frozen=True)
class SplitSpec:
    """How many scenes each split has (one question per category per scene)."""

    seed: int = 0
    train: int = 4000
    val: int = 100
    test: int = 50


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def question_rows(scenes: list[Scene]) -> tuple[list[dict], list[dict]]:
    """(question-file rows, answer rows) with question ids numbered in scene order."""
    questions, answers = [], []
    for scene in scenes:
        for qa in scene.qas:
            qid = len(questions)
            questions.append({"question_id": qid, "image": f"{scene.image_id}.png",
                              "text": with_short_answer_prompt(qa.question), "category": qa.category})
            answers.append({"question_id": qid, "answer": qa.answer, "category": qa.category})
    return questions, answers


def pope_label_rows(questions: list[dict], answers: list[dict], category: str) -> list[dict]:
    """POPE label lines of one existence category, in question-file order."""
    return [{"question_id": q["question_id"], "image": q["image"], "text": q["text"], "label": a["answer"]}
            for q, a in zip(questions, answers) if q["category"] == category]


def conversation_record(scene: Scene) -> dict:
    """LLaVA training record: the scene's questions as one multi-turn conversation, image in the first turn."""
    turns = []
    for i, qa in enumerate(scene.qas):
        text = with_short_answer_prompt(qa.question)
        turns.append({"from": "human", "value": f"{DEFAULT_IMAGE_TOKEN_TEXT}\n{text}" if i == 0 else text})
        turns.append({"from": "gpt", "value": qa.answer})
    return {"id": scene.image_id, "image": f"{scene.image_id}.png", "conversations": turns}


def write_split(root: str | os.PathLike, split: str, n_scenes: int, seed: int = 0,
                cfg: SceneConfig = SceneConfig(), images: bool = True) -> Path:
    """Generate ``n_scenes`` scenes of ``split`` and write them under ``root/split``; returns that folder."""
    if n_scenes < 1:
        raise ValueError(f"n_scenes must be >= 1, got {n_scenes}")
    out = Path(root) / split
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "pope").mkdir(exist_ok=True)
    scenes = [make_scene(seed, split, i, cfg) for i in range(n_scenes)]
    if images:
        for scene in scenes:
            path = out / "images" / f"{scene.image_id}.png"
            scene.image.save(path.with_name(path.name + ".tmp.png"))
            os.replace(path.with_name(path.name + ".tmp.png"), path)
    questions, answers = question_rows(scenes)
    _atomic_write_text(out / "questions.jsonl", _jsonl(questions))
    _atomic_write_text(out / "answers.jsonl", _jsonl(answers))
    for category in EXISTENCE_CATEGORIES:
        _atomic_write_text(out / "pope" / f"coco_pope_{category}.json",
                           _jsonl(pope_label_rows(questions, answers, category)))
    _atomic_write_text(out / "captions.jsonl",
                       _jsonl([{"image": f"{s.image_id}.png", "caption": caption(s)} for s in scenes]))
    _atomic_write_text(out / "conversations.json", json.dumps([conversation_record(s) for s in scenes], indent=1))
    return out


def write_splits(root: str | os.PathLike, spec: SplitSpec = SplitSpec(), images: bool = True) -> dict[str, Path]:
    """All three splits; returns {split: folder}."""
    return {split: write_split(root, split, getattr(spec, split), spec.seed, images=images)
            for split in ("train", "val", "test")}


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Write the toy train/val/test splits in LLaVA's formats.")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=SplitSpec.train, help="train scenes")
    parser.add_argument("--val", type=int, default=SplitSpec.val, help="val scenes")
    parser.add_argument("--test", type=int, default=SplitSpec.test, help="test scenes")
    args = parser.parse_args()
    for split, path in write_splits(args.out, SplitSpec(args.seed, args.train, args.val, args.test)).items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()


DEMO_SEED = 2024


def write_demo_scenes(out_dir: str | os.PathLike, n_scenes: int = 3, seed: int = DEMO_SEED) -> Path:
    """The demo's bundled scenes: PNGs + ``questions.json`` (image, question with short-answer line, answer).

    Each scene gets a colour question and an adversarial existence question (the asked object's colour and
    shape are both in the scene), the kinds where keeping the right tokens matters."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_scenes):
        scene = make_scene(seed, "test", i)
        name = f"scene_{i + 1}.png"
        scene.image.save(out / name)
        picked = [qa for qa in scene.qas if qa.category in ("color", "adversarial", "relation")][:2]
        rows += [{"image": name, "question": with_short_answer_prompt(qa.question), "answer": qa.answer,
                  "category": qa.category} for qa in picked]
    _atomic_write_text(out / "questions.json", json.dumps(rows, indent=1))
    return out

"""Batched answer generation (`--batch-size`, `--group-by-length`): the batches, the left padding, and runs
whose answers must equal those of batch 1 under greedy decoding (the toy checkpoint on a slice of its test
split for script / divprune / fastv, the tiny checkpoints for unreadable images, text-only questions and a
kill-and-resume with another batch size)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llava.eval import common, model_vqa_loader, model_vqa_science
from tests.eval_fixtures import make_pope, make_sqa

REPO = Path(__file__).resolve().parents[1]
TOY_CHECKPOINT = REPO / "llava" / "toy" / "checkpoint"
TOY_QUESTIONS = 20  # the first 20 questions of the toy test split: batches of 8, 8 and 4


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _texts(path: Path) -> list[tuple]:
    return [(r["question_id"], r["text"], r.get("error")) for r in _lines(path)]


# ----------------------------------------------------------------------------- batches and padding
def test_batch_order_consecutive_or_grouped_within_windows():
    lengths = [3, 5, 1, 4, 2]
    assert common.batch_order(lengths, 2, False) == [[0, 1], [2, 3], [4]]
    # longest first: 1 (5), 3 (4), 0 (3), 4 (2), 2 (1)
    assert common.batch_order(lengths, 2, True) == [[1, 3], [0, 4], [2]]
    assert common.batch_order([7, 7, 7], 2, True) == [[0, 1], [2]]            # ties keep question order
    # batch 1: windows of LENGTH_WINDOW_BATCHES positions are sorted on their own
    w = common.LENGTH_WINDOW_BATCHES
    lengths = list(range(2 * w + 3))                                           # increasing: each window reverses
    flat = [b[0] for b in common.batch_order(lengths, 1, True)]
    assert flat == list(range(w - 1, -1, -1)) + list(range(2 * w - 1, w - 1, -1)) + [2 * w + 2, 2 * w + 1, 2 * w]
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="--batch-size"):
            common.batch_order([1], bad, False)


def test_left_pad_ids_and_mask():
    ids, mask = common.left_pad([torch.tensor([5, -200, 6]), torch.tensor([7]), torch.tensor([8, 9])], pad_id=0)
    assert ids.tolist() == [[5, -200, 6], [0, 0, 7], [0, 8, 9]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]


def test_bad_batch_size_is_refused_before_the_model_loads(tmp_path):
    make_pope(tmp_path)
    args = ["--model-path", str(tmp_path / "no-model"), "--question-file", str(tmp_path / "pope/llava_pope_test.jsonl"),
            "--image-folder", str(tmp_path / "pope/val2014"), "--answers-file", str(tmp_path / "a.jsonl"),
            "--device", "cpu", "--batch-size", "0"]
    with pytest.raises(ValueError, match="--batch-size: expected an int >= 1, got 0"):
        model_vqa_loader.main(args)
    assert not (tmp_path / "a.jsonl").exists()


# ----------------------------------------------------------------------------- the toy model: batch 8 == batch 1
@pytest.fixture(scope="module")
def toy_questions(tmp_path_factory):
    from llava.toy.bench import ensure_test_split

    root = tmp_path_factory.mktemp("toy")
    split = ensure_test_split(root / "data")
    rows = [json.loads(line) for line in (split / "questions.jsonl").read_text().splitlines()][:TOY_QUESTIONS]
    questions = root / "questions.jsonl"
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return questions, split / "images"


def _toy_run(questions: Path, images: Path, answers: Path, method: str, *extra: str) -> Path:
    model_vqa_loader.main(["--model-path", str(TOY_CHECKPOINT), "--question-file", str(questions),
                           "--image-folder", str(images), "--answers-file", str(answers), "--pruning-method", method,
                           "--visual-token-num", "16", "--device", "cpu", "--dtype", "float32",
                           "--max_new_tokens", "8", "--num-workers", "0", *extra])
    return answers


@pytest.mark.parametrize("method, grouped", [("script", False), ("divprune", True), ("fastv", False)])
def test_toy_batch_8_answers_equal_batch_1(toy_questions, tmp_path, method, grouped):
    from transformers import AutoTokenizer

    questions, images = toy_questions
    tokenizer = AutoTokenizer.from_pretrained(str(TOY_CHECKPOINT))
    lengths = {len(tokenizer(json.loads(line)["text"]).input_ids) for line in questions.read_text().splitlines()}
    assert len(lengths) >= 3           # prompts of several lengths: the batches really are left-padded
    one = _toy_run(questions, images, tmp_path / "b1.jsonl", method)
    extra = ["--group-by-length"] if grouped else []
    eight = _toy_run(questions, images, tmp_path / "b8.jsonl", method, "--batch-size", "8", *extra)
    want = _texts(one)
    assert len(want) == TOY_QUESTIONS and sum(bool(t) for _, t, _ in want) == TOY_QUESTIONS
    assert _texts(eight) == want       # same answers, written in question order
    assert [r["metadata"]["visual_tokens"] for r in _lines(eight)] == [r["metadata"]["visual_tokens"] for r in _lines(one)]
    assert {r["metadata"]["fingerprint"] for r in _lines(eight)} == {r["metadata"]["fingerprint"] for r in _lines(one)}


# ----------------------------------------------------------------------------- the tiny checkpoints
@pytest.fixture(scope="module")
def tiny15(tiny_llava15_path):
    return str(tiny_llava15_path)      # tests/conftest.py's tiny LLaVA-1.5 checkpoint


def _pope_args(ckpt, data: Path, answers: Path, *extra: str) -> list[str]:
    return ["--model-path", ckpt, "--question-file", str(data / "pope/llava_pope_test.jsonl"),
            "--image-folder", str(data / "pope/val2014"), "--answers-file", str(answers),
            "--visual-token-num", "4", "--device", "cpu", "--dtype", "float32", "--max_new_tokens", "3",
            "--num-workers", "0", *extra]


def test_unreadable_image_inside_a_batch(tiny15, tmp_path):
    make_pope(tmp_path)
    (tmp_path / "pope/val2014/COCO_val2014_000000000003.jpg").write_bytes(b"not an image")
    reference = tmp_path / "b1.jsonl"
    assert model_vqa_loader.main(_pope_args(tiny15, tmp_path, reference, "--on-image-error", "record")) == 4
    # record: the failed question gets its error line in its place, the others are answered as with batch 1
    recorded = tmp_path / "record.jsonl"
    assert model_vqa_loader.main(_pope_args(tiny15, tmp_path, recorded, "--on-image-error", "record",
                                            "--batch-size", "4")) == 4
    assert _texts(recorded) == _texts(reference)
    assert [r["question_id"] for r in _lines(recorded) if "error" in r] == [3]
    # stop: the questions before it are answered and written, then the run stops naming the image
    stopped = tmp_path / "stop.jsonl"
    with pytest.raises(RuntimeError, match=r"COCO_val2014_000000000003\.jpg.*2 answers written so far"):
        model_vqa_loader.main(_pope_args(tiny15, tmp_path, stopped, "--batch-size", "4"))
    assert _texts(stopped) == _texts(reference)[:2]


def test_text_only_and_image_questions_in_one_batch(tiny15, tmp_path):
    make_sqa(tmp_path)
    d = tmp_path / "scienceqa"

    def run(answers: Path, *extra: str) -> list[tuple]:
        model_vqa_science.main(["--model-path", tiny15, "--question-file", str(d / "llava_test_CQM-A.json"),
                                "--image-folder", str(d / "images/test"), "--answers-file", str(answers),
                                "--single-pred-prompt", "--visual-token-num", "4", "--device", "cpu",
                                "--dtype", "float32", "--max_new_tokens", "3", *extra])
        return _texts(answers)

    want = run(tmp_path / "b1.jsonl")
    assert [q for q, _, _ in want] == ["5", "9", "12"]          # "9" has no image
    assert run(tmp_path / "b3.jsonl", "--batch-size", "3") == want
    assert run(tmp_path / "b3g.jsonl", "--batch-size", "3", "--group-by-length") == want


def test_killed_batched_run_resumes_with_another_batch_size(tiny15, tmp_path):
    make_pope(tmp_path)
    reference = tmp_path / "b1.jsonl"
    model_vqa_loader.main(_pope_args(tiny15, tmp_path, reference))
    answers = tmp_path / "a.jsonl"
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), common.CRASH_ENV: "1"}
    cmd = [sys.executable, "-m", "llava.eval.model_vqa_loader", *_pope_args(tiny15, tmp_path, answers)]
    crashed = subprocess.run(cmd + ["--batch-size", "3"], env=env, capture_output=True, text=True, timeout=240)
    assert crashed.returncode == common.CRASH_EXIT_CODE, crashed.stderr[-2000:]
    raw = answers.read_text()
    assert raw.count("\n") == 1 and not raw.endswith("\n")     # one answer + half a line
    assert model_vqa_loader.main(_pope_args(tiny15, tmp_path, answers, "--batch-size", "2")) == 3
    assert _texts(answers) == _texts(reference)

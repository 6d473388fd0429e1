"""Answer generation: sharding, the resumable answers file, prompts/samples per benchmark, and a real
kill-and-resume run of the loader against the tiny LLaVA-1.5 checkpoint on CPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llava.eval import common, model_vqa_loader, model_vqa_mmbench, model_vqa_science
from tests.eval_fixtures import make_mmbench, make_pope, make_sqa

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- sharding
@pytest.mark.parametrize(
    "n_items, n, expected",
    [
        (10, 3, [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]),   # ceil(10/3) = 4
        (4, 4, [[0], [1], [2], [3]]),
        (5, 4, [[0, 1], [2, 3], [4]]),                    # ceil(5/4) = 2 -> only 3 chunks
        (0, 2, []),
    ],
)
def test_split_list_contiguous_ceil_chunks(n_items, n, expected):
    assert common.split_list(list(range(n_items)), n) == expected


def test_get_chunk_covers_everything_once_and_handles_missing_chunks():
    items = list(range(5))
    chunks = [common.get_chunk(items, 4, k) for k in range(4)]
    assert chunks == [[0, 1], [2, 3], [4], []]
    assert sum(chunks, []) == items
    with pytest.raises(ValueError, match="chunk_idx"):
        common.get_chunk(items, 2, 2)
    with pytest.raises(ValueError, match="num_chunks"):
        common.split_list(items, 0)


# ----------------------------------------------------------------------------- resumable writer
def _row(qid, text="x", prompt="p", **kw):
    return {"question_id": qid, "prompt": prompt, "text": text, **kw}


def test_writer_repairs_partial_last_line_and_skips_written(tmp_path):
    path = tmp_path / "a.jsonl"
    good = [_row(1), _row(2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in good) + '{"question_id": 3, "pro')
    with common.ResumableJsonlWriter(path) as w:
        assert w.repaired
        assert _row(1) in w and _row(2) in w and _row(3) not in w
        w.write(_row(2, text="dup"))   # already there: ignored
        w.write(_row(3))
        w.write(_row(3))               # twice in one run: written once
    lines = [json.loads(l) for l in path.read_text().splitlines()]
    assert [r["question_id"] for r in lines] == [1, 2, 3]
    assert lines[1]["text"] == "x"


def test_writer_key_includes_prompt_and_round(tmp_path):
    # LLaVA's TextVQA file reuses the image id as question_id; MMBench repeats the index per round
    with common.ResumableJsonlWriter(tmp_path / "a.jsonl") as w:
        w.write(_row("img1", prompt="what?"))
        w.write(_row("img1", prompt="which?"))
        w.write(_row(7, prompt="q", round_id=0))
        w.write(_row(7, prompt="q", round_id=1))
    assert len((tmp_path / "a.jsonl").read_text().splitlines()) == 4


def test_writer_refuses_a_corrupt_complete_line_even_the_last(tmp_path):
    # a kill mid-write leaves a line without its newline; a newline-terminated invalid line is corruption
    path = tmp_path / "a.jsonl"
    text = json.dumps(_row(1)) + "\n" + "{not json}\n"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"a\.jsonl line 2 is not valid JSON"):
        common.ResumableJsonlWriter(path)
    assert path.read_text() == text


# ----------------------------------------------------------------------------- flags
def test_pruning_params_parsing():
    assert common.parse_pruning_params(["tau=0.1", "negate=false", "kernel=cos", "k=4"]) == {
        "tau": 0.1, "negate": False, "kernel": "cos", "k": 4}
    with pytest.raises(ValueError, match="--pruning-param"):
        common.parse_pruning_params(["tau"])


def test_generation_flags_accept_both_spellings_and_known_methods():
    import argparse

    import script_prune

    ap = argparse.ArgumentParser()
    common.add_generation_args(ap, max_new_tokens=128)
    base = ["--model-path", "m", "--question-file", "q", "--answers-file", "a"]
    a = ap.parse_args(base + ["--visual_token_num", "64", "--pruning-method", "none"])
    assert a.visual_token_num == 64 and a.pruning_method == "none" and a.max_new_tokens == 128
    a = ap.parse_args(base + ["--visual-token-num", "32", "--pruning-param", "tau=0.3"])
    assert a.visual_token_num == 32 and a.pruning_method == "script"
    cfg = common.build_pruning_config(a)
    assert cfg.method == "script" and cfg.visual_token_num == 32 and cfg.params == {"tau": 0.3}
    assert common.build_pruning_config(ap.parse_args(base + ["--pruning-method", "none"])) is None
    assert "script" in script_prune.list_methods()
    with pytest.raises(SystemExit):
        ap.parse_args(base + ["--pruning-method", "no-such-method"])


def test_build_prompt_vicuna_v1():
    prompt = common.build_prompt("What?", True, "vicuna_v1", False)
    assert prompt == ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                      "helpful, detailed, and polite answers to the user's questions. USER: <image>\nWhat? ASSISTANT:")
    assert "<image>" not in common.build_prompt("What?", False, "vicuna_v1", False)
    assert "<im_start><image><im_end>\nWhat?" in common.build_prompt("What?", True, "vicuna_v1", True)


# ----------------------------------------------------------------------------- samples per benchmark
def test_loader_samples_and_missing_image_message(tmp_path):
    make_pope(tmp_path)
    samples = model_vqa_loader.load_samples(str(tmp_path / "pope/llava_pope_test.jsonl"), str(tmp_path / "pope/val2014"))
    assert [s.question_id for s in samples] == [1, 2, 3, 4]
    assert samples[0].question == "Is there a dog in the image?\nAnswer the question using a single word or phrase."
    assert samples[0].query == "Is there a dog in the image?"
    assert samples[0].load_image().size == (40, 30)
    os.remove(tmp_path / "pope/val2014/COCO_val2014_000000000003.jpg")
    with pytest.raises(FileNotFoundError, match=r"COCO_val2014_000000000003\.jpg.*EVAL\.md"):
        model_vqa_loader.load_samples(str(tmp_path / "pope/llava_pope_test.jsonl"), str(tmp_path / "pope/val2014"))
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl.*EVAL\.md"):
        model_vqa_loader.load_samples(str(tmp_path / "nope.jsonl"), str(tmp_path))


def test_science_samples_text_only_and_prompts(tmp_path):
    make_sqa(tmp_path)
    d = tmp_path / "scienceqa"
    s = model_vqa_science.load_samples(str(d / "llava_test_CQM-A.json"), str(d / "images/test"), True)
    assert [x.question_id for x in s] == ["5", "9", "12"]
    instr = "Answer with the option's letter from the given choices directly."
    assert s[0].prompt_field == ("<image>\nContext: The picture shows a magnet.\nWhich pole is marked?\nA. north\nB. south\n" + instr)
    assert s[0].question == "Context: The picture shows a magnet.\nWhich pole is marked?\nA. north\nB. south\n" + instr
    assert s[1].load_image is None and not s[1].prompt_field.startswith("<image>")
    assert s[1].query == "Context: none\nWhich is a mammal?\nA. frog\nB. whale\nC. trout"


def test_mmbench_options_hint_and_rounds(tmp_path):
    make_mmbench(tmp_path)
    tsv = str(tmp_path / "mmbench/mmbench_dev_20230712.tsv")
    s = model_vqa_mmbench.load_samples(tsv, True, "en", False)
    assert len(s) == 3
    assert s[0].prompt_field == "A simple figure.\nWhat shape is shown?\nA. circle\nB. square\nC. triangle\nD. star"
    assert s[0].question.endswith("\nAnswer with the option's letter from the given choices directly.")
    # options stop at the first empty column; no hint -> question first
    assert s[1].prompt_field == "Which color dominates?\nA. red\nB. green"
    assert s[1].extra == {"round_id": 0, "options": ["red", "green"], "option_char": ["A", "B"]}
    cn = model_vqa_mmbench.load_samples(str(tmp_path / "mmbench_cn/mmbench_dev_cn_20231003.tsv"), True, "cn", False)
    assert cn[0].question.endswith("\n请直接回答选项字母。")
    rounds = model_vqa_mmbench.load_samples(tsv, True, "en", True)
    assert len(rounds) == 4 + 2 + 3
    r1 = rounds[1]
    assert r1.extra == {"round_id": 1, "options": ["square", "triangle", "star", "circle"], "option_char": ["B", "C", "D", "A"]}
    assert r1.prompt_field.endswith("A. square\nB. triangle\nC. star\nD. circle")
    assert rounds[0].load_image().size == (36, 28)


def test_mmbench_image_cell_referring_to_another_row():
    images = {0: "iVBORw0KGgoAAAA", 5: "0"}
    assert model_vqa_mmbench.resolve_image_cell("5", images) == "iVBORw0KGgoAAAA"
    with pytest.raises(ValueError, match="index 9"):
        model_vqa_mmbench.resolve_image_cell("9", images)


# ----------------------------------------------------------------------------- a real run, killed and resumed
@pytest.fixture(scope="module")
def tiny15(request, tmp_path_factory):
    try:
        return str(request.getfixturevalue("tiny_llava15_path"))
    except pytest.FixtureLookupError:
        from llava.model.tiny import make_tiny_checkpoint

        return make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny15")), arch="llava-1.5")


def _loader_cmd(ckpt, data, answers):
    return [sys.executable, "-m", "llava.eval.model_vqa_loader", "--model-path", ckpt,
            "--question-file", str(data / "pope/llava_pope_test.jsonl"), "--image-folder", str(data / "pope/val2014"),
            "--answers-file", str(answers), "--visual-token-num", "4", "--device", "cpu", "--dtype", "float32",
            "--max_new_tokens", "3"]


def _env(**extra):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), **extra}
    env.pop(common.CRASH_ENV, None)
    env.update(extra)
    return env


def test_loader_killed_mid_write_resumes_without_duplicates(tiny15, tmp_path):
    make_pope(tmp_path)
    answers = tmp_path / "out" / "a.jsonl"
    crashed = subprocess.run(_loader_cmd(tiny15, tmp_path, answers), env=_env(**{common.CRASH_ENV: "2"}),
                             capture_output=True, text=True, timeout=240)
    assert crashed.returncode == common.CRASH_EXIT_CODE, crashed.stderr[-2000:]
    raw = answers.read_text()
    assert raw.count("\n") == 2 and not raw.endswith("\n")   # two answers + half a line
    # resume with a DataLoader worker process (the GPU default path loads images in workers)
    done = subprocess.run(_loader_cmd(tiny15, tmp_path, answers) + ["--num-workers", "1"], env=_env(),
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "dropped a truncated last line" in done.stderr
    rows = [json.loads(l) for l in answers.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert set(r) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
        assert r["metadata"]["method"] == "script" and r["metadata"]["budget"] == 4
        assert r["metadata"]["visual_tokens"] == 4     # 4 of the tiny CLIP's patches reached the LLM
    # a third run has nothing to do and leaves the file as it is
    before = answers.read_text()
    again = subprocess.run(_loader_cmd(tiny15, tmp_path, answers), env=_env(), capture_output=True, text=True, timeout=240)
    assert again.returncode == 0 and answers.read_text() == before


def test_resume_refuses_answers_of_another_setting(tiny15, tmp_path):
    import argparse

    ap = argparse.ArgumentParser()
    common.add_generation_args(ap, max_new_tokens=8)
    questions = tmp_path / "q.jsonl"
    questions.write_text("{}\n")
    sample = common.EvalSample(question_id=1, question="q", prompt_field="p", load_image=None, query="q")
    base = ["--model-path", tiny15, "--question-file", str(questions), "--device", "cpu", "--visual-token-num", "64"]
    args = ap.parse_args(base + ["--answers-file", str(tmp_path / "a.jsonl")])
    fp = common.run_fingerprint(args, common.build_pruning_config(args), [sample])
    answers = tmp_path / "a.jsonl"
    answers.write_text(json.dumps({**_row(1), "metadata": {"fingerprint": common.fingerprint_id(fp), "run": fp}}) + "\n")
    args = ap.parse_args(base + ["--answers-file", str(answers), "--pruning-param", "tau=0.1"])
    with pytest.raises(ValueError, match=r"another run.*\n  params: \{\} in the file, \{\"tau\": 0.1\} in this run"):
        common.run_generation(args, [sample])
    # same setting: nothing left to do, the model is never loaded
    args = ap.parse_args(base + ["--answers-file", str(answers)])
    assert common.run_generation(args, [sample]) == 0
    # an answers file of an older version (no fingerprint) cannot be checked: refused
    answers.write_text(json.dumps({**_row(1), "metadata": {"method": "script", "budget": 64, "params": {}}}) + "\n")
    with pytest.raises(ValueError, match="no run fingerprint"):
        common.run_generation(args, [sample])

"""Issue 13: answer files and benchmark numbers that cannot be silently wrong.

Each numbered case of the issue (and each of its weaker items) is reproduced here against the tiny random
LLaVA-1.5 checkpoint on CPU: the run fingerprint and what resume refuses (1), one writer per answers file
(3), duplicate question keys (4), a question file edited between resumed runs and the merge (6), a corrupt
middle line (7), unreadable images, parameter checks before the model loads, a partly filled summary.csv,
pruning with autograd on, corrupt checkpoint files and contradicting negate flags.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llava.eval import common, model_vqa_loader, summarize
from llava.eval.io_utils import FileLock, FileLockedError
from tests.eval_fixtures import make_pope

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny15(tiny_llava15_path):
    return str(tiny_llava15_path)


def _pope_args(ckpt, data: Path, answers: Path, *extra: str) -> list[str]:
    return ["--model-path", ckpt, "--question-file", str(data / "pope/llava_pope_test.jsonl"),
            "--image-folder", str(data / "pope/val2014"), "--answers-file", str(answers),
            "--visual-token-num", "4", "--device", "cpu", "--dtype", "float32", "--max_new_tokens", "3",
            "--num-workers", "0", *extra]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _env(**extra) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    for name in (common.CRASH_ENV, common.DRIVER_ENV, "CUDA_VISIBLE_DEVICES", "CHUNKS", "RUN_TAG"):
        env.pop(name, None)
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def answered(tiny15, tmp_path_factory):
    """One finished loader run on the 4 POPE questions: (data root, answers file)."""
    root = tmp_path_factory.mktemp("answered")
    make_pope(root)
    answers = root / "out" / "a.jsonl"
    assert model_vqa_loader.main(_pope_args(tiny15, root, answers)) == 4
    return root, answers


# ----------------------------------------------------------------------------- 1. run fingerprint
def test_every_answer_carries_the_run_fingerprint(tiny15, answered):
    root, answers = answered
    rows = _lines(answers)
    assert len(rows) == 4
    run = rows[0]["metadata"]["run"]
    question_file = root / "pope/llava_pope_test.jsonl"
    assert run["model_path"] == os.path.abspath(tiny15)
    assert run["method"] == "script" and run["budget"] == 4 and run["params"] == {}
    assert run["negate"] is True                                   # the default negated relevance
    assert run["conv_mode"] == "vicuna_v1"
    assert run["decoding"] == {"max_new_tokens": 3, "num_beams": 1, "do_sample": False}
    assert run["dtype"] == "float32" and run["attn_implementation"] == "sdpa"
    assert run["question_file_sha256"] == hashlib.sha256(question_file.read_bytes()).hexdigest()
    assert run["versions"]["script-prune"] and run["versions"]["torch"] and run["versions"]["transformers"]
    assert len(run["model_sha256"]) == 16
    fid = hashlib.sha256(json.dumps(run, sort_keys=True).encode()).hexdigest()[:16]
    assert {r["metadata"]["fingerprint"] for r in rows} == {fid}
    assert all(r["metadata"]["run"] == run for r in rows)


@pytest.mark.parametrize("extra, field", [
    (["--no-negate-relevance"], "negate: true in the file, false in this run"),
    (["--max_new_tokens", "5"], "decoding.max_new_tokens: 3 in the file, 5 in this run"),
    (["--conv-mode", "llava_v1"], 'conv_mode: "vicuna_v1" in the file, "llava_v1" in this run'),
    (["--temperature", "0.7"], "decoding.do_sample: false in the file, true in this run"),
    (["--num_beams", "2"], "decoding.num_beams: 1 in the file, 2 in this run"),
    (["--dtype", "bfloat16"], 'dtype: "float32" in the file, "bfloat16" in this run'),
    (["--attn-implementation", "eager"], 'attn_implementation: "sdpa" in the file, "eager" in this run'),
    (["--pruning-param", "tau=0.3"], 'params: {} in the file, {"tau": 0.3} in this run'),
    (["--visual-token-num", "3"], "budget: 4 in the file, 3 in this run"),
])
def test_resume_refuses_any_other_setting_naming_the_field(tiny15, answered, extra, field):
    root, answers = answered
    before = answers.read_text()
    with pytest.raises(ValueError) as e:
        model_vqa_loader.main(_pope_args(tiny15, root, answers) + extra)
    assert "holds answers of another run" in str(e.value) and field in str(e.value)
    assert answers.read_text() == before


def test_resume_refuses_another_checkpoint_and_a_changed_config(tiny15, answered, tmp_path):
    root, answers = answered
    other = tmp_path / "copy"
    shutil.copytree(tiny15, other)
    with pytest.raises(ValueError, match="model_path: "):
        model_vqa_loader.main(_pope_args(str(other), root, answers))
    config = json.loads((other / "config.json").read_text())
    config["mm_projector_type"] = config.get("mm_projector_type", "mlp2x_gelu") + "_edited"
    (other / "config.json").write_text(json.dumps(config))
    from llava.model.builder import checkpoint_digest

    assert checkpoint_digest(str(other)) != checkpoint_digest(tiny15)


def test_same_settings_resume_without_loading_the_model(tiny15, answered):
    root, answers = answered
    before = answers.read_text()
    assert model_vqa_loader.main(_pope_args(tiny15, root, answers)) == 0
    assert answers.read_text() == before


# ----------------------------------------------------------------------------- 3. one writer per answers file
def test_second_writer_is_refused_naming_the_holder(tmp_path):
    path = tmp_path / "a.jsonl"
    first = common.ResumableJsonlWriter(path)
    try:
        with pytest.raises(FileLockedError) as e:
            common.ResumableJsonlWriter(path)
        msg = str(e.value)
        assert f"pid {os.getpid()}" in msg and "on host" in msg and "since" in msg and str(path) in msg
    finally:
        first.close()
    common.ResumableJsonlWriter(path).close()      # released: the next writer gets it


def test_run_refuses_while_another_process_writes_the_file(tiny15, tmp_path):
    make_pope(tmp_path)
    answers = tmp_path / "a.jsonl"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from llava.eval.common import ResumableJsonlWriter as W; "
         f"w = W({str(answers)!r}); print('ready', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(FileLockedError, match=f"pid {holder.pid} on host"):
            model_vqa_loader.main(_pope_args(tiny15, tmp_path, answers))
    finally:
        holder.kill()
        holder.wait()
    assert answers.read_text() == ""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killing_only_the_bash_driver_stops_its_workers(tiny15, tmp_path, sig):
    """A signal to the driver of pope.sh only: the Python worker must stop instead of writing on as an orphan
    (SIGKILL: the worker notices that the driver is gone; SIGTERM: the driver's trap stops it first)."""
    ckpt = Path(tiny15)
    data = tmp_path / "data"
    make_pope(data)
    qfile = data / "pope/llava_pope_test.jsonl"
    base = _lines(qfile)
    many = [{**q, "question_id": 1000 * k + q["question_id"]} for k in range(60) for q in base]   # 240 questions
    qfile.write_text("".join(json.dumps(q) + "\n" for q in many))
    env = _env(PYTHON=sys.executable, CKPT_DIR=str(ckpt.parent), CKPT=ckpt.name, DATA_DIR=str(data),
               RESULTS_DIR=str(tmp_path / "results"), CHUNKS="1")
    err_file = open(tmp_path / "driver.err", "w")
    driver = subprocess.Popen(["bash", str(REPO / "scripts/v1_5/eval/pope.sh"), "4", "--device", "cpu",
                               "--dtype", "float32", "--max_new_tokens", "3"], env=env, cwd=str(tmp_path),
                              stdout=subprocess.DEVNULL, stderr=err_file, start_new_session=True)
    answers = data / "pope/answers" / ckpt.name / "script_4" / "1_0.jsonl"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (answers.exists() and answers.read_text().count("\n") >= 2):
            time.sleep(0.2)
        assert answers.read_text().count("\n") >= 2, "the worker never started answering"
        workers = _children(driver.pid)
        assert len(workers) == 1, workers
        worker = workers[0]
        driver.send_signal(sig)                          # only the driver, as some schedulers do
        driver.wait(timeout=30)
        if sig == signal.SIGTERM:
            err = (tmp_path / "driver.err").read_text()
            assert driver.returncode == 143 and "interrupted: stopped 1 answer generator(s)" in err
        deadline = time.time() + 10
        while time.time() < deadline and _alive(worker):
            time.sleep(0.2)
        assert not _alive(worker), "the worker kept running after its driver died"
        n = answers.read_text().count("\n")
        assert n < len(many)
        time.sleep(1.0)
        assert answers.read_text().count("\n") == n        # nobody writes any more
    finally:
        err_file.close()
        try:
            os.killpg(driver.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _children(pid: int) -> list[int]:
    """Pids of the live processes whose parent is `pid` (Linux /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) is not running
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


# ----------------------------------------------------------------------------- 4. duplicate question keys
def test_duplicate_question_key_is_an_error_naming_key_and_line(tiny15, tmp_path):
    make_pope(tmp_path)
    qfile = tmp_path / "pope/llava_pope_test.jsonl"
    rows = _lines(qfile)
    rows.append({**rows[0], "image": rows[1]["image"]})        # same (question_id, prompt), another image
    qfile.write_text("".join(json.dumps(r) + "\n" for r in rows))
    answers = tmp_path / "a.jsonl"
    with pytest.raises(ValueError) as e:
        model_vqa_loader.main(_pope_args(tiny15, tmp_path, answers))
    msg = str(e.value)
    assert "line 5 repeats the question key" in msg and "of line 1" in msg and str(qfile) in msg
    assert '[1, 0, "Is there a dog in the image?' in msg
    assert not answers.exists()


# ----------------------------------------------------------------------------- 6. edited question file / merge
def test_resume_refuses_a_question_file_edited_in_between(tiny15, tmp_path):
    make_pope(tmp_path)
    answers = tmp_path / "a.jsonl"
    crashed = subprocess.run([sys.executable, "-m", "llava.eval.model_vqa_loader",    # killed after 2 answers
                              *_pope_args(tiny15, tmp_path, answers)], env=_env(**{common.CRASH_ENV: "2"}),
                             capture_output=True, text=True, timeout=240)
    assert crashed.returncode == common.CRASH_EXIT_CODE, crashed.stderr[-2000:]
    qfile = tmp_path / "pope/llava_pope_test.jsonl"
    rows = _lines(qfile)
    rows.insert(0, {**rows[0], "question_id": 5, "text": "Is there a cow in the image?"})
    qfile.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError) as e:
        model_vqa_loader.main(_pope_args(tiny15, tmp_path, answers))
    assert "question_file_sha256" in str(e.value) and "questions_sha256" in str(e.value)


def _chunk_rows(samples, fp, order):
    return [{"question_id": samples[i].question_id, "prompt": samples[i].prompt_field, "text": f"a{i}",
             "metadata": {"fingerprint": common.fingerprint_id(fp), "run": fp}} for i in order]


def _write(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_merge_writes_question_order_and_exactly_the_question_set(tmp_path):
    samples = [common.EvalSample(question_id=i, question=f"q{i}", prompt_field=f"q{i}", load_image=None, query="")
               for i in range(4)]
    fp = {"method": "script", "budget": 4}
    a = _write(tmp_path / "2_0.jsonl", _chunk_rows(samples, fp, [1, 0]))
    b = _write(tmp_path / "2_1.jsonl", _chunk_rows(samples, fp, [3, 2]))
    merged = tmp_path / "merge.jsonl"
    assert common.merge_answers([b, a], str(merged), samples, fp) == 4
    assert [r["text"] for r in _lines(merged)] == ["a0", "a1", "a2", "a3"]
    # an answer to a question not in the file (the edited-question-file case): refused, merge untouched
    before = merged.read_text()
    extra = _chunk_rows(samples, fp, [2, 3]) + [{**_chunk_rows(samples, fp, [0])[0], "question_id": 99}]
    c = _write(tmp_path / "c.jsonl", extra)
    with pytest.raises(ValueError, match=r"1 answers are to questions not in the question file \(first: \[99, 0"):
        common.merge_answers([a, c], str(merged), samples, fp)
    with pytest.raises(ValueError, match=r"2 of 4 questions have no answer \(first: \[2, 0, \"q2\"\]"):
        common.merge_answers([a], str(merged), samples, fp)
    with pytest.raises(ValueError, match="answered twice"):
        common.merge_answers([a, b, _write(tmp_path / "d.jsonl", _chunk_rows(samples, fp, [0]))], str(merged),
                             samples, fp)
    with pytest.raises(ValueError, match="budget: 4 in the file, 8 in this run"):
        common.merge_answers([a, b], str(merged), samples, {"method": "script", "budget": 8})
    assert merged.read_text() == before


# ----------------------------------------------------------------------------- 7. corrupt middle line
def test_corrupt_middle_line_is_an_error_not_a_truncation(tmp_path):
    path = tmp_path / "a.jsonl"
    good = [{"question_id": i, "prompt": "p", "text": "x"} for i in (1, 3, 4)]
    text = json.dumps(good[0]) + "\n" + '{"question_id": 2, "pro\n' + "".join(json.dumps(r) + "\n" for r in good[1:])
    path.write_text(text)
    with pytest.raises(ValueError) as e:
        common.ResumableJsonlWriter(path)
    assert f"{path} line 2 is not valid JSON" in str(e.value) and "partial" not in str(e.value)
    assert path.read_text() == text                        # nothing dropped
    # only a last line without its newline (a kill mid-write) is cut off, the answers before it kept
    path.write_text("".join(json.dumps(r) + "\n" for r in good) + '{"question_id": 5, "pro')
    with common.ResumableJsonlWriter(path) as w:
        assert w.repaired and len(w.done) == 3
    assert path.read_text() == "".join(json.dumps(r) + "\n" for r in good)
    # a valid JSON line that is not an answer, and a repeated answer, are errors too
    path.write_text(json.dumps(good[0]) + "\n[1, 2]\n")
    with pytest.raises(ValueError, match="line 2 is not an answer line"):
        common.ResumableJsonlWriter(path)
    path.write_text(json.dumps(good[0]) + "\n" + json.dumps(good[0]) + "\n")
    with pytest.raises(ValueError, match="line 2 repeats the answer of line 1"):
        common.ResumableJsonlWriter(path)


# ----------------------------------------------------------------------------- weaker items
def _break_image(root: Path, qid: int) -> Path:
    image = root / "pope/val2014" / f"COCO_val2014_{qid:012d}.jpg"
    image.write_bytes(b"not an image at all")
    return image


def test_unreadable_image_stops_naming_it_and_keeps_the_answers_before(tiny15, tmp_path):
    make_pope(tmp_path)
    bad = _break_image(tmp_path, 3)
    answers = tmp_path / "a.jsonl"
    with pytest.raises(RuntimeError) as e:
        model_vqa_loader.main(_pope_args(tiny15, tmp_path, answers))
    assert str(bad) in str(e.value) and "--on-image-error record" in str(e.value)
    assert [r["question_id"] for r in _lines(answers)] == [1, 2]


def test_unreadable_image_recorded_as_a_failed_answer_and_listed_in_the_summary(tiny15, tmp_path):
    make_pope(tmp_path)
    bad = _break_image(tmp_path, 3)
    answers = tmp_path / "a.jsonl"
    assert model_vqa_loader.main(_pope_args(tiny15, tmp_path, answers, "--on-image-error", "record")) == 4
    rows = _lines(answers)
    assert [r["question_id"] for r in rows] == [1, 2, 3, 4]
    failed = [r for r in rows if "error" in r]
    assert len(failed) == 1 and failed[0]["question_id"] == 3 and failed[0]["text"] == ""
    assert str(bad) in failed[0]["error"] and failed[0]["metadata"]["visual_tokens"] == 0
    csv_path = tmp_path / "summary.csv"
    summarize.main(["add", "--csv", str(csv_path), "--benchmark", "pope", "--checkpoint", "ck", "--method", "script",
                    "--budget", "4", "--metric", "average_f1", "--value", "50.0", "--answers-file", str(answers)])
    table = summarize.main(["--csv", str(csv_path)])
    assert table[1][table[0].index("POPE")] == "50.00!"
    assert summarize.read_marks(str(csv_path)) == {summarize.RowKey("ck", "script", 4): {"pope": summarize.Mark("", 1)}}


def test_lock_file_records_and_clears_its_holder(tmp_path):
    target = tmp_path / "x.csv"
    lock = FileLock(target, "results summary").acquire()
    info = json.loads((tmp_path / "x.csv.lock").read_text())
    assert info["pid"] == os.getpid() and {"host", "started", "command"} <= set(info)
    lock.release()
    assert (tmp_path / "x.csv.lock").read_text() == ""


# ----------------------------------------------------------------------------- 1 and 6 through the scripts
def test_pope_script_reruns_refusals_and_summary_rows(tiny15, tmp_path):
    """pope.sh: a rerun with --no-negate-relevance is refused (no second summary row); the same run again
    replaces its row; RUN_TAG gives the other setting its own row; an edited question file is refused."""
    ckpt = Path(tiny15)
    data = tmp_path / "data"
    make_pope(data)
    env = _env(PYTHON=sys.executable, CKPT_DIR=str(ckpt.parent), CKPT=ckpt.name, DATA_DIR=str(data),
               RESULTS_DIR=str(tmp_path / "results"), CHUNKS="2")
    gen = ["--device", "cpu", "--dtype", "float32", "--max_new_tokens", "3"]

    def pope(*extra, **more_env):
        return subprocess.run(["bash", str(REPO / "scripts/v1_5/eval/pope.sh"), "4", *gen, *extra],
                              env={**env, **more_env}, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))

    def summary_rows():
        return summarize._read_rows(tmp_path / "results" / "summary.csv")

    first = pope()
    assert first.returncode == 0, first.stderr[-3000:]
    merged = data / "pope/answers" / ckpt.name / "script_4" / "merge.jsonl"
    answers = merged.read_text()
    assert [r["question_id"] for r in _lines(merged)] == [1, 2, 3, 4]
    rows = summary_rows()
    assert len(rows) == 1 and rows[0]["fingerprint"] == _lines(merged)[0]["metadata"]["fingerprint"]

    other = pope("--no-negate-relevance")
    assert other.returncode != 0 and "negate: true in the file, false in this run" in other.stderr
    assert len(summary_rows()) == 1 and merged.read_text() == answers

    again = pope()
    assert again.returncode == 0, again.stderr[-3000:]
    assert [(r["value"], r["fingerprint"]) for r in summary_rows()] == [(rows[0]["value"], rows[0]["fingerprint"])]

    tagged = pope("--no-negate-relevance", RUN_TAG="nonegate")
    assert tagged.returncode == 0, tagged.stderr[-3000:]
    assert [r["run"] for r in summary_rows()] == ["", "nonegate"]
    nonegate = _lines(data / "pope/answers" / ckpt.name / "nonegate" / "merge.jsonl")
    assert {r["metadata"]["run"]["negate"] for r in nonegate} == {False}
    table = summarize.main(["--csv", str(tmp_path / "results" / "summary.csv")])
    assert [r[1] for r in table[1:]] == ["script", "script (nonegate)"]

    qfile = data / "pope/llava_pope_test.jsonl"
    questions = _lines(qfile)
    questions = questions[::-1] + [{**questions[0], "question_id": 5, "text": "Is there a cow in the image?"}]
    qfile.write_text("".join(json.dumps(q) + "\n" for q in questions))
    edited = pope()
    assert edited.returncode != 0 and "question_file_sha256" in edited.stderr
    assert merged.read_text() == answers and len(summary_rows()) == 2

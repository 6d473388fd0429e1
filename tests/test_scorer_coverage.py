"""Issue 13 (scorer side): every scorer and converter checks its answers against the question file.

Each case first reproduced the silent wrong number (noted per test), then became an error before any number
is printed, or an explicit, marked subset with --allow-subset. Expected values are computed by hand.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from llava.eval import (
    convert_mmbench_for_submission,
    convert_mmvet_for_eval,
    convert_vizwiz_for_submission,
    convert_vqav2_for_submission,
    eval_gqa,
    eval_mme,
    eval_pope,
    eval_science_qa,
    eval_textvqa,
)
from llava.eval.coverage import COVERAGE_KEYS, CoverageError, check_coverage, summary_line, unique_keys
from tests.eval_fixtures import write_jsonl

REPO = Path(__file__).resolve().parents[1]
SFX = "\nAnswer the question using a single word or phrase."



# ----------------------------------------------------------------------------- the rule itself
def test_check_coverage_counts_and_first_ids():
    with pytest.raises(CoverageError) as e:
        check_coverage([1, 2, 3, 4, 5, 6, 7, 8], [1, 1, 2, 9, 9, 10], answers="--result-file a.jsonl",
                       questions="--question-file q.jsonl")
    msg = str(e.value)
    assert "--result-file a.jsonl does not match --question-file q.jsonl" in msg
    assert "6 of 8 questions have no answer (first: 3, 4, 5, 6, 7, ...)" in msg
    assert "1 questions are answered more than once (first: 1)" in msg
    assert "2 answers are for questions not in --question-file q.jsonl (first: 9, 10)" in msg


def test_allow_subset_allows_missing_only():
    cov = check_coverage(["a", "b", "c"], ["c", "a"], answers="A", questions="Q", allow_subset=True)
    assert cov.fields() == {"answered": 2, "questions": 3, "subset": True}
    assert cov.missing == ("b",)
    assert summary_line(cov.fields()).startswith("SUBSET (--allow-subset): 2 of 3 questions")
    with pytest.raises(CoverageError, match="more than once"):
        check_coverage(["a", "b"], ["a", "a"], answers="A", questions="Q", allow_subset=True)
    with pytest.raises(CoverageError, match="not in Q"):
        check_coverage(["a", "b"], ["a", "z"], answers="A", questions="Q", allow_subset=True)
    with pytest.raises(CoverageError, match="--allow-subset to score the answered subset"):
        check_coverage(["a", "b"], ["a"], answers="A", questions="Q")
    full = check_coverage(["a", "b"], ["b", "a"], answers="A", questions="Q", allow_subset=True)
    assert full.fields() == {"answered": 2, "questions": 2, "subset": False}


def test_repeated_question_keys_are_an_error_at_load():
    with pytest.raises(CoverageError, match=r"q.jsonl: 1 question keys occur more than once \(first: 7\)"):
        unique_keys([7, 8, 7], "q.jsonl")


# ----------------------------------------------------------------------------- TextVQA: 66.7 -> 100 with one answer missing
def _textvqa(tmp_path, answered):
    ann = {"data": [{"question_id": i, "image_id": f"im{i}", "question": f"q{i}?", "answers": ["yes"] * 10}
                    for i in range(3)]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    texts = {0: "yes", 1: "yes", 2: "no"}            # 2 of 3 right: 66.67
    return str(tmp_path / "ann.json"), write_jsonl(tmp_path / "a.jsonl", [
        {"question_id": f"im{i}", "prompt": f"q{i}?" + SFX, "text": texts[i]} for i in answered])


def test_textvqa_missing_answer_is_an_error_or_a_marked_subset(tmp_path, capsys):
    ann, full = _textvqa(tmp_path, [0, 1, 2])
    assert eval_textvqa.score_textvqa(ann, full)["accuracy"] == pytest.approx(200 / 3)
    ann, part = _textvqa(tmp_path, [0, 1])           # the wrong answer missing: was 100.00, exit 0
    with pytest.raises(CoverageError, match=r"1 of 3 questions have no answer \(first: \('im2', 'q2\?'\)\)"):
        eval_textvqa.main(["--annotation-file", ann, "--result-file", part])
    assert "accuracy" not in capsys.readouterr().out   # nothing printed before the error
    out = tmp_path / "m.json"
    m = eval_textvqa.main(["--annotation-file", ann, "--result-file", part, "--allow-subset", "--json", str(out)])
    assert m["accuracy"] == pytest.approx(100.0)
    assert json.loads(out.read_text()) == {"accuracy": 100.0, "answered": 2, "questions": 3, "subset": True}
    assert "SUBSET (--allow-subset): 2 of 3 questions" in capsys.readouterr().out


def test_textvqa_repeated_annotation_key_is_an_error(tmp_path):
    ann = {"data": [{"question_id": i, "image_id": "im", "question": "Q?", "answers": ["a"] * 10} for i in range(2)]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    afile = write_jsonl(tmp_path / "a.jsonl", [{"question_id": "im", "prompt": "Q?" + SFX, "text": "a"}])
    with pytest.raises(CoverageError, match="occur more than once"):
        eval_textvqa.score_textvqa(str(tmp_path / "ann.json"), afile)


# ----------------------------------------------------------------------------- MME: artwork 50 -> 200
def _mme_artwork(tmp_path, answers):
    gt = tmp_path / "gt"
    (gt / "artwork" / "questions_answers_YN").mkdir(parents=True, exist_ok=True)
    (gt / "artwork" / "questions_answers_YN" / "1.txt").write_text(
        "Is it by Monet? Please answer yes or no.\tYes\nIs it by Dali? Please answer yes or no.\tNo\n")
    rows = [{"question_id": "artwork/images/1.jpg", "prompt": f"Is it by {who}? Please answer yes or no.", "text": t}
            for who, t in answers]
    return str(gt), write_jsonl(tmp_path / "a.jsonl", rows)


def test_mme_missing_answer_is_an_error_or_a_marked_subset(tmp_path):
    gt, full = _mme_artwork(tmp_path, [("Monet", "Yes"), ("Dali", "Yes")])
    res = str(tmp_path / "res")
    assert eval_mme.main(["--answers-file", full, "--gt-dir", gt, "--results-dir", res])["subtasks"] == {"artwork": 50.0}
    gt, part = _mme_artwork(tmp_path, [("Monet", "Yes")])            # was 200.00, exit 0
    with pytest.raises(CoverageError, match="1 of 2 questions have no answer"):
        eval_mme.main(["--answers-file", part, "--gt-dir", gt, "--results-dir", res])
    m = eval_mme.main(["--answers-file", part, "--gt-dir", gt, "--results-dir", res, "--allow-subset"])
    assert m["subtasks"] == {"artwork": 200.0} and (m["answered"], m["questions"], m["subset"]) == (1, 2, True)


def test_mme_duplicate_answer_and_result_files_checked_against_gt(tmp_path):
    gt, dup = _mme_artwork(tmp_path, [("Monet", "Yes"), ("Monet", "Yes")])
    with pytest.raises(CoverageError, match="answered more than once"):
        eval_mme.main(["--answers-file", dup, "--gt-dir", gt, "--results-dir", str(tmp_path / "res")])
    # result files alone (no answers file) are checked against the ground truth too
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "artwork.txt").write_text("1.jpg\tIs it by Monet? Please answer yes or no.\tYes\tYes\n")
    with pytest.raises(CoverageError, match="1 of 2 questions have no answer"):
        eval_mme.main(["--gt-dir", gt, "--results-dir", str(tmp_path / "only")])


def test_mme_repeated_ground_truth_question_is_an_error(tmp_path):
    gt = tmp_path / "gt" / "existence"
    gt.mkdir(parents=True)
    (gt / "1.txt").write_text("Is there a dog? Please answer yes or no.\tYes\nIs there a  dog? Please answer yes or no.\tNo\n")
    afile = write_jsonl(tmp_path / "a.jsonl", [{"question_id": "existence/1.jpg", "prompt": "Is there a dog?", "text": "Yes"}])
    with pytest.raises(CoverageError, match="--gt-dir .*occur more than once"):
        eval_mme.main(["--answers-file", afile, "--gt-dir", str(tmp_path / "gt"), "--results-dir", str(tmp_path / "r")])


# ----------------------------------------------------------------------------- POPE: by question, never by order
def _pope(tmp_path, answer_ids):
    """adversarial: labels y,y,y,y,y,n; answers y,y,y,y,n,n -> TP4 FN1 TN1: P=1 R=.8 F1=88.89. popular/random: 1 right each."""
    ann = tmp_path / "coco"
    items = {1: ("adversarial", "yes", "Yes"), 2: ("adversarial", "yes", "Yes"), 3: ("adversarial", "yes", "Yes"),
             4: ("adversarial", "yes", "Yes"), 5: ("adversarial", "yes", "No"), 6: ("adversarial", "no", "No"),
             10000001: ("random", "yes", "Yes"), 20000001: ("popular", "no", "No")}
    for cat in ("adversarial", "popular", "random"):
        ids = [i for i, (c, _, _) in items.items() if c == cat]
        write_jsonl(ann / f"coco_pope_{cat}.json", [{"question_id": n + 1, "image": f"{i}.jpg", "text": f"Is there a x{i}?",
                                                "label": items[i][1]} for n, i in enumerate(ids)])
    q = write_jsonl(tmp_path / "q.jsonl", [{"question_id": i, "image": f"{i}.jpg", "text": f"Is there a x{i}?" + SFX,
                                       "category": c} for i, (c, _, _) in items.items()])
    a = write_jsonl(tmp_path / "a.jsonl", [{"question_id": i, "text": items[i][2]} for i in answer_ids])
    return str(ann), q, a


def test_pope_reordered_answers_score_the_same(tmp_path):
    ann, q, a = _pope(tmp_path, [1, 2, 3, 4, 5, 6, 10000001, 20000001])
    assert eval_pope.score_pope(ann, q, a)["adversarial"]["f1"] == pytest.approx(800 / 9)
    ann, q, a = _pope(tmp_path, [20000001, 10000001, 6, 5, 4, 3, 2, 1])    # by order this gave 66.67
    assert eval_pope.score_pope(ann, q, a)["adversarial"]["f1"] == pytest.approx(800 / 9)


def test_pope_recorded_failure_counts_wrong_not_yes(tmp_path):
    """An answer recorded with --on-image-error record ("text": "", "error": ...) for question 6 (label no):
    read by LLaVA's rule, "" is "yes" -- here it must count wrong whatever the label. Adversarial then holds
    TP4 FN1 FP1 TN0: P = R = 0.8, F1 = 80.00, accuracy 4/6; and for question 1 (label yes), flagged too:
    TP3 FN2 TN1: P = 1, R = 0.6, F1 = 75.00."""
    ann, q, a = _pope(tmp_path, [1, 2, 3, 4, 5, 6, 10000001, 20000001])
    rows = [json.loads(line) for line in Path(a).read_text().splitlines()]
    rows[5].update(text="", error="cannot identify image file '6.jpg'")
    write_jsonl(Path(a), rows)
    adversarial = eval_pope.score_pope(ann, q, a)["adversarial"]
    assert adversarial["f1"] == pytest.approx(80.0) and adversarial["accuracy"] == pytest.approx(400 / 6)
    rows[5] = {"question_id": 6, "text": "No"}
    rows[0].update(text="", error="cannot identify image file '1.jpg'")
    write_jsonl(Path(a), rows)
    assert eval_pope.score_pope(ann, q, a)["adversarial"]["f1"] == pytest.approx(75.0)


def test_pope_duplicate_standing_in_for_a_missing_answer_is_an_error(tmp_path):
    ann, q, a = _pope(tmp_path, [1, 2, 3, 4, 5, 5, 10000001, 20000001])     # 6 missing, 5 twice
    with pytest.raises(CoverageError, match=r"1 of 8 questions have no answer \(first: 6\); 1 questions are answered more"):
        eval_pope.score_pope(ann, q, a)


def test_pope_labels_and_questions_must_agree(tmp_path):
    ann, q, a = _pope(tmp_path, [1, 2, 3, 4, 5, 6, 10000001, 20000001])
    extra = Path(ann) / "coco_pope_random.json"
    extra.write_text(extra.read_text() + json.dumps({"question_id": 2, "image": "x.jpg", "text": "Is there a y?",
                                                     "label": "no"}) + "\n")   # e.g. the 3,000-line random split
    with pytest.raises(ValueError, match="1 label lines have no question"):
        eval_pope.score_pope(ann, q, a)
    qs = [json.loads(line) for line in Path(q).read_text().splitlines()]
    write_jsonl(Path(q), qs + [qs[0]])
    with pytest.raises(CoverageError, match="--question-file .*occur more than once"):
        eval_pope.score_pope(ann, q, a)


# ----------------------------------------------------------------------------- converters; --num-chunks among the extras
def _vqav2(tmp_path, answered):
    full = write_jsonl(tmp_path / "test.jsonl", [{"question_id": i, "image": "x.jpg", "text": "?"} for i in (1, 2, 3, 4)])
    dev = write_jsonl(tmp_path / "dev.jsonl", [{"question_id": i, "image": "x.jpg", "text": "?"} for i in (1, 2, 3)])
    ans = write_jsonl(tmp_path / "a.jsonl", [{"question_id": i, "text": "Two"} for i in answered])
    return ["--answers-file", ans, "--question-file", dev, "--test-file", full, "--out", str(tmp_path / "up.json")]


def test_vqav2_missing_test_dev_answer_is_an_error(tmp_path):
    # a run with `--num-chunks 2` among the extra args answers only chunk 0 (ceil(3/2) = 2 questions);
    # the converter used to fill question 3 with "" and exit 0
    with pytest.raises(CoverageError, match=r"1 of 3 questions have no answer \(first: 3\)"):
        convert_vqav2_for_submission.main(_vqav2(tmp_path, [1, 2]))
    assert not (tmp_path / "up.json").exists()
    fields = convert_vqav2_for_submission.main(_vqav2(tmp_path, [1, 2]) + ["--allow-subset", "--json", str(tmp_path / "m.json")])
    assert fields == {"answered": 2, "questions": 3, "subset": True}
    assert json.loads((tmp_path / "m.json").read_text()) == fields
    assert [r["answer"] for r in json.loads((tmp_path / "up.json").read_text())] == ["2", "2", "", ""]
    with pytest.raises(CoverageError, match="not in --question-file"):
        convert_vqav2_for_submission.main(_vqav2(tmp_path, [1, 2, 3, 4]))   # 4 is outside test-dev


def test_vizwiz_mmvet_mmbench_gqa_check_coverage(tmp_path):
    q = write_jsonl(tmp_path / "q.jsonl", [{"question_id": i, "image": f"{i}.jpg", "text": "?"} for i in (0, 1)])
    one = write_jsonl(tmp_path / "one.jsonl", [{"question_id": 0, "text": "A"}])
    dup = write_jsonl(tmp_path / "dup.jsonl", [{"question_id": 0, "text": "A"}, {"question_id": 1, "text": "B"},
                                          {"question_id": 1, "text": "B"}])
    for args in (["--question-file", q, "--answers-file", "{a}", "--out", str(tmp_path / "v.json")],):
        with pytest.raises(CoverageError, match="1 of 2 questions have no answer"):
            convert_vizwiz_for_submission.main([x.format(a=one) for x in args])
        with pytest.raises(CoverageError, match="answered more than once"):
            convert_vizwiz_for_submission.main([x.format(a=dup) for x in args])
    with pytest.raises(CoverageError, match="1 of 2 questions have no answer"):
        convert_mmvet_for_eval.main(["--src", one, "--question-file", q, "--dst", str(tmp_path / "r.json")])
    with pytest.raises(CoverageError, match="answered more than once"):
        convert_mmvet_for_eval.main(["--src", dup, "--question-file", q, "--dst", str(tmp_path / "r.json")])
    (tmp_path / "gqa.json").write_text(json.dumps({"0": {"answer": "a"}, "1": {"answer": "b"}}))
    gqa = ["--predictions-out", str(tmp_path / "p.json"), "--questions-file", str(tmp_path / "gqa.json")]
    with pytest.raises(CoverageError, match="1 of 2 questions have no answer"):
        eval_gqa.main(["--answers-file", one] + gqa)
    with pytest.raises(CoverageError, match="more than once"):
        eval_gqa.main(["--answers-file", dup, "--predictions-out", str(tmp_path / "p.json")])
    m = eval_gqa.main(["--answers-file", one, "--allow-subset", "--json", str(tmp_path / "g.json")] + gqa)
    assert json.loads((tmp_path / "g.json").read_text()) == {"accuracy": 100.0, "answered": 1, "questions": 2, "subset": True}


def test_mmbench_missing_row_is_an_error_or_a_marked_subset(tmp_path):
    pd = pytest.importorskip("pandas")
    tsv = tmp_path / "mmb.tsv"
    pd.DataFrame({"index": [10, 11], "question": ["q", "q"], "A": ["a", "a"], "B": ["b", "b"],
                  "answer": ["A", "B"]}).to_csv(tsv, sep="\t", index=False)
    ans = write_jsonl(tmp_path / "a.jsonl", [{"question_id": 10, "round_id": 0, "text": "A"},
                                        {"question_id": 11, "round_id": 1, "text": "B"}])   # round 1 is not scored
    args = ["--annotation-file", str(tsv), "--result-file", ans, "--out", str(tmp_path / "x.xlsx")]
    with pytest.raises(CoverageError, match=r"1 of 2 questions have no answer \(first: 11\)"):
        convert_mmbench_for_submission.main(args)
    m = convert_mmbench_for_submission.main(args + ["--allow-subset", "--json", str(tmp_path / "m.json")])
    assert json.loads((tmp_path / "m.json").read_text()) == {"accuracy_local": 100.0, "answered": 1, "questions": 2,
                                                            "subset": True}


def test_every_scorer_metrics_json_carries_the_coverage_keys(tmp_path):
    """The contract with summarize: answered (int), questions (int), subset (bool) in every metrics JSON."""
    ann, q, a = _pope(tmp_path / "pope", [1, 2, 3, 4, 5, 6, 10000001, 20000001])
    eval_pope.main(["--annotation-dir", ann, "--question-file", q, "--result-file", a, "--json", str(tmp_path / "p.json")])
    gt, full = _mme_artwork(tmp_path / "mme", [("Monet", "Yes"), ("Dali", "No")])
    eval_mme.main(["--answers-file", full, "--gt-dir", gt, "--results-dir", str(tmp_path / "res"),
                   "--json", str(tmp_path / "m.json")])
    (tmp_path / "sqa").mkdir()
    (tmp_path / "sqa" / "problems.json").write_text(json.dumps({"1": {"choices": ["x", "y"], "answer": 0, "image": "i"}}))
    (tmp_path / "sqa" / "pid_splits.json").write_text(json.dumps({"test": ["1"]}))
    sa = write_jsonl(tmp_path / "sqa" / "a.jsonl", [{"question_id": "1", "prompt": "<image>\nq", "text": "A"}])
    eval_science_qa.main(["--base-dir", str(tmp_path / "sqa"), "--result-file", sa, "--json", str(tmp_path / "s.json")])
    for name, n in (("p.json", 8), ("m.json", 2), ("s.json", 1)):
        saved = json.loads((tmp_path / name).read_text())
        assert {k: saved[k] for k in COVERAGE_KEYS} == {"answered": n, "questions": n, "subset": False}, name


@pytest.mark.parametrize("extra", ["--num-chunks", "--chunk-idx=1"])
def test_eval_script_refuses_chunk_arguments_among_the_extras(tmp_path, extra):
    r = subprocess.run(["bash", str(REPO / "scripts/v1_5/eval/vqav2.sh"), "64", extra, "2"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "DATA_DIR": str(tmp_path)})
    assert r.returncode != 0
    assert f"{extra.split('=')[0]}" in r.stderr and "use CHUNKS=N instead" in r.stderr

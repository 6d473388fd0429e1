"""Golden tests for the scorers and converters in llava/eval (expected values computed by hand)."""
from __future__ import annotations

import json

import pytest

from llava.eval import (
    convert_mmbench_for_submission,
    convert_mme,
    convert_mmvet_for_eval,
    convert_vizwiz_for_submission,
    convert_vqav2_for_submission,
    eval_gqa,
    eval_mme,
    eval_pope,
    eval_science_qa,
    eval_textvqa,
    summarize,
)
from llava.eval.vqa_normalize import normalize_answer, soft_accuracy
from tests.eval_fixtures import write_jsonl



# ----------------------------------------------------------------------------- EvalAI normalisation
@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Two", "2"),                      # number word
        ("ten apples", "10 apples"),
        ("None", "0"),
        ("The dog.", "dog"),               # article + final period
        ("an apple", "apple"),
        ("the answer is a cat", "answer is cat"),
        ("dont", "don't"),                 # contractions get their apostrophes back
        ("couldnt've", "couldn't've"),
        ("cant", "can't"),
        ("well", "well"),                  # a real word, not "we'll"
        ("yes!", "yes"),                   # mark not touching a space -> space, then trimmed
        ("hello-world", "hello world"),
        ("well - done", "well done"),      # mark touching a space -> deleted
        ("1,000", "1000"),                 # commas always go
        ("3.5", "3.5"),                    # period before a digit stays
        ("What's that?", "what 's that"),  # possessive split off, '?' dropped
        ("  Red\tcar\n", "red car"),
        ("(blue)", "blue"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize("k, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_soft_accuracy_leave_one_out(k, expected):
    # k of 10 humans said "cat": (k*min(1,(k-1)/3) + (10-k)*min(1,k/3)) / 10
    answers = ["cat"] * k + ["dog"] * (10 - k)
    assert soft_accuracy("cat", answers) == pytest.approx(expected)


def test_soft_accuracy_normalises_both_sides():
    assert soft_accuracy("Two.", ["2", "two", "3", "3", "3", "3", "3", "3", "3", "3"]) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="gt_answers"):
        soft_accuracy("x", [])


# ----------------------------------------------------------------------------- POPE
@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes, there is a dog in the image.", "yes"),
        ("No, there is no dog.", "no"),
        ("There is not a dog", "no"),
        ("no.", "no"),
        ("Yes. No.", "yes"),           # only the first sentence counts
        ("Not really.", "yes"),        # LLaVA's rule only looks for "No", "not", "no"
        ("Nope", "yes"),
        ("no, it is", "no"),           # comma removed before splitting
    ],
)
def test_pope_yes_no_parsing(text, expected):
    assert eval_pope.parse_yes_no(text) == expected


def test_pope_binary_metrics_hand_computed():
    # TP=2 (0,4) FP=1 (1) TN=1 (2) FN=1 (3)
    m = eval_pope.binary_metrics(["yes", "yes", "no", "no", "yes"], ["yes", "no", "no", "yes", "yes"])
    assert m["accuracy"] == pytest.approx(60.0)
    assert m["precision"] == pytest.approx(200 / 3)
    assert m["recall"] == pytest.approx(200 / 3)
    assert m["f1"] == pytest.approx(200 / 3)
    assert m["yes_ratio"] == pytest.approx(60.0)
    with pytest.raises(ValueError, match="equal lengths"):
        eval_pope.binary_metrics(["yes"], ["yes", "no"])


def test_pope_end_to_end_matches_by_question_not_order(tmp_path, capsys):
    ann = tmp_path / "coco"
    # interleaved categories, ids offset per category as in LLaVA's question file; label files number from 1
    qs = [(1, "adversarial", "yes"), (20000001, "popular", "no"), (2, "adversarial", "no"), (10000001, "random", "yes"),
          (20000002, "popular", "yes"), (10000002, "random", "yes")]
    question = {qid: f"Is there a thing{qid} in the image?" for qid, _, _ in qs}
    for cat in ("adversarial", "popular", "random"):
        rows = [(qid, label) for qid, c, label in qs if c == cat]
        write_jsonl(ann / f"coco_pope_{cat}.json", [{"question_id": i + 1, "image": f"{qid}.jpg", "text": question[qid],
                                                "label": label} for i, (qid, label) in enumerate(rows)])
    qfile = write_jsonl(tmp_path / "q.jsonl", [{"question_id": i, "image": f"{i}.jpg", "category": c,
                                           "text": question[i] + "\nAnswer the question using a single word or phrase."}
                                          for i, c, _ in qs])
    texts = {1: "Yes", 20000001: "No", 2: "Yes", 10000001: "Yes", 20000002: "No.", 10000002: "No"}
    # answers in reverse order: pairing is by question, so the order does not matter
    afile = write_jsonl(tmp_path / "a.jsonl", [{"question_id": i, "text": texts[i]} for i, _, _ in reversed(qs)])
    out = tmp_path / "m.json"
    m = eval_pope.main(["--annotation-dir", str(ann), "--question-file", qfile, "--result-file", afile, "--json", str(out)])
    # adversarial: preds yes,yes vs labels yes,no -> TP1 FP1: P=.5 R=1 F1=2/3 acc=50 yes=100
    assert m["adversarial"]["f1"] == pytest.approx(200 / 3)
    assert m["adversarial"]["accuracy"] == pytest.approx(50.0)
    assert m["adversarial"]["yes_ratio"] == pytest.approx(100.0)
    # popular: preds no,no vs no,yes -> TN1 FN1: P=0 (0/0) R=0 F1=0 acc=50
    assert m["popular"]["f1"] == 0.0 and m["popular"]["accuracy"] == pytest.approx(50.0)
    # random: preds yes,no vs yes,yes -> TP1 FN1: P=1 R=.5 F1=2/3
    assert m["random"]["f1"] == pytest.approx(200 / 3)
    assert m["average_f1"] == pytest.approx((200 / 3 + 0 + 200 / 3) / 3)
    saved = json.loads(out.read_text())
    assert set(saved) == {"adversarial", "popular", "random", "average_f1", "answered", "questions", "subset"}
    assert (saved["answered"], saved["questions"], saved["subset"]) == (6, 6, False)
    assert set(saved["random"]) == {"accuracy", "precision", "recall", "f1", "yes_ratio"}
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "44.44" in last  # headline printed last


# ----------------------------------------------------------------------------- MME
@pytest.mark.parametrize(
    "text, expected",
    [("Yes", "yes"), ("no", "no"), ("No.", "no"), ("yes, it is", "yes"), ("Not sure", "no"),
     ("The answer is yes", "other"), ("", "other"), ("maybe", "other")],
)
def test_mme_answer_parsing(text, expected):
    assert eval_mme.parse_mme_answer(text) == expected


def test_mme_subtask_acc_plus_pairs():
    lines = [
        ("a.jpg", "q1", "Yes", "Yes"), ("a.jpg", "q2", "No", "No"),    # both right
        ("b.jpg", "q1", "Yes", "Yes"), ("b.jpg", "q2", "No", "yes"),   # one right
    ]
    s = eval_mme.score_subtask(lines)
    assert s["acc"] == pytest.approx(75.0) and s["acc_plus"] == pytest.approx(50.0)
    assert s["score"] == pytest.approx(125.0)


def test_mme_convert_and_score(tmp_path):
    gt = tmp_path / "MME_Benchmark_release_version"
    # flat layout (existence) and the questions_answers_YN layout (artwork); cognition task code_reasoning
    (gt / "existence").mkdir(parents=True)
    (gt / "existence" / "001.txt").write_text("Is there a dog in this image? Please answer yes or no.\tYes\n"
                                               "Is there a cat in this image? Please answer yes or no.\tNo\n")
    (gt / "existence" / "002.txt").write_text("Is there a car in this image? Please answer yes or no.\tYes\n"
                                               "Is there a bus in this image? Please answer yes or no.\tNo\n")
    (gt / "artwork" / "questions_answers_YN").mkdir(parents=True)
    (gt / "artwork" / "images").mkdir(parents=True)
    (gt / "artwork" / "questions_answers_YN" / "10.txt").write_text(
        "Is this painted by Monet?  Please answer yes or no.\tYes\nIs this painted by Dali?  Please answer yes or no.\tNo\n")
    (gt / "code_reasoning").mkdir()
    (gt / "code_reasoning" / "c1.txt").write_text("Will it print 3? Please answer yes or no.\tNo\n"
                                                  "Will it print 4? Please answer yes or no.\tYes\n")
    answers = [
        {"question_id": "existence/001.jpg", "prompt": "Is there a dog in this image? Please answer yes or no.", "text": "Yes"},
        {"question_id": "existence/001.jpg", "prompt": "Is there a cat in this image? Please answer yes or no.", "text": "No"},
        {"question_id": "existence/002.jpg", "prompt": "Is there a car in this image? Please answer yes or no.", "text": "No"},
        {"question_id": "existence/002.jpg", "prompt": "Is there a bus in this image? Please answer yes or no.", "text": "No"},
        # single space where the GT file has two: still matched
        {"question_id": "artwork/images/10.jpg", "prompt": "Is this painted by Monet? Please answer yes or no.", "text": "Yes"},
        {"question_id": "artwork/images/10.jpg", "prompt": "Is this painted by Dali? Please answer yes or no.", "text": "Yes"},
        {"question_id": "code_reasoning/c1.png", "prompt": "Will it print 3? Please answer yes or no.", "text": "No"},
        {"question_id": "code_reasoning/c1.png", "prompt": "Will it print 4? Please answer yes or no.", "text": "Yes"},
    ]
    afile = write_jsonl(tmp_path / "a.jsonl", answers)
    res = tmp_path / "res"
    out = tmp_path / "m.json"
    m = eval_mme.main(["--answers-file", afile, "--gt-dir", str(gt), "--results-dir", str(res), "--json", str(out)])
    lines = (res / "existence.txt").read_text().splitlines()
    assert lines[0].split("\t") == ["001.jpg", "Is there a dog in this image? Please answer yes or no.", "Yes", "Yes"]
    # existence: 3/4 right, 1/2 images fully right -> 75 + 50; artwork: 1/2, 0/1 -> 50; code: 100 + 100
    assert m["subtasks"] == pytest.approx({"existence": 125.0, "artwork": 50.0, "code_reasoning": 200.0})
    assert m["perception"] == pytest.approx(175.0)
    assert m["cognition"] == pytest.approx(200.0)
    assert json.loads(out.read_text())["perception"] == pytest.approx(175.0)


def test_mme_unknown_prompt_is_an_error(tmp_path):
    gt = tmp_path / "gt" / "existence"
    gt.mkdir(parents=True)
    (gt / "1.txt").write_text("Is there a dog? Please answer yes or no.\tYes\n")
    afile = write_jsonl(tmp_path / "a.jsonl", [{"question_id": "existence/1.jpg", "prompt": "Is there a cow?", "text": "No"}])
    with pytest.raises(ValueError, match="1 answers are for questions not in --gt-dir"):
        convert_mme.convert_answers(afile, str(tmp_path / "gt"))


# ----------------------------------------------------------------------------- TextVQA
def test_textvqa_soft_accuracy_end_to_end(tmp_path):
    ann = {"data": [
        {"question_id": 11, "image_id": "img1", "question": "What brand is it?",
         "answers": ["Nikon"] * 3 + ["canon"] * 7},
        {"question_id": 12, "image_id": "img2", "question": "How many birds?",
         "answers": ["two"] + ["3"] * 9},
    ]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    sfx = "\nAnswer the question using a single word or phrase."
    afile = write_jsonl(tmp_path / "a.jsonl", [
        {"question_id": "img1", "prompt": "What brand is it?\nReference OCR token: NIKON, D90" + sfx, "text": "nikon."},
        {"question_id": "img2", "prompt": "How many birds?" + sfx, "text": "2"},
    ])
    out = tmp_path / "m.json"
    m = eval_textvqa.main(["--annotation-file", str(tmp_path / "ann.json"), "--result-file", afile, "--json", str(out)])
    # 3 of 10 match -> 0.9; 1 of 10 ("two" -> "2") -> 0.3; mean 0.6
    assert m["accuracy"] == pytest.approx(60.0)
    assert json.loads(out.read_text()) == pytest.approx({"accuracy": 60.0, "answered": 2, "questions": 2, "subset": False})


def test_textvqa_question_line():
    assert eval_textvqa.question_from_prompt("Reference OCR token: a\nWhat Is This?\nAnswer the question using a single word or phrase.") == "what is this?"


# ----------------------------------------------------------------------------- ScienceQA
@pytest.mark.parametrize(
    "text, expected",
    [("A", "A"), ("B. a cat", "B"), ("The answer is C.", "C"), ("I think The answer is D!", "D"),
     ("The answer is C. The answer is D.", "FAILED"), ("b", "FAILED"), ("F", "FAILED"), ("B.cat", "FAILED"),
     ("", "FAILED")],
)
def test_sqa_letter_parsing(text, expected):
    assert eval_science_qa.parse_letter(text) == expected


def test_sqa_scores_split_and_img_subset(tmp_path):
    problems = {
        "1": {"choices": ["x", "y"], "answer": 1, "image": "image.png"},
        "2": {"choices": ["x", "y", "z"], "answer": 0, "image": None},
        "3": {"choices": ["x", "y", "z", "w"], "answer": 3, "image": "image.png"},
        "4": {"choices": ["x", "y"], "answer": 0, "image": "image.png"},
        "5": {"choices": ["x", "y"], "answer": 0, "image": None},   # not in the test split
    }
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": ["1", "2", "3", "4"], "val": ["5"]}))
    afile = write_jsonl(tmp_path / "a.jsonl", [
        {"question_id": "1", "prompt": "<image>\nq", "text": "B"},                  # right
        {"question_id": "2", "prompt": "q", "text": "The answer is A."},            # right
        {"question_id": "3", "prompt": "<image>\nq", "text": "E"},                  # E beyond 4 choices -> wrong
        # "4" missing: an error unless a subset is scored on purpose
    ])
    with pytest.raises(ValueError, match="1 of 4 questions have no answer"):
        eval_science_qa.main(["--base-dir", str(tmp_path), "--result-file", afile])
    m = eval_science_qa.main(["--base-dir", str(tmp_path), "--result-file", afile, "--json", str(tmp_path / "m.json"),
                              "--allow-subset"])
    assert m["accuracy"] == pytest.approx(50.0)          # 2 / 4: the missing answer fails
    assert m["img_accuracy"] == pytest.approx(50.0)      # 1 / 2: LLaVA's rule, the missing answer is no image question
    assert json.loads((tmp_path / "m.json").read_text()) == pytest.approx(
        {"accuracy": 50.0, "img_accuracy": 50.0, "answered": 3, "questions": 4, "subset": True})


# ----------------------------------------------------------------------------- GQA
def test_gqa_predictions_and_accuracy(tmp_path):
    afile = write_jsonl(tmp_path / "a.jsonl", [
        {"question_id": "q1", "text": "Yes."}, {"question_id": "q2", "text": "Table"}, {"question_id": "q3", "text": "red"},
    ])
    questions = {"q1": {"answer": "yes"}, "q2": {"answer": "chair"}, "q3": {"answer": "red"},
                 "q4": {"answer": "no", "isBalanced": False}}
    (tmp_path / "questions.json").write_text(json.dumps(questions))
    pred_out = tmp_path / "data" / "testdev_balanced_predictions.json"
    m = eval_gqa.main(["--answers-file", afile, "--predictions-out", str(pred_out),
                       "--questions-file", str(tmp_path / "questions.json"), "--json", str(tmp_path / "m.json")])
    assert json.loads((tmp_path / "m.json").read_text()) == pytest.approx(
        {"accuracy": 200 / 3, "answered": 3, "questions": 3, "subset": False})
    assert json.loads(pred_out.read_text()) == [
        {"questionId": "q1", "prediction": "yes"}, {"questionId": "q2", "prediction": "table"},
        {"questionId": "q3", "prediction": "red"}]
    assert m["accuracy"] == pytest.approx(200 / 3)


def test_gqa_missing_answer_is_an_error(tmp_path):
    afile = write_jsonl(tmp_path / "a.jsonl", [{"question_id": "q1", "text": "yes"}])
    (tmp_path / "q.json").write_text(json.dumps({"q1": {"answer": "yes"}, "q2": {"answer": "no"}}))
    with pytest.raises(ValueError, match="no answer"):
        eval_gqa.gqa_accuracy(eval_gqa.convert_answers(afile), str(tmp_path / "q.json"))


# ----------------------------------------------------------------------------- submission converters
def test_vqav2_submission_covers_the_full_test_list(tmp_path):
    test = write_jsonl(tmp_path / "test.jsonl", [{"question_id": i, "image": f"{i}.jpg", "text": "?"} for i in (5, 6, 7)])
    dev = write_jsonl(tmp_path / "dev.jsonl", [{"question_id": i, "image": f"{i}.jpg", "text": "?"} for i in (5, 7)])
    ans = write_jsonl(tmp_path / "a.jsonl", [{"question_id": 7, "text": "Two"}, {"question_id": 5, "text": "The Dog."}])
    out = tmp_path / "up" / "sub.json"
    convert_vqav2_for_submission.main(["--answers-file", ans, "--question-file", dev, "--test-file", test, "--out", str(out)])
    # 6 is outside test-dev: "" as EvalAI expects
    assert json.loads(out.read_text()) == [
        {"question_id": 5, "answer": "dog"}, {"question_id": 6, "answer": ""}, {"question_id": 7, "answer": "2"}]


def test_vizwiz_submission(tmp_path):
    q = write_jsonl(tmp_path / "q.jsonl", [{"question_id": 0, "image": "VizWiz_test_00000000.jpg", "text": "?"},
                                      {"question_id": 1, "image": "VizWiz_test_00000001.jpg", "text": "?"}])
    ans = write_jsonl(tmp_path / "a.jsonl", [{"question_id": 1, "text": "Unanswerable"}, {"question_id": 0, "text": "a can of soup"}])
    out = tmp_path / "sub.json"
    convert_vizwiz_for_submission.main(["--question-file", q, "--answers-file", ans, "--out", str(out)])
    assert json.loads(out.read_text()) == [
        {"image": "VizWiz_test_00000000.jpg", "answer": "can of soup"},
        {"image": "VizWiz_test_00000001.jpg", "answer": "unanswerable"}]


def test_mmvet_results(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", [{"question_id": 0, "text": "A cat."}, {"question_id": 12, "text": "42"}])
    q = write_jsonl(tmp_path / "q.jsonl", [{"question_id": 12, "image": "b.png", "text": "?"}, {"question_id": 0, "image": "a.png", "text": "?"}])
    dst = tmp_path / "r.json"
    convert_mmvet_for_eval.main(["--src", src, "--question-file", q, "--dst", str(dst)])
    assert json.loads(dst.read_text()) == {"v1_0": "A cat.", "v1_12": "42"}


def test_mmbench_xlsx_and_local_accuracy(tmp_path):
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({
        "index": [10, 11, 12], "question": ["q0", "q1", "q2"], "hint": ["h", None, None],
        "A": ["a", "a", "a"], "B": ["b", "b", "b"], "C": ["c", None, "c"], "D": [None, None, "d"],
        "answer": ["B", "A", "D"], "category": ["x"] * 3, "image": ["AAAA"] * 3, "source": ["s"] * 3,
        "l2-category": ["l"] * 3, "comment": ["-"] * 3, "split": ["dev"] * 3,
    })
    tsv = tmp_path / "mmbench.tsv"
    df.to_csv(tsv, sep="\t", index=False)
    ans = write_jsonl(tmp_path / "a.jsonl", [
        {"question_id": 10, "round_id": 0, "text": "B"}, {"question_id": 11, "round_id": 0, "text": "C. c"},
        {"question_id": 12, "round_id": 0, "text": "The answer is D.\x07"},   # control char: dropped for xlsx
    ])
    out = tmp_path / "up" / "exp.xlsx"
    m = convert_mmbench_for_submission.main(["--annotation-file", str(tsv), "--result-file", ans, "--out", str(out)])
    back = pd.read_excel(out, engine="openpyxl")
    assert list(back["prediction"]) == ["B", "C. c", "The answer is D."]
    assert "image" not in back.columns and list(back["index"]) == [10, 11, 12]
    assert m["accuracy_local"] == pytest.approx(200 / 3)


# ----------------------------------------------------------------------------- summarize
def test_summarize_reproduces_paper_table2_acc_and_relative(tmp_path):
    csv_path = str(tmp_path / "summary.csv")
    names = [c[0] for c in summarize.COLUMNS]
    unpruned = [61.94, 64.09, 58.10, 1507.06, 86.96, 69.41, 78.50, 58.20, 50.32, 31.82]
    fastv192 = [58.09, 63.40, 54.04, 1490.65, 82.30, 68.96, 72.88, 54.09, 54.97, 29.59]
    metric = {b: m[0] for b, _, m in summarize.COLUMNS}
    for bench, v in zip(names, unpruned):
        summarize.append_row(csv_path, bench, "llava-v1.5-7b", "script", 576, metric[bench], v)
    for bench, v in zip(names, fastv192):
        summarize.append_row(csv_path, bench, "llava-v1.5-7b", "fastv", 192, metric[bench], v)
    rows = summarize.main(["--csv", csv_path])
    header, ref_row, fastv_row = rows
    acc_i, rel_i = header.index("Acc."), header.index("Relative")
    assert ref_row[acc_i] == "63.47" and ref_row[rel_i] == "100.00%"    # Table 2: 63.47, 100%
    assert fastv_row[acc_i] == "61.29" and fastv_row[rel_i] == "96.56%"  # Table 2: 61.29, 96.56%


def test_summarize_later_rows_win_and_bad_benchmark(tmp_path):
    csv_path = str(tmp_path / "s.csv")
    summarize.append_row(csv_path, "pope", "ck", "script", 64, "average_f1", 50.0)
    summarize.append_row(csv_path, "pope", "ck", "script", 64, "average_f1", 80.0)
    summarize.append_row(csv_path, "vqav2", "ck", "script", 64, "submission", "answers_upload/x.json")
    table = summarize.read_scores(csv_path)
    assert table == {summarize.RowKey("ck", "script", 64): {"pope": 80.0}}
    with pytest.raises(ValueError, match="benchmark"):
        summarize.append_row(csv_path, "nope", "ck", "script", 64, "x", 1.0)


def test_missing_file_message_points_at_eval_md(tmp_path):
    with pytest.raises(FileNotFoundError, match="EVAL.md") as e:
        eval_textvqa.score_textvqa(str(tmp_path / "nope.json"), str(tmp_path / "a.jsonl"))
    assert "nope.json" in str(e.value)

"""Issue 21: the scorers equal LLaVA's own scripts to the last edge case (expected values computed by hand).

Rules and tables come from LLaVA's public eval scripts, EvalAI's VQA answer processor / the VQA tool's
vqaEval.py, and MME's eval_tool calculation.py (facts, not code; see EVAL.md "Which rule each scorer follows").
"""
from __future__ import annotations

import json

import pytest

from llava.eval import convert_mmbench_for_submission, eval_mme, eval_science_qa, eval_textvqa
from llava.eval.vqa_normalize import CONTRACTIONS, normalize_answer, soft_accuracy
from tests.eval_fixtures import write_jsonl



# ----------------------------------------------------------------------------- 2. the contraction table
# The published table (vqaEval.py; straight apostrophes as in EvalAI's processor and LLaVA's m4c_evaluator),
# typed out here independently of llava/eval/vqa_normalize.py, in the published order.
PUBLISHED_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}

# Keys the pipeline can never reach: they hold capitals (the text is lower-cased first) or "'s" (split off as
# " 's" first). Expected outputs worked out by hand from steps 1-3 of the module docstring.
UNREACHABLE_KEYS = {
    "Id've": "id've", "I'dve": "i'dve", "Im": "im", "Ive": "ive",
    "let's": "let 's", "ow's'at": "ow 's'at", "'ow'sat": "'ow 'sat", "she's": "she 's",
}


def test_contraction_table_is_the_published_one():
    assert len(PUBLISHED_CONTRACTIONS) == 120
    assert list(CONTRACTIONS.items()) == list(PUBLISHED_CONTRACTIONS.items())


@pytest.mark.parametrize("spelling", list(PUBLISHED_CONTRACTIONS))
def test_every_table_entry_end_to_end(spelling):
    expected = UNREACHABLE_KEYS.get(spelling, PUBLISHED_CONTRACTIONS[spelling])
    assert normalize_answer(spelling) == expected


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("somebody'd", "somebodyd"),       # the table's odd entry
        ("somebodyd", "somebodyd"),        # not a key
        ("hadntve", "hadntve"),            # the table has hadnt've / hadn'tve only
        ("wouldntve", "wouldntve"),
        ("youdve", "youdve"),
        ("yallll", "yallll"),              # only y'allll is a key
        ("'ows'at", "'ow's'at"),
        ("I'm", "i'm"), ("Im", "im"), ("ive", "ive"), ("id", "id"), ("shes", "shes"), ("well", "well"),
        ("Whats", "what's"),
        ("1,000-2", "1000 2"),             # commas go first, so the digit-comma rule never fires; "-" -> space
        ("a.b. c", "ab c"),                # periods not before a digit are deleted
        ("x" + ". x" * 40, "x" + " x" * 32 + ". x" * 8),   # at most 32 of them (re.UNICODE passed as count)
        ("none of the above", "0 of above"),
        ("Eleven", "eleven"),              # number words stop at ten
        ("AN Apple", "apple"),
        ("hi:there", "hi:there"),          # ":" and "'" are not EvalAI punctuation marks
        ("{x}", "x"), ("wow!", "wow"),
    ],
)
def test_normalisation_rules(raw, expected):
    assert normalize_answer(raw) == expected


def test_textvqa_probe_of_table_spellings(tmp_path):
    """7 answers: 3 spellings the old derived table mapped but the official one does not (old 100.00)."""
    pairs = [("hadntve", "hadn't've"), ("wouldntve", "wouldn't've"), ("youdve", "you'd've"),
             ("dont", "don't"), ("cant", "can't"), ("youre", "you're"), ("somebodyd", "somebody'd")]
    ann = {"data": [{"question_id": i, "image_id": f"im{i}", "question": f"q{i}?", "answers": [gt] * 10}
                    for i, (_, gt) in enumerate(pairs)]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    afile = write_jsonl(tmp_path / "a.jsonl", [{"question_id": f"im{i}", "prompt": f"q{i}?\nAnswer the question using a single word or phrase.",
                                          "text": pred} for i, (pred, _) in enumerate(pairs)])
    m = eval_textvqa.score_textvqa(str(tmp_path / "ann.json"), afile)
    assert m["accuracy"] == pytest.approx(400 / 7)    # 4 of 7 match under the official table: 57.14


def test_vqa_soft_accuracy_uses_official_table():
    assert soft_accuracy("hadntve", ["hadn't've"] * 10) == 0.0
    assert soft_accuracy("somebody'd", ["somebodyd"] * 10) == 1.0


# ----------------------------------------------------------------------------- 3. LLaVA-1.0 TextVQA prompts
@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("OCR tokens: STOP, sign Question: What does the sign say? Short answer:", "what does the sign say?"),
        ("OCR tokens: a\nb Question: Which\nline? Short answer:", "which\nline?"),      # DOTALL, as LLaVA
        ("What is this?\nReference OCR token: A, B\nAnswer the question using a single word or phrase.", "what is this?"),
        ("Reference OCR token: A\nWhat Is This?\nAnswer the question using a single word or phrase.", "what is this?"),
        ("Reference OCR token: A\nQuestion: What is it?", "what is it?"),
        ("Question: How many?\nAnswer the question using a single word or phrase.", "how many?"),
    ],
)
def test_textvqa_question_from_both_prompt_styles(prompt, expected):
    assert eval_textvqa.question_from_prompt(prompt) == expected


def test_textvqa_unreadable_prompt_is_a_clear_error():
    with pytest.raises(ValueError, match="not a TextVQA prompt"):
        eval_textvqa.question_from_prompt("one line only")


def test_textvqa_scores_llava_1_0_prompts(tmp_path):
    ann = {"data": [{"question_id": 1, "image_id": "img1", "question": "What does the sign say?",
                     "answers": ["stop"] * 3 + ["halt"] * 7}]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    afile = write_jsonl(tmp_path / "a.jsonl", [{"question_id": "img1", "text": "Stop",
                                           "prompt": "OCR tokens: STOP Question: What does the sign say? Short answer:"}])
    assert eval_textvqa.score_textvqa(str(tmp_path / "ann.json"), afile)["accuracy"] == pytest.approx(90.0)  # 3 of 10


# ----------------------------------------------------------------------------- 1. ScienceQA IMG rule
def _sqa(tmp_path, has_image, correct_letter, answers):
    """problems with 2 choices each (answer = index of `correct_letter`); `has_image` is problems.json's field."""
    problems = {pid: {"choices": ["x", "y"], "answer": "AB".index(correct_letter[pid]),
                      "image": "image.png" if has_image[pid] else None} for pid in has_image}
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": list(has_image)}))
    return write_jsonl(tmp_path / "a.jsonl", answers)


def test_sqa_img_accuracy_missing_answers_leave_the_img_denominator(tmp_path):
    has_image = {"1": True, "2": True, "3": True, "4": True, "5": False, "6": False}
    truth = {pid: "A" for pid in has_image}
    afile = _sqa(tmp_path, has_image, truth, [
        {"question_id": "1", "prompt": "<image>\nq", "text": "A"},      # right
        {"question_id": "2", "prompt": "<image>\nq", "text": "B"},      # wrong
        {"question_id": "5", "prompt": "q", "text": "A"},               # right
        {"question_id": "6", "prompt": "q", "text": "A"},               # right ("3", "4" missing)
    ])
    with pytest.raises(ValueError, match="2 of 6 questions have no answer"):
        eval_science_qa.score_science_qa(str(tmp_path), afile)
    m, rows = eval_science_qa.score_science_qa(str(tmp_path), afile, allow_subset=True)
    assert m["accuracy"] == pytest.approx(50.0)       # 3 of 6; the missing ones fail
    assert m["img_accuracy"] == pytest.approx(50.0)   # 1 of 2 (problems.json's rule gave 1 of 4 = 25.00)
    assert (m["img_total"], m["answered"], m["questions"], m["subset"]) == (2, 4, 6, True)


def test_sqa_img_accuracy_follows_the_stored_prompt_not_problems_json(tmp_path):
    has_image = {"1": True, "2": True, "3": True, "4": True, "5": False, "6": False}
    truth = {pid: "A" for pid in has_image}
    afile = _sqa(tmp_path, has_image, truth, [
        {"question_id": "1", "prompt": "q", "text": "A"},               # right; problems.json says image
        {"question_id": "2", "prompt": "<image>\nq", "text": "B"},      # wrong
        {"question_id": "3", "prompt": "<image>\nq", "text": "A"},      # right
        {"question_id": "4", "prompt": "<image>\nq", "text": "B"},      # wrong
        {"question_id": "5", "prompt": "<image>\nq", "text": "B"},      # wrong; problems.json says no image
        {"question_id": "6", "prompt": "q", "text": "A"},               # right
    ])
    m, _ = eval_science_qa.score_science_qa(str(tmp_path), afile)
    assert m["img_accuracy"] == pytest.approx(25.0)   # 1 of 4 (2, 3, 4, 5); problems.json's rule gave 2 of 4 = 50.00
    assert m["accuracy"] == pytest.approx(50.0)
    assert (m["answered"], m["questions"], m["subset"]) == (6, 6, False)


# ----------------------------------------------------------------------------- 4. MME = calculation.py
YN = " Please answer yes or no."
FLAT = ("existence", "count", "position", "color", "OCR",
        "commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
# subtask -> images -> two (gt, prediction) pairs; hand-computed score = 100 * acc + 100 * acc+ on the right
MME_CASES = {
    "existence": ({"A": [("Yes", "Yes"), ("No", "No")], "B": [("Yes", "yes"), ("No", "Yes")]}, 75 + 50),
    "count": ({"A": [("Yes", "Yes, there are two."), ("No", "No, only one.")]}, 100 + 100),
    "position": ({"A": [("Yes", "I think yes"), ("No", "no")]}, 50 + 0),             # "i th": other
    "color": ({"A": [("Yes", "No"), ("No", "Yes")], "B": [("Yes", "Yes"), ("No", "No")]}, 50 + 50),
    "posters": ({"A": [("Yes", "yes."), ("No", "nope")]}, 100 + 100),                 # prefix rule both
    "celebrity": ({"A": [("No", "Not sure"), ("Yes", "Maybe")]}, 50 + 0),             # "not " -> no; other
    "scene": ({"A": [("Yes", "  yes"), ("No", "no")], "B": [("Yes", "Yes"), ("No", "No")]}, 75 + 50),  # "  ye": other
    "landmark": ({"A": [("Yes", "Yes"), ("No", "Yes")], "B": [("Yes", "YESNO"), ("No", "No")],
                  "C": [("Yes", "No"), ("No", "No")]}, 100 * 4 / 6 + 100 / 3),
    "artwork": ({"A": [("Yes", "Yes"), ("No", "No")]}, 200),
    "OCR": ({"A": [("Yes", "The answer is yes"), ("No", "No")]}, 50 + 0),            # "the ": other
    "commonsense_reasoning": ({"A": [("Yes", "Yes"), ("No", "No")], "B": [("Yes", "Yes"), ("No", "No")]}, 200),
    "numerical_calculation": ({"A": [("Yes", "No"), ("No", "Yes")]}, 0),
    "text_translation": ({"A": [("Yes", "Yes"), ("No", "No")], "B": [("No", "no"), ("Yes", "no")]}, 75 + 50),
    "code_reasoning": ({"A": [("Yes", "yes"), ("No", "Nothing")]}, 200),              # "noth" -> no
}


def _mme_data(tmp_path, cases=MME_CASES):
    """Ground truth in both MME layouts and LLaVA answers (question_id `<subtask>/[images/]<image>.png`)."""
    gt = tmp_path / "MME_Benchmark_release_version"
    answers = []
    for task, (images, _) in cases.items():
        folder = gt / task if task in FLAT else gt / task / "questions_answers_YN"
        folder.mkdir(parents=True)
        for image, pairs in images.items():
            qs = [f"Is this {task} {image} case {i}?{YN}" for i in range(len(pairs))]
            (folder / f"{image}.txt").write_text("".join(f"{q}\t{g}\n" for q, (g, _) in zip(qs, pairs)))
            qid = f"{task}/{image}.png" if task in FLAT else f"{task}/images/{image}.png"
            answers += [{"question_id": qid, "prompt": q, "text": p} for q, (_, p) in zip(qs, pairs)]
    return gt, answers


def test_mme_golden_every_subtask(tmp_path):
    gt, answers = _mme_data(tmp_path)
    afile = write_jsonl(tmp_path / "a.jsonl", answers[::-1])      # order does not matter: grouped by image
    m = eval_mme.main(["--answers-file", afile, "--gt-dir", str(gt), "--results-dir", str(tmp_path / "res")])
    assert m["subtasks"] == pytest.approx({task: score for task, (_, score) in MME_CASES.items()})
    assert m["perception"] == pytest.approx(1200.0)
    assert m["cognition"] == pytest.approx(525.0)
    assert (m["answered"], m["questions"], m["subset"]) == (42, 42, False)
    # the written result files score the same on their own, also with LLaVA's `<stem>.txt` image column
    again = eval_mme.main(["--gt-dir", str(gt), "--results-dir", str(tmp_path / "res")])
    assert again["subtasks"] == pytest.approx(m["subtasks"])
    for path in (tmp_path / "res").glob("*.txt"):
        lines = [ln.split("\t") for ln in path.read_text().splitlines()]
        path.write_text("".join("\t".join([f.rsplit(".", 1)[0] + ".txt", *rest]) + "\n" for f, *rest in lines))
    assert eval_mme.main(["--gt-dir", str(gt), "--results-dir", str(tmp_path / "res")])["perception"] == pytest.approx(1200.0)


def test_mme_result_lines_keep_the_raw_prediction(tmp_path):
    gt, answers = _mme_data(tmp_path, {"scene": MME_CASES["scene"]})
    eval_mme.main(["--answers-file", write_jsonl(tmp_path / "a.jsonl", answers), "--gt-dir", str(gt),
                   "--results-dir", str(tmp_path / "res")])
    first = (tmp_path / "res" / "scene.txt").read_text().splitlines()[0].split("\t")
    assert first == ["A.png", f"Is this scene A case 0?{YN}", "Yes", "  yes"]   # not stripped: calculation.py's "other"


# ----------------------------------------------------------------------------- 5. MMBench column order
def test_mmbench_prediction_is_the_seventh_column_as_llava_writes_it(tmp_path):
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({
        "index": [10, 11], "question": ["q0", "q1"], "hint": ["h", None], "A": ["a", "a"], "B": ["b", "b"],
        "C": ["c", None], "D": [None, None], "answer": ["B", "A"], "category": ["x"] * 2, "image": ["AAAA"] * 2,
        "source": ["s"] * 2, "l2-category": ["l"] * 2, "comment": ["-"] * 2, "split": ["dev"] * 2,
    })
    tsv = tmp_path / "mmbench.tsv"
    df.to_csv(tsv, sep="\t", index=False)
    ans = write_jsonl(tmp_path / "a.jsonl", [{"question_id": 10, "round_id": 0, "text": "B"},
                                        {"question_id": 11, "round_id": 0, "text": "A"}])
    table, _ = convert_mmbench_for_submission.build_table(str(tsv), ans)
    # LLaVA drops 6 columns, then inserts `prediction` at position 6 (0-based)
    assert list(table.columns) == ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"]

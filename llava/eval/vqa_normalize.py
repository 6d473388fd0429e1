"""EvalAI-style answer normalisation and VQA soft accuracy (TextVQA, VQAv2, VizWiz).

Rules (the VQA challenge's published answer processing):
1. lower case; drop "," and "?"; split the possessive "'s" off as " 's"; newlines/tabs -> spaces.
2. punctuation: each mark in `PUNCTUATION` is deleted when it touches a space (or the text has a digit
   comma digit group), otherwise replaced by a space; a period not followed by a digit is deleted.
3. per word: number words zero..ten (and "none") -> digits; the articles a / an / the are dropped;
   apostrophe-less contractions ("dont", "youre", "couldnt've") get their apostrophes back.

Soft accuracy of a prediction against n human answers: for each of the n leave-one-out subsets,
min(1, #matches in the subset / 3); the prediction scores the mean over the n subsets.
"""
from __future__ import annotations

import itertools
import re
from typing import Sequence

PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"(?!<=\d)(\.)(?!\d)")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})

# Canonical contractions (with apostrophes). Every spelling that drops at least one apostrophe maps back
# to the canonical form, except spellings that are ordinary English words (see _REAL_WORDS).
_CANONICAL_CONTRACTIONS = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't
he'd he'd've he's how'd how'll how's i'd've i'm i've isn't it'd it'd've it'll let's ma'am mightn't
mightn't've might've mustn't must've needn't not've o'clock oughtn't shan't she'd've she's should've
shouldn't shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd someone'd've someone'll
someone's something'd something'd've something'll that's there'd there'd've there're there's they'd
they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've
when's where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't would've
wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've
""".split()
_REAL_WORDS = frozenset({"id", "im", "ive", "its", "ill", "well", "were", "wed", "shed", "hell", "shell", "lets", "shes"})


def _apostrophe_dropped_variants(word: str) -> set[str]:
    """All spellings of `word` with a non-empty subset of its apostrophes removed."""
    parts = word.split("'")
    gaps = len(parts) - 1
    out = set()
    for keep in itertools.product((True, False), repeat=gaps):
        if all(keep):
            continue
        s = parts[0]
        for k, part in zip(keep, parts[1:]):
            s += ("'" if k else "") + part
        out.add(s)
    return out


def _build_contractions() -> dict[str, str]:
    table: dict[str, str] = {}
    for canon in _CANONICAL_CONTRACTIONS:
        for variant in _apostrophe_dropped_variants(canon):
            if variant not in _REAL_WORDS:
                table[variant] = canon
    return table


CONTRACTIONS = _build_contractions()


def _split_words(text: str) -> str:
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's")
    return text.replace("\n", " ").replace("\t", " ").strip()


def _strip_punctuation(text: str) -> str:
    has_digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        if (mark + " " in text or " " + mark in text) or has_digit_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    # The reference implementation passes re.UNICODE (=32) as the `count` argument: at most 32 periods go.
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=32)


def _digits_articles_contractions(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(answer: str) -> str:
    """EvalAI answer normalisation (see module docstring)."""
    if not isinstance(answer, str):
        raise ValueError(f"answer: expected a string, got {type(answer).__name__}")
    text = _split_words(answer)
    text = _strip_punctuation(text)
    return _digits_articles_contractions(text)


def soft_accuracy(prediction: str, gt_answers: Sequence[str], *, normalize: bool = True) -> float:
    """VQA soft accuracy in [0, 1]: mean over leave-one-out subsets of min(1, matches / 3).

    With k of the n human answers equal to the prediction this is
    (k * min(1, (k-1)/3) + (n-k) * min(1, k/3)) / n.
    """
    if len(gt_answers) == 0:
        raise ValueError("gt_answers: expected at least one human answer")
    if normalize:
        prediction = normalize_answer(prediction)
        gt_answers = [normalize_answer(a) for a in gt_answers]
    n = len(gt_answers)
    k = sum(a == prediction for a in gt_answers)
    held_out_match = min(1.0, (k - 1) / 3) if k else 0.0
    held_out_other = min(1.0, k / 3)
    return (k * held_out_match + (n - k) * held_out_other) / n

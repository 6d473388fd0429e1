"""EvalAI answer normalisation and VQA soft accuracy (TextVQA, VQAv2, VizWiz), as LLaVA's scorers apply them.

The rules are those of EvalAI's VQA answer processor, which LLaVA's `m4c_evaluator.EvalAIAnswerProcessor`
uses for its TextVQA scorer and its VQAv2 / VizWiz submission converters (see EVAL.md, "Which rule each
scorer follows"):
1. lower case; drop every "," and "?"; split the possessive "'s" off as " 's"; newlines/tabs -> spaces; trim.
2. punctuation: each mark in `PUNCTUATION` is deleted when it touches a space somewhere in the text (or
   the text has a digit-comma-digit group, which cannot happen after step 1), otherwise replaced by a space;
   then a period not followed by a digit is deleted (at most 32 of them, a quirk of the reference code).
3. per word: number words zero..ten (and "none") -> digits; the articles a / an / the are dropped; a word
   found in the official contraction table (`CONTRACTIONS`) is replaced by its entry.

The VQA tool's own `vqaEval.py` differs from EvalAI's processor in step 2 (its punctuation list has ":" and
"'" and lacks "{", "}", "-", "!") and skips step 1; LLaVA's numbers follow EvalAI's processor, so ours do.

Soft accuracy of a prediction against n human answers: for each of the n leave-one-out subsets,
min(1, #matches in the subset / 3); the prediction scores the mean over the n subsets.
"""
from __future__ import annotations

import re
from typing import Sequence

PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"(?!<=\d)(\.)(?!\d)")
_DIGIT_COMMA_DIGIT = re.compile(r"(?<=\d)(,)+(?=\d)")   # EvalAI's form; inert after step 1
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})

# The contraction table of the VQA evaluation tool (vqaEval.py), in the straight-apostrophe form that EvalAI's
# answer processor and LLaVA's m4c_evaluator use: 120 "spelling replacement" pairs in the published order, kept
# exactly as published, oddities included (see EVAL.md, "Answer normalisation"). It is applied to whole words
# after lower-casing, so the capitalised keys (Im, Ive, Id've, I'dve) never match, "somebody'd" becomes
# "somebodyd", and spellings it lacks ("hadntve", "wouldntve", "shes", "id", "ive") stay as they are.
_CONTRACTION_TABLE = """
aint ain't
arent aren't
cant can't
couldve could've
couldnt couldn't
couldn'tve couldn't've
couldnt've couldn't've
didnt didn't
doesnt doesn't
dont don't
hadnt hadn't
hadnt've hadn't've
hadn'tve hadn't've
hasnt hasn't
havent haven't
hed he'd
hed've he'd've
he'dve he'd've
hes he's
howd how'd
howll how'll
hows how's
Id've I'd've
I'dve I'd've
Im I'm
Ive I've
isnt isn't
itd it'd
itd've it'd've
it'dve it'd've
itll it'll
let's let's
maam ma'am
mightnt mightn't
mightnt've mightn't've
mightn'tve mightn't've
mightve might've
mustnt mustn't
mustve must've
neednt needn't
notve not've
oclock o'clock
oughtnt oughtn't
ow's'at 'ow's'at
'ows'at 'ow's'at
'ow'sat 'ow's'at
shant shan't
shed've she'd've
she'dve she'd've
she's she's
shouldve should've
shouldnt shouldn't
shouldnt've shouldn't've
shouldn'tve shouldn't've
somebody'd somebodyd
somebodyd've somebody'd've
somebody'dve somebody'd've
somebodyll somebody'll
somebodys somebody's
someoned someone'd
someoned've someone'd've
someone'dve someone'd've
someonell someone'll
someones someone's
somethingd something'd
somethingd've something'd've
something'dve something'd've
somethingll something'll
thats that's
thered there'd
thered've there'd've
there'dve there'd've
therere there're
theres there's
theyd they'd
theyd've they'd've
they'dve they'd've
theyll they'll
theyre they're
theyve they've
twas 'twas
wasnt wasn't
wed've we'd've
we'dve we'd've
weve we've
werent weren't
whatll what'll
whatre what're
whats what's
whatve what've
whens when's
whered where'd
wheres where's
whereve where've
whod who'd
whod've who'd've
who'dve who'd've
wholl who'll
whos who's
whove who've
whyll why'll
whyre why're
whys why's
wont won't
wouldve would've
wouldnt wouldn't
wouldnt've wouldn't've
wouldn'tve wouldn't've
yall y'all
yall'll y'all'll
y'allll y'all'll
yall'd've y'all'd've
y'alld've y'all'd've
y'all'dve y'all'd've
youd you'd
youd've you'd've
you'dve you'd've
youll you'll
youre you're
youve you've
"""


def _parse_table(text: str) -> dict[str, str]:
    """`spelling replacement` lines -> dict; a malformed or repeated line is an error."""
    table: dict[str, str] = {}
    for line in text.strip().splitlines():
        spelling, replacement = line.split()
        if spelling in table:
            raise ValueError(f"_CONTRACTION_TABLE: {spelling!r} listed twice")
        table[spelling] = replacement
    return table


CONTRACTIONS = _parse_table(_CONTRACTION_TABLE)


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

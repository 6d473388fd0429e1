"""Coverage of an answers file against its question file: the one rule every scorer and converter applies.

A benchmark number is only meaningful when every question was answered exactly once. Before any number is
printed, each scorer and converter in ``llava.eval`` compares the keys of its answers with the keys of its
question file and raises :class:`CoverageError` on

- missing answers (questions without an answer),
- duplicate answers (a question answered more than once),
- unknown answers (answers to questions the question file does not hold),

giving the counts and the first few keys of each kind. ``--allow-subset`` scores the answered questions on
purpose: missing answers are then allowed (duplicates and unknown answers never are), the result says
"SUBSET" when it prints, and the metrics carry ``answered``, ``questions`` and ``subset``.

A question file whose own keys repeat is an error when it is loaded (:func:`unique_keys`).
"""
from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import dataclass
from typing import Hashable, Iterable, Sequence

FIRST_FEW = 5
SUBSET_FLAG = "--allow-subset"
COVERAGE_KEYS = ("answered", "questions", "subset")   # in every scorer's metrics


class CoverageError(ValueError):
    """Answers and question file disagree (missing, duplicate or unknown answers, or repeated question keys)."""


@dataclass(frozen=True)
class Coverage:
    """How an answers file covers its question file; the key lists keep question / answer order."""

    questions: int
    answered: int
    missing: tuple
    duplicate: tuple
    unknown: tuple

    @property
    def subset(self) -> bool:
        """True when some questions are unanswered (only possible with ``--allow-subset``)."""
        return self.answered < self.questions

    def fields(self) -> dict:
        """The coverage keys every scorer's metrics carry: answered, questions, subset."""
        return dict(zip(COVERAGE_KEYS, (self.answered, self.questions, self.subset)))


def summary_line(fields: dict) -> str:
    """The printed coverage line of a metrics dict; it starts with SUBSET when questions were left out."""
    answered, questions = fields["answered"], fields["questions"]
    if answered < questions:
        return (f"SUBSET ({SUBSET_FLAG}): {answered} of {questions} questions answered and scored, "
                f"{questions - answered} left out")
    return f"coverage: all {questions} questions answered once"


def _first(keys: Sequence) -> str:
    shown = ", ".join(repr(k) for k in keys[:FIRST_FEW])
    return f"{shown}, ..." if len(keys) > FIRST_FEW else shown


def unique_keys(keys: Iterable[Hashable], what: str) -> list:
    """`keys` as a list; raises CoverageError naming `what` when a key occurs more than once."""
    keys = list(keys)
    counts = Counter(keys)
    repeated = [k for k in dict.fromkeys(keys) if counts[k] > 1]
    if repeated:
        raise CoverageError(
            f"{what}: {len(repeated)} question keys occur more than once (first: {_first(repeated)}); "
            "each question must appear once"
        )
    return keys


def measure(question_keys: Sequence[Hashable], answer_keys: Iterable[Hashable]) -> Coverage:
    """Compare answer keys with the (unique) question keys; no check, no error."""
    answer_keys = list(answer_keys)
    counts = Counter(answer_keys)
    known = set(question_keys)
    return Coverage(
        questions=len(question_keys),
        answered=sum(1 for k in question_keys if counts[k]),
        missing=tuple(k for k in question_keys if not counts[k]),
        duplicate=tuple(k for k in dict.fromkeys(answer_keys) if counts[k] > 1 and k in known),
        unknown=tuple(k for k in dict.fromkeys(answer_keys) if k not in known),
    )


def check_coverage(question_keys: Sequence[Hashable], answer_keys: Iterable[Hashable], *, answers: str,
                   questions: str, allow_subset: bool = False) -> Coverage:
    """Coverage of `answer_keys` over `question_keys`, or CoverageError naming both files.

    `answers` / `questions` name the two inputs in the message (argument and path). Missing answers are
    allowed only with `allow_subset`; duplicate and unknown answers are always an error.
    """
    cov = measure(unique_keys(question_keys, questions), answer_keys)
    problems = []
    if cov.missing and not allow_subset:
        problems.append(f"{len(cov.missing)} of {cov.questions} questions have no answer "
                        f"(first: {_first(cov.missing)})")
    if cov.duplicate:
        problems.append(f"{len(cov.duplicate)} questions are answered more than once (first: {_first(cov.duplicate)})")
    if cov.unknown:
        problems.append(f"{len(cov.unknown)} answers are for questions not in {questions} (first: {_first(cov.unknown)})")
    if problems:
        hint = ""
        if cov.missing and not allow_subset and not (cov.duplicate or cov.unknown):
            hint = f"; finish the run (rerun it to resume), or pass {SUBSET_FLAG} to score the answered subset on purpose"
        raise CoverageError(f"{answers} does not match {questions}: " + "; ".join(problems) + hint)
    if not cov.answered:
        raise CoverageError(f"{answers}: no answers to score")
    return cov


def add_subset_argument(ap: argparse.ArgumentParser) -> None:
    """The shared ``--allow-subset`` option of the scorers and converters."""
    ap.add_argument(SUBSET_FLAG, action="store_true",
                    help="score / convert the answered questions only, on purpose (missing answers allowed; "
                         "the result is marked SUBSET and the metrics carry subset=true)")

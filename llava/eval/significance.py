"""Paired significance tests between a reference method and every other one (the paper's Table 11, App. D.3).

    # per-run metrics (e.g. 20 seeds of MME totals): one JSON per method
    python -m llava.eval.significance --scores script=runs/script.json --scores fastv=runs/fastv.json \
        --metric mme_total [--reference script] [--out table11.json]
    # per-question scores from answer files, scored against a ground-truth file
    python -m llava.eval.significance --scores script=ans/script.jsonl --scores random=ans/random.jsonl \
        --truth data/test/answers.jsonl

For each method M != reference R, over the paired scores ``r_i`` (R) and ``m_i`` (M):

- paired one-sided t-test, ``scipy.stats.ttest_rel(r, m, alternative="greater")``: H0 mean(r - m) = 0
  against H1 mean(r - m) > 0 ("the reference is better");
- Wilcoxon signed-rank test, ``scipy.stats.wilcoxon(r, m, zero_method="wilcox", alternative="greater")``:
  zero differences are dropped before ranking (Wilcoxon's original rule); scipy's ``method="auto"``
  takes the exact null distribution for up to 50 non-zero differences without ties, the normal
  approximation otherwise (20 runs all in favour of R give the exact ``2^-20 = 9.54e-7`` of Table 11).
- When every difference is zero neither test is defined; the p-values are reported as 1.0 (no evidence
  that R is better), as is the reference's own row (Table 11 prints "1.00").

Mean and StdDev are over the method's own scores (StdDev with ``ddof=1``, the sample standard deviation).

Inputs (``--scores NAME=PATH``, repeat per method; pairing is by id, and the id sets must be equal):

- ``*.jsonl`` answer files (LLaVA's ``question_id`` per line): per-question score = the row's numeric
  ``--score-key`` field (default ``score``) when present; otherwise the answer ``text`` scored against
  ``--truth`` (jsonl with ``question_id`` and ``answer``): yes/no truths with LLaVA's POPE parsing
  (``eval_pope.parse_yes_no``), others by EvalAI-normalised exact match; 100 if right, else 0.
- ``*.json`` per-run metrics: a list of numbers (ids ``0, 1, ...``), a list of objects holding
  ``--metric`` and optionally ``run`` or ``seed`` as the id, an object ``{run_id: number | {metric: ...}}``,
  or any of these under a ``"runs"`` key.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llava.eval.io_utils import atomic_write_json, read_jsonl

DEFAULT_REFERENCE = "script"


class PairingError(ValueError):
    """The score files do not hold the same ids (the tests need paired samples)."""


@dataclass
class Scores:
    """One method's paired scores: ids in file order and the score of each."""

    name: str
    path: str
    ids: list[str]
    values: list[float]


# --------------------------------------------------------------------------------------------- reading
def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}: expected a finite number, got {value!r}")
    return float(value)


def answer_correct(text: str, truth: str) -> bool:
    """POPE's yes/no rule when the truth is yes/no, else EvalAI-normalised exact match."""
    from llava.eval.eval_pope import parse_yes_no
    from llava.eval.vqa_normalize import normalize_answer

    if truth.strip().lower() in ("yes", "no"):
        return parse_yes_no(text) == truth.strip().lower()
    return normalize_answer(text) == normalize_answer(truth)


def read_truth(path: str) -> dict[str, str]:
    """``question_id`` -> ``answer`` from a ground-truth jsonl."""
    rows = read_jsonl(path, "--truth")
    out = {}
    for r in rows:
        if "question_id" not in r or "answer" not in r:
            raise ValueError(f"--truth {path}: every line needs 'question_id' and 'answer', got keys {sorted(r)}")
        out[str(r["question_id"])] = str(r["answer"])
    return out


def _answer_scores(path: Path, score_key: str, truth: dict[str, str] | None) -> tuple[list[str], list[float]]:
    ids, values = [], []
    for n, r in enumerate(read_jsonl(path, "--scores answer file"), 1):
        if "question_id" not in r:
            raise ValueError(f"{path}:{n}: answer line without 'question_id'")
        qid = str(r["question_id"])
        if score_key in r:
            values.append(_number(r[score_key], f"{path}:{n} '{score_key}'"))
        elif truth is not None:
            if qid not in truth:
                raise PairingError(f"{path}: question_id {qid!r} is not in the --truth file")
            values.append(100.0 if answer_correct(str(r.get("text", "")), truth[qid]) else 0.0)
        else:
            raise ValueError(f"{path}:{n}: no numeric '{score_key}' field and no --truth file to score 'text'")
        ids.append(qid)
    return ids, values


def _run_scores(path: Path, metric: str | None) -> tuple[list[str], list[float]]:
    data = json.loads(path.read_text())
    if isinstance(data, dict) and "runs" in data:
        data = data["runs"]

    def pick(item: Any, where: str) -> float:
        if isinstance(item, dict):
            if metric is None:
                raise ValueError(f"{where}: runs are objects; name the value with --metric (keys: {sorted(item)})")
            if metric not in item:
                raise ValueError(f"{where}: no --metric {metric!r} (keys: {sorted(item)})")
            return _number(item[metric], f"{where} {metric!r}")
        return _number(item, where)

    if isinstance(data, list):
        ids = [str(item.get("run", item.get("seed", k))) if isinstance(item, dict) else str(k)
               for k, item in enumerate(data)]
        return ids, [pick(item, f"{path} run {k}") for k, item in enumerate(data)]
    if isinstance(data, dict):
        return [str(k) for k in data], [pick(v, f"{path} run {k!r}") for k, v in data.items()]
    raise ValueError(f"{path}: expected a list or an object of per-run values, got {type(data).__name__}")


def load_scores(name: str, path: str, score_key: str = "score", truth: dict[str, str] | None = None,
                metric: str | None = None) -> Scores:
    """Read one method's scores (``.jsonl`` answers or ``.json`` per-run metrics, see the module docstring)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--scores {name}={path}: no such file")
    ids, values = _answer_scores(p, score_key, truth) if p.suffix == ".jsonl" else _run_scores(p, metric)
    if not ids:
        raise ValueError(f"--scores {name}={path}: no scores")
    seen: set[str] = set()
    dup = next((i for i in ids if i in seen or seen.add(i)), None)
    if dup is not None:
        raise PairingError(f"--scores {name}={path}: id {dup!r} occurs more than once")
    return Scores(name, str(path), ids, values)


def check_paired(reference: Scores, other: Scores) -> list[float]:
    """``other``'s values in the reference's id order; PairingError naming both files otherwise."""
    if len(reference.ids) != len(other.ids) or set(reference.ids) != set(other.ids):
        ref_set, other_set = set(reference.ids), set(other.ids)
        only_ref = [i for i in reference.ids if i not in other_set][:3]
        only_other = [i for i in other.ids if i not in ref_set][:3]
        raise PairingError(
            f"unpaired inputs: {reference.path} ({reference.name}, {len(reference.ids)} scores) and {other.path} "
            f"({other.name}, {len(other.ids)} scores) hold different ids; first only in {reference.name}: "
            f"{only_ref}, first only in {other.name}: {only_other}. Both must score the same questions / runs."
        )
    by_id = dict(zip(other.ids, other.values))
    return [by_id[i] for i in reference.ids]


# --------------------------------------------------------------------------------------------- tests
def paired_tests(reference: Sequence[float], other: Sequence[float]) -> tuple[float, float]:
    """(t-test p, Wilcoxon p), one-sided "reference greater"; 1.0 for both when all differences are 0."""
    from scipy import stats

    r = np.asarray(reference, dtype=np.float64)
    m = np.asarray(other, dtype=np.float64)
    if r.shape != m.shape or r.ndim != 1:
        raise PairingError(f"paired scores must be two 1-D arrays of one length, got {r.shape} and {m.shape}")
    if len(r) < 2:
        raise ValueError(f"the paired tests need at least 2 paired scores, got {len(r)}")
    if np.all(r - m == 0):
        return 1.0, 1.0
    t_p = float(stats.ttest_rel(r, m, alternative="greater").pvalue)
    w_p = float(stats.wilcoxon(r, m, zero_method="wilcox", alternative="greater").pvalue)
    return t_p, w_p


def compare(methods: Sequence[Scores], reference: str = DEFAULT_REFERENCE) -> list[dict]:
    """Table 11's rows: the other methods in the given order, then the reference."""
    names = [m.name for m in methods]
    if reference not in names:
        raise ValueError(f"--reference {reference!r} is not among the methods {names}")
    if len(set(names)) != len(names):
        raise ValueError(f"method names must be distinct, got {names}")
    ref = methods[names.index(reference)]
    rows = []
    for m in [m for m in methods if m.name != reference] + [ref]:
        values = check_paired(ref, m)
        t_p, w_p = (1.0, 1.0) if m is ref else paired_tests(ref.values, values)
        arr = np.asarray(values, dtype=np.float64)
        rows.append({"method": m.name, "n": len(arr), "mean": float(arr.mean()),
                     "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
                     "t_test_p": t_p, "wilcoxon_p": w_p, "reference": m is ref, "path": m.path})
    return rows


def _p(p: float) -> str:
    if p >= 0.01:
        return f"{p:.2f}"
    mant, exp = f"{p:.2e}".split("e")
    return f"{mant} x 10^{int(exp)}"


def format_table(rows: list[dict]) -> str:
    """Table 11's layout: Method, Mean, StdDev, t-test p, Wilcoxon p."""
    head = f"{'Method':<18}{'Mean':>12}{'StdDev':>10}{'t-test p':>18}{'Wilcoxon p':>18}"
    lines = [head, "-" * len(head)]
    for r in rows:
        name = r["method"] + (" (ref)" if r["reference"] else "")
        lines.append(f"{name:<18}{r['mean']:>12.2f}{r['std']:>10.2f}{_p(r['t_test_p']):>18}{_p(r['wilcoxon_p']):>18}")
    return "\n".join(lines)


def parse_named(items: Sequence[str], flag: str) -> list[tuple[str, str]]:
    """["a=x", "b=y"] -> [("a", "x"), ("b", "y")], ValueError on a malformed item."""
    out = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"{flag} expects NAME=PATH, got {item!r}")
        out.append((name.strip(), path.strip()))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llava.eval.significance", description=__doc__.split("\n")[0])
    p.add_argument("--scores", action="append", required=True, metavar="NAME=PATH",
                   help="a method's answer file (.jsonl) or per-run metrics (.json); repeat per method")
    p.add_argument("--reference", default=DEFAULT_REFERENCE, help="the method tested as better (default script)")
    p.add_argument("--truth", default=None, help="ground truth jsonl (question_id, answer) to score answer texts")
    p.add_argument("--score-key", default="score", help="numeric per-question field of the answer lines")
    p.add_argument("--metric", default=None, help="the per-run value's key when runs are objects")
    p.add_argument("--out", default=None, help="write the rows as JSON here (atomic)")
    return p


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        named = parse_named(args.scores, "--scores")
        if len(named) < 2:
            raise ValueError("give at least two methods (--scores NAME=PATH twice or more)")
        truth = read_truth(args.truth) if args.truth else None
        methods = [load_scores(n, p, args.score_key, truth, args.metric) for n, p in named]
        rows = compare(methods, args.reference)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    print(format_table(rows))
    if args.out:
        atomic_write_json(args.out, {"reference": args.reference, "alternative": "reference greater",
                                     "t_test": "scipy.stats.ttest_rel(alternative='greater')",
                                     "wilcoxon": "scipy.stats.wilcoxon(zero_method='wilcox', alternative='greater')",
                                     "rows": rows, "table": format_table(rows)})
        print(f"wrote {args.out}", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()

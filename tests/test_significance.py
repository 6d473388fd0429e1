"""Table 11 (App. D.3): paired one-sided t-test and Wilcoxon signed-rank test, and refusal of unpaired inputs."""

import itertools
import json
import math

import pytest
from scipy import stats

from llava.eval import significance as S


def _exact_wilcoxon_greater(diffs):
    """P(W+ >= observed) under H0 by enumerating all sign flips of the non-zero |d| (ranks 1..n, no ties)."""
    nz = [d for d in diffs if d != 0]
    ranks = {v: r for r, v in enumerate(sorted(abs(d) for d in nz), 1)}
    observed = sum(ranks[abs(d)] for d in nz if d > 0)
    rs = list(ranks.values())
    hits = sum(sum(r for r, s in zip(rs, signs) if s) >= observed
               for signs in itertools.product((0, 1), repeat=len(rs)))
    return hits / 2 ** len(rs)


def _t_test_greater(r, m):
    """One-sided paired t-test from the formula: t = mean(d) / (sd(d) / sqrt(n)), p = P(T_{n-1} >= t)."""
    d = [a - b for a, b in zip(r, m)]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    t = mean / (sd / math.sqrt(n))
    return t, stats.t.sf(t, n - 1)


def test_hand_checkable_t_statistic():
    # d = (2, 3, 4): mean 3, sd 1, t = 3 / (1 / sqrt 3) = 3 sqrt(3)
    r, m = [3.0, 5.0, 7.0], [1.0, 2.0, 3.0]
    t, p = _t_test_greater(r, m)
    assert t == pytest.approx(3 * math.sqrt(3))
    t_p, w_p = S.paired_tests(r, m)
    assert t_p == pytest.approx(p, rel=1e-10)
    assert w_p == pytest.approx(1 / 8)  # all three signs positive: 1 of 2^3 sign patterns


def test_twenty_runs_all_better_give_table11_wilcoxon():
    ref = [1487.0 + 0.1 * i for i in range(20)]
    other = [x - 100.0 - (i % 7) * 0.37 - i * 0.011 for i, x in enumerate(ref)]  # distinct differences
    _, w_p = S.paired_tests(ref, other)
    assert w_p == pytest.approx(2.0 ** -20)  # 9.54e-7, Table 11's Wilcoxon column


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_p_values_equal_independent_computation(seed):
    import random

    rng = random.Random(seed)
    ref = [rng.uniform(50, 60) for _ in range(12)]
    other = [x - rng.uniform(-2.0, 3.0) for x in ref]
    other[3] = ref[3]  # one zero difference: dropped by the Wilcoxon test ("wilcox" rule)
    t_p, w_p = S.paired_tests(ref, other)
    assert t_p == pytest.approx(_t_test_greater(ref, other)[1], rel=1e-9)
    assert t_p == pytest.approx(stats.ttest_rel(ref, other, alternative="greater").pvalue, rel=1e-12)
    # 11 non-zero distinct differences: scipy's auto method is exact here; enumerate the 2^11 sign flips
    assert w_p == pytest.approx(_exact_wilcoxon_greater([a - b for a, b in zip(ref, other)]), rel=1e-9)


def test_all_zero_differences_report_one():
    assert S.paired_tests([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == (1.0, 1.0)


# --------------------------------------------------------------------------- files and the CLI
def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_cli_answer_files_scored_against_truth(tmp_path, capsys):
    truth = _jsonl(tmp_path / "truth.jsonl", [{"question_id": q, "answer": a} for q, a in
                                               [(1, "yes"), (2, "no"), (3, "red"), (4, "2"), (5, "yes"), (6, "no")]])
    # reference right on all 6; other wrong on questions 2, 3 and 4 (POPE parsing: "No, ..." -> no)
    ref = _jsonl(tmp_path / "script.jsonl", [{"question_id": q, "text": t} for q, t in
                                             [(1, "Yes"), (2, "No, there is not."), (3, "Red."), (4, "two"),
                                              (5, "yes"), (6, "no")]])
    other = _jsonl(tmp_path / "fastv.jsonl", [{"question_id": q, "text": t} for q, t in
                                              [(6, "no"), (5, "Yes"), (4, "3"), (3, "blue"), (2, "yes"), (1, "yes")]])
    out = tmp_path / "t11.json"
    rows = S.main(["--scores", f"script={ref}", "--scores", f"fastv={other}", "--truth", truth, "--out", str(out)])
    assert [r["method"] for r in rows] == ["fastv", "script"]
    fastv, script = rows
    assert script["mean"] == 100.0 and fastv["mean"] == 50.0
    d = [0, 100, 100, 100, 0, 0]  # paired by question id, not by line order
    assert fastv["t_test_p"] == pytest.approx(_t_test_greater(d, [0] * 6)[1])
    assert fastv["wilcoxon_p"] == pytest.approx(stats.wilcoxon(d, alternative="greater").pvalue)
    assert (script["t_test_p"], script["wilcoxon_p"]) == (1.0, 1.0)
    printed = capsys.readouterr().out
    for head in ("Method", "Mean", "StdDev", "t-test p", "Wilcoxon p", "script (ref)"):
        assert head in printed
    assert json.loads(out.read_text())["rows"][0]["method"] == "fastv"


def test_cli_per_run_metrics(tmp_path):
    ref = [{"seed": s, "mme": 1487.0 + 0.5 * (s % 3)} for s in range(20)]
    other = [{"seed": s, "mme": 1076.0 + 0.3 * s} for s in reversed(range(20))]
    (tmp_path / "script.json").write_text(json.dumps({"runs": ref}))
    (tmp_path / "fastv.json").write_text(json.dumps(other))
    rows = S.main(["--scores", f"script={tmp_path / 'script.json'}", "--scores", f"fastv={tmp_path / 'fastv.json'}",
                   "--metric", "mme"])
    r = [x["mme"] for x in ref]
    m = [1076.0 + 0.3 * s for s in range(20)]
    assert rows[0]["mean"] == pytest.approx(sum(m) / 20)
    assert rows[0]["std"] == pytest.approx(stats.tstd(m))
    assert rows[0]["t_test_p"] == pytest.approx(_t_test_greater(r, m)[1], rel=1e-9)
    assert rows[0]["wilcoxon_p"] == pytest.approx(2.0 ** -20)


def test_refuses_different_question_sets(tmp_path, capsys):
    a = _jsonl(tmp_path / "script.jsonl", [{"question_id": q, "score": 1.0} for q in (1, 2, 3, 4)])
    b = _jsonl(tmp_path / "random.jsonl", [{"question_id": q, "score": 0.0} for q in (1, 2, 5, 4)])
    with pytest.raises(SystemExit):
        S.main(["--scores", f"script={a}", "--scores", f"random={b}"])
    err = capsys.readouterr().err
    assert "unpaired" in err and "script.jsonl" in err and "random.jsonl" in err
    assert "['3']" in err and "['5']" in err


def test_refuses_different_lengths(tmp_path):
    a = S.Scores("script", "a.json", ["0", "1", "2"], [1.0, 2.0, 3.0])
    b = S.Scores("fastv", "b.json", ["0", "1"], [1.0, 2.0])
    with pytest.raises(S.PairingError, match=r"a\.json.*3 scores.*b\.json.*2 scores.*only in script: \['2'\]"):
        S.compare([a, b])


@pytest.mark.parametrize("argv, message", [
    (["--scores", "script"], "NAME=PATH"),
    (["--scores", "script=missing.json", "--scores", "b=missing2.json"], "no such file"),
    (["--scores", "a=x.json"], "at least two"),
])
def test_cli_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        S.main(argv)
    assert message in capsys.readouterr().err


def test_refuses_unknown_reference_and_duplicate_ids(tmp_path):
    with pytest.raises(ValueError, match="reference"):
        S.compare([S.Scores("a", "a", ["1", "2"], [1, 2]), S.Scores("b", "b", ["1", "2"], [1, 2])], "script")
    dup = _jsonl(tmp_path / "d.jsonl", [{"question_id": 1, "score": 1}, {"question_id": 1, "score": 0}])
    with pytest.raises(S.PairingError, match="more than once"):
        S.load_scores("d", dup)

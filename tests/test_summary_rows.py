"""Issue 13, the summary: rows keyed by the run fingerprint (a rerun replaces its row), subset marks from the
scorers' metrics, a partly filled summary.csv shown with "-", and an older csv upgraded to the new columns."""
from __future__ import annotations

import json
from pathlib import Path

from llava.eval import summarize


def test_summarize_a_partly_filled_csv_shows_dashes(tmp_path):
    csv_path = tmp_path / "summary.csv"
    csv_path.write_text("benchmark,checkpoint,method,budget,metric,value,date\n"
                        "gqa,ck,script,576,accuracy,60,d\n"
                        "pope,ck,script,64,average_f1,80,d\n"
                        "mme,ck,script,,perception,1500,d\n"        # a row without its budget
                        "textvqa,ck,scr")                            # a row cut short
    rows = summarize.main(["--csv", str(csv_path)])
    header = rows[0]
    by_budget = {r[2]: r for r in rows[1:]}
    assert set(by_budget) == {"576", "64"}
    assert by_budget["64"][header.index("POPE")] == "80.00" and by_budget["64"][header.index("GQA")] == "-"
    assert by_budget["64"][header.index("Relative")] == "-"         # shares no benchmark with the 576 row
    assert by_budget["576"][header.index("Relative")] == "100.00%"


def test_summary_row_is_keyed_by_the_run_fingerprint(tmp_path):
    csv_path = str(tmp_path / "s.csv")
    add = lambda value, fp, run="", when="d": summarize.append_row(  # noqa: E731
        csv_path, "pope", "ck", "script", 4, "average_f1", value, when, fingerprint=fp, run=run)
    add(80.0, "aaaa")
    add(81.0, "aaaa")                                              # a rerun of the same run replaces its row
    assert [(r["value"], r["fingerprint"]) for r in summarize._read_rows(Path(csv_path))] == [("81.0", "aaaa")]
    add(70.0, "bbbb", run="nonegate")                              # another run: its own row and table row
    assert summarize.read_scores(csv_path) == {summarize.RowKey("ck", "script", 4): {"pope": 81.0},
                                               summarize.RowKey("ck", "script", 4, "nonegate"): {"pope": 70.0}}
    methods = [r[1] for r in summarize.main(["--csv", csv_path])[1:]]
    assert methods == ["script", "script (nonegate)"]


def test_summary_marks_a_subset_from_the_scorer_metrics(tmp_path):
    csv_path = str(tmp_path / "s.csv")
    metrics = tmp_path / "m.json"
    metrics.write_text(json.dumps({"average_f1": 66.7, "answered": 3, "questions": 4, "subset": True}))
    summarize.main(["add", "--csv", csv_path, "--benchmark", "pope", "--checkpoint", "ck", "--method", "script",
                    "--budget", "4", "--metric", "average_f1", "--value", "66.7", "--metrics-json", str(metrics)])
    table = summarize.main(["--csv", csv_path])
    assert table[1][table[0].index("POPE")] == "66.70*"
    notes = summarize.format_notes(summarize.read_marks(csv_path))
    assert notes == "- ck script 4 pope: * scored on a subset: 3/4 questions answered\n"


def test_old_summary_csv_gets_the_new_columns_when_a_row_is_added(tmp_path):
    csv_path = tmp_path / "s.csv"
    csv_path.write_text("benchmark,checkpoint,method,budget,metric,value,date\ngqa,ck,script,576,accuracy,60,d\n")
    summarize.append_row(str(csv_path), "pope", "ck", "script", 576, "average_f1", 80.0, "e", fingerprint="ff")
    lines = csv_path.read_text().splitlines()
    assert lines[0] == ",".join(summarize.FIELDS)
    assert lines[1] == "gqa,ck,script,576,accuracy,60,d,,,,"
    assert summarize.read_scores(str(csv_path)) == {summarize.RowKey("ck", "script", 576): {"gqa": 60.0, "pope": 80.0}}

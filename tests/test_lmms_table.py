"""llava.lmms.table on canned lmms-eval outputs: values, Acc. and Relative against numbers computed by hand
(in the comments), the newest results file winning, Video-MME durations from the logged samples, and the
summary.csv rows."""

import json

import pytest

from llava.eval import summarize
from llava.lmms import table


def write_run(folder, results_files, samples=None, lvb=None):
    """results_files: [(file stem, {task: {metric: value}})] written as lmms-eval writes them ("metric,none");
    samples: Video-MME's logged (duration, pred, answer, score); lvb: LongVideoBench's (category, parsed_pred,
    answer), as lmms-eval's longvideobench_process_results logs them."""
    folder.mkdir(parents=True)
    for stem, results in results_files:
        data = {"results": {t: {"alias": t, **{f"{m},none": v for m, v in ms.items()}} for t, ms in results.items()},
                "config": {"model": "script_llava_video", "model_args": f"pretrained=x,{folder.name}"}}
        (folder / f"{stem}_results.json").write_text(json.dumps(data))
    if samples is not None:
        with open(folder / "20260102_000000_samples_videomme.jsonl", "w") as f:
            for duration, pred, answer, score in samples:
                record = {"duration": duration, "pred_answer": pred, "answer": answer}
                if score is not None:
                    record["score"] = score
                f.write(json.dumps({"doc_id": 0, "videomme_perception_score": record}) + "\n")
    if lvb is not None:
        with open(folder / "20260102_000000_samples_longvideobench_val_v.jsonl", "w") as f:
            for i, (category, pred, answer) in enumerate(lvb):
                record = {"id": str(i), "duration_group": 15, "question_category": category, "answer": answer,
                          "parsed_pred": pred}
                f.write(json.dumps({"doc_id": i, "lvb_acc": record, "submission": {str(i): pred}}) + "\n")
    return str(folder)


@pytest.fixture
def video_runs(tmp_path):
    script = write_run(tmp_path / "script_32", [
        ("20260101_000000", {"mlvu_dev": {"mlvu_percetion_score": 50.0},  # replaced by the newer file
                             "mvbench_action_count": {"mvbench_accuracy": 40.0},
                             "mvbench_object_shuffle": {"mvbench_accuracy": 60.0}}),
        ("20260102_000000", {"mlvu_dev": {"mlvu_percetion_score": 66.0}, "longvideobench_val_v": {"lvb_acc": 0.55},
                             "videomme": {"videomme_perception_score": 60.0}}),
    ], samples=[("short", "A", "A", 1.0), ("short", "B", "B", 1.0), ("short", "C", "C", 1.0), ("short", "A", "B", 0.0),
                ("medium", "A", "A", None), ("medium", "A", "B", None), ("long", "A", "B", None),
                ("long", "C", "D", 0.0)],
        lvb=[("S2E", "A", "A"), ("T2O", "B", "C"), ("E2O", "C", "C"), ("O2E", "D", "D"),  # perception 3 / 4
             ("E3E", "A", "A"), ("TOS", "A", "B"), ("TAA", "C", "D")])  # relation 1 / 3
    none = write_run(tmp_path / "none_169", [
        ("20260103_000000", {"mlvu_dev": {"mlvu_percetion_score": 70.0}, "longvideobench_val_v": {"lvb_acc": 0.6},
                             "videomme": {"videomme_perception_score": 62.0}})])
    return script, none


def test_video_table_against_hand_computed_acc_and_relative(video_runs, tmp_path):
    script, none = video_runs
    rows = table.main(["--suite", "video", "--run", f"script 32={script}", "--out", str(tmp_path / "t.md")])
    assert rows[0] == ["Method", "MLVU m-avg", "MVBench", "LongVideoBench val", "perception", "relation",
                       "Video-MME w/o sub", "short", "medium", "long", "Acc.", "Relative"]
    # paper: (67.75 + 58.15 + 59.07 + 63.66) / 4 = 62.1575
    assert rows[1] == ["paper", "67.75", "58.15", "59.07", "65.03", "53.64", "63.66", "76.46", "61.21", "53.19", "62.16",
                       "100.00%"]
    # MVBench (40 + 60) / 2; LVB 0.55 x 100; short 3/4, medium 1/2, long 0/2; Acc. (66 + 50 + 55 + 60) / 4 = 57.75;
    # Relative 57.75 / 62.1575 = 92.909 %
    # LongVideoBench perception 3/4, relation 1/3 (not in Acc.)
    assert rows[2] == ["script 32", "66.00", "50.00", "55.00", "75.00", "33.33", "60.00", "75.00", "50.00", "0.00",
                       "57.75", "92.91%"]
    assert (tmp_path / "t.md").read_text().startswith("| Method | MLVU m-avg |")


def test_relative_to_a_run_uses_the_columns_both_rows_have(video_runs):
    script, none = video_runs
    rows = table.main(["--suite", "video", "--run", f"script 32={script}", "--run", f"none 169={none}",
                       "--reference", "none 169"])
    # the reference lacks MVBench: (66 + 55 + 60) / 3 = 60.333 vs (70 + 60 + 62) / 3 = 64 -> 94.271 %
    assert rows[2][-2:] == ["57.75", "94.27%"]
    assert rows[3] == ["none 169", "70.00", "-", "60.00", "-", "-", "62.00", "-", "-", "-", "64.00", "100.00%"]
    # the paper row over the same three: (67.75 + 59.07 + 63.66) / 3 = 63.4933 / 64 = 99.208 %
    assert rows[1][-1] == "99.21%"


def test_internvl3_table_scales_ocrbench_and_mme(tmp_path):
    run = write_run(tmp_path / "script_256", [("20260101_000000", {
        "ai2d": {"exact_match": 0.8}, "textvqa_val": {"exact_match": 0.75}, "chartqa": {"relaxed_overall": 0.7},
        "ocrbench": {"ocrbench_accuracy": 0.64}, "hallusion_bench_image": {"aAcc": 48.0},
        "mme": {"mme_perception_score": 1600.0, "mme_cognition_score": 600.0},
        "mmbench_en_dev": {"gpt_eval_score": 80.0, "submission": "some/file.xlsx"}})])
    rows = table.main(["--suite", "internvl3", "--run", f"script 256={run}"])
    # paper Acc.: (85.28 + 81.51 + 85.07 + 85.3 + 50.02 + 2393.22 / 28 + 83.82 + 82.54) / 8 = 79.8765
    assert rows[1][-2:] == ["79.88", "100.00%"]
    # ours: (80 + 75 + 70 + 64 + 48 + 2200 / 28 + 80) / 7 = 70.7959; the paper over the same seven: 79.4960
    # -> 89.056 %
    assert rows[2] == ["script 256", "80.00", "75.00", "70.00", "640", "48.00", "2200.00", "80.00", "-", "70.80",
                       "89.06%"]


def test_summary_rows_are_keyed_by_the_run_and_replaced_on_rerun(video_runs, tmp_path):
    script, _ = video_runs
    csv_path = tmp_path / "summary.csv"
    args = ["--suite", "video", "--run", f"script 32={script}", "--csv", str(csv_path), "--checkpoint", "LLaVA-Video-7B"]
    table.main(args)
    table.main(args)  # a rerun of the same run replaces its rows
    rows = summarize._read_rows(csv_path)
    assert sorted((r["benchmark"], r["value"]) for r in rows) == [
        ("longvideobench", "55.0"), ("mlvu", "66.0"), ("mvbench", "50.0"), ("videomme", "60.0")]
    assert {(r["checkpoint"], r["method"], r["budget"], r["metric"]) for r in rows} == {
        ("LLaVA-Video-7B", "script", "32", "lmms_eval")}
    assert summarize.read_scores(str(csv_path)) == {}  # not columns of the LLaVA table


def test_bad_input_is_refused_by_name(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no lmms-eval"):
        table.read_run(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x_results.json").write_text(json.dumps({"nothing": 1}))
    with pytest.raises(ValueError, match="not an lmms-eval results file"):
        table.read_run(tmp_path / "bad")
    with pytest.raises(ValueError, match="METHOD BUDGET"):
        table.main(["--suite", "video", "--run", f"script={tmp_path / 'empty'}"])
    with pytest.raises(ValueError, match="--reference"):
        table.build_rows("video", {}, reference="none 169")


def test_an_unknown_longvideobench_category_is_an_error_naming_it(tmp_path):
    run = write_run(tmp_path / "r", [("20260101_000000", {"longvideobench_val_v": {"lvb_acc": 0.5}})],
                    lvb=[("S2E", "A", "A"), ("X9X", "A", "A")])
    with pytest.raises(ValueError, match="line 2: question_category 'X9X' is none of"):
        table.main(["--suite", "video", "--run", f"script 32={run}"])

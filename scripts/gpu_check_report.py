"""The report of scripts/gpu_check.sh: OUT_DIR's step results -> OUT_DIR/gpu_check.json + OUT_DIR/gpu_check.md.

    python scripts/gpu_check_report.py OUT_DIR          # after the steps ran
    python scripts/gpu_check_report.py --env FILE       # the machine (GPU, torch, CUDA, triton, flash_attn) as JSON

Reads what the steps wrote (every file may be missing: a step that failed, timed out or was skipped is reported as
such): steps.tsv, env.json, cuda_tests.xml (pytest's JUnit XML), bench_torch.json / bench_fused.json
(``script_prune.bench``), efficiency_sdpa.json / efficiency_flash.json (``llava.eval.efficiency``: a list of rows
or ``{"rows": [...]}``), toy_throughput.json (``llava.toy.throughput``).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

PAPER_PREFILL_MS = {2880: 246.0, 320: 35.0}   # Table 6, LLaVA-NeXT-7B, whole model, fp16 on a GPU
# What one call of a bench case is, in images: one LLaVA-1.5 image, one NeXT image (5 crops), one video (64 frames).
BENCH_CASE_NAMES = {(1, 576): "LLaVA-1.5, 1 image", (5, 576): "LLaVA-NeXT, 5 crops of 1 image",
                    (64, 169): "LLaVA-Video, 64 frames", (1, 2880): "2880 tokens in one row"}


def machine() -> dict[str, Any]:
    """GPU name, memory, torch / CUDA / transformers / triton / flash_attn versions."""
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                            "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", gpus=torch.cuda.device_count())
    for dist in ("transformers", "triton", "flash_attn"):
        try:
            from importlib.metadata import version

            info[dist] = version(dist.replace("_", "-"))
        except Exception:  # noqa: BLE001 - not installed
            info[dist] = None
    return info


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def read_steps(out: Path) -> list[dict]:
    path = out / "steps.tsv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def read_junit(path: Path) -> dict | None:
    """passed / failed / errors / skipped counts and the failing test names of a JUnit XML file."""
    if not path.is_file():
        return None
    root = ET.parse(path).getroot()
    cases = root.iter("testcase")
    out = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": []}
    for case in cases:
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None:
            out["failed"] += 1
            out["failures"].append(name)
        elif case.find("error") is not None:
            out["errors"] += 1
            out["failures"].append(name)
        elif case.find("skipped") is not None:
            out["skipped"] += 1
        else:
            out["passed"] += 1
    return out


def bench_rows(payload: dict | None, variant: str) -> list[dict]:
    """script_prune.bench rows with the variant (validating torch walk / trusted fused walk) and what a call is."""
    if not payload:
        return []
    rows = []
    for r in payload.get("rows", []):
        per_step = 1000 * r["median_ms"] / r["k"] if r.get("median_ms") is not None and r.get("k") else None
        rows.append({**r, "variant": variant, "dtype": payload.get("dtype"), "validate": payload.get("validate"),
                     "us_per_step": per_step,
                     "case": BENCH_CASE_NAMES.get((r.get("B"), r.get("N")), f"{r.get('B')}x{r.get('N')}")})
    return rows


def efficiency_rows(payload: Any, attn: str) -> list[dict]:
    rows = payload.get("rows", []) if isinstance(payload, dict) else (payload or [])
    return [{**r, "attn": attn} for r in rows if isinstance(r, dict)]


def _fmt(value: Any, spec: str = ".1f") -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return format(value, spec)
    return str(value)


def markdown(report: dict) -> str:
    env = report.get("env") or {}
    lines = ["# GPU check", "",
             f"Machine: {env.get('gpu', 'no GPU')} ({env.get('gpu_memory_gib', '?')} GiB), torch {env.get('torch')}, "
             f"CUDA {env.get('cuda')}, transformers {env.get('transformers')}, triton {env.get('triton')}, "
             f"flash_attn {env.get('flash_attn')}.", "", "## Steps", "", "| step | status | seconds | note |",
             "|---|---|---|---|"]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']} | {s.get('note') or ''} |" for s in report["steps"]]
    tests = report.get("cuda_tests")
    if tests:
        lines += ["", f"CUDA tests: {tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, "
                      f"{tests['skipped']} skipped" + (f" (failing: {', '.join(tests['failures'])})" if tests["failures"] else "")]
    if report["bench"]:
        lines += ["", "## Selection (script_prune.bench --device cuda)", "",
                  "A call selects for one image (1 crop / 5 NeXT crops) or one video (64 frames). Per greedy step: the "
                  "call's median over the k steps of its walk, an upper bound (the call also builds the similarities).",
                  "",
                  "| case | B x N x D, k | method | variant | dtype | ms per image | min ms | µs per greedy step | host syncs | kernel launches | greedy |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in report["bench"]:
            lines.append(f"| {r['case']} | {r['B']}x{r['N']}x{r['D']}, {r['k']} | {r['method']} | {r['variant']} | "
                         f"{r['dtype']} | {_fmt(r.get('median_ms'), '.3f')} | {_fmt(r.get('min_ms'), '.3f')} | "
                         f"{_fmt(r.get('us_per_step'), '.1f')} | "
                         f"{_fmt(r.get('syncs'), 'd')} | {_fmt(r.get('launches'), 'd')} | {r.get('greedy') or r.get('note', '')} |")
    if report["efficiency"]:
        lines += ["", "## LLaVA-NeXT-7B shape, random weights, float16, 32 layers (llava.eval.efficiency)", "",
                  f"Paper (Table 6): prefill {PAPER_PREFILL_MS[2880]:.0f} ms at 2880 visual tokens -> "
                  f"{PAPER_PREFILL_MS[320]:.0f} ms at 320 (x6.8).", "",
                  "| attention | method | visual tokens | prefill ms (x) | decode ms/token | KV cache MiB | peak MiB | select ms |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in report["efficiency"]:
            name = "unpruned" if r.get("method") in ("none", None) else r["method"]
            speed = f" (x{r['prefill_speedup']:.2f})" if isinstance(r.get("prefill_speedup"), (int, float)) else ""
            lines.append(f"| {r['attn']} | {name} | {_fmt(r.get('visual_tokens'), 'd')} | "
                         f"{_fmt(r.get('prefill_ms'))}{speed} | {_fmt(r.get('decode_ms_per_token'), '.2f')} | "
                         f"{_fmt(r.get('kv_cache_mb'))} | {_fmt(r.get('peak_mem_mb'), '.0f')} | {_fmt(r.get('select_ms'), '.2f')} |")
    toy = report.get("toy_throughput")
    if toy:
        lines += ["", f"## Toy model, batched generation ({toy.get('device_name')}, {toy.get('dtype')})", "", toy["table"]]
    return "\n".join(lines) + "\n"


def build_report(out: Path) -> dict:
    toy = _load_json(out / "toy_throughput.json")
    return {
        "env": _load_json(out / "env.json"),
        "steps": read_steps(out),
        "cuda_tests": read_junit(out / "cuda_tests.xml"),
        "bench": bench_rows(_load_json(out / "bench_torch.json"), "torch walk, validating")
        + bench_rows(_load_json(out / "bench_fused.json"), "fused walk, trusted (validate=False)"),
        "efficiency": efficiency_rows(_load_json(out / "efficiency_sdpa.json"), "sdpa")
        + efficiency_rows(_load_json(out / "efficiency_flash.json"), "flash_attention_2"),
        "toy_throughput": toy,
        "paper_prefill_ms": PAPER_PREFILL_MS,
    }


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", nargs="?", help="the folder scripts/gpu_check.sh wrote")
    ap.add_argument("--env", metavar="FILE", help="only write the machine description to FILE")
    args = ap.parse_args(argv)
    if args.env:
        _write_atomic(Path(args.env), json.dumps(machine(), indent=2))
        return 0
    if not args.out_dir:
        ap.error("give OUT_DIR (or --env FILE)")
    out = Path(args.out_dir)
    if not out.is_dir():
        ap.error(f"OUT_DIR {out} is not a folder")
    report = build_report(out)
    _write_atomic(out / "gpu_check.json", json.dumps(report, indent=2, default=str))
    text = markdown(report)
    _write_atomic(out / "gpu_check.md", text)
    print(text)
    bad = [s["step"] for s in report["steps"] if s["status"] in ("failed", "timeout")]
    if bad:
        print(f"[gpu_check] steps that did not finish: {', '.join(bad)} (see their logs in {out})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Speed / memory benchmark of the registered methods (not a test).

    python -m script_prune.bench [--device cpu|cuda] [--json out.json] [--methods script qcsp ...]
                                 [--cases 0 1 2] [--threads N] [--min-repeats 5] [--budget-s 2]
                                 [--greedy auto|torch|triton] [--trusted] [--dtype float32|float16|bfloat16]

Prints the median wall time (ms) of ``select`` (``reduce`` for merging methods) through the
public API (validating, or the trusted path with ``--trusted``), the peak extra memory of one
call, the kernel launches and host syncs of one call, for the paper's settings
(B, N, D, k) = (1,576,4096,64), (1,576,4096,192), (5,576,4096,64) (five LLaVA-NeXT crops),
(64,169,3584,16) (64 video frames), (1,2880,4096,320). Inputs are Gaussian noise (seed 0, in
``--dtype``) with CLIP-sized auxiliaries. ``--greedy`` picks the greedy walk's backend
(``script_prune.fused``; ``triton`` on CPU runs Triton's interpreter: correctness, not speed).

Launches per call (``launches``): on CUDA the CUDA kernels the torch profiler records during
one call; on CPU the aten ops that compute on tensor data plus fused Triton launches, counted
by ``script_prune.counting`` (views, bare allocations and scalar reads excluded). ``cuda path``
(``launches_cuda_path``) is the same count for a dry run on the ``meta`` device with the fused
greedy and ``validate=False``, i.e. the launches the CUDA path makes, measured on any machine.
Host syncs per call (``syncs``): on CUDA the warnings of ``torch.cuda.set_sync_debug_mode("warn")``
during one call; on CPU the sync points ``script_prune.counting`` counts (``.item()``, ``bool()``,
``.tolist()``, ``nonzero``, boolean-mask indexing, ...).

Peak extra memory: on CUDA ``torch.cuda.max_memory_allocated`` minus the allocated bytes
before the call; on CPU the torch profiler's allocation events of one call, replayed in
time order (the maximum running sum of bytes allocated minus freed), i.e. torch tensor
memory only (not Python objects or allocator caching).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

import script_prune as sp
from script_prune import counting, fused

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

#: Channels of the CLIP joint space (ViT-L/14) and of the per-head keys, for synthetic inputs.
CLIP_DIM = 768
KEY_DIM = 64
QUERY_ROWS = 2


@dataclass(frozen=True)
class BenchCase:
    """One benchmark setting: batch, tokens, feature dim, budget."""

    B: int
    N: int
    D: int
    k: int


CASES = (
    BenchCase(1, 576, 4096, 64),
    BenchCase(1, 576, 4096, 192),
    BenchCase(5, 576, 4096, 64),
    BenchCase(64, 169, 3584, 16),
    BenchCase(1, 2880, 4096, 320),
)


@dataclass
class BenchRow:
    """One measured (case, method)."""

    B: int
    N: int
    D: int
    k: int
    method: str
    median_ms: float | None
    min_ms: float | None
    repeats: int
    peak_extra_mib: float | None
    note: str = ""
    launches: int | None = None
    syncs: int | None = None
    launches_cuda_path: int | None = None
    greedy: str = ""


def synthetic_inputs(case: BenchCase, device: torch.device, seed: int = 0,
                     dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Every tensor input a registered method may ask for, on ``device`` (floating ones in ``dtype``)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    b, n = case.B, case.N
    tensors = {
        "features": torch.randn(b, n, case.D, generator=g),
        "image_embeds": torch.randn(b, n, CLIP_DIM, generator=g),
        "query_embeds": torch.randn(b, QUERY_ROWS, CLIP_DIM, generator=g),
        "cls_attention": torch.softmax(torch.randn(b, n, generator=g), dim=-1),
        "keys": torch.randn(b, n, KEY_DIM, generator=g),
        "scores": torch.softmax(torch.randn(b, n, generator=g), dim=-1),
    }
    return {name: t.to(device=device, dtype=dtype) for name, t in tensors.items()}


def method_call(method: str, case: BenchCase, tensors: dict[str, torch.Tensor],
                validate: bool = True) -> Callable[[], Any]:
    """A zero-argument call of ``method`` through the public API (ValueError if an input is unknown)."""
    spec = sp.get_method(method)
    missing = [name for name in spec.inputs if name not in tensors]
    if missing:
        raise ValueError(f"no synthetic input for {missing}")
    inputs = {name: tensors[name] for name in spec.inputs}
    run = sp.reduce if spec.merges else sp.select
    return lambda: run(tensors["features"], case.k, method, validate=validate, **inputs)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device, min_repeats: int, budget_s: float) -> list[float]:
    """Wall times (ms) of ``fn`` after one warm-up: at least ``min_repeats``, more while under ``budget_s``."""
    fn()
    _sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_repeats or (time.perf_counter() - start < budget_s and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(1000.0 * (time.perf_counter() - t0))
    return times


def cpu_peak_extra_bytes(fn: Callable[[], Any]) -> int:
    """Peak of (bytes allocated - bytes freed) by torch on the CPU during one call of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    running = peak = 0
    for e in events:
        if e.device_type() == torch.device("cpu").type or str(e.device_type()).endswith("CPU"):
            running += e.nbytes()
            peak = max(peak, running)
    return peak


def cuda_peak_extra_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """``max_memory_allocated`` during one call of ``fn`` minus the bytes allocated before it."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def cpu_launches_and_syncs(fn: Callable[[], Any]) -> tuple[int, int]:
    """(launches, host syncs) of one call of ``fn``, counted by :mod:`script_prune.counting`."""
    with counting.count_ops() as counts:
        fn()
    return counts.launches, counts.syncs


def cuda_launches_and_syncs(fn: Callable[[], Any], device: torch.device) -> tuple[int, int]:
    """(CUDA kernels the profiler records, sync warnings of set_sync_debug_mode) for one call of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(device)
    launches = sum(1 for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset")))
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    return launches, syncs


def cuda_path_launches(method: str, case: BenchCase, tensors: dict[str, torch.Tensor]) -> int | None:
    """Launches of one trusted call with the fused greedy, dry-run on the ``meta`` device (None if it cannot)."""
    meta = {name: torch.empty_like(t, device="meta") for name, t in tensors.items()}
    try:
        with fused.greedy_backend("triton"):
            return cpu_launches_and_syncs(method_call(method, case, meta, validate=False))[0]
    except Exception:  # noqa: BLE001 - a method that reads tensor values (a host sync) cannot dry-run
        return None


def greedy_used(features: torch.Tensor) -> str:
    """The greedy backend a call on ``features`` takes: ``torch``, ``triton`` or ``triton (interpreter)``."""
    n = features.shape[1]
    if not fused.use_fused(features.new_empty(1).expand(1, n, n)):  # a stand-in kernel, no allocation
        return "torch"
    return "triton (interpreter)" if features.device.type == "cpu" else "triton"


def bench_one(method: str, case: BenchCase, tensors: dict[str, torch.Tensor], device: torch.device,
              min_repeats: int, budget_s: float, validate: bool = True) -> BenchRow:
    """Measure one (case, method)."""
    base = dict(B=case.B, N=case.N, D=case.D, k=case.k, method=method)
    try:
        fn = method_call(method, case, tensors, validate)
        times = time_call(fn, device, min_repeats, budget_s)
        peak = cuda_peak_extra_bytes(fn, device) if device.type == "cuda" else cpu_peak_extra_bytes(fn)
        launches, syncs = cuda_launches_and_syncs(fn, device) if device.type == "cuda" else cpu_launches_and_syncs(fn)
    except ValueError as err:
        return BenchRow(**base, median_ms=None, min_ms=None, repeats=0, peak_extra_mib=None, note=f"skipped: {err}")
    return BenchRow(**base, median_ms=statistics.median(times), min_ms=min(times), repeats=len(times),
                    peak_extra_mib=peak / 2**20, launches=launches, syncs=syncs,
                    launches_cuda_path=cuda_path_launches(method, case, tensors),
                    greedy=greedy_used(tensors["features"]))


def format_table(rows: list[BenchRow]) -> str:
    """Plain-text table of the rows."""
    head = (f"{'B':>3} {'N':>5} {'D':>5} {'k':>4}  {'method':<16} {'median ms':>10} {'min ms':>9} {'reps':>4} "
            f"{'peak MiB':>9} {'launches':>8} {'syncs':>5} {'cuda path':>9}  greedy")
    lines = [head, "-" * len(head)]

    def count(value: int | None) -> str:
        return "-" if value is None else str(value)

    for r in rows:
        if r.median_ms is None:
            lines.append(f"{r.B:>3} {r.N:>5} {r.D:>5} {r.k:>4}  {r.method:<16} {r.note}")
            continue
        lines.append(f"{r.B:>3} {r.N:>5} {r.D:>5} {r.k:>4}  {r.method:<16} {r.median_ms:>10.1f} "
                     f"{r.min_ms:>9.1f} {r.repeats:>4} {r.peak_extra_mib:>9.1f} {count(r.launches):>8} "
                     f"{count(r.syncs):>5} {count(r.launches_cuda_path):>9}  {r.greedy}")
    return "\n".join(lines)


def write_json_atomic(path: str, payload: dict[str, Any]) -> None:
    """Write JSON to ``path`` via a temporary file and ``os.replace`` (never half-written)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(payload, fh, indent=2)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m script_prune.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (or cuda:N); default cpu")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="methods to run, space- or comma-separated (default: all registered)")
    parser.add_argument("--cases", nargs="+", type=int, default=None,
                        help="indices (0-4) of the cases to run (default: all)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for the run (default: torch's default)")
    parser.add_argument("--min-repeats", type=int, default=5, help="timed calls per row at least (default 5)")
    parser.add_argument("--budget-s", type=float, default=2.0, help="time per row after min-repeats (default 2)")
    parser.add_argument("--greedy", choices=fused.BACKENDS, default="auto",
                        help="greedy walk backend: auto (fused on CUDA with triton), torch, triton "
                             "(on CPU: Triton's interpreter, correctness only)")
    parser.add_argument("--trusted", action="store_true",
                        help="call with validate=False (the integration's trusted path, no value checks)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="input dtype (default float32)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device must be cpu or cuda[:N], got {args.device!r}")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda[:N], got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was requested but CUDA is not available")
    methods = [m for item in args.methods for m in item.split(",") if m] if args.methods else sp.list_methods()
    unknown = [m for m in methods if m not in sp.list_methods()]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {sp.list_methods()}")
    bad_cases = [i for i in args.cases or [] if not 0 <= i < len(CASES)]
    if bad_cases:
        parser.error(f"--cases must be in 0..{len(CASES) - 1}, got {bad_cases}")
    if args.min_repeats < 1 or args.budget_s < 0:
        parser.error("--min-repeats must be >= 1 and --budget-s >= 0")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    cases = CASES if args.cases is None else tuple(CASES[i] for i in args.cases)
    if args.greedy == "triton" and device.type == "cpu" and "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"  # Triton reads it when imported (lazily, by script_prune.fused)
    rows: list[BenchRow] = []
    with fused.greedy_backend(args.greedy):
        for case in cases:
            tensors = synthetic_inputs(case, device, dtype=DTYPES[args.dtype])
            for method in methods:
                row = bench_one(method, case, tensors, device, args.min_repeats, args.budget_s, not args.trusted)
                rows.append(row)
                print(format_table([row]).splitlines()[-1], file=sys.stderr, flush=True)
            del tensors
    print(format_table(rows))
    if args.json:
        write_json_atomic(args.json, {
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "dtype": args.dtype,
            "memory_method": "cuda max_memory_allocated delta" if device.type == "cuda"
            else "torch profiler allocation events (max running sum)",
            "greedy_backend": args.greedy,
            "validate": not args.trusted,
            "launch_method": "torch.profiler CUDA kernel events of one call" if device.type == "cuda"
            else "script_prune.counting: aten ops computing on data + fused Triton launches, one call",
            "launches_cuda_path_method": "script_prune.counting on the meta device, fused greedy, validate=False",
            "sync_method": "torch.cuda.set_sync_debug_mode('warn') warnings, one call" if device.type == "cuda"
            else "script_prune.counting sync points (item/bool/tolist/nonzero/mask indexing...), one call",
            "rows": [asdict(r) for r in rows],
        })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

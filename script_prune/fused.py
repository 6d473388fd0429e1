"""The greedy DPP walk as one fused Triton kernel per call (one program per batch row).

The torch path (:class:`script_prune.core._CholeskyGreedy`) launches eight kernels per greedy
step and Script walks ~1.7 m steps, so on a GPU a call is bound by launch latency (issue 19).
Here every row of the batch is one Triton program that runs the whole walk in a loop:

    d2 = diag(L); picked = {}; found = 0; exhausted = False
    while found < m and t < n:
        j = argmax over unpicked of (diag if exhausted else d2), first index on ties
        if not exhausted and d2_j <= 1e-10: exhausted = True, j = argmax of the unpicked diag
        if not exhausted:                    # Chen et al. (2018), Eq. 11 without epsilon
            c_t = (L_j. - sum_{s<t} c_s[j] c_s) / sqrt(d2_j);  d2 -= c_t^2
        picked += {j}; if keep[j]: out[found] = j, found += 1

which is exactly the rule of the torch path (``dpp_greedy`` / ``script_walk``): greedy picks
until the largest residual of the row is <= 1e-10, then descending diagonal, ties to the lower
index, and (Script) stop once ``m`` GSP survivors were picked. The early stop is decided on the
device per row, so the call has no host sync and no chunking. The factors ``c_s`` live in a
scratch buffer (B, T, N), ``T`` = the most steps a row can take before its ``m``-th kept pick
(``N - n_keep + m`` for Script, ``k`` for the plain greedy), fixed before the launch.

Dispatch (:func:`use_fused`): CUDA tensors with Triton installed take this path; everything
else takes the torch path. :func:`greedy_backend` overrides it (``"torch"``, ``"triton"``,
``"auto"``); with ``"triton"`` on CPU tensors the kernel runs in Triton's interpreter (the same
kernel body, executed by numpy), which is how the tests check it on a machine without a GPU.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import threading
from typing import Any, Iterator

import torch
from torch import Tensor

from . import counting

# Optional dependency (pip install "script-prune[triton]"), imported on first use: Triton decides
# at import time whether its functions compile or run in the interpreter (TRITON_INTERPRET=1).
triton: Any = None
tl: Any = None
_jitted: Any = None

#: Same threshold as :data:`script_prune.core.EXHAUSTED_RESIDUAL` (kept equal by a test).
EXHAUSTED_RESIDUAL = 1e-10

#: Rows longer than this take the torch path (a row's state lives in one program's registers).
MAX_FUSED_N = 8192

BACKENDS = ("auto", "torch", "triton")
#: Environment override of the default backend (``auto`` when unset).
BACKEND_ENV = "SCRIPT_PRUNE_GREEDY"

_state = threading.local()


def triton_available() -> bool:
    """True if Triton is installed (without importing it)."""
    return triton is not None or importlib.util.find_spec("triton") is not None


def _kernel() -> Any:
    """The jitted walk, imported and built on first use (compiled, or interpreted under TRITON_INTERPRET=1)."""
    global triton, tl, _jitted
    if _jitted is None:
        import triton as triton_module
        import triton.language as language

        triton, tl = triton_module, language
        _jitted = triton.jit(_walk_body)
    return _jitted


def interpreted() -> bool:
    """True if this process runs Triton kernels in the interpreter (TRITON_INTERPRET=1 when triton was imported)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_kernel(), InterpretedFunction)


def current_backend() -> str:
    """The backend in force: the innermost :func:`greedy_backend`, else ``$SCRIPT_PRUNE_GREEDY``, else ``auto``."""
    backend = getattr(_state, "backend", None) or os.environ.get(BACKEND_ENV, "auto") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV} / greedy_backend must be one of {BACKENDS}, got {backend!r}")
    return backend


@contextlib.contextmanager
def greedy_backend(backend: str) -> Iterator[None]:
    """Force the greedy walk's backend inside the block: ``auto`` | ``torch`` | ``triton``.

    ``triton`` raises (at the call) when Triton is not installed; on CPU tensors it runs the
    kernel in Triton's interpreter (correctness checks only: it is slow).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    with counting.scoped_setting(_state, "backend", backend):
        yield


def use_fused(kernel: Tensor) -> bool:
    """Whether the greedy on ``kernel`` (B, N, N) takes the fused path under the current backend."""
    backend = current_backend()
    if backend == "torch":
        return False
    if backend == "triton":
        if kernel.shape[1] > MAX_FUSED_N:
            raise ValueError(f"the fused greedy supports N <= {MAX_FUSED_N}, got N = {kernel.shape[1]}")
        if kernel.device.type == "meta":  # dry run: nothing executes, Triton not needed
            return True
        if not triton_available():
            raise RuntimeError("greedy backend 'triton' requested but triton is not installed "
                               "(pip install 'script-prune[triton]')")
        if kernel.device.type == "cpu" and not interpreted():
            raise RuntimeError("the fused greedy on CPU tensors needs Triton's interpreter: "
                               "set TRITON_INTERPRET=1 before triton is imported")
        return True
    return kernel.is_cuda and kernel.shape[1] <= MAX_FUSED_N and triton_available() and not interpreted()


def launch_config(n: int, interpreter: bool = False) -> dict[str, int]:
    """Block sizes and warps for rows of ``n`` tokens (all compile-time constants of the kernel).

    ``BLOCK_N``: the row, padded to a power of two. ``BLOCK_T``: factor rows per inner
    iteration, so one tile holds about 8192 values (32768 in the interpreter, where a tile is
    one numpy operation; only the summation order of ``<c_j, c_i>`` differs). ``num_warps``:
    4 up to 512 tokens, 8 up to 2048, 16 beyond (not tuned on a GPU yet; see docs/efficiency.md).
    """
    block_n = max(16, 1 << max(0, math.ceil(math.log2(max(n, 1)))))
    block_t = max(1, min(64 if interpreter else 32, (32768 if interpreter else 8192) // block_n))
    num_warps = 4 if block_n <= 512 else 8 if block_n <= 2048 else 16
    return {"BLOCK_N": block_n, "BLOCK_T": block_t, "num_warps": num_warps}


def _walk_body(
    kernel_ptr, scale_ptr, keep_ptr, factor_ptr, out_ptr,
    n, m, max_steps,
    stride_kernel, stride_scale, stride_keep, stride_factor, stride_out,
    exhausted_residual,
    HAS_SCALE: tl.constexpr, ALL_KEPT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """One batch row of the greedy walk (see the module docstring). Shapes: kernel (B, N, N)
    float32 contiguous rows, scale (B, N) float32, keep (B, N) uint8, factors (B, max_steps, N)
    float32 scratch, out (B, m) int64. With HAS_SCALE the kernel is ``(L_ij r_i) r_j`` with
    ``r`` = scale, in the rounding order of ``core.scale_kernel_``."""
    row = tl.program_id(0).to(tl.int64)
    kernel = kernel_ptr + row * stride_kernel
    factors = factor_ptr + row * stride_factor
    offs = tl.arange(0, BLOCK_N)
    inside = offs < n
    neg_inf = float("-inf")
    diag = tl.load(kernel + offs * (n + 1), mask=inside, other=0.0)
    if HAS_SCALE:
        r = tl.load(scale_ptr + row * stride_scale + offs, mask=inside, other=0.0)
        diag = (diag * r) * r
    diag = tl.where(inside, diag, neg_inf)
    d2 = diag
    picked = offs >= n  # padding lanes count as picked
    t = tl.full((), 0, tl.int32)
    found = tl.full((), 0, tl.int32)
    exhausted = tl.full((), 0, tl.int32)
    while (found < m) & (t < n):
        score = tl.where(picked, neg_inf, tl.where(exhausted != 0, diag, d2))
        best, j = tl.max(score, axis=0, return_indices=True, return_indices_tie_break_left=True)
        if (exhausted == 0) & (best <= exhausted_residual):
            exhausted = tl.full((), 1, tl.int32)
            best, j = tl.max(tl.where(picked, neg_inf, diag), axis=0, return_indices=True,
                             return_indices_tie_break_left=True)
        j = tl.minimum(tl.maximum(j, 0), n - 1)  # memory safety only (NaN inputs on the trusted path)
        if (exhausted == 0) & (t < max_steps):
            acc = tl.load(kernel + j * n + offs, mask=inside, other=0.0)  # L_j. (= L_.j, symmetric)
            if HAS_SCALE:
                acc = (acc * tl.load(scale_ptr + row * stride_scale + j)) * r
            for s0 in range(0, t, BLOCK_T):
                s = s0 + tl.arange(0, BLOCK_T)
                live = s < t
                c_j = tl.load(factors + s * n + j, mask=live, other=0.0)  # (BLOCK_T,)
                tile = tl.load(factors + s[:, None] * n + offs[None, :],
                               mask=live[:, None] & inside[None, :], other=0.0)  # (BLOCK_T, BLOCK_N)
                acc -= tl.sum(c_j[:, None] * tile, axis=0)
            e = tl.where(inside, acc / tl.sqrt_rn(best), 0.0)
            tl.store(factors + t * n + offs, e, mask=inside)
            d2 = d2 - e * e
            tl.debug_barrier()  # the new factor row is read by other threads in later steps
        picked = picked | (offs == j)
        if ALL_KEPT:
            kept = j >= 0
        else:
            kept = tl.load(keep_ptr + row * stride_keep + j) != 0
        tl.store(out_ptr + row * stride_out + found, j.to(tl.int64), mask=kept)
        found += kept.to(tl.int32)
        t += 1


def greedy_walk(
    kernel: Tensor, m: int, keep: Tensor | None = None, max_steps: int | None = None, scale: Tensor | None = None
) -> Tensor:
    """Fused greedy walk: per row, the first ``m`` kept picks in greedy order. # (B, N, N) -> (B, m) int64

    ``keep`` (B, N) bool marks the eligible tokens (``None``: all, i.e. the plain greedy's
    first ``m`` picks); every row must have at least ``m`` of them. ``max_steps`` bounds the
    Cholesky steps of a row (default ``N``); it must be at least the number of picks a row
    makes before its ``m``-th kept one, e.g. ``N - (kept per row) + m``. ``scale`` (B, N):
    walk ``diag(scale) kernel diag(scale)`` without forming it. One kernel launch, no host
    sync. ``kernel`` must be float32, symmetric and finite; it is not modified.
    """
    b, n, _ = kernel.shape
    kernel = kernel.contiguous()
    max_steps = n if max_steps is None else max(1, min(int(max_steps), n))
    factors = kernel.new_empty(b, max_steps, n)
    out = torch.empty(b, m, dtype=torch.int64, device=kernel.device)
    if keep is None:
        keep_arg, keep_stride, all_kept = out, 0, True  # not read
    else:
        keep_arg = keep.contiguous().view(torch.uint8)
        keep_stride, all_kept = keep_arg.stride(0), False
    scale_arg = kernel if scale is None else scale.contiguous()  # not read without scale
    if b == 0 or m == 0:
        return out
    config = launch_config(n, interpreter=kernel.device.type == "cpu")
    if kernel.device.type == "meta":  # dry run (shapes only), e.g. to count the launches of a call
        with counting.fused_launch("greedy_walk"):
            return out
    with counting.fused_launch("greedy_walk"):
        _kernel()[(b,)](
            kernel, scale_arg, keep_arg, factors, out, n, m, max_steps,
            kernel.stride(0), scale_arg.stride(0), keep_stride, factors.stride(0), out.stride(0),
            EXHAUSTED_RESIDUAL, HAS_SCALE=scale is not None, ALL_KEPT=all_kept, **config,
        )
    return out


def compile_for_cuda(n: int, arch: int = 90, has_scale: bool = True, all_kept: bool = False) -> Any:
    """Compile the walk for rows of ``n`` tokens for CUDA compute capability ``arch`` without a GPU
    (Triton's front end, its MLIR lowering and ptxas; not in the interpreter). Returns Triton's compiled kernel
    (``.asm["ptx"]``, ``.metadata``); raises if the kernel does not compile."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jitted = _kernel()
    if interpreted():
        raise RuntimeError("compile_for_cuda needs Triton's compiler: unset TRITON_INTERPRET before triton is imported")
    pointers = {"kernel_ptr": "*fp32", "scale_ptr": "*fp32", "keep_ptr": "*u8", "factor_ptr": "*fp32", "out_ptr": "*i64"}
    scalars = {"n": "i32", "m": "i32", "max_steps": "i32", "stride_kernel": "i64", "stride_scale": "i32",
               "stride_keep": "i32", "stride_factor": "i64", "stride_out": "i32", "exhausted_residual": "fp32"}
    config = launch_config(n)
    constants = {"HAS_SCALE": has_scale, "ALL_KEPT": all_kept, "BLOCK_N": config["BLOCK_N"], "BLOCK_T": config["BLOCK_T"]}
    signature = {**pointers, **scalars, **{name: "constexpr" for name in constants}}
    source = ASTSource(fn=jitted, signature=signature,
                       constexprs={(jitted.arg_names.index(name),): value for name, value in constants.items()})
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": config["num_warps"]})

"""The fused greedy walk (script_prune.fused) against the float64 references and the torch path.

Without a GPU the kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before
Triton is imported); on a GPU machine the CUDA tests at the end run the compiled kernel.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import script_prune as sp
from script_prune import core, fused
from script_prune.counting import count_ops
from tests import reference as ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GREEDY_METHODS = ["script", "qcsp", "cdpruner"]

needs_interpreter = pytest.mark.skipif(
    not (fused.triton_available() and fused.interpreted()),
    reason="needs triton, run in its interpreter (TRITON_INTERPRET=1, set by conftest.py when there is no GPU)",
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _psd(n: int, seed: int, batch: int | None = None) -> torch.Tensor:
    """Well-conditioned PSD kernel(s) X X^T / 3n in float64."""
    lead = () if batch is None else (batch,)
    x = torch.randn(*lead, n, 3 * n, generator=_gen(seed), dtype=torch.float64)
    return x @ x.transpose(-1, -2) / (3 * n)


def _clustered(n: int, seed: int, d: int = 32, batch: int = 1) -> torch.Tensor:
    base = torch.randn(batch, 4, d, generator=_gen(seed))
    return base[:, torch.arange(n) % 4] + 0.6 * torch.randn(batch, n, d, generator=_gen(seed + 50))


def _both_paths(fn):
    """(torch path result, fused path result) of ``fn()``."""
    with fused.greedy_backend("torch"):
        want = fn()
    with fused.greedy_backend("triton"):
        got = fn()
    return want, got


# --------------------------------------------------------------------------- against float64 references


@needs_interpreter
@pytest.mark.parametrize("seed", range(4))
def test_fused_greedy_matches_explicit_determinants(seed: int) -> None:
    kernel = _psd(14, seed)
    with fused.greedy_backend("triton"), count_ops() as counts:
        got = sp.dpp_greedy(kernel.float(), 14)
    assert counts.launch_ops["triton:greedy_walk"] == 1
    assert got.tolist() == ref.dpp_greedy_slogdet(kernel, 14)


@needs_interpreter
@pytest.mark.parametrize(("n", "m", "rho", "seed"), [(20, 5, 0.5, 0), (21, 8, 0.5, 1), (16, 6, 1.0, 3), (15, 5, 0.0, 4)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_script_matches_float64_reference(n: int, m: int, rho: float, seed: int, dtype: torch.dtype) -> None:
    feats = _clustered(n, seed)[0].to(dtype)
    img = torch.randn(n, 12, generator=_gen(seed + 1)).to(dtype)
    query = torch.randn(3, 12, generator=_gen(seed + 2)).to(dtype)
    with fused.greedy_backend("triton"):
        got = sp.select(feats, m, "script", image_embeds=img, query_embeds=query, gsp_ratio=rho, negate=True)
    # the reference sees the same (rounded) inputs, in float64
    assert got.tolist() == ref.script_select(feats.float(), img.float(), query.float(), m, rho=rho, negate=True)


@needs_interpreter
def test_fused_qcsp_matches_explicit_determinants() -> None:
    feats = _clustered(24, 11)[0]
    img, query = torch.randn(24, 12, generator=_gen(12)), torch.randn(2, 12, generator=_gen(13))
    with fused.greedy_backend("triton"):
        got = sp.select(feats, 7, "qcsp", image_embeds=img, query_embeds=query)
    r = torch.as_tensor(ref.relevance(img, query))
    kernel = torch.as_tensor(ref.cosine_matrix(feats)) * torch.outer(r, r)
    assert got.tolist() == sorted(ref.dpp_greedy_slogdet(kernel, 7))


# --------------------------------------------------------------------------- against today's torch path


F32, F16, BF16 = DTYPES
# (B, N, D, k): the paper's row (N = 576, k = 64), five LLaVA-NeXT crops, 8 of 64 video frames (N = 169), a small
# odd case. D > N keeps the kernel full-rank (D <= N exhausts it into float32 noise, where picks are arbitrary).
# Every shape runs Script in the three input dtypes; the interpreter is slow, so the plain greedy (qcsp, CDPruner)
# and the five crops get a subset.
PAPER, CROPS, VIDEO, SMALL = (1, 576, 640, 64), (5, 576, 640, 64), (8, 169, 200, 16), (3, 45, 64, 9)
FUSED_VS_TORCH = (
    [(shape, "script", dtype) for shape in (PAPER, VIDEO, SMALL) for dtype in DTYPES]
    + [(CROPS, "script", F16), (PAPER, "qcsp", F32), (PAPER, "cdpruner", F16), (VIDEO, "qcsp", BF16),
       (VIDEO, "cdpruner", F32)]
    + [(SMALL, method, dtype) for method in ("qcsp", "cdpruner") for dtype in DTYPES]
)


@needs_interpreter
@pytest.mark.parametrize(("shape", "method", "dtype"), FUSED_VS_TORCH)
def test_fused_equals_torch_path(shape: tuple[int, int, int, int], method: str, dtype: torch.dtype) -> None:
    b, n, d, k = shape
    g = _gen(b * n + k)
    feats = torch.randn(b, n, d, generator=g).to(dtype)
    img = torch.randn(b, n, 24, generator=g).to(dtype)
    query = torch.randn(b, 2, 24, generator=g).to(dtype)
    want, got = _both_paths(lambda: sp.select(feats, k, method, image_embeds=img, query_embeds=query, negate=True))
    assert got.tolist() == want.tolist()


@needs_interpreter
def test_fused_walk_equals_torch_walk_with_relevance_scaling() -> None:
    # the fused path scales diag(r) S diag(r) on the fly; the torch path in place: same picks, S untouched by fused
    s = core.cosine_similarity_matrix(_clustered(40, 3, batch=3))
    r = torch.rand(3, 40, generator=_gen(4))
    keep = torch.rand(3, 40, generator=_gen(5)) < 0.5
    keep[:, :8] = True  # at least m = 6 kept per row
    before = s.clone()
    with fused.greedy_backend("triton"):
        got = core.script_walk(s, keep, 6, relevance=r)
        got_greedy = core.dpp_greedy(s, 10, relevance=r)
    assert torch.equal(s, before)
    with fused.greedy_backend("torch"):
        want = core.script_walk(s.clone(), keep, 6, relevance=r)
        want_greedy = core.dpp_greedy(core.scale_kernel_(s.clone(), r), 10)
    assert got.tolist() == want.tolist() and got_greedy.tolist() == want_greedy.tolist()


@needs_interpreter
def test_fused_walk_bound_is_enough_when_survivors_come_last() -> None:
    # diagonal kernel: the greedy order is by descending diagonal; the kept tokens are the m smallest, so the walk
    # needs every removed token first: exactly N - n_keep + m steps, the bound script passes
    n, m = 12, 3
    kernel = torch.diag(torch.arange(n, 0, -1, dtype=torch.float32)).unsqueeze(0)  # order 0, 1, ..., 11
    keep = torch.zeros(1, n, dtype=torch.bool)
    keep[0, -5:] = True  # n_keep = 5 -> bound 12 - 5 + 3 = 10 steps
    with fused.greedy_backend("triton"):
        got = core.script_walk(kernel, keep, m, max_steps=n - 5 + m)
    assert got.tolist() == [[7, 8, 9]]


@needs_interpreter
def test_fused_exhaustion_and_ties() -> None:
    v = torch.tensor([1.0, 2.0, 1.0, 0.5, 0.25, 1.0])
    rank_one = torch.outer(v, v)
    with fused.greedy_backend("triton"):
        # exhausted after pick 1, then descending diagonal with the 0/2/5 tie to the lower index
        assert sp.dpp_greedy(rank_one, 6).tolist() == [1, 0, 2, 5, 3, 4]
        # per row: an exhausted row next to a well-conditioned one
        both = torch.stack([rank_one, _psd(6, 9).float()])
        got = sp.dpp_greedy(both, 6)
        assert got[0].tolist() == [1, 0, 2, 5, 3, 4]
        assert got[1].tolist() == ref.dpp_greedy_slogdet(both[1], 6)
        assert sp.dpp_greedy(torch.eye(5), 5).tolist() == [0, 1, 2, 3, 4]
        assert sp.dpp_greedy(torch.diag(torch.tensor([1.0, 2.0, 2.0, 1.0])), 3).tolist() == [1, 2, 0]
        assert sp.dpp_greedy(torch.tensor([[0.5]]), 1).tolist() == [0]
        keep = torch.tensor([[True, False, False, True, True, True]])
        assert sorted(core.script_walk(rank_one.unsqueeze(0), keep, 3)[0].tolist()) == [0, 3, 5]


@needs_interpreter
def test_fused_trusted_path_with_nan_stays_in_range() -> None:
    feats = torch.randn(2, 30, 8, generator=_gen(1))
    feats[0, 4, 2] = float("nan")
    img, query = torch.randn(2, 30, 6, generator=_gen(2)), torch.randn(2, 6, generator=_gen(3))
    with fused.greedy_backend("triton"):
        got = sp.select(feats, 5, image_embeds=img, query_embeds=query, validate=False)
        assert got.shape == (2, 5) and bool((got >= 0).all() & (got < 30).all())
        with pytest.raises(ValueError, match="features contains NaN or inf"):
            sp.select(feats, 5, image_embeds=img, query_embeds=query)


# --------------------------------------------------------------------------- host syncs and launches


@needs_interpreter
@pytest.mark.parametrize("method", GREEDY_METHODS)
def test_trusted_fused_call_has_no_host_sync_and_validated_call_one(method: str) -> None:
    feats, img = torch.randn(2, 40, 16, generator=_gen(7)), torch.randn(2, 40, 8, generator=_gen(8))
    query = torch.randn(3, 8, generator=_gen(9))
    with fused.greedy_backend("triton"):
        with count_ops() as trusted:
            sp.select(feats, 6, method, image_embeds=img, query_embeds=query, validate=False)
        with count_ops() as checked:
            sp.select(feats, 6, method, image_embeds=img, query_embeds=query)
    assert trusted.syncs == 0, trusted.sync_ops
    assert checked.syncs == 1, checked.sync_ops
    assert trusted.launch_ops["triton:greedy_walk"] == 1


@pytest.mark.parametrize(("b", "n", "d", "k"), [(1, 576, 4096, 64), (5, 576, 4096, 64), (1, 576, 4096, 192),
                                                (64, 169, 3584, 16), (1, 2880, 4096, 320)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_path_launches_at_most_50_per_call(b: int, n: int, d: int, k: int, dtype: torch.dtype) -> None:
    # a dry run on the meta device follows the CUDA path's ops (no CPU-only blocked Gram) and launches nothing
    feats = torch.empty(b, n, d, device="meta", dtype=dtype)
    img = torch.empty(b, n, 768, device="meta", dtype=dtype)
    query = torch.empty(b, 2, 768, device="meta", dtype=dtype)
    for method in GREEDY_METHODS:
        with fused.greedy_backend("triton"), count_ops() as counts:
            out = sp.select(feats, k, method, image_embeds=img, query_embeds=query, validate=False, negate=True)
        assert out.shape == (b, k)
        assert counts.syncs == 0, (method, counts.sync_ops)
        assert counts.launch_ops["triton:greedy_walk"] == 1
        assert counts.launches <= 50, (method, counts.launches, counts.launch_ops)


# --------------------------------------------------------------------------- dispatch and configuration


def test_dispatch_rules(monkeypatch) -> None:
    cpu = torch.zeros(1, 4, 4)
    meta = torch.empty(1, 4, 4, device="meta")
    monkeypatch.delenv(fused.BACKEND_ENV, raising=False)
    assert fused.current_backend() == "auto"
    assert not fused.use_fused(cpu) and not fused.use_fused(meta)  # auto: CUDA tensors only
    with fused.greedy_backend("triton"):
        assert fused.use_fused(meta)
        with fused.greedy_backend("torch"):
            assert not fused.use_fused(meta)
        assert fused.current_backend() == "triton"
    monkeypatch.setenv(fused.BACKEND_ENV, "triton")
    assert fused.current_backend() == "triton"
    monkeypatch.setenv(fused.BACKEND_ENV, "cuda")
    with pytest.raises(ValueError, match="must be one of"):
        fused.current_backend()
    with pytest.raises(ValueError, match="must be one of"):
        with fused.greedy_backend("fast"):
            pass


def test_dispatch_limits(monkeypatch) -> None:
    monkeypatch.setattr(fused, "MAX_FUSED_N", 3)
    with fused.greedy_backend("triton"), pytest.raises(ValueError, match="N <= 3"):
        fused.use_fused(torch.empty(1, 4, 4, device="meta"))
    monkeypatch.setattr(fused, "triton", None)
    monkeypatch.setattr(fused.importlib.util, "find_spec", lambda name: None)
    with fused.greedy_backend("triton"), pytest.raises(RuntimeError, match="triton is not installed"):
        fused.use_fused(torch.zeros(1, 2, 2))


def test_launch_config() -> None:
    assert fused.launch_config(576) == {"BLOCK_N": 1024, "BLOCK_T": 8, "num_warps": 8}
    assert fused.launch_config(169) == {"BLOCK_N": 256, "BLOCK_T": 32, "num_warps": 4}
    assert fused.launch_config(2880) == {"BLOCK_N": 4096, "BLOCK_T": 2, "num_warps": 16}
    assert fused.launch_config(1)["BLOCK_N"] == 16
    assert fused.launch_config(576, interpreter=True)["BLOCK_T"] == 32


@pytest.mark.skipif(not fused.triton_available(), reason="triton is not installed")
def test_kernel_compiles_for_cuda_without_a_gpu() -> None:
    # the interpreter does not type-check like the compiler; compile every variant for sm_90 (H100/H200) and sm_80
    # in a process without TRITON_INTERPRET (Triton fixes the mode when it is imported)
    code = (
        "from script_prune import fused\n"
        "for n, arch in ((169, 90), (576, 90), (2880, 90), (576, 80)):\n"
        "    for scale, all_kept in ((True, False), (True, True), (False, True)):\n"
        "        k = fused.compile_for_cuda(n, arch, scale, all_kept)\n"
        "        assert '.local' not in k.asm['ptx'], (n, arch)  # no local-memory arrays\n"
        "print('compiled')\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9's default, stated to silence its warning
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


def test_exhaustion_threshold_is_the_core_one() -> None:
    assert fused.EXHAUSTED_RESIDUAL == core.EXHAUSTED_RESIDUAL


# --------------------------------------------------------------------------- on a GPU (compiled kernel)


needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and fused.triton_available() and not fused.interpreted()),
    reason="needs CUDA and compiled triton",
)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tf32", [False, True])
def test_cuda_fused_equals_cpu_torch_path(dtype: torch.dtype, tf32: bool, monkeypatch) -> None:
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", tf32)
    g = _gen(1)
    feats = torch.randn(5, 576, 64, generator=g).to(dtype)
    img, query = torch.randn(5, 576, 24, generator=g).to(dtype), torch.randn(5, 2, 24, generator=g).to(dtype)
    device = torch.device("cuda")
    for method in GREEDY_METHODS:
        with fused.greedy_backend("torch"):
            want = sp.select(feats, 64, method, image_embeds=img, query_embeds=query)
            want_cuda = sp.select(feats.to(device), 64, method, image_embeds=img.to(device), query_embeds=query.to(device))
        assert fused.use_fused(torch.empty(1, 576, 576, device=device))
        got = sp.select(feats.to(device), 64, method, image_embeds=img.to(device), query_embeds=query.to(device),
                        validate=False)
        assert got.cpu().tolist() == want_cuda.cpu().tolist(), method
        if not tf32:  # TF32 rounds the Gram on the GPU: the CPU picks may differ on close calls
            assert got.cpu().tolist() == want.tolist(), method


@needs_cuda
def test_cuda_trusted_call_does_not_sync() -> None:
    device = torch.device("cuda")
    feats = torch.randn(1, 576, 256, device=device, dtype=torch.float16)
    img, query = torch.randn(1, 576, 64, device=device), torch.randn(2, 64, device=device)
    sp.select(feats, 64, image_embeds=img, query_embeds=query, validate=False)  # compile / warm up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sp.select(feats, 64, image_embeds=img, query_embeds=query, validate=False, negate=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)

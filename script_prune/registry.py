"""Method registry and the validated public API (``select``, ``reduce``, the scoring functions).

All input checking lives here: methods registered with :func:`register_method` receive
batched, finite float32 tensors and a budget ``1 <= budget < N``.

Host syncs: ``select`` / ``reduce`` read every value check of a call (NaN/inf in each input, the
method's indices in range and unique) with **one** host sync after the method ran;
``validate=False`` is the trusted path: the same shape/type checks (host only) and no value
check, so the call itself never waits for the device (docs/algorithm.md, "Selection on a GPU").
"""

from __future__ import annotations

import contextvars
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from . import core
from .budget import keeps_all

__all__ = [
    "MethodSpec",
    "Reduction",
    "check_params",
    "register_method",
    "get_method",
    "list_methods",
    "select",
    "reduce",
    "redundancy_scores",
    "query_relevance",
    "dpp_greedy",
]

STAGES = ("vision", "llm")


@dataclass(frozen=True)
class MethodSpec:
    """A registered pruning method.

    ``inputs``: tensor inputs the method needs, by keyword (e.g. ``("image_embeds",
    "query_embeds")``); ``params``: accepted parameter names with their defaults;
    ``stage``: ``"vision"`` (acts on the projected visual tokens) or ``"llm"`` (inside the
    LLM); ``merges``: returns extra merged tokens (use :func:`reduce`); ``check``: optional
    ``check(params)`` raising ValueError for values out of range (see :func:`check_params`).
    """

    name: str
    fn: Callable[..., Any]
    inputs: tuple[str, ...] = ()
    params: dict[str, Any] = field(default_factory=dict)
    stage: str = "vision"
    merges: bool = False
    paper: str = ""
    description: str = ""
    check: Callable[[dict[str, Any]], None] | None = None

    @property
    def needs_relevance(self) -> bool:
        """True when the method reads query relevance inputs (``image_embeds`` / ``query_embeds``, Eq. 3-4)."""
        return any(name in RELEVANCE_INPUTS for name in self.inputs)


#: The tensor inputs that carry query relevance (paper Eq. 3-4): image and query embeddings.
RELEVANCE_INPUTS = ("image_embeds", "query_embeds")


@dataclass(frozen=True)
class Reduction:
    """Result of :func:`reduce`: kept token indices (ascending) and optional merged tokens.

    ``indices``: (B, m) int64; ``merged``: (B, e, D) or ``None`` for pure selection.
    """

    indices: Tensor
    merged: Tensor | None = None


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(
    name: str,
    *,
    inputs: tuple[str, ...] | list[str] = (),
    params: Mapping[str, Any] | None = None,
    stage: str = "vision",
    merges: bool = False,
    paper: str = "",
    description: str = "",
    check: Callable[[dict[str, Any]], None] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering ``fn(features (B,N,D), budget, **inputs, **params)`` under ``name``.

    ``check(params)``, when given, receives the full parameters (defaults filled in, types checked) and
    raises ValueError for a value out of range; :func:`check_params` runs it.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    inputs = tuple(inputs)
    params = dict(params or {})
    clash = set(inputs) & set(params)
    if clash:
        raise ValueError(f"names {sorted(clash)} are both inputs and params of method {name!r}")

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        if not callable(fn):
            raise ValueError(f"fn for method {name!r} must be callable")
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is already registered")
        _REGISTRY[name] = MethodSpec(
            name=name, fn=fn, inputs=inputs, params=params, stage=stage,
            merges=bool(merges), paper=paper, description=description, check=check,
        )
        return fn

    return decorator


def get_method(name: str) -> MethodSpec:
    """The :class:`MethodSpec` registered as ``name`` (ValueError listing the known ones)."""
    if name not in _REGISTRY:
        raise ValueError(f"method must be one of {list_methods()}, got {name!r}")
    return _REGISTRY[name]


def list_methods() -> list[str]:
    """Names accepted by :func:`select` / :func:`reduce`, sorted."""
    return sorted(_REGISTRY)


# --------------------------------------------------------------------------- validation


class _DeferredChecks:
    """Device-side value checks of one call, read together with one host sync by :meth:`resolve`.

    ``enabled=False`` (the trusted path) drops them. While a call's checks are active (see
    ``_CHECKS``), :func:`_float32_tensor` adds its NaN/inf check here instead of syncing.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.items: list[tuple[Tensor, Exception]] = []

    def add(self, ok: Tensor, error: Exception) -> None:
        if self.enabled:
            self.items.append((ok.reshape(()), error))

    def resolve(self) -> None:
        """Raise the first failed check's error (one host sync for all of them)."""
        items, self.items = self.items, []
        if not items:
            return
        flags = torch.stack([ok for ok, _ in items]).tolist()  # the one host sync of the call
        for flag, (_, error) in zip(flags, items):
            if not flag:
                raise error


_CHECKS: contextvars.ContextVar[_DeferredChecks | None] = contextvars.ContextVar("script_prune_checks", default=None)


def inside_call() -> bool:
    """True while ``select`` / ``reduce`` run a method: its tensor inputs were already checked
    (or trusted, ``validate=False``), so a method's own NaN/inf check would only add a host sync."""
    return _CHECKS.get() is not None


def _finite_flag(x: Tensor) -> Tensor:
    """Device bool scalar: ``x`` has no NaN/inf (one pass: NaN propagates through min/max)."""
    if x.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=x.device)
    low, high = torch.aminmax(x)
    return (low > -math.inf) & (high < math.inf)  # False for NaN too


def _all_finite(x: Tensor) -> bool:
    """True if ``x`` has no NaN/inf (one host sync)."""
    return bool(_finite_flag(x))


def _float32_tensor(x: Any, name: str, dims: tuple[int, ...], device: torch.device | None = None) -> Tensor:
    """Check that ``x`` is a finite floating tensor with one of ``dims`` dims; return it as float32."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() not in dims:
        expected = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{name} must be {expected}, got shape {tuple(x.shape)}")
    if device is not None and x.device != device:
        x = x.to(device)
    x = x.to(torch.float32)
    checks = _CHECKS.get()
    if checks is not None:
        if checks.enabled:
            checks.add(_finite_flag(x), ValueError(f"{name} contains NaN or inf"))
    elif not _all_finite(x):
        raise ValueError(f"{name} contains NaN or inf")
    return x


def _batched_features(features: Any, name: str = "features") -> tuple[Tensor, bool]:
    """``features`` as (B, N, D) float32 plus whether the input was batched."""
    x = _float32_tensor(features, name, (2, 3))
    batched = x.dim() == 3
    x = x if batched else x.unsqueeze(0)
    if x.shape[1] == 0 or x.shape[2] == 0:
        raise ValueError(f"{name} must have at least one token and one channel, got shape {tuple(x.shape)}")
    return x, batched


def _query(query_embeds: Any, batch: int, channels: int, device: torch.device, batched: bool) -> Tensor:
    """``query_embeds`` (M, C) shared or (B, M, C) -> (B, M, C) float32."""
    q = _float32_tensor(query_embeds, "query_embeds", (2, 3), device)
    if q.dim() == 3 and q.shape[0] != batch:
        what = f"batch size {batch}" if batched else "a leading dim of 1 for unbatched inputs"
        raise ValueError(f"query_embeds must be (M, C) or (B, M, C) with {what}, got shape {tuple(q.shape)}")
    q = q.unsqueeze(0).expand(batch, -1, -1) if q.dim() == 2 else q
    if q.shape[1] == 0:
        raise ValueError("query_embeds must have at least one row (M >= 1)")
    if q.shape[2] != channels:
        raise ValueError(f"query_embeds must have C={channels} channels like image_embeds, got {q.shape[2]}")
    return q


def _image_embeds(image_embeds: Any, batch: int, n: int, device: torch.device, batched: bool) -> Tensor:
    """``image_embeds`` (B, N, C) (or (N, C) when unbatched) -> (B, N, C) float32."""
    x = _float32_tensor(image_embeds, "image_embeds", (3,) if batched else (2,), device)
    x = x if batched else x.unsqueeze(0)
    if x.shape[:2] != (batch, n):
        raise ValueError(f"image_embeds must have (B, N) = {(batch, n)} like features, got shape {tuple(x.shape)}")
    return x


def _other_input(value: Any, name: str, batch: int, device: torch.device, batched: bool) -> Tensor:
    """A method-specific tensor input: leading batch dim (added when unbatched), float32."""
    x = _float32_tensor(value, name, tuple(range(1, 6)), device)
    x = x if batched else x.unsqueeze(0)
    if x.shape[0] != batch:
        raise ValueError(f"{name} must have batch size {batch} like features, got shape {tuple(x.shape)}")
    return x


def _budget(budget: Any, name: str = "budget") -> int:
    """``budget`` as a Python int >= 1."""
    if isinstance(budget, bool) or not isinstance(budget, numbers.Integral):
        if isinstance(budget, Tensor) and budget.numel() == 1 and not budget.is_floating_point():
            budget = int(budget)
        else:
            raise ValueError(f"{name} must be an integer, got {budget!r}")
    budget = int(budget)
    if budget < 1:
        raise ValueError(f"{name} must be >= 1, got {budget}")
    return budget


def _param(method: str, name: str, value: Any, default: Any) -> Any:
    """Type-check a method parameter against its default's type."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"parameter {name!r} of method {method!r} must be a bool, got {value!r}")
    elif isinstance(default, numbers.Integral):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"parameter {name!r} of method {method!r} must be an int, got {value!r}")
        value = int(value)
    elif isinstance(default, numbers.Real):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"parameter {name!r} of method {method!r} must be a finite number, got {value!r}")
        value = float(value)
    return value


def check_params(method: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` checked against ``method``'s parameters without running it -> the given params, converted.

    Unknown names, values whose type differs from the default's and values out of the method's range (its
    ``check``, run with the defaults filled in) raise ValueError naming the parameter. Defaults are not added
    to the result, so a caller can still fill a parameter from elsewhere (e.g. ``negate`` from a relevance
    source in ``script_prune.patch``).
    """
    spec = get_method(method)
    unknown = sorted(set(params) - set(spec.params))
    if unknown:
        raise ValueError(f"parameters {unknown} are not parameters of method {method!r}; it accepts {sorted(spec.params)}")
    checked = {name: _param(method, name, value, spec.params[name]) for name, value in params.items()}
    if spec.check is not None:
        spec.check({**spec.params, **checked})
    return checked


def _split_kwargs(spec: MethodSpec, given: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split keyword arguments into the method's tensor inputs and its parameters."""
    inputs, params = {}, dict(spec.params)
    for key, value in given.items():
        if key in spec.inputs:
            inputs[key] = value
        elif key in spec.params:
            params[key] = _param(spec.name, key, value, spec.params[key])
        else:
            raise ValueError(
                f"unknown parameter {key!r} for method {spec.name!r}; "
                f"parameters: {sorted(spec.params)}, inputs: {list(spec.inputs)}"
            )
    if spec.check is not None:  # the method's ranges (host-side, no sync)
        spec.check(params)
    return inputs, params


def _prepared_inputs(spec: MethodSpec, raw: dict[str, Any], x: Tensor, batched: bool) -> dict[str, Tensor]:
    """Validate the method's tensor inputs against ``x`` (B, N, D) and batch them."""
    b, n, _ = x.shape
    out: dict[str, Tensor] = {}
    for key in spec.inputs:
        if raw.get(key) is None:
            raise ValueError(f"method {spec.name!r} needs the input {key}, which was not given")
        if key == "image_embeds":
            out[key] = _image_embeds(raw[key], b, n, x.device, batched)
        elif key != "query_embeds":
            out[key] = _other_input(raw[key], key, b, x.device, batched)
    if "query_embeds" in spec.inputs:
        channels = out["image_embeds"].shape[2] if "image_embeds" in out else x.shape[2]
        out["query_embeds"] = _query(raw["query_embeds"], b, channels, x.device, batched)
    return out


def _sorted_indices(
    indices: Any, spec: MethodSpec, batch: int, n: int, width: int | None, checks: _DeferredChecks
) -> Tensor:
    """Check a method's returned indices and sort them ascending (the value check joins ``checks``)."""
    if not isinstance(indices, Tensor) or indices.dim() != 2 or indices.shape[0] != batch:
        raise RuntimeError(f"method {spec.name!r} must return (B, m) indices, got {getattr(indices, 'shape', indices)}")
    if width is not None and indices.shape[1] != width:
        raise RuntimeError(f"method {spec.name!r} returned {indices.shape[1]} indices per row, expected {width}")
    indices = torch.sort(indices.to(torch.int64), dim=1).values
    if indices.shape[1] == 0:
        return indices
    if checks.enabled:
        bad = (indices[:, 0] < 0).any() | (indices[:, -1] >= n).any() | (indices[:, 1:] == indices[:, :-1]).any()
        checks.add(~bad, RuntimeError(f"method {spec.name!r} returned out-of-range or repeated indices"))
    return indices


def _run(
    features: Any, budget: Any, method: str, tensors: dict[str, Any], kwargs: dict[str, Any], merging_ok: bool,
    validate: bool = True,
) -> tuple[Reduction, bool]:
    """Validate, call the method on batched float32 inputs, return a batched Reduction.

    Shape/type checks run on the host first; the value checks (NaN/inf, the returned indices)
    are read with one host sync at the end, or skipped when ``validate`` is False.
    """
    if not isinstance(validate, bool):
        raise ValueError(f"validate must be a bool, got {validate!r}")
    checks = _DeferredChecks(validate)
    token = _CHECKS.set(checks)
    try:
        red, batched = _run_method(features, budget, method, tensors, kwargs, merging_ok, checks)
    except Exception:
        checks.resolve()  # a NaN/inf input explains a failure better than the failure itself
        raise
    finally:
        _CHECKS.reset(token)
    checks.resolve()
    return red, batched


def _run_method(
    features: Any, budget: Any, method: str, tensors: dict[str, Any], kwargs: dict[str, Any], merging_ok: bool,
    checks: _DeferredChecks,
) -> tuple[Reduction, bool]:
    spec = get_method(method)
    if spec.merges and not merging_ok:
        raise ValueError(f"method {method!r} merges tokens; call script_prune.reduce instead of select")
    raw_inputs, params = _split_kwargs(spec, kwargs)
    for key, value in tensors.items():  # explicit image/query embeds; ignored by methods not needing them
        if key in spec.inputs and raw_inputs.get(key) is None:
            raw_inputs[key] = value
    x, batched = _batched_features(features)
    budget = _budget(budget)
    inputs = _prepared_inputs(spec, raw_inputs, x, batched)
    b, n, _ = x.shape
    if keeps_all(budget, n) or b == 0:
        kept = torch.arange(min(budget, n), device=x.device).expand(b, -1).clone()
        return Reduction(indices=kept, merged=None), batched
    out = spec.fn(x, budget, **inputs, **params)
    if isinstance(out, Reduction):
        merged = out.merged
        if merged is not None and (not isinstance(merged, Tensor) or merged.dim() != 3 or merged.shape[0] != b):
            raise RuntimeError(f"method {method!r} must return merged tokens as (B, e, D)")
        return Reduction(_sorted_indices(out.indices, spec, b, n, None, checks), merged), batched
    return Reduction(_sorted_indices(out, spec, b, n, budget, checks), None), batched


# --------------------------------------------------------------------------- public API


def select(
    features: Tensor,
    budget: int,
    method: str = "script",
    image_embeds: Tensor | None = None,
    query_embeds: Tensor | None = None,
    *,
    validate: bool = True,
    **kwargs: Any,
) -> Tensor:
    """Indices of the ``budget`` tokens ``method`` keeps. # (B, N, D) | (N, D) -> (B, budget) | (budget,)

    Returned ascending, int64, on the features' device. ``budget >= N`` keeps everything.
    ``image_embeds`` / ``query_embeds`` are ignored by methods that do not use them;
    other keyword arguments are the method's inputs and parameters
    (``get_method(method).inputs`` / ``.params``).

    ``validate=False`` is the trusted path for integrations: no NaN/inf check of the inputs
    and no check of the method's output, hence no host sync in the call (with ``budget`` a
    Python int, the fused greedy on CUDA and a method that syncs nowhere itself, as Script
    and its ablations). Non-finite inputs then give unspecified (but in-range) indices.
    """
    red, batched = _run(
        features, budget, method, {"image_embeds": image_embeds, "query_embeds": query_embeds}, kwargs, False,
        validate,
    )
    return red.indices if batched else red.indices[0]


def reduce(
    features: Tensor,
    budget: int,
    method: str = "script",
    image_embeds: Tensor | None = None,
    query_embeds: Tensor | None = None,
    *,
    validate: bool = True,
    **kwargs: Any,
) -> Reduction:
    """Like :func:`select` but for every method, returning a :class:`Reduction`.

    ``merged`` is ``None`` for pure selection methods; unbatched input gives an unbatched
    ``indices`` (m,) and ``merged`` (e, D). ``validate``: as in :func:`select`.
    """
    red, batched = _run(
        features, budget, method, {"image_embeds": image_embeds, "query_embeds": query_embeds}, kwargs, True,
        validate,
    )
    if batched:
        return red
    return Reduction(red.indices[0], None if red.merged is None else red.merged[0])


def _finite_number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def redundancy_scores(features: Tensor, tau: float = 0.2, gamma: float = 1.0) -> Tensor:
    """GSP redundancy score per token (Eq. 8-9). # (B, N, D) | (N, D) -> (B, N) | (N,) float32

    Higher = more redundant.
    """
    x, batched = _batched_features(features)
    scores = core.redundancy_scores(x, _finite_number(tau, "tau"), _finite_number(gamma, "gamma"))
    return scores if batched else scores[0]


def query_relevance(image_embeds: Tensor, query_embeds: Tensor, negate: bool = False) -> Tensor:
    """Query relevance ``r_norm`` (Eq. 3-4, min-max per row). # (B, N, C) | (N, C) -> (B, N) | (N,)

    ``query_embeds``: (M, C) shared by the batch or (B, M, C).
    """
    x, batched = _batched_features(image_embeds, "image_embeds")
    if not isinstance(negate, bool):
        raise ValueError(f"negate must be a bool, got {negate!r}")
    q = _query(query_embeds, x.shape[0], x.shape[2], x.device, batched)
    rel = core.query_relevance(x, q, negate)
    return rel if batched else rel[0]


def dpp_greedy(kernel: Tensor, k: int) -> Tensor:
    """Greedy DPP MAP pick order (Chen et al. 2018; Eq. 11). # (B, N, N) | (N, N) -> (B, k) | (k,) int64

    ``kernel`` must be symmetric; ``1 <= k <= N``.
    """
    x = _float32_tensor(kernel, "kernel", (2, 3))
    batched = x.dim() == 3
    x = x if batched else x.unsqueeze(0)
    n = x.shape[1]
    if x.shape[2] != n or n == 0:
        raise ValueError(f"kernel must be square (B, N, N) with N >= 1, got shape {tuple(x.shape)}")
    scale = float(x.abs().amax()) if x.numel() else 0.0
    if not torch.allclose(x, x.transpose(1, 2), rtol=1e-5, atol=1e-6 * max(scale, 1.0)):
        raise ValueError("kernel must be symmetric")
    k = _budget(k, "k")
    if k > n:
        raise ValueError(f"k must be <= N = {n}, got {k}")
    order = core.dpp_greedy(x, k)
    return order if batched else order[0]

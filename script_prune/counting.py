"""Count host syncs and (would-be) kernel launches of a block of torch code, on any device.

    with count_ops() as counts:
        sp.select(features, 64, image_embeds=e, query_embeds=q, validate=False)
    counts.syncs, counts.launches, counts.sync_ops

How it counts (a :class:`~torch.utils._python_dispatch.TorchDispatchMode`, i.e. every aten op
after autograd, whatever the device, plus patched Python methods):

- **host syncs**: ops whose result the host has to wait for on an accelerator: the scalar
  reads behind ``.item()`` / ``bool()`` / ``int()`` / ``float()`` (``aten._local_scalar_dense``),
  ``aten.equal`` / ``is_nonzero`` / ``allclose``, ops with data-dependent output shapes
  (``nonzero``, ``masked_select``, ``unique*``, boolean-mask indexing ``x[mask]`` /
  ``x[mask] = v``, ``repeat_interleave`` without ``output_size``), copies from a non-CPU
  device to the CPU, and the Python methods ``Tensor.tolist`` / ``Tensor.numpy`` (which do
  not go through the dispatcher on CPU).
- **launches**: every aten op that computes on tensor data, i.e. all ops except views
  (``OpOverload.is_view``: ``view``, ``transpose``, ``expand``, slicing, ...), bare
  allocations (``empty*``, ``new_empty*``), metadata-only ops (``detach``, ``alias``,
  ``lift_fresh``) and the scalar reads counted as syncs; plus one per fused Triton launch
  (:func:`fused_launch`; the ops the Triton interpreter runs inside it are not counted). On
  CUDA one such aten op is one kernel for the ops used here (elementwise, reductions, bmm,
  gather/scatter, cumsum); ``sort`` may launch a few. It is the count an accelerator would
  see, measured on the CPU; on CUDA the benchmark also counts real kernels with the profiler.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

_SYNC_OPS = {
    aten._local_scalar_dense, aten.equal, aten.is_nonzero, aten.allclose, aten.nonzero, aten.masked_select,
    aten.unique_consecutive, aten._unique2, aten._unique, aten.unique_dim,
}
_INDEX_OPS = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}
_NO_LAUNCH_OPS = {
    aten.empty, aten.empty_strided, aten.empty_like, aten.new_empty, aten.new_empty_strided,
    aten.detach, aten.alias, aten.lift_fresh, aten.set_, aten.resize_,
}

_local = threading.local()


@dataclass
class OpCounts:
    """What :func:`count_ops` saw: ``syncs`` / ``launches`` totals and the op names behind them."""

    sync_ops: Counter = field(default_factory=Counter)
    launch_ops: Counter = field(default_factory=Counter)

    @property
    def syncs(self) -> int:
        return sum(self.sync_ops.values())

    @property
    def launches(self) -> int:
        return sum(self.launch_ops.values())


def _has_bool_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


def _is_sync(func, args: tuple, kwargs: dict) -> bool:
    packet = func.overloadpacket
    if packet in _SYNC_OPS:
        return True
    if packet in _INDEX_OPS:
        return _has_bool_index(args)
    if packet is aten.repeat_interleave:  # tensor repeats: the output length is read on the host
        return func._overloadname != "self_int" and kwargs.get("output_size") is None
    if packet in (aten._to_copy, aten.copy_):
        src = args[1] if packet is aten.copy_ else args[0]
        dst_device = args[0].device if packet is aten.copy_ else kwargs.get("device")
        return (isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst_device is not None
                and torch.device(dst_device).type == "cpu")
    return False


def _is_launch(func) -> bool:
    return not (func.is_view or func.overloadpacket in _NO_LAUNCH_OPS
                or func.overloadpacket is aten._local_scalar_dense)


class _CountingMode(TorchDispatchMode):
    def __init__(self, counts: OpCounts) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not getattr(_local, "inside_fused", False):
            name = str(func.overloadpacket.__name__)
            if _is_sync(func, args, kwargs):
                self.counts.sync_ops[name] += 1
            if _is_launch(func):
                self.counts.launch_ops[name] += 1
        return func(*args, **kwargs)


_active: list[OpCounts] = []


@contextlib.contextmanager
def scoped_setting(namespace: Any, name: str, value: Any) -> Iterator[None]:
    """``namespace.name = value`` inside the block (e.g. on a ``threading.local``), the previous value (or None) after."""
    previous = getattr(namespace, name, None)
    setattr(namespace, name, value)
    try:
        yield
    finally:
        setattr(namespace, name, previous)


@contextlib.contextmanager
def fused_launch(name: str) -> Iterator[None]:
    """Mark a fused kernel launch: counts as one launch; ops run inside it are not counted."""
    for counts in _active:
        counts.launch_ops[f"triton:{name}"] += 1
    with scoped_setting(_local, "inside_fused", True):
        yield


def _patched(counts: OpCounts, name: str, original):
    def method(self, *args, **kwargs):
        if not getattr(_local, "inside_fused", False):
            counts.sync_ops[f"Tensor.{name}"] += 1
        return original(self, *args, **kwargs)

    return method


@contextlib.contextmanager
def count_ops() -> Iterator[OpCounts]:
    """Count host syncs and launches of the torch code run inside the block (see the module doc)."""
    counts = OpCounts()
    originals = {name: torch.Tensor.__dict__.get(name) for name in ("tolist", "numpy")}
    for name in originals:
        setattr(torch.Tensor, name, _patched(counts, name, getattr(torch.Tensor, name)))
    _active.append(counts)
    try:
        with _CountingMode(counts):
            yield counts
    finally:
        _active.remove(counts)
        for name, original in originals.items():
            if original is None:
                delattr(torch.Tensor, name)  # back to the inherited C method
            else:
                setattr(torch.Tensor, name, original)

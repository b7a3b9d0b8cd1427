"""Host synchronisation in the training step: when reading tensor values on the host is free, and a counter.

On a CUDA device every host read of a tensor value (``.item()``, ``bool(t)``, ``int(t)``, ``.tolist()``, ``.cpu()``,
boolean-mask indexing ``x[mask]``, ``nonzero``, ``unique``) waits until every queued kernel has finished: the GPU
idles while Python catches up, once per read. On the CPU the same read costs nothing. Code on the training path
therefore asks :func:`host_reads_are_free` before taking a data-dependent shortcut (for example the Transformer's
per-utterance path, which needs the lengths on the host) and uses an on-device formulation otherwise.

:func:`device_path` forces the on-device formulation on the CPU, so tests can check that it gives the same result
as the CPU path and that it makes no host read (:class:`HostSyncCounter`).
"""

from __future__ import annotations

import contextlib
import os
import traceback
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

_force_device_path = False
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def host_reads_are_free(tensor: Tensor) -> bool:
    """Whether reading ``tensor``'s values on the host costs no device synchronisation: a CPU tensor, unless the
    on-device formulation is forced with :func:`device_path`."""
    return tensor.device.type == "cpu" and not _force_device_path


@contextlib.contextmanager
def device_path() -> Iterator[None]:
    """Run the code path meant for accelerators (no host reads of tensor values) even on CPU tensors."""
    global _force_device_path
    previous, _force_device_path = _force_device_path, True
    try:
        yield
    finally:
        _force_device_path = previous


def to_device_async(tensor: Tensor, device: torch.device | str) -> Tensor:
    """Copy a host tensor (random draws, flags built in Python) to ``device`` without making the host wait.

    ``tensor.to("cuda")`` from ordinary memory waits until the copy is done, i.e. until every kernel queued before it
    has run (``set_sync_debug_mode`` flags it). From pinned memory with ``non_blocking=True`` the copy is queued
    like a kernel; the pinned block is not reused before the copy has run (the caching host allocator records it).
    """
    device = torch.device(device)
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


@dataclass(frozen=True)
class HostSync:
    """One host read: what it was (``kind``) and where (``site``: ``path:line in function: source``)."""

    kind: str
    site: str


# ops whose CUDA kernels copy a data-dependent result (a count, a value) back to the host
_SYNCING_OPS = {
    torch.ops.aten._local_scalar_dense.default: ".item() / bool() / int() / float()",
    torch.ops.aten.nonzero.default: "nonzero",
    torch.ops.aten.masked_select.default: "masked_select",
    torch.ops.aten._unique2.default: "unique",
    torch.ops.aten.unique_dim.default: "unique",
    torch.ops.aten.unique_consecutive.default: "unique_consecutive",
    torch.ops.aten.bincount.default: "bincount",
}
_INDEX_OPS = {
    torch.ops.aten.index.Tensor,
    torch.ops.aten.index_put.default,
    torch.ops.aten.index_put_.default,
    torch.ops.aten._index_put_impl_.default,
}
_REPEAT_INTERLEAVE_OPS = {
    torch.ops.aten.repeat_interleave.Tensor,
    torch.ops.aten.repeat_interleave.self_Tensor,
}
_COPY_OPS = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default}


def _call_site() -> str:
    """The innermost speechlab frame of the current Python stack (else the innermost non-torch frame)."""
    frames = traceback.extract_stack()[:-3]
    own = [
        f for f in frames if f.filename.startswith(_PACKAGE_DIR) and not f.filename.endswith("host_sync.py")
    ]
    outside_torch = [f for f in frames if f"{os.sep}torch{os.sep}" not in f.filename]
    frame = (own or outside_torch or frames)[-1]
    path = os.path.relpath(frame.filename, os.path.dirname(_PACKAGE_DIR.rstrip(os.sep)))
    return f"{path}:{frame.lineno} in {frame.name}: {(frame.line or '').strip()}"


class HostSyncCounter(TorchDispatchMode):
    """Record every host read of a tensor value made inside the ``with`` block.

    Counts what would synchronise a CUDA device: scalar reads (``aten._local_scalar_dense``, behind ``.item()``,
    ``bool()``, ``int()``, ``float()`` and ``if tensor:``), ops whose output size depends on the data
    (``nonzero``, ``masked_select``, ``unique``, ``bincount``, ``repeat_interleave`` without ``output_size``,
    indexing with a boolean mask), copies from a non-CPU device to the CPU, and the Python-level reads that do not
    reach the dispatcher on CPU tensors (``.tolist()``, ``.numpy()``, ``.cpu()``, ``.to("cpu")`` with the device named by
    a string). On CPU tensors
    these are all counted too: that is the point, so a test on the CPU sees what a GPU run would pay for.
    ``syncs`` lists them in order with their call site.
    """

    # Higher-order operators (FlexAttention, compiled regions) pass through: run as usual, with this mode off
    # inside them (their internals are fixed-size kernels).
    supports_higher_order_operators = True

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[HostSync] = []
        self._patched: dict[str, object] = {}

    def _record(self, kind: str) -> None:
        self.syncs.append(HostSync(kind, _call_site()))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        if func in _SYNCING_OPS:
            self._record(_SYNCING_OPS[func])
        elif func in _INDEX_OPS:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices):
                self._record("boolean-mask indexing")
        elif func in _REPEAT_INTERLEAVE_OPS and kwargs.get("output_size") is None:
            self._record("repeat_interleave without output_size")
        elif func in _COPY_OPS:
            source = args[1] if func is torch.ops.aten.copy_.default else args[0]
            target = args[0].device if func is torch.ops.aten.copy_.default else kwargs.get("device")
            if target is not None and torch.device(target).type == "cpu" and source.device.type != "cpu":
                self._record("device-to-host copy")
        return func(*args, **kwargs)

    def __enter__(self) -> HostSyncCounter:
        counter = self
        originals = {name: getattr(Tensor, name) for name in ("tolist", "numpy", "cpu", "to")}
        self._patched = originals

        def wrap(name: str):
            original = originals[name]

            def method(tensor, *args, **kwargs):
                if name != "to" or _targets_cpu(*args, **kwargs):
                    counter._record(f".{name}()")
                return original(tensor, *args, **kwargs)

            return method

        for name in originals:
            setattr(Tensor, name, wrap(name))
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        for name, original in self._patched.items():
            setattr(Tensor, name, original)
        self._patched = {}
        return super().__exit__(*exc)


def _targets_cpu(*args, **kwargs) -> bool:
    """Whether ``Tensor.to(*args, **kwargs)`` names the CPU by a string (``.to("cpu")``).

    A ``torch.device`` argument is taken to follow the data (``lengths.to(audio.device)``: a no-op on the
    accelerator too), so on CPU tensors it cannot be told apart from a real move to the host and is not counted.
    """
    device = kwargs.get("device")
    for arg in args:
        if isinstance(arg, str):
            device = arg
    return isinstance(device, str) and torch.device(device).type == "cpu"

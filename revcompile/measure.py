"""Measuring what a training step keeps alive for backward.

On any device, the activations a forward pass keeps for backward are exactly the tensors
autograd saves; ``torch.autograd.graph.saved_tensors_hooks`` sees each of them as it is
saved. Several saved tensors often share one storage (views, a tensor saved by two ops),
so they are counted once per storage. Parameters are saved too (a linear layer saves its
weight) but they are not activations and exist anyway; they are left out.

On CUDA the peak of ``torch.cuda.max_memory_allocated`` over a step is the other honest
number. On CPU the resident-set size is not: glibc keeps freed blocks resident, so a
process's high-water mark overstates what was alive at once. The live heap (bytes handed
out by malloc and not yet freed, from glibc's ``mallinfo2``) is the CPU counterpart of
``memory_allocated``; ``HeapPeak`` samples it during a step, which can only miss a peak,
never invent one.
"""

from __future__ import annotations

import ctypes
import threading
import time
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["SavedTensors", "saved_for_backward", "live_heap_bytes", "HeapPeak"]


@dataclass(frozen=True)
class SavedTensors:
    """Distinct storages saved for backward during one forward pass."""

    bytes: int
    storages: int
    tensors: int


def _storage_key(tensor: torch.Tensor):
    try:
        storage = tensor.untyped_storage()
        return (tensor.device, storage.data_ptr()), storage.nbytes()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage
        return (tensor.device, id(tensor)), tensor.numel() * tensor.element_size()


def saved_for_backward(run, parameters=()) -> tuple[object, SavedTensors]:
    """Run ``run()`` and count the distinct storages it saves for backward.

    ``parameters`` (tensors, or a module whose parameters to use) are excluded.
    Returns ``run()``'s result and the count; the result keeps the graph alive, so the
    caller can go on to call ``backward`` on it.
    """
    if isinstance(parameters, nn.Module):
        parameters = list(parameters.parameters())
    excluded = {_storage_key(p)[0] for p in parameters}
    seen: dict = {}
    count = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal count
        count += 1
        key, nbytes = _storage_key(tensor)
        if key not in excluded:
            seen[key] = nbytes
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = run()
    return result, SavedTensors(bytes=sum(seen.values()), storages=len(seen), tensors=count)


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
    ]


def _load_mallinfo2():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        libc.mallinfo2()
        return libc.mallinfo2
    except (OSError, AttributeError):
        return None


_MALLINFO2 = _load_mallinfo2()


def live_heap_bytes() -> int | None:
    """Bytes currently allocated by malloc (glibc); None where that cannot be read."""
    if _MALLINFO2 is None:
        return None
    info = _MALLINFO2()
    return int(info.uordblks + info.hblkhd)


class HeapPeak:
    """Sample the live heap in a background thread: ``with HeapPeak() as peak: step()``.

    ``peak.growth`` is the largest live heap seen above the value at entry (bytes), or
    None where the heap cannot be read. Sampling can miss a short peak, never invent one.
    """

    def __init__(self, interval: float = 0.0005):
        self.interval = interval
        self.growth: int | None = None
        self._stop = threading.Event()

    def __enter__(self) -> "HeapPeak":
        self._base = live_heap_bytes()
        if self._base is None:
            return self
        self._peak = self._base
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, live_heap_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        if self._base is None:
            return
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, live_heap_bytes())
        self.growth = self._peak - self._base

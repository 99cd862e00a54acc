"""How much activation memory a conversion saves, measured on a real training step.

``memory_report`` runs one forward and backward of the original model and of the
converted one on the same inputs and measures, for each:

* the activations saved for backward (distinct storages, parameters excluded) -- exact
  on every device;
* the peak memory of the step above what was allocated before it: on CUDA from
  ``max_memory_allocated``, on CPU from the live heap (see ``revcompile.measure``);
* the wall time of the step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils import _pytree as pytree

from passes.plan import Plan
from revcompile.measure import HeapPeak, saved_for_backward

__all__ = ["StepMeasurement", "MemoryReport", "measure_step", "memory_report"]


@dataclass(frozen=True)
class StepMeasurement:
    saved_bytes: int  # activations saved for backward
    peak_bytes: int | None  # peak allocation of the step above its start (None if unknown)
    seconds: float  # one forward + backward


@dataclass(frozen=True)
class MemoryReport:
    model: str
    batch_size: int | None
    device: str
    dtype: str
    plan: Plan
    original: StepMeasurement
    converted: StepMeasurement

    @property
    def saved_reduction(self) -> float:
        return self.original.saved_bytes / max(self.converted.saved_bytes, 1)

    @property
    def peak_reduction(self) -> float | None:
        if self.original.peak_bytes is None or self.converted.peak_bytes is None:
            return None
        return self.original.peak_bytes / max(self.converted.peak_bytes, 1)


def _loss(output) -> torch.Tensor:
    leaves = [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]
    if not leaves:
        raise ValueError("the model returned no floating-point output that requires grad")
    return sum(t.float().sum() for t in leaves)


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def measure_step(model: nn.Module, args: tuple, kwargs: dict | None = None) -> StepMeasurement:
    """Measure one forward + backward of ``model`` (after one warm-up step)."""
    kwargs = kwargs or {}
    device = _device_of(model)
    cuda = device.type == "cuda"

    def step():
        output, saved = saved_for_backward(lambda: model(*args, **kwargs), model)
        _loss(output).backward()
        return saved

    step()  # warm-up: kernels, allocator, gradient buffers, traced variants
    model.zero_grad(set_to_none=False)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start_bytes = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    if cuda:
        saved = step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - start_bytes
    else:
        with HeapPeak() as heap:
            saved = step()
        peak = heap.growth
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return StepMeasurement(saved_bytes=saved.bytes, peak_bytes=peak, seconds=seconds)


def memory_report(model: nn.Module, example_inputs=(), example_kwargs: dict | None = None, *, converted: nn.Module | None = None, name: str | None = None) -> MemoryReport:
    """Measure ``model`` and its conversion (made here unless ``converted`` is given)."""
    from revcompile.api import convert, explain

    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    kwargs = dict(example_kwargs or {})
    if converted is None:
        converted = convert(model, args, kwargs)
    model.train()
    converted.train()
    original = measure_step(model, args, kwargs)
    reversible = measure_step(converted, args, kwargs)
    first = next((t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)), None)
    param = next(model.parameters())
    return MemoryReport(
        model=name or type(model).__name__,
        batch_size=int(first.shape[0]) if first is not None and first.dim() else None,
        device=str(param.device),
        dtype=str(param.dtype).replace("torch.", ""),
        plan=explain(converted),
        original=original,
        converted=reversible,
    )

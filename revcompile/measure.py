"""Measuring what a training step keeps alive for backward.

On any device, the activations a forward pass keeps for backward are exactly the tensors
autograd saves; ``torch.autograd.graph.saved_tensors_hooks`` sees each of them as it is
saved. Several saved tensors often share one storage (views, a tensor saved by two ops),
so they are counted once per storage. Parameters are saved too (a linear layer saves its
weight) but they are not activations and exist anyway; they are left out.

On CUDA the peak of ``torch.cuda.max_memory_allocated`` over a step is the other honest
number, and the report uses both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["SavedTensors", "saved_for_backward"]


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

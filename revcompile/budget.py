"""The memory budget of a training step, and the largest batch that fits a memory cap.

Rev-ViT's tables report a "maximum batch size" per model: that is what a smaller
activation footprint buys. Here it is computed rather than searched for: a step needs
what does not depend on the batch -- parameters, their gradients (in the parameter's dtype),
the optimizer's state (AdamW: two moments per parameter, counted in float32, or the
parameter's dtype where wider -- what mixed-precision recipes keep; ``torch.optim.AdamW``
with bfloat16 parameters keeps bfloat16 moments, half that) and a reserve for what
is not a tensor (the CUDA context, allocator fragmentation) -- plus activation memory,
which is linear in the batch: ``fixed + per_sample * batch``. The largest batch is the
last one whose sum stays under the cap.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from revcompile.passes.memory import LinearBytes

__all__ = [
    "ReportError",
    "OPTIMIZER_STATE",
    "OPTIMIZER_NAMES",
    "DEFAULT_RESERVE",
    "TrainingState",
    "BatchCapacity",
    "parse_bytes",
    "format_bytes",
    "training_state",
    "batch_capacity",
    "largest_batches",
    "nothing_fits",
]

# Optimizer state per parameter, in parameter-sized tensors.
OPTIMIZER_STATE = {"adamw": 2, "adam": 2, "sgd-momentum": 1, "sgd": 0}
OPTIMIZER_NAMES = {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD", "sgd-momentum": "SGD with momentum"}
STATE_ELEMENT_BYTES = 4  # optimizer state is counted in float32 (or the parameter's dtype where wider)
DEFAULT_RESERVE = 512 * 2**20
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


class ReportError(ValueError):
    """A report cannot be made as asked (a memory cap that nothing fits, an unreadable size)."""


def parse_bytes(text: str | int | float) -> int:
    """``"16GiB"``, ``"512 MB"``, ``"1.5e9"`` or a number -> bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ReportError(f"cannot read {text!r} as a size; write it like 16GiB, 512MiB or 8GB")
    return int(float(match.group(1)) * _UNITS[unit])


def format_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n:,.0f} B"


@dataclass(frozen=True)
class TrainingState:
    """Memory a training step needs whatever the batch size."""

    parameters: int
    gradients: int
    optimizer: str
    optimizer_state: int
    reserve: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer_state + self.reserve


@dataclass(frozen=True)
class BatchCapacity:
    memory_cap: int
    original: int  # the largest batch that fits; 0 if none does
    converted: int
    per_sample_original: float  # activation bytes per sample the sizes were computed with
    per_sample_converted: float
    basis: str  # where those bytes come from
    planned: int | None = None  # the largest batch some memory plan fits (revcompile.plan_memory); None: not searched

    @property
    def gain(self) -> float | None:
        return self.converted / self.original if self.original else None


def training_state(model: nn.Module, optimizer: str, reserve: int) -> TrainingState:
    if optimizer not in OPTIMIZER_STATE:
        raise ReportError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZER_STATE)}")
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    grads = sum(p.numel() * p.element_size() for p in trainable)
    state = sum(p.numel() * max(p.element_size(), STATE_ELEMENT_BYTES) for p in trainable)
    return TrainingState(params, grads, optimizer, OPTIMIZER_STATE[optimizer] * state, reserve)


def _largest_batch(room: float, activations: LinearBytes) -> int:
    room -= activations.fixed
    if activations.per_sample <= 0:
        return 0
    return max(int(room // activations.per_sample), 0)


def largest_batches(memory_cap: int, state: TrainingState, original: LinearBytes, converted: LinearBytes,
                    basis: str) -> BatchCapacity:
    """Largest batches under ``memory_cap`` given each model's activation bytes as a line in the batch (0: none fits)."""
    room = memory_cap - state.total
    return BatchCapacity(memory_cap, _largest_batch(room, original), _largest_batch(room, converted),
                         original.per_sample, converted.per_sample, basis)


def nothing_fits(memory_cap: int, state: TrainingState, converted: LinearBytes) -> str:
    """Why not even one sample of the converted model fits ``memory_cap``, in numbers."""
    return (
        f"memory cap {format_bytes(memory_cap)} is too small: parameters, gradients and "
        f"{OPTIMIZER_NAMES[state.optimizer]} state "
        f"take {format_bytes(state.total - state.reserve)}, the reserve {format_bytes(state.reserve)}, and one "
        f"sample of the converted model needs {format_bytes(state.total + converted.at(1))} in all"
    )


def batch_capacity(memory_cap: int, state: TrainingState, original: LinearBytes, converted: LinearBytes,
                   basis: str) -> BatchCapacity:
    """``largest_batches``, raising ``ReportError`` when not even one sample of the converted model fits."""
    capacity = largest_batches(memory_cap, state, original, converted, basis)
    if capacity.converted < 1:
        raise ReportError(nothing_fits(memory_cap, state, converted))
    return capacity

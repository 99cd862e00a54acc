"""The peak memory of a training step, simulated on fake tensors by running the step itself.

Counting what autograd *saves* (``revcompile.passes.memory``) leaves out the working
memory of the backward: the gradients flowing back, each op's temporaries, and -- for a
reversible segment -- the rebuilt branch graph, the reconstructed streams and the
parameter gradients of the block being differentiated. Guessing those as a constant number of
stream-sized tensors under-predicted the converted step's peak by up to a third. Instead,
this module *runs* the training step -- forward, loss, backward, through the real
runtime -- on fake tensors (``FakeTensorMode``: shapes, dtypes and devices, no data, no
kernels, no memory) and follows every storage the step creates from the op that creates
it until it is freed (``LiveTensorBytes``: a dispatch mode that sees each op's outputs and
a finalizer on each new storage). The largest total alive at once is the step's peak.

The same counter runs on real tensors (``tensor_peak``): that measures the real step's
peak tensor memory exactly at op granularity on any device, which the tests hold the
simulation against, beside the sampled live heap (``revcompile.measure.HeapPeak``).

Parameters and their ``.grad`` buffers exist before the step and after it, so they are
not part of the peak (as in the measurements): gradients are allocated before counting
starts, and the step accumulates into them as a training loop after its first step does.
"""

from __future__ import annotations

import contextlib
import gc
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["LiveTensorBytes", "resident_tensors", "training_loss", "training_step", "tensor_peak", "simulate_step_peak", "StepPeak", "largest_fitting_batch"]


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the storages created inside the mode that are alive now, and the most at once.

    ``existing``: tensors alive before the step whose frees during it count (gradient
    buffers). ``resident``: tensors alive throughout it (parameters, buffers, inputs): an op
    that returns a view of one (``weight.t()`` that a linear saves, a segment's detached
    alias) allocates nothing. Without them such a view was counted as a new storage of the
    parameter's size, and never freed: a step's peak held every parameter it viewed.
    """

    def __init__(self, existing=(), resident=()):
        super().__init__()
        self.live = self.peak = 0
        self._sizes: dict[int, int] = {}
        for tensor in existing:  # alive before the step; their frees during it count
            self._track(tensor)
        for tensor in resident:
            self._sizes.setdefault(tensor.untyped_storage()._cdata, 0)
        self.base = self.peak = self.live

    @property
    def growth(self) -> int:
        """The peak above what was alive at the start."""
        return self.peak - self.base

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._sizes:
            return
        size = storage.nbytes()
        self._sizes[key] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in pytree.tree_leaves(out):
            if isinstance(value, torch.Tensor):
                self._track(value)
        return out


def training_loss(output) -> torch.Tensor:
    """The loss a measurement backpropagates: the output's ``loss`` if it has one, else the sum
    of its floating-point outputs that require grad."""
    loss = getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor) and loss.requires_grad:
        return loss
    leaves = [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]
    if not leaves:
        raise ValueError("the model returned no floating-point output that requires grad; nothing to train")
    return sum(t.float().sum() for t in leaves)


def training_step(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward, ``training_loss``, backward: the step both the simulation and the measurements run."""
    # The output stays alive through backward, as in the loop HF documents (``outputs =
    # model(**batch); outputs.loss.backward()``): a language model's logits (batch x tokens x
    # vocabulary) and key/value cache are then part of the peak. A loop that drops the output
    # first peaks lower, so counting it errs on the side that fits.
    output = model(*args, **kwargs)
    training_loss(output).backward()


@contextlib.contextmanager
def _no_collection():
    """Python's cycle collector off for a counted step, after one collection.

    A storage held by a reference cycle is freed when the collector happens to run: during
    one step, or only after it. Left on, the same step's peak varied by whatever cycles
    held (two Swin bias tables), between the simulation and the measurement and from run to
    run; off, both count every cycle's storage until the step ends.
    """
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def tensor_peak(model: nn.Module, args: tuple, kwargs: dict | None = None) -> int:
    """Peak tensor bytes of one real training step above its start (after a warm-up step)."""
    kwargs = kwargs or {}
    training_step(model, args, kwargs)  # warm-up: traced variants, .grad buffers
    counter = LiveTensorBytes(_gradients(model), resident_tensors(model, args, kwargs))
    with _no_collection(), counter:
        training_step(model, args, kwargs)
    model.zero_grad(set_to_none=True)
    return counter.growth


def _gradients(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad for p in model.parameters() if p.grad is not None]


def resident_tensors(model: nn.Module, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """What is alive before and after a step of ``model``: its parameters, buffers and the inputs."""
    inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    return [*model.parameters(), *model.buffers(), *inputs]


@dataclass(frozen=True)
class StepPeak:
    """A simulated training step: its peak above the start, and what was alive at its end."""

    peak_bytes: int
    end_bytes: int  # should be ~0: what the step leaves alive besides parameters and gradients


def simulate_step_peak(model: nn.Module, args: tuple, kwargs: dict | None = None) -> StepPeak:
    """Run one training step of ``model`` on fake tensors and return its peak tensor bytes.

    Allocates no memory for activations or parameters: every parameter, buffer and input is
    replaced by a fake tensor of the same shape, dtype and device for the step. The
    caller's random generators are left as they were.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    kwargs = kwargs or {}
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    named = dict(model.named_parameters(remove_duplicate=False))
    devices = sorted({t.device.index or 0 for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.is_cuda})
    with torch.random.fork_rng(devices=devices), mode:
        fakes = {name: _fake(mode, p) for name, p in named.items()}
        buffers = {name: mode.from_tensor(b) for name, b in model.named_buffers(remove_duplicate=False)}
        inputs = pytree.tree_map(lambda v: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v, (args, kwargs))
        for fake in {id(f): f for f in fakes.values()}.values():
            if fake.requires_grad:
                fake.grad = torch.zeros_like(fake)
        with _reparametrize_module(model, {**fakes, **buffers}, tie_weights=True):
            counter = LiveTensorBytes(_gradients(model), resident_tensors(model, *inputs))
            with _no_collection(), counter:
                training_step(model, *inputs)
    return StepPeak(counter.growth, counter.live - counter.base)


def _fake(mode, parameter: torch.Tensor) -> torch.Tensor:
    """A fake stand-in that stays an ``nn.Parameter`` (segments look parameters up by name)."""
    return mode.from_tensor(parameter)


def largest_fitting_batch(peak_at, room: int, guess: int, *, tolerance: float = 0.02, most: int = 1 << 20) -> int:
    """The largest batch whose simulated peak ``peak_at(batch)`` stays within ``room`` bytes.

    A line fitted through two batch sizes extrapolates a step's peak only approximately,
    and a "largest batch" that is a few percent too large runs out of memory. So the line's
    answer (``guess``) is only where the search starts: it brackets the answer with real
    simulations of the step, then bisects until the bracket is within ``tolerance`` of the
    batch (or one sample), and returns its lower end -- a batch that was simulated and fits.
    Returns 0 if not even one sample fits.
    """
    fits = lambda batch: peak_at(batch) <= room  # noqa: E731
    guess = max(1, min(guess, most))
    if fits(guess):
        low, high = guess, None
        while high is None:
            step = max(1, low // 8)
            if low + step > most:
                return low
            if fits(low + step):
                low += step
            else:
                high = low + step
    else:
        low, high = 0, guess
        while high - low > 1 and low == 0:
            probe = max(1, high // 2)
            if fits(probe):
                low = probe
            else:
                high = probe
                if probe == 1:
                    return 0
    while high - low > max(1, int(low * tolerance)):
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low

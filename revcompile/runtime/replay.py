"""Making a recompute see exactly what the forward saw: generator states and autocast.

Dropout and drop-path inside a branch must draw the same masks when backward recomputes it,
or gradients are silently wrong. The reference implementations reseed the global
generators per block, which perturbs the user's random stream and races under two
streams; here the CPU and CUDA generator states are captured before each branch in the
forward and restored around its recompute, and the caller's states are put back
afterwards. Generator state is host-side (the CUDA generator's seed and offset are read at
kernel launch), so restoring it around launches on different streams from one host thread
is exact. A branch that draws nothing (``revcompile.passes.randomness``, decided from its graph
at conversion) saves and restores nothing. The forward's autocast state (CPU and CUDA) is
re-entered the same way.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch

__all__ = ["cuda_devices", "capture_rng", "replayed_rng", "autocast_state", "autocast_as"]


def cuda_devices(tensors) -> tuple[int, ...]:
    return tuple(sorted({t.device.index or 0 for t in tensors if isinstance(t, torch.Tensor) and t.is_cuda}))


def capture_rng(devices: tuple[int, ...]):
    return torch.get_rng_state(), tuple(torch.cuda.get_rng_state(d) for d in devices)


def _restore_rng(state, devices: tuple[int, ...]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    for device, device_state in zip(devices, cuda):
        torch.cuda.set_rng_state(device_state, device)


@contextmanager
def replayed_rng(state, devices: tuple[int, ...]):
    """Run a branch with the generators as they were in the forward, then put them back
    (``state`` None: the branch draws nothing, so nothing was saved and nothing is replayed)."""
    if state is None:
        yield
        return
    current = capture_rng(devices)
    _restore_rng(state, devices)
    try:
        yield
    finally:
        _restore_rng(current, devices)


_AUTOCAST_DEVICES = ("cpu", "cuda")


def autocast_state() -> dict:
    return {d: (torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in _AUTOCAST_DEVICES}


@contextmanager
def autocast_as(state: dict):
    with ExitStack() as stack:
        for device, (enabled, dtype) in state.items():
            if device == "cuda" and not torch.cuda.is_available():
                continue
            if (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)) == (enabled, dtype):
                continue  # already so (the usual case): entering it again costs Python time per block
            stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled))
        yield

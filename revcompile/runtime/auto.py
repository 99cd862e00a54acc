"""``"auto"``: time the one-stream and the two-stream backward of a segment, keep the faster."""

from __future__ import annotations

import contextlib
import statistics

import torch

__all__ = ["AutoChoice", "backward_mode"]


class AutoChoice:
    """Times the two programs of one segment on one input shape, then keeps the faster.

    The first backward of each is a warm-up; then ``TRIALS`` of each, alternating. Timing
    uses CUDA events on the caller's stream around the whole backward; they are read at
    the start of the next backward (a host wait only during the trials, never inside a
    program). ``"parallel"`` is kept only if its median is ``MARGIN`` faster, so the choice
    is never slower than sequential beyond timing noise.
    """

    TRIALS = 3
    MARGIN = 0.98

    def __init__(self):
        self.plan = ["reversible", "parallel"] * (1 + self.TRIALS)
        self.pending: list = []
        self.times: dict[str, list[float]] = {"reversible": [], "parallel": []}
        self.choice: str | None = None

    def next_mode(self) -> str:
        if self.choice is not None:
            return self.choice
        for mode, start, end in self.pending:
            end.synchronize()
            self.times[mode].append(start.elapsed_time(end))
        self.pending = []
        if not self.plan:
            sequential = statistics.median(self.times["reversible"][1:])
            parallel = statistics.median(self.times["parallel"][1:])
            self.choice = "parallel" if parallel < self.MARGIN * sequential else "reversible"
            return self.choice
        return self.plan.pop(0)

    def timed(self, mode: str):
        if self.choice is not None:
            return contextlib.nullcontext()
        return self._time(mode)

    @contextlib.contextmanager
    def _time(self, mode: str):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self.pending.append((mode, start, end))


def backward_mode(requested: str, choices: dict, stream: torch.Tensor, autocast: dict):
    """The program mode for this backward, and a context that times it (``"auto"`` only)."""
    if requested != "auto":
        return requested, contextlib.nullcontext()
    if stream.device.type != "cuda":
        return "reversible", contextlib.nullcontext()
    key = (stream.device, tuple(stream.shape), stream.dtype, tuple(sorted(autocast.items())))
    choice = choices.setdefault(key, AutoChoice())
    mode = choice.next_mode()
    return mode, choice.timed(mode)

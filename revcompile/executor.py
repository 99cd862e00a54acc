"""Running a ``BackwardProgram``: an interpreter over an environment of named values.

The program (``revcompile.passes.schedule``) says which step runs when, on which stream, and which
steps it must wait for; the runtime supplies the math of each step (a dispatch table,
``ops[kind](block, branch, values, scratch)``). This module does the rest, the same way
on every device:

* it issues the program group by group and, within a group, branch by branch (the G ops
  of the group's steps, then their F ops), so a grad frees a branch graph before the
  next branch graph is rebuilt;
* before a step, its stream waits for the events of the steps it depends on across
  streams, and every value it reads that another stream produced is handed to its stream
  (``Tensor.record_stream``: the caching allocator must not reuse that memory until this
  stream is done with it);
* a step sees only the values it declared (``StepValues``), so the program's dependency
  graph is the runtime's real data flow, not a description of it;
* values are dropped after their last use, so nothing outlives the block that needs it.

Streams come from a backend. ``CudaStreams`` uses the caller's current stream as stream
0 and cached side streams for the others, and never blocks the host: ordering is
``wait_stream`` at entry and exit and ``wait_event`` between steps. ``InlineStreams``
(CPU) has no concurrency: every stream operation is a no-op and the steps run in program
order, through exactly the same code.
"""

from __future__ import annotations

import contextlib

import torch

from revcompile.passes.schedule import BackwardProgram, Step

__all__ = ["BRANCHES", "StepValues", "InlineStreams", "CudaStreams", "stream_backend", "ProgramRun", "run_program"]

BRANCHES = ("g", "f")  # the order of a block's branches in backward: G(Y1) first, then F(X2)


class StepValues:
    """The environment as one step may see it: its declared reads and writes, nothing else.

    ``take`` reads a value and, when this step is its last user, removes it from the
    environment at once instead of after the step: a step's two branches then hold only
    what each still needs (a block's output streams are dead once its inputs are rebuilt,
    its output cotangents once G's are pulled), which lowers the backward's peak.
    """

    def __init__(self, env: dict, step: Step, reads: frozenset, writes: frozenset, last_use: frozenset = frozenset()):
        self._env, self._step, self._reads, self._writes, self._last_use = env, step, reads, writes, last_use

    def _check(self, name: str, allowed: frozenset, verb: str) -> None:
        if name not in allowed:
            raise KeyError(f"{self._step[0]} {self._step[1]} {verb} {name!r}, which its program entry does not declare")

    def __getitem__(self, name: str):
        self._check(name, self._reads | self._writes, "reads")
        return self._env[name]

    def get(self, name: str, default=None):
        self._check(name, self._reads | self._writes, "reads")
        return self._env.get(name, default)

    def take(self, name: str):
        """``self[name]``, removed from the environment if no later step reads it."""
        self._check(name, self._reads | self._writes, "reads")
        return self._env.pop(name) if name in self._last_use else self._env[name]

    def __setitem__(self, name: str, value) -> None:
        self._check(name, self._writes, "writes")
        self._env[name] = value


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


# --- stream backends ----------------------------------------------------------------------------


class InlineStreams:
    """No concurrency (CPU): the program's steps run one after another, in its order."""

    def __init__(self, count: int):
        self.count = count

    def use(self, stream: int):
        return contextlib.nullcontext()

    def record(self, stream: int):
        return None

    def wait(self, stream: int, event) -> None:
        pass

    def handoff(self, tensors, stream: int) -> None:
        pass

    def begin(self) -> None:
        pass

    def end(self) -> None:
        pass


_SIDE_STREAMS: dict[tuple[int, int], "torch.cuda.Stream"] = {}


def _side_stream(device: torch.device, k: int) -> "torch.cuda.Stream":
    """One cached side stream per device and index: streams are reused across backwards."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if (index, k) not in _SIDE_STREAMS:
        _SIDE_STREAMS[(index, k)] = torch.cuda.Stream(device=index)
    return _SIDE_STREAMS[(index, k)]


class CudaStreams:
    """Stream 0 is the current stream (where the program's inputs were made); the others are
    side streams that start after everything already queued on it and that it waits for at
    the end. No call here blocks the host."""

    def __init__(self, count: int, device: torch.device):
        self.count = count
        self.ambient = torch.cuda.current_stream(device)
        self.streams = [self.ambient] + [_side_stream(device, k) for k in range(1, count)]

    def use(self, stream: int):
        return torch.cuda.stream(self.streams[stream])

    def record(self, stream: int):
        event = torch.cuda.Event()
        event.record(self.streams[stream])
        return event

    def wait(self, stream: int, event) -> None:
        self.streams[stream].wait_event(event)

    def handoff(self, tensors, stream: int) -> None:
        for tensor in tensors:
            if tensor.is_cuda:
                tensor.record_stream(self.streams[stream])

    def begin(self) -> None:
        for side in self.streams[1:]:
            side.wait_stream(self.ambient)

    def end(self) -> None:
        for side in self.streams[1:]:
            self.ambient.wait_stream(side)


def stream_backend(device: torch.device, count: int):
    """``CudaStreams`` on a CUDA device when the program uses more than one stream, else inline."""
    if device.type == "cuda" and count > 1:
        return CudaStreams(count, device)
    return InlineStreams(count)


# --- the interpreter -------------------------------------------------------------------------------


def _last_uses(program: BackwardProgram) -> dict[Step, set]:
    """After which step each value can be dropped (outputs are kept)."""
    last: dict[str, Step] = {}
    for step in program.order:
        for value in program.reads[step] | program.writes[step]:
            last[value] = step
    drops: dict[Step, set] = {step: set() for step in program.order}
    for value, step in last.items():
        if value not in program.outputs:
            drops[step].add(value)
    return drops


class ProgramRun:
    """One run of ``program`` on ``env``, issued in pieces: ``run_through(step)`` issues groups
    until ``step`` has run, ``run_through()`` to the end.

    ``ops[kind](block, branch, values, scratch)`` performs one branch of one step; it reads
    and writes ``values`` (a ``StepValues``) and may keep state for the step's next branch
    in ``scratch``. ``streams`` is a backend (``stream_backend``). Each piece starts after
    everything queued on stream 0 and ends with stream 0 waiting for every other stream,
    with the outputs made so far handed to stream 0: between pieces the caller may take
    outputs out of ``env`` (the reconstruction tape releases a block's parameter gradients
    there, ``revcompile.runtime.tape``) and use them on stream 0.
    """

    def __init__(self, program: BackwardProgram, ops: dict, env: dict, streams):
        self.program, self.ops, self.env, self.streams = program, ops, env, streams
        self.producer = {name: 0 for name in env}  # the stream whose work made each value
        self.drops = _last_uses(program)
        self.awaited = {awaited for _, awaited in program.waits}
        self.events: dict[Step, object] = {}
        self.done: set[Step] = set()
        self.issued_groups = 0

    @property
    def finished(self) -> bool:
        return self.issued_groups == len(self.program.groups)

    def run_through(self, step: Step | None = None) -> dict:
        """Issue groups until ``step`` (every step when None) has run; return the environment."""
        self.streams.begin()
        while not self.finished and (step is None or step not in self.done):
            self._issue(self.program.groups[self.issued_groups])
            self.issued_groups += 1
        for name in self.program.outputs:
            if name in self.env and self.producer[name] != 0:
                self.streams.handoff(list(_tensors(self.env[name])), 0)
        self.streams.end()
        return self.env

    def _issue(self, group: tuple[Step, ...]) -> None:
        program, env, streams = self.program, self.env, self.streams
        for step in group:
            stream = program.streams[step]
            for dependency in program.waits_for(step):
                streams.wait(stream, self.events[dependency])
            for name in program.reads[step]:
                if name in env and self.producer[name] != stream:
                    streams.handoff(list(_tensors(env[name])), stream)
        views = {step: StepValues(env, step, program.reads[step], program.writes[step], frozenset(self.drops[step])) for step in group}
        scratch: dict[Step, dict] = {step: {} for step in group}
        for branch in BRANCHES:
            for step in group:
                with streams.use(program.streams[step]):
                    self.ops[step[0]](step[1], branch, views[step], scratch[step])
        for step in group:
            stream = program.streams[step]
            for name in program.writes[step]:
                if name in env:
                    self.producer[name] = stream
            if step in self.awaited:
                self.events[step] = streams.record(stream)
            for name in self.drops[step]:
                env.pop(name, None)
            self.done.add(step)


def run_program(program: BackwardProgram, ops: dict, env: dict, streams) -> dict:
    """Run ``program`` on ``env`` (holding its inputs) in one piece and return ``env`` with its
    outputs (``ProgramRun`` says what ``ops`` and ``streams`` are)."""
    return ProgramRun(program, ops, env, streams).run_through()

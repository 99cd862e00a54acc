"""Running reversible segments: forward without a graph, backward by reconstruction.

A ``ReversibleSegment`` is what a ``reversible_segment_<i>`` call in a converted graph
executes. It couples the segment's blocks (``Y1 = X1 + F(X2)``, ``Y2 = X2 + G(Y1)``) and
runs in one of the ``BACKWARD_MODES``:

* ``"reversible"``: one ``torch.autograd.Function`` for the whole segment. Its forward
  runs the blocks without recording a graph and saves only the final ``(Y1, Y2)`` and the
  side inputs. Its backward runs the segment's ``BackwardProgram`` (``revcompile.passes.schedule``)
  with one stream: for each block, last first, it recomputes ``G(Y1)`` with a graph and
  pushes ``dY2`` through it, reconstructs ``X2 = Y2 - G(Y1)``, recomputes ``F(X2)`` and
  pushes ``dY1`` through it, reconstructs ``X1 = Y1 - F(X2)``: one branch graph alive at a
  time. The parameter gradients are returned from the Function, so autograd accumulates
  each of them exactly once per backward (gradient accumulation and DDP hooks see one
  event).
* ``"parallel"``: the same Function running the two-stream program (PaReprop): the
  gradients of block ``i`` overlap the reconstruction of block ``i-1`` on another CUDA
  stream, ordered by events, at the cost of at most one more block graph alive. On CPU
  there is one execution stream, and the same program runs in its order.
* ``"auto"``: on CUDA, times both programs for a few backwards per segment and input
  shape and keeps the faster (``_AutoChoice``); elsewhere ``"reversible"``.
* ``"autograd"``: the same coupled computation with ordinary stored activations -- the
  reference the reversible backward must reproduce.

Recomputation must see exactly what the forward saw: dropout masks are replayed by
capturing the generator states (CPU and CUDA) before each branch in the forward and
restoring them around its recomputation -- the user's generators are put back afterwards,
never reseeded -- and the autocast state of the forward is re-entered in the backward.
Generator state is host-side (the CUDA generator's seed and offset are read at kernel
launch), so restoring it around launches on different streams from one host thread is
exact.
"""

from __future__ import annotations

import contextlib
import statistics
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from revcompile.passes.rewrite import BranchProgram, SegmentProgram
from revcompile.passes.schedule import (
    GRAD,
    RECOMPUTE,
    BackwardProgram,
    cotangent_value,
    grad_value,
    graph_value,
    schedule_backward,
    side_value,
    streams_value,
)
from revcompile.executor import run_program, stream_backend

__all__ = ["BACKWARD_MODES", "STREAM_PRECISIONS", "StreamArithmetic", "stream_dtype", "ReconstructionDrift", "RuntimeSettings", "ReversibleSegment", "bind_graph"]

BACKWARD_MODES = {
    "reversible": "reconstruct inputs from outputs in backward; activation memory independent of depth",
    "parallel": "reversible, with block i's gradients overlapping block i-1's reconstruction on a second "
    "CUDA stream (PaReprop); at most one more block graph alive; runs in program order on CPU",
    "auto": "on CUDA, time reversible and parallel for a few steps per segment and input shape and keep "
    "the faster; reversible elsewhere",
    "autograd": "the same coupled architecture with stored activations (the gradient reference)",
}

# How many streams each mode's backward program uses.
_PROGRAM_STREAMS = {"reversible": 1, "parallel": 2}


# How the two coupled streams are kept while the branches run (``convert(..., streams=)``).
STREAM_PRECISIONS = {
    "exact": "float64 on a fixed-point grid (2**-36): branch outputs are rounded onto it, so the "
    "stream additions are exact and so is reconstruction, at any depth and precision",
    "float32": "float32 when the model's stream is float16/bfloat16, else the model's precision",
    "model": "whatever precision the model computes the stream in",
}

# Fixed-point scale of "exact" streams. float64's 53-bit significand fixes range x resolution:
# 2**-36 resolves 1.5e-11 (finer than float32 above ~1e-4, so LayerScale-sized branch outputs
# survive) and stays exact while |x| < 2**17 = 131072 (LLM "massive activations" are ~1e4).
_GRID = 2.0**36


class _ToGrid(torch.autograd.Function):
    """Round onto the fixed-point grid in float64; the gradient passes straight through."""

    @staticmethod
    def forward(ctx, value: torch.Tensor) -> torch.Tensor:
        ctx.dtype = value.dtype
        # one float64 temporary, rounded in place (a Function's forward records no graph)
        grid = value.to(torch.float64, copy=True)
        return grid.mul_(_GRID).round_().div_(_GRID)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.to(ctx.dtype)


def stream_dtype(precision: str, model_dtype: torch.dtype) -> torch.dtype | None:
    """The dtype streams are kept in for ``precision``; None keeps the model's own."""
    if precision == "exact":
        return torch.float64
    if precision == "float32" and model_dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return None


class StreamArithmetic:
    """How a segment enters, updates, inverts and leaves its two streams.

    The branches always run in the model's own precision; only the streams' representation
    changes. ``add`` and ``subtract`` are inverses exactly for ``"exact"`` and up to
    rounding otherwise.
    """

    def __init__(self, precision: str, x: torch.Tensor):
        self.precision = precision
        self.model_dtype = x.dtype
        self.stream_dtype = stream_dtype(precision, x.dtype)

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        if self.precision == "exact":
            return _ToGrid.apply(x)
        return x if self.stream_dtype is None else x.to(self.stream_dtype)

    def branch_input(self, stream: torch.Tensor) -> torch.Tensor:
        return stream if self.stream_dtype is None else stream.to(self.model_dtype)

    def _on_stream(self, branch_output: torch.Tensor) -> torch.Tensor:
        return _ToGrid.apply(branch_output) if self.precision == "exact" else branch_output

    def add(self, stream: torch.Tensor, branch_output: torch.Tensor) -> torch.Tensor:
        return stream + self._on_stream(branch_output)

    def subtract(self, stream: torch.Tensor, branch_output: torch.Tensor) -> torch.Tensor:
        return stream - self._on_stream(branch_output.detach())

    def leave(self, fused: torch.Tensor) -> torch.Tensor:
        return fused.to(self.model_dtype)


@dataclass(frozen=True)
class ReconstructionDrift:
    """How far a reconstructed block input is from the one the forward computed."""

    segment: int
    block: str
    stream: str  # "X1" or "X2"
    max_abs_error: float
    relative_error: float  # max |reconstructed - stored| / max |stored|


@dataclass
class RuntimeSettings:
    """Mutable run-time switches shared by all segments of one converted model."""

    mode: str = "reversible"
    streams: str = "exact"
    check_reconstruction: bool = False
    # filled by the reconstruction check: (segment, block index) -> (X1 drift, X2 drift)
    drift: dict = field(default_factory=dict)


def bind_graph(graph: fx.Graph, root: nn.Module, class_name: str) -> fx.GraphModule:
    """An executable GraphModule whose attribute lookups go to ``root``'s live hierarchy.

    ``fx.GraphModule`` normally copies references to the attributes its graph uses into
    fresh container modules. Those copies go stale when ``root.to()`` replaces a buffer,
    so the bound module shares ``root``'s own attribute dictionaries instead: parameters,
    buffers and submodules are looked up in the model at call time.
    """
    gm = fx.GraphModule(root, graph, class_name)
    for table in ("_modules", "_parameters", "_buffers"):
        gm.__dict__[table] = root.__dict__[table]
    return gm


class _Branch:
    """A bound branch: its GraphModule and where its inputs and parameters come from."""

    def __init__(self, program: BranchProgram, root: nn.Module, parameter_index: dict[str, int]):
        self.name = program.name
        self.module = bind_graph(program.graph, root, program.name.replace(".", "_").replace(":", "_"))
        self.side_inputs = program.side_inputs
        self.parameters = tuple(parameter_index[p] for p in program.parameters)

    def __call__(self, stream: torch.Tensor, side: tuple) -> torch.Tensor:
        return self.module(stream, *(side[i] for i in self.side_inputs))


def _fuse(y1: torch.Tensor, y2: torch.Tensor, fusion: str) -> torch.Tensor:
    return (y1 + y2) / 2 if fusion == "mean" else y1 + y2


def _fuse_backward(grad: torch.Tensor, fusion: str) -> tuple[torch.Tensor, torch.Tensor]:
    if fusion == "mean":
        half = grad / 2
        return half, half
    return grad, grad


# --- reproducing the forward's randomness and autocast state -------------------------------


def _cuda_devices(tensors) -> tuple[int, ...]:
    return tuple(sorted({t.device.index or 0 for t in tensors if isinstance(t, torch.Tensor) and t.is_cuda}))


def _capture_rng(devices: tuple[int, ...]):
    return torch.get_rng_state(), tuple(torch.cuda.get_rng_state(d) for d in devices)


def _restore_rng(state, devices: tuple[int, ...]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    for device, device_state in zip(devices, cuda):
        torch.cuda.set_rng_state(device_state, device)


@contextmanager
def _replayed_rng(state, devices: tuple[int, ...]):
    """Run a block with the generators as they were in the forward, then put them back."""
    current = _capture_rng(devices)
    _restore_rng(state, devices)
    try:
        yield
    finally:
        _restore_rng(current, devices)


_AUTOCAST_DEVICES = ("cpu", "cuda")


def _autocast_state() -> dict:
    return {d: (torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in _AUTOCAST_DEVICES}


@contextmanager
def _autocast_as(state: dict):
    with ExitStack() as stack:
        for device, (enabled, dtype) in state.items():
            if device == "cuda" and not torch.cuda.is_available():
                continue
            stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled))
        yield


# --- the segment ----------------------------------------------------------------------------


class ReversibleSegment:
    """Executable form of one ``SegmentProgram``, bound to a model's parameters."""

    def __init__(self, program: SegmentProgram, root: nn.Module, settings: RuntimeSettings):
        self.program = program
        self.root = root
        self.settings = settings
        self.parameter_names = program.parameters
        index = {name: i for i, name in enumerate(self.parameter_names)}
        self.blocks = [(_Branch(b.f, root, index), _Branch(b.g, root, index)) for b in program.blocks]
        self.fusion = program.fusion
        self.__name__ = f"reversible_segment_{program.index}"
        self._programs: dict[int, BackwardProgram] = {}
        self.auto_choices: dict[tuple, _AutoChoice] = {}

    def backward_program(self, mode: str = "parallel") -> BackwardProgram:
        """The scheduled backward this segment runs in ``mode`` ("reversible" or "parallel")."""
        if mode not in _PROGRAM_STREAMS:
            raise ValueError(f"a backward program exists for {sorted(_PROGRAM_STREAMS)}, not {mode!r}")
        streams = _PROGRAM_STREAMS[mode]
        if streams not in self._programs:
            self._programs[streams] = schedule_backward(self.program, streams=streams)
        return self._programs[streams]

    def __repr__(self) -> str:
        return f"ReversibleSegment({self.program.name}, {len(self.blocks)} blocks, fusion={self.fusion!r})"

    def parameters(self) -> list[torch.Tensor]:
        """The parameters as they are now (looked up by name: they may have been replaced)."""
        return [self.root.get_parameter(name) for name in self.parameter_names]

    def arithmetic(self, x: torch.Tensor) -> StreamArithmetic:
        return StreamArithmetic(self.settings.streams, x)

    def run_blocks(self, x: torch.Tensor, side: tuple, rng_log: list | None = None, devices=(), inputs: list | None = None):
        """Forward through the coupled blocks: ``(Y1, Y2)`` of the last block."""
        arithmetic = self.arithmetic(x)
        x1 = x2 = arithmetic.enter(x)
        for f, g in self.blocks:
            if inputs is not None:
                inputs.append((x1, x2))
            if rng_log is not None:
                rng_log.append(_capture_rng(devices))
            y1 = arithmetic.add(x1, f(arithmetic.branch_input(x2), side))
            if rng_log is not None:
                rng_log.append(_capture_rng(devices))
            y2 = arithmetic.add(x2, g(arithmetic.branch_input(y1), side))
            x1, x2 = y1, y2
        return x1, x2

    def fuse(self, y1: torch.Tensor, y2: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self.arithmetic(like).leave(_fuse(y1, y2, self.fusion))

    @torch.compiler.disable
    def __call__(self, x: torch.Tensor, *side):
        # Kept out of torch.compile: a compiled forward would draw dropout masks with
        # inductor's generator, which the eager recompute in backward cannot replay.
        params = self.parameters()
        _refuse_sharded(self, params)
        needs_graph = torch.is_grad_enabled() and (
            x.requires_grad
            or any(p.requires_grad for p in params)
            or any(isinstance(s, torch.Tensor) and s.requires_grad for s in side)
        )
        if self.settings.mode == "autograd" or not needs_graph:
            return self.fuse(*self.run_blocks(x, side), x)
        return _ReversibleFunction.apply(self, x, len(side), *side, *params)


def _refuse_sharded(segment: "ReversibleSegment", params) -> None:
    """FSDP that shards a module inside a segment: its parameters arrive sharded, because the
    segment reads them directly instead of calling that module (so FSDP never gathers them)."""
    sharded = [n for n, p in zip(segment.parameter_names, params) if type(p).__name__ == "DTensor"]
    if sharded:
        raise RuntimeError(
            f"revcompile: {len(sharded)} parameters of {segment.__name__} ({sharded[0]}, ...) are sharded "
            "by FSDP. Reversible segments read their parameters directly, so shard the converted model "
            "as a whole -- fully_shard(converted) -- not modules inside it, or use DistributedDataParallel."
        )


# --- the math of the backward steps ---------------------------------------------------------------


def _rebuild(branch: _Branch, stream: torch.Tensor, side: tuple, arithmetic: StreamArithmetic):
    """Recompute ``branch(stream)`` with a graph from a fresh leaf: ``(leaf, output)``."""
    with torch.enable_grad():
        leaf = stream.detach().requires_grad_(True)
        return leaf, branch(arithmetic.branch_input(leaf), side)


def _record_drift(segment: "ReversibleSegment", i: int, rebuilt, stored) -> None:
    """The reconstruction check: compare rebuilt block inputs with the ones kept for it."""
    drifts = []
    for stream, got, want in zip(("X1", "X2"), rebuilt, stored):
        if not torch.isfinite(got).all():
            raise RuntimeError(
                f"revcompile: non-finite reconstruction of {stream} at the input of block "
                f"{segment.program.blocks[i].name} ({segment.__name__}): the forward overflowed or the "
                "reconstruction diverged. Keep the streams in float32 (convert(..., streams='float32')), "
                "lower the learning rate, or use set_backward(model, 'autograd') to compare."
            )
        error = float((got.double() - want.double()).abs().max())
        scale = float(want.double().abs().max())
        drifts.append(ReconstructionDrift(segment.program.index, segment.program.blocks[i].name, stream, error, error / scale if scale else error))
    segment.settings.drift[(segment.program.index, i)] = tuple(drifts)


def _pull(branch: _Branch, leaf, out, cotangent, params, side, side_leaves):
    """Pull ``cotangent`` back through a rebuilt branch graph (and free it).

    Returns the gradient for the branch input and (position, grad) pairs for the branch's
    parameters and differentiable side inputs.
    """
    if not out.requires_grad:  # branch independent of everything differentiable
        return None, [], []
    own_params = [(i, params[i]) for i in branch.parameters if params[i].requires_grad]
    own_side = [(i, side[i]) for i in branch.side_inputs if i in side_leaves]
    wrt = [leaf] + [p for _, p in own_params] + [s for _, s in own_side]
    grads = torch.autograd.grad(out, wrt, cotangent.to(out.dtype), allow_unused=True)
    k = 1 + len(own_params)
    return grads[0], list(zip((i for i, _ in own_params), grads[1:k])), list(zip((i for i, _ in own_side), grads[k:]))


class _StepMath:
    """What ``recompute i`` and ``grad i`` compute, one branch at a time (G, then F).

    The executor decides where and when each runs; values come and go through the
    program's environment under the names ``revcompile.passes.schedule`` gives them.
    """

    def __init__(self, segment: "ReversibleSegment", side: tuple, params, rng_log, devices, side_leaves, arithmetic, stored):
        self.segment, self.side, self.params = segment, side, params
        self.rng_log, self.devices, self.side_leaves = rng_log, devices, side_leaves
        self.arithmetic, self.stored = arithmetic, stored
        self.ops = {RECOMPUTE: self.recompute, GRAD: self.grad}

    def recompute(self, i: int, branch: str, values, scratch: dict) -> None:
        f, g = self.segment.blocks[i]
        y1, y2 = values[streams_value(i)]
        if branch == "g":
            with _replayed_rng(self.rng_log[2 * i + 1], self.devices):
                leaf, out = _rebuild(g, y1, self.side, self.arithmetic)
            values[graph_value(i)] = {"g": (leaf, out)}
            scratch["x2"] = self.arithmetic.subtract(y2, out)
        else:
            x2 = scratch.pop("x2")
            with _replayed_rng(self.rng_log[2 * i], self.devices):
                leaf, out = _rebuild(f, x2, self.side, self.arithmetic)
            values[graph_value(i)]["f"] = (leaf, out)
            values[streams_value(i - 1)] = (self.arithmetic.subtract(y1, out), x2)
            if self.stored is not None:
                _record_drift(self.segment, i, values[streams_value(i - 1)], self.stored[i])

    def grad(self, i: int, branch: str, values, scratch: dict) -> None:
        f, g = self.segment.blocks[i]
        rebuilt = values[graph_value(i)]
        if branch == "g":
            dy1, dy2 = values[cotangent_value(i)]
            d_y1, param_grads, side_grads = _pull(g, *rebuilt.pop("g"), dy2, self.params, self.side, self.side_leaves)
            scratch["dy"] = (dy1 if d_y1 is None else dy1 + d_y1, dy2)
        else:
            dy1, dy2 = scratch.pop("dy")
            d_x2, param_grads, side_grads = _pull(f, *rebuilt.pop("f"), dy1, self.params, self.side, self.side_leaves)
            values[cotangent_value(i - 1)] = (dy1, dy2 if d_x2 is None else dy2 + d_x2)
        names = self.segment.parameter_names
        self._accumulate(values, [(grad_value(names[k]), grad) for k, grad in param_grads])
        self._accumulate(values, [(grad_value(side_value(k)), grad) for k, grad in side_grads])

    @staticmethod
    def _accumulate(values, updates) -> None:
        for name, grad in updates:
            if grad is not None:
                total = values.get(name)
                values[name] = grad if total is None else total + grad


# --- choosing between the sequential and the parallel program -------------------------------------


class _AutoChoice:
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


def _backward_mode(ctx, segment: ReversibleSegment, y1: torch.Tensor):
    """The program mode for this backward, and a context that times it (``"auto"`` only)."""
    if ctx.mode != "auto":
        return ctx.mode, contextlib.nullcontext()
    if y1.device.type != "cuda":
        return "reversible", contextlib.nullcontext()
    key = (y1.device, tuple(y1.shape), y1.dtype, tuple(sorted(ctx.autocast.items())))
    choice = segment.auto_choices.setdefault(key, _AutoChoice())
    mode = choice.next_mode()
    return mode, choice.timed(mode)


class _ReversibleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, segment: ReversibleSegment, x: torch.Tensor, n_side: int, *rest):
        side, params = rest[:n_side], rest[n_side:]
        devices = _cuda_devices((x, *side))
        rng_log: list = []
        stored = [] if segment.settings.check_reconstruction else None  # debug: keep block inputs
        y1, y2 = segment.run_blocks(x, side, rng_log, devices, stored)
        out = segment.fuse(y1, y2, x)
        tensor_side = [i for i, s in enumerate(side) if isinstance(s, torch.Tensor)]
        ctx.save_for_backward(y1, y2, *(side[i] for i in tensor_side))
        ctx.segment = segment
        ctx.side_layout = (n_side, tensor_side, {i: s for i, s in enumerate(side) if i not in tensor_side})
        ctx.side_requires_grad = {i for i in tensor_side if side[i].requires_grad}
        ctx.params = params
        ctx.rng = (rng_log, devices)
        ctx.autocast = _autocast_state()
        ctx.mode = segment.settings.mode
        ctx.arithmetic = segment.arithmetic(x)
        ctx.input_dtype = x.dtype
        ctx.stored = stored
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "revcompile: double backward (create_graph=True) through a reversible segment is not "
                "supported: its backward recomputes instead of keeping a differentiable graph. For "
                "higher-order gradients use revcompile.set_backward(model, 'autograd')."
            )
        segment: ReversibleSegment = ctx.segment
        y1, y2, *saved_side = ctx.saved_tensors
        n_side, tensor_side, constants = ctx.side_layout
        side_list = [constants.get(i) for i in range(n_side)]
        for i, tensor in zip(tensor_side, saved_side):
            side_list[i] = tensor.detach().requires_grad_(True) if i in ctx.side_requires_grad else tensor
        side = tuple(side_list)
        rng_log, devices = ctx.rng
        depth = len(segment.blocks)
        cotangents = _fuse_backward(grad_out.to(y1.dtype), segment.fusion)
        env = {streams_value(depth - 1): (y1, y2), cotangent_value(depth - 1): cotangents}
        env.update({side_value(i): side[i] for i in tensor_side})
        math = _StepMath(segment, side, ctx.params, rng_log, devices, ctx.side_requires_grad, ctx.arithmetic, ctx.stored)
        mode, timing = _backward_mode(ctx, segment, y1)
        program = segment.backward_program(mode)
        with _autocast_as(ctx.autocast), timing:
            env = run_program(program, math.ops, env, stream_backend(y1.device, program.stream_count))
        dx1, dx2 = env[cotangent_value(-1)]
        param_grads = [env.get(grad_value(name)) for name in segment.parameter_names]
        side_grads = [env.get(grad_value(side_value(i))) for i in range(n_side)]
        return (None, (dx1 + dx2).to(ctx.input_dtype), None, *side_grads, *param_grads)

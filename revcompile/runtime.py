"""Running reversible segments: forward without a graph, backward by reconstruction.

A ``ReversibleSegment`` is what a ``reversible_segment_<i>`` call in a converted graph
executes. It couples the segment's blocks (``Y1 = X1 + F(X2)``, ``Y2 = X2 + G(Y1)``) and
runs in one of two backward modes:

* ``"reversible"``: one ``torch.autograd.Function`` for the whole segment. Its forward
  runs the blocks without recording a graph and saves only the final ``(Y1, Y2)`` and the
  side inputs. Its backward walks the blocks in reverse: it recomputes ``G(Y1)`` with a
  graph to push ``dY2`` through it, reconstructs ``X2 = Y2 - G(Y1)``, recomputes
  ``F(X2)`` to push ``dY1`` through it, reconstructs ``X1 = Y1 - F(X2)``, and so on. The
  parameter gradients are returned from the Function, so autograd accumulates each of
  them exactly once per backward (gradient accumulation and DDP hooks see one event).
* ``"autograd"``: the same coupled computation with ordinary stored activations -- the
  reference the reversible backward must reproduce.

Recomputation must see exactly what the forward saw: dropout masks are replayed by
capturing the generator states (CPU and CUDA) before each branch in the forward and
restoring them around its recomputation -- the user's generators are put back afterwards,
never reseeded -- and the autocast state of the forward is re-entered in the backward.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn
from torch.autograd.function import once_differentiable

from passes.rewrite import BranchProgram, SegmentProgram

__all__ = ["BACKWARD_MODES", "RuntimeSettings", "ReversibleSegment", "bind_graph"]

BACKWARD_MODES = {
    "reversible": "reconstruct inputs from outputs in backward; activation memory independent of depth",
    "autograd": "the same coupled architecture with stored activations (the gradient reference)",
}


@dataclass
class RuntimeSettings:
    """Mutable run-time switches shared by all segments of one converted model."""

    mode: str = "reversible"


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

    def __repr__(self) -> str:
        return f"ReversibleSegment({self.program.name}, {len(self.blocks)} blocks, fusion={self.fusion!r})"

    def parameters(self) -> list[torch.Tensor]:
        """The parameters as they are now (looked up by name: they may have been replaced)."""
        return [self.root.get_parameter(name) for name in self.parameter_names]

    def run_blocks(self, x: torch.Tensor, side: tuple, rng_log: list | None = None, devices=()):
        x1 = x2 = x
        for f, g in self.blocks:
            if rng_log is not None:
                rng_log.append(_capture_rng(devices))
            y1 = x1 + f(x2, side)
            if rng_log is not None:
                rng_log.append(_capture_rng(devices))
            y2 = x2 + g(y1, side)
            x1, x2 = y1, y2
        return x1, x2

    def __call__(self, x: torch.Tensor, *side):
        params = self.parameters()
        needs_graph = torch.is_grad_enabled() and (
            x.requires_grad
            or any(p.requires_grad for p in params)
            or any(isinstance(s, torch.Tensor) and s.requires_grad for s in side)
        )
        if self.settings.mode == "autograd" or not needs_graph:
            return _fuse(*self.run_blocks(x, side), self.fusion)
        return _ReversibleFunction.apply(self, x, len(side), *side, *params)


def _vjp(branch: _Branch, stream: torch.Tensor, side: tuple, cotangent: torch.Tensor, params, side_leaves):
    """Recompute ``branch(stream)`` with a graph and pull ``cotangent`` back through it.

    Returns the branch output (detached), the gradient for ``stream``, and the gradients
    for the branch's parameters and differentiable side inputs as (position, grad) pairs.
    """
    with torch.enable_grad():
        leaf = stream.detach().requires_grad_(True)
        out = branch(leaf, side)
    own_params = [(i, params[i]) for i in branch.parameters if params[i].requires_grad]
    own_side = [(i, side[i]) for i in branch.side_inputs if i in side_leaves]
    wrt = [leaf] + [p for _, p in own_params] + [s for _, s in own_side]
    if not out.requires_grad:  # branch independent of everything differentiable
        return out.detach(), None, [], []
    grads = torch.autograd.grad(out, wrt, cotangent, allow_unused=True)
    k = 1 + len(own_params)
    param_grads = [(i, g) for (i, _), g in zip(own_params, grads[1:k])]
    side_grads = [(i, g) for (i, _), g in zip(own_side, grads[k:])]
    return out.detach(), grads[0], param_grads, side_grads


def _accumulate(totals: list, updates) -> None:
    for i, grad in updates:
        if grad is not None:
            totals[i] = grad if totals[i] is None else totals[i] + grad


class _ReversibleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, segment: ReversibleSegment, x: torch.Tensor, n_side: int, *rest):
        side, params = rest[:n_side], rest[n_side:]
        devices = _cuda_devices((x, *side))
        rng_log: list = []
        y1, y2 = segment.run_blocks(x, side, rng_log, devices)
        out = _fuse(y1, y2, segment.fusion)
        tensor_side = [i for i, s in enumerate(side) if isinstance(s, torch.Tensor)]
        ctx.save_for_backward(y1, y2, *(side[i] for i in tensor_side))
        ctx.segment = segment
        ctx.side_layout = (n_side, tensor_side, {i: s for i, s in enumerate(side) if i not in tensor_side})
        ctx.side_requires_grad = {i for i in tensor_side if side[i].requires_grad}
        ctx.params = params
        ctx.rng = (rng_log, devices)
        ctx.autocast = _autocast_state()
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        segment: ReversibleSegment = ctx.segment
        y1, y2, *saved_side = ctx.saved_tensors
        n_side, tensor_side, constants = ctx.side_layout
        side_list = [constants.get(i) for i in range(n_side)]
        for i, tensor in zip(tensor_side, saved_side):
            side_list[i] = tensor.detach().requires_grad_(True) if i in ctx.side_requires_grad else tensor
        side = tuple(side_list)
        params = ctx.params
        rng_log, devices = ctx.rng
        param_grads: list = [None] * len(params)
        side_grads: list = [None] * n_side

        dy1, dy2 = _fuse_backward(grad_out, segment.fusion)
        with _autocast_as(ctx.autocast):
            for index in reversed(range(len(segment.blocks))):
                f, g = segment.blocks[index]
                with _replayed_rng(rng_log[2 * index + 1], devices):
                    g_out, d_y1, p_grads, s_grads = _vjp(g, y1, side, dy2, params, ctx.side_requires_grad)
                if d_y1 is not None:
                    dy1 = dy1 + d_y1
                _accumulate(param_grads, p_grads)
                _accumulate(side_grads, s_grads)
                x2 = y2 - g_out
                with _replayed_rng(rng_log[2 * index], devices):
                    f_out, d_x2, p_grads, s_grads = _vjp(f, x2, side, dy1, params, ctx.side_requires_grad)
                _accumulate(param_grads, p_grads)
                _accumulate(side_grads, s_grads)
                x1 = y1 - f_out
                dy2 = dy2 if d_x2 is None else dy2 + d_x2
                y1, y2 = x1, x2
        return (None, dy1 + dy2, None, *side_grads, *param_grads)

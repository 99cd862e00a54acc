"""The math of a segment's backward steps: rebuild a branch, invert a step, pull a cotangent.

A block is two coupling steps (its F, then its G). ``("recompute", i)`` walks block ``i``'s
steps backwards: it recomputes G from the stream G read, with a graph, inverts G's step
(``Coupling.invert``), then does the same for F, and leaves block ``i``'s input streams.
``("grad", i)`` pulls the cotangents back through the two rebuilt graphs
(``Coupling.gradient``), collecting the parameters' and side inputs' gradients. The
executor decides where and when each runs; values come and go through the program's
environment under the names ``revcompile.passes.schedule`` gives them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from revcompile.passes.couplings import Coupling, StreamArithmetic
from revcompile.passes.schedule import GRAD, RECOMPUTE, cotangent_value, grad_value, graph_value, saved_value, side_value, streams_value
from revcompile.runtime.replay import replayed_rng

__all__ = ["ReconstructionDrift", "StepMath"]


@dataclass(frozen=True)
class ReconstructionDrift:
    """How far a reconstructed block input is from the one the forward computed."""

    segment: int
    block: str
    stream: str  # one of the coupling's stream names
    max_abs_error: float
    relative_error: float  # max |reconstructed - stored| / max |stored|


def _rebuild(segment, branch, stream: torch.Tensor, side: tuple, arith: StreamArithmetic, params):
    """Recompute ``branch(stream)`` with a graph from a fresh leaf, on detached aliases of its
    parameters (``ReversibleSegment.detached_parameters``): ``(leaf, output, aliases)``."""
    with torch.enable_grad(), segment.detached_parameters(branch.parameters, params) as aliases:
        leaf = stream.detach().requires_grad_(True)
        return leaf, branch(arith.branch_input(leaf), side), aliases


def _pull(branch, rebuilt, cotangent, params, side, side_leaves):
    """Pull ``cotangent`` back through a rebuilt branch graph (and free it).

    Returns the gradient for the branch input and (position, grad) pairs for the branch's
    parameters (taken with respect to the aliases the branch was rebuilt on) and
    differentiable side inputs.
    """
    leaf, out, aliases = rebuilt
    if not out.requires_grad:  # branch independent of everything differentiable
        return None, [], []
    own_params = [(i, aliases.get(i, params[i])) for i in branch.parameters if params[i].requires_grad]
    own_side = [(i, side[i]) for i in branch.side_inputs if i in side_leaves]
    wrt = [leaf] + [p for _, p in own_params] + [s for _, s in own_side]
    grads = torch.autograd.grad(out, wrt, cotangent.to(out.dtype), allow_unused=True)
    k = 1 + len(own_params)
    return grads[0], list(zip((i for i, _ in own_params), grads[1:k])), list(zip((i for i, _ in own_side), grads[k:]))


class StepMath:
    """What ``recompute i`` and ``grad i`` compute for one backward of one segment."""

    def __init__(self, segment, coupling: Coupling, arith: StreamArithmetic, side: tuple, params, rng, side_leaves, stored,
                 exit_streams_owned: bool = False):
        self.segment, self.coupling, self.arith = segment, coupling, arith
        # The exit's streams are saved on its autograd node. A backward that frees the graph
        # may overwrite them (the last block's X2 goes over its Y2) instead of holding a third stream.
        self.exit_streams_owned = exit_streams_owned
        self.side, self.params, self.side_leaves, self.stored = side, params, side_leaves, stored
        self.rng_log, self.devices = rng
        self.ops = {RECOMPUTE: self.recompute, GRAD: self.grad}

    def recompute(self, i: int, branch: str, values, scratch: dict) -> None:
        """Rebuild one branch of block ``i``. G's inverse is taken only when F's recompute
        starts, after ``grad i``'s G (which runs between the two in the sequential program):
        G's gradient then runs with block ``i``'s input stream X2 not yet allocated."""
        step = 2 * i + (branch == "g")
        f, g = self.segment.blocks[i]
        residues = values[saved_value("residue", i)] if self.coupling.saves_per_step else (None, None)
        if branch == "g":
            cur, nxt = values.take(streams_value(i))
            with replayed_rng(self.rng_log[step], self.devices):
                rebuilt = _rebuild(self.segment, g, cur, self.side, self.arith, self.params)
            values[graph_value(i)] = {"g": rebuilt}
            scratch["g inverse"] = (cur, nxt, rebuilt[1].detach())
            return
        y1, y2, h_g = scratch.pop("g inverse")
        overwrite = self.exit_streams_owned and i == len(self.segment.blocks) - 1
        cur, nxt = self.coupling.invert(self.arith, y1, y2, h_g, residues[1], overwrite_next=overwrite), y1
        del y2, h_g  # dead: free them before F's graph is rebuilt
        with replayed_rng(self.rng_log[step], self.devices):
            rebuilt = _rebuild(self.segment, f, cur, self.side, self.arith, self.params)
        values[graph_value(i)]["f"] = rebuilt
        prev = self.coupling.invert(self.arith, cur, nxt, rebuilt[1].detach(), residues[0])
        values[streams_value(i - 1)] = (prev, cur)
        if self.stored is not None:
            self._record_drift(i, (prev, cur), self.stored[i])

    def grad(self, i: int, branch: str, values, scratch: dict) -> None:
        f, g = self.segment.blocks[i]
        d_cur, d_next = values.take(cotangent_value(i)) if branch == "g" else scratch.pop("d_between")
        rebuilt = values[graph_value(i)].pop(branch)
        pulled, param_grads, side_grads = _pull(g if branch == "g" else f, rebuilt, d_next, self.params, self.side, self.side_leaves)
        before = self.coupling.gradient(d_cur, d_next, pulled, pulled_owned=self.arith.casts_branch_input)
        if branch == "g":
            scratch["d_between"] = before
        else:
            values[cotangent_value(i - 1)] = before
        names = self.segment.parameter_names
        self._accumulate(values, [(grad_value(names[k]), grad) for k, grad in param_grads])
        self._accumulate(values, [(grad_value(side_value(k)), grad) for k, grad in side_grads])

    @staticmethod
    def _accumulate(values, updates) -> None:
        for name, grad in updates:
            if grad is not None:
                total = values.get(name)
                values[name] = grad if total is None else total + grad

    def _record_drift(self, i: int, rebuilt, stored) -> None:
        """The reconstruction check: compare rebuilt block inputs with the ones kept for it."""
        block = self.segment.program.blocks[i].name
        drifts = []
        for stream, got, want in zip(self.coupling.stream_names, rebuilt, stored):
            if not torch.isfinite(got).all():
                raise RuntimeError(
                    f"revcompile: non-finite reconstruction of {stream} at the input of block {block} "
                    f"({self.segment.__name__}): the forward overflowed or the reconstruction diverged. Keep the "
                    "streams exact (convert(..., streams='exact')), lower the learning rate, or use "
                    "set_backward(model, 'autograd') to compare."
                )
            error = float((got.double() - want.double()).abs().max())
            scale = float(want.double().abs().max())
            drifts.append(ReconstructionDrift(self.segment.program.index, block, stream, error, error / scale if scale else error))
        self.segment.settings.drift[(self.segment.program.index, i)] = tuple(drifts)

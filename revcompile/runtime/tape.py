"""A segment's backward run by the autograd engine block by block, releasing gradients as it goes.

Had a segment been one ``torch.autograd.Function`` taking all its parameters, autograd
would accumulate their gradients (``AccumulateGrad``: ``.grad``, tensor and
post-accumulate-grad hooks, DDP's reducer) only when the whole segment's backward is
done: DDP could start no all-reduce of the segment before that, and every gradient of
the segment would be held at once, a gradient-sized transient. So a segment is a chain
of autograd nodes instead, in forward order:

    _SegmentEntry(x, side...)            enters the coupling's streams; keeps nothing
    _BlockGate(block 0's parameters)     block 0's two steps without a graph; a zero-size token in and out
    ...
    _BlockGate(block n-1's parameters)   the exit: the last block, the segment's output; saves the streams

In backward the engine meets the gates last block first. Gate ``i`` runs the segment's
``BackwardProgram`` up to and including ``grad i`` and returns block ``i``'s parameter
gradients, which autograd accumulates -- hooks and all-reduce included -- before gate
``i-1`` starts. The entry's backward, last, returns the input's and side inputs'
gradients. The forward runs block ``i``'s steps in gate ``i`` so that a block sharded by
FSDP2 is gathered for exactly that node (``runtime.sharding``). The nodes of one forward
share a ``ReconstructionTape``: the forward in progress, then the backward's program run
and its environment. A backward that stops early (``torch.autograd.grad`` with respect to
a late block's parameters only) leaves the run unfinished; the tape drops it when the
engine's graph task ends.
"""

from __future__ import annotations

import contextlib

import torch

from revcompile.executor import ProgramRun, stream_backend
from revcompile.passes.couplings import StreamArithmetic
from revcompile.passes.schedule import GRAD, RECOMPUTE, cotangent_value, grad_value, saved_value, side_value, streams_value
from revcompile.runtime.auto import backward_mode
from revcompile.runtime.replay import autocast_as, autocast_state, capture_rng, cuda_devices
from revcompile.runtime.steps import StepMath

__all__ = ["ReconstructionTape", "reversible_call"]


class ReconstructionTape:
    """What the nodes of one segment call share: the forward's state, then one backward run."""

    def __init__(self, segment, params: list, side: tuple, sharding=None):
        self.segment, self.params, self.sharding = segment, params, sharding
        self.side_layout = (len(side), [i for i, s in enumerate(side) if isinstance(s, torch.Tensor)])
        self.constants = {i: s for i, s in enumerate(side) if i not in self.side_layout[1]}
        self.side_requires_grad = {i for i in self.side_layout[1] if side[i].requires_grad}
        self.walk: dict | None = None  # the forward in progress: streams, residues, branches, side inputs
        self.forward: dict = {}  # the forward's coupling, arithmetic, generator states, autocast, mode
        self.run = None  # the backward run in progress: a _Run

    def start(self, saved: tuple, grad_out: torch.Tensor) -> None:
        """A backward begins at the exit (also a second one, with ``retain_graph``)."""
        self.finish()
        self.run = _Run(self, saved, grad_out)
        torch.autograd.Variable._execution_engine.queue_callback(self.finish)

    def finish(self) -> None:
        """Drop the run: at the entry, or when the engine's graph task ends (a backward that stopped early)."""
        if self.run is not None:
            self.run.close()
        self.run = None


class _Run:
    """One backward through the segment: its program run, environment and step math."""

    def __init__(self, tape: ReconstructionTape, saved: tuple, grad_out: torch.Tensor):
        segment, forward = tape.segment, tape.forward
        prev, cur, *rest = saved
        n_tensor_side = len(tape.side_layout[1])
        residues = rest[n_tensor_side:]
        side = _side_inputs(tape, rest[:n_tensor_side])
        depth = len(segment.blocks)
        env = {streams_value(depth - 1): (prev, cur), cotangent_value(depth - 1): forward["coupling"].leave_gradient(grad_out.to(cur.dtype))}
        env.update({side_value(i): side[i] for i in tape.side_layout[1]})
        if residues:
            env.update({saved_value("residue", i): tuple(residues[2 * i:2 * i + 2]) for i in range(depth)})
        math = StepMath(segment, forward["coupling"], forward["arith"], side, tape.params, forward["rng"],
                        tape.side_requires_grad, forward["stored"], exit_streams_owned=not _graph_kept())
        mode, timing = backward_mode(forward["mode"], segment.auto_choices, cur, forward["autocast"])
        program = segment.backward_program(mode, forward["coupling"])
        self.autocast = forward["autocast"]
        self.timing = contextlib.ExitStack()
        self.timing.enter_context(timing)
        ops = _gathering_ops(math.ops, tape.sharding) if tape.sharding is not None else math.ops
        self.program_run = ProgramRun(program, ops, env, stream_backend(cur.device, program.stream_count))

    def through_block(self, i: int) -> dict:
        """Run up to and including ``grad i``; the environment after it."""
        with autocast_as(self.autocast):
            env = self.program_run.run_through((GRAD, i))
        if self.program_run.finished:
            self.timing.close()
        return env

    def close(self) -> None:
        self.timing.close()
        self.program_run = None


def _graph_kept() -> bool:
    """Whether the running backward keeps the graph (``retain_graph``); True where torch cannot say."""
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if keep_graph is None else bool(keep_graph())


def _gathering_ops(ops: dict, sharding) -> dict:
    """``ops`` with block ``i``'s FSDP2 modules gathered for its recompute. FSDP's own pre-backward
    hook gathers them when the gradient of block ``i``'s gate arrives; this covers a program
    that recomputes a block before that (``"parallel"``). FSDP's post-backward reshards."""
    recompute = ops[RECOMPUTE]

    def gathered_recompute(i, branch, values, scratch):
        if branch == "g":  # a block's recompute starts with G
            sharding.gather(i)
        recompute(i, branch, values, scratch)

    return {**ops, RECOMPUTE: gathered_recompute}


def _side_inputs(tape: ReconstructionTape, saved_side) -> tuple:
    """The forward's side inputs, differentiable ones as fresh leaves."""
    n_side, tensor_side = tape.side_layout
    side_list = [tape.constants.get(i) for i in range(n_side)]
    for i, tensor in zip(tensor_side, saved_side):
        side_list[i] = tensor.detach().requires_grad_(True) if i in tape.side_requires_grad else tensor
    return tuple(side_list)


def reversible_call(segment, x: torch.Tensor, side: tuple, params: list, sharding=None) -> torch.Tensor:
    """The segment's output, with the entry -> gates -> exit chain as its graph.

    With ``sharding`` (``runtime.sharding``), each sharded block's gate is called through its
    FSDP2 modules, whose own hooks gather the block for the gate's forward (the block's two
    steps) and again in backward, and reduce-scatter the gradients the gate returns for
    FSDP's unsharded parameters.
    """
    tape = ReconstructionTape(segment, list(params), side, sharding)
    token = _SegmentEntry.apply(tape, x, *side)
    for i in range(len(segment.blocks)):
        token = sharding.call_block(i, _gate, tape, i, token) if sharding is not None else _gate(tape, i, token)
    return token


def _gate(tape: ReconstructionTape, i: int, token: torch.Tensor) -> torch.Tensor:
    """Block ``i``'s gate, taking its parameters as they are registered now (FSDP's unsharded
    ones while its modules are gathered)."""
    positions = tape.segment.block_parameters[i]
    if tape.sharding is not None:
        live = tape.segment.parameters()
        for k in positions:
            tape.params[k] = live[k]
    return _BlockGate.apply(tape, i, token, *(tape.params[k] for k in positions))


class _SegmentEntry(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tape: ReconstructionTape, x: torch.Tensor, *side):
        segment = tape.segment
        coupling, arith = segment.settings.coupling, StreamArithmetic(segment.settings.streams, x.dtype)
        stored = [] if segment.settings.check_reconstruction else None  # debug: keep block inputs
        tape.forward = {"coupling": coupling, "arith": arith, "rng": ([], cuda_devices((x, *side))), "stored": stored,
                        "autocast": autocast_state(), "mode": segment.settings.mode, "input_dtype": x.dtype}
        tape.walk = {"streams": coupling.enter(arith, x), "residues": [], "branches": segment.branches(side), "side": side}
        ctx.tape = tape
        return x.new_empty(0)

    @staticmethod
    def backward(ctx, _token_grad):
        tape: ReconstructionTape = ctx.tape
        if tape.run is None or not tape.run.program_run.finished:
            raise RuntimeError(f"revcompile internal error: the input gradient of {tape.segment.__name__} was "
                               "asked for before block 0's gradient step ran")
        env = tape.run.program_run.env
        d_prev, d_cur = env[cotangent_value(-1)]
        side_grads = [env.get(grad_value(side_value(i))) for i in range(tape.side_layout[0])]
        tape.finish()
        return (None, (d_prev + d_cur).to(tape.forward["input_dtype"]), *side_grads)


class _BlockGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tape: ReconstructionTape, i: int, token: torch.Tensor, *params):
        ctx.tape, ctx.block = tape, i
        ctx.exit = i == len(tape.segment.blocks) - 1
        _forward_block(tape, i)
        if not ctx.exit:
            return token.new_empty(0)
        walk, coupling = tape.walk, tape.forward["coupling"]
        prev, cur = walk["streams"]
        kept = walk["residues"] if coupling.saves_per_step else []  # e.g. the dual coupling's packed remainder bits
        ctx.save_for_backward(prev, cur, *(walk["side"][k] for k in tape.side_layout[1]), *kept)
        tape.walk = None
        return coupling.leave(tape.forward["arith"], prev, cur)

    @staticmethod
    def backward(ctx, grad):
        _refuse_double_backward()
        tape: ReconstructionTape = ctx.tape
        if ctx.exit:
            tape.start(ctx.saved_tensors, grad)
            grad = grad.new_empty(0)
        if tape.run is None:  # gates are reached only through the exit, which starts a run
            raise RuntimeError(f"revcompile internal error: block {ctx.block}'s gradient step of "
                               f"{tape.segment.__name__} was reached with no backward of the segment in progress")
        env = tape.run.through_block(ctx.block)
        names = tape.segment.parameter_names
        grads = [env.pop(grad_value(names[k]), None) for k in tape.segment.block_parameters[ctx.block]]
        return (None, None, grad, *grads)


def _forward_block(tape: ReconstructionTape, i: int) -> None:
    """Block ``i``'s two coupling steps, without a graph, as ``Coupling.run`` takes them."""
    segment, forward, walk = tape.segment, tape.forward, tape.walk
    coupling, arith, (rng_log, devices), stored = forward["coupling"], forward["arith"], forward["rng"], forward["stored"]
    prev, cur = walk["streams"]
    if stored is not None:
        stored.append((prev, cur))
    for j in (2 * i, 2 * i + 1):
        rng_log.append(capture_rng(devices) if segment.draws_random[j] else None)
        nxt, residue = coupling.step(arith, prev, cur, walk["branches"][j](arith.branch_input(cur)), True)
        walk["residues"].append(residue)
        prev, cur = cur, nxt
    walk["streams"] = (prev, cur)


def _refuse_double_backward() -> None:
    if torch.is_grad_enabled():
        raise RuntimeError(
            "revcompile: double backward (create_graph=True) through a reversible segment is not "
            "supported: its backward recomputes instead of keeping a differentiable graph. For "
            "higher-order gradients use revcompile.set_backward(model, 'autograd')."
        )

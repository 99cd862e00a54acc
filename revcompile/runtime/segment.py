"""A reversible segment bound to a model: forward without a graph, backward by reconstruction.

A ``ReversibleSegment`` is what a ``reversible_segment_<i>`` call in a converted graph
executes. It runs its blocks' branches as the steps of the model's coupling
(``revcompile.passes.couplings``) in one of the ``BACKWARD_MODES``: reversibly, as a
chain of autograd nodes (``runtime.tape``) whose forward keeps only the final streams,
the side inputs and the coupling's per-step residues, and whose backward runs the
segment's ``BackwardProgram`` (``revcompile.passes.schedule``) with the math of
``runtime.steps`` one block per node -- so autograd accumulates each block's parameter
gradients, exactly once per backward with hooks and DDP's all-reduce, as soon as that
block's step is done; or, in ``"autograd"``, the same coupled computation with stored
activations -- the reference the reversible backward must reproduce. Blocks sharded by
FSDP2 (``fully_shard(block)``) run each as a forward of their FSDP modules
(``runtime.sharding``), so FSDP gathers, reshards and reduce-scatters them block by block.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from revcompile.passes.couplings import Coupling, RevViT, StreamArithmetic
from revcompile.passes.rewrite import BranchProgram, SegmentProgram
from revcompile.passes.schedule import BackwardProgram, schedule_backward
from revcompile.runtime.sharding import BlockSharding
from revcompile.runtime.tape import reversible_call

__all__ = ["BACKWARD_MODES", "RuntimeSettings", "ReversibleSegment", "bind_graph"]

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


@dataclass
class RuntimeSettings:
    """Mutable run-time switches shared by all segments of one converted model."""

    mode: str = "reversible"
    streams: str = "exact"
    coupling: Coupling = field(default_factory=RevViT)
    check_reconstruction: bool = False
    # filled by the reconstruction check: (segment, block index) -> drift of each stream
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


class ReversibleSegment:
    """Executable form of one ``SegmentProgram``, bound to a model's parameters."""

    def __init__(self, program: SegmentProgram, root: nn.Module, settings: RuntimeSettings):
        self.program = program
        self.root = root
        self.settings = settings
        self.parameter_names = program.parameters
        index = {name: i for i, name in enumerate(self.parameter_names)}
        self.blocks = [(_Branch(b.f, root, index), _Branch(b.g, root, index)) for b in program.blocks]
        # each block's parameters (positions in parameter_names): what its gate releases in backward
        self.block_parameters = [tuple(dict.fromkeys(f.parameters + g.parameters)) for f, g in self.blocks]
        self._parameter_paths = [(tuple(n.split(".")[:-1]), n.rsplit(".", 1)[-1]) for n in self.parameter_names]
        # per step (block 0's F, its G, ...): whether its recompute must replay generator state
        self.draws_random = tuple(branch.draws_random for b in program.blocks for branch in (b.f, b.g))
        self.__name__ = f"reversible_segment_{program.index}"
        self._programs: dict[tuple, BackwardProgram] = {}
        self.auto_choices: dict[tuple, object] = {}

    def backward_program(self, mode: str = "parallel", coupling: Coupling | None = None) -> BackwardProgram:
        """The scheduled backward this segment runs in ``mode`` ("reversible" or "parallel")."""
        if mode not in _PROGRAM_STREAMS:
            raise ValueError(f"a backward program exists for {sorted(_PROGRAM_STREAMS)}, not {mode!r}")
        coupling = coupling or self.settings.coupling
        key = (_PROGRAM_STREAMS[mode], coupling.saves_per_step)
        if key not in self._programs:
            self._programs[key] = schedule_backward(self.program, streams=key[0], coupling=coupling)
        return self._programs[key]

    def __repr__(self) -> str:
        return f"ReversibleSegment({self.program.name}, {len(self.blocks)} blocks, {self.settings.coupling.label()})"

    def parameters(self) -> list[torch.Tensor]:
        """The parameters as they are now (looked up by name: they may have been replaced).

        Each call walks the model's own module and parameter tables along paths split once
        (``get_parameter`` costs ~25 us a name, milliseconds per step for a ViT-S segment).
        """
        try:
            return [_walk(self.root, path)._parameters[leaf] for path, leaf in self._parameter_paths]
        except (KeyError, AttributeError):  # a parametrized or otherwise unusual module: the slow lookup
            return [self.root.get_parameter(name) for name in self.parameter_names]

    @contextlib.contextmanager
    def detached_parameters(self, positions: tuple[int, ...], params: list):
        """The module tables hold detached aliases of these parameters inside the block.

        A branch rebuilt in backward reads its parameters from the model; were they the
        parameters themselves, the rebuild's ``torch.autograd.grad`` would run their tensor
        hooks (``p.register_hook``) on the block's contribution, and autograd would run them
        again on the gradient the block's gate hands it. Rebuilt on aliases (same storage, no
        hooks, no graph history), the gradients are taken with respect to the aliases and
        reach the parameters once, through the gate. Yields ``{position: alias}``; a
        parameter the tables do not hold under its name (a parametrization) is left as it is.
        """
        swapped, aliases = [], {}
        try:
            for k in positions:
                param = params[k]
                if not param.requires_grad or k in aliases:
                    continue
                path, leaf = self._parameter_paths[k]
                try:
                    table = _walk(self.root, path)._parameters
                except (KeyError, AttributeError):
                    continue
                if table.get(leaf) is not param:
                    continue
                aliases[k] = table[leaf] = param.detach().requires_grad_(True)
                swapped.append((table, leaf, param))
            yield aliases
        finally:
            for table, leaf, param in reversed(swapped):
                table[leaf] = param

    def branches(self, side: tuple) -> list:
        """The branches in step order (block 0's F, its G, ...), as ``stream -> output``."""
        return [lambda s, b=branch: b(s, side) for block in self.blocks for branch in block]

    @torch.compiler.disable
    def __call__(self, x: torch.Tensor, *side):
        # Kept out of torch.compile: a compiled forward would draw dropout masks with
        # inductor's generator, which the eager recompute in backward cannot replay.
        params = self.parameters()
        sharding = BlockSharding.find(self, params)
        needs_graph = torch.is_grad_enabled() and (
            x.requires_grad
            or any(p.requires_grad for p in params)
            or any(isinstance(s, torch.Tensor) and s.requires_grad for s in side)
        )
        if self.settings.mode == "autograd" or not needs_graph:
            return self._run_stored(x, side, sharding)
        return reversible_call(self, x, side, params, sharding)

    def _run_stored(self, x: torch.Tensor, side: tuple, sharding: BlockSharding | None):
        """The coupled forward with ordinary autograd (or none). Sharded blocks run each as a
        forward of their FSDP2 modules, so that FSDP's hooks gather, reshard and reduce-scatter
        as for any module."""
        coupling, arith = self.settings.coupling, StreamArithmetic(self.settings.streams, x.dtype)
        if sharding is None:
            prev, cur, _ = coupling.run(arith, x, self.branches(side), keep_residues=False)
            return coupling.leave(arith, prev, cur)
        branches = self.branches(side)

        def block(i: int, prev, cur):
            for j in (2 * i, 2 * i + 1):
                prev, cur = cur, coupling.step(arith, prev, cur, branches[j](arith.branch_input(cur)), False)[0]
            return prev, cur

        prev, cur = coupling.enter(arith, x)
        for i in range(len(self.blocks)):
            prev, cur = sharding.call_block(i, block, i, prev, cur)
        return coupling.leave(arith, prev, cur)


def _walk(module: nn.Module, path: tuple[str, ...]) -> nn.Module:
    for name in path:
        module = module._modules[name]
    return module

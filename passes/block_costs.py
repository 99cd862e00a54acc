"""What each detected block costs to store, checkpoint or couple: the memory planner's inputs.

Measured, not tabulated: the traced graph is interpreted on fake tensors (shapes only, as
``revcompile.passes.memory`` does) with autograd's ``saved_tensors_hooks`` attributing every
saved storage to the node that saved it first, and ``torch.utils.flop_counter`` counting
each node's forward FLOPs. A block's numbers are the sums over the nodes it takes over
(``Block.replaces``); what a reversible step keeps follows from the model's coupling
(``revcompile.passes.couplings``) and the streams' precision. The same interpretation
prices the graph between blocks (``revcompile.passes.gap_costs``): ``measure_plan_costs``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils import _pytree as pytree
from torch.utils.flop_counter import FlopCounterMode

from revcompile.passes.checkpoint import region_problem
from revcompile.passes.couplings import Coupling, stream_dtype
from revcompile.passes.gap_costs import gap_costs
from revcompile.passes.memory import _SavedLedger, _SavedTensorInterpreter
from revcompile.passes.plan import Block
from revcompile.passes.recompute import BlockCost, GapCost

__all__ = ["measure_block_costs", "measure_plan_costs"]


class _CostInterpreter(_SavedTensorInterpreter):
    """Also counts each node's FLOPs and keeps the shapes of the values the blocks read."""

    def __init__(self, gm: fx.GraphModule, ledger: _SavedLedger, counter: FlopCounterMode, wanted: set[str]):
        super().__init__(gm, ledger, {})
        self.counter = counter
        self.flops: dict[str, int] = {}
        self.values: dict[str, tuple[int, torch.dtype]] = {}
        self.storage: dict[str, int] = {}  # node -> storage bytes of the tensors its value holds
        self.wanted = wanted

    def run_node(self, node: fx.Node):
        before = self.counter.get_total_flops()
        value = super().run_node(node)
        self.flops[node.name] = self.counter.get_total_flops() - before
        if node.name in self.wanted and isinstance(value, torch.Tensor):
            self.values[node.name] = (value.numel(), value.dtype)
        storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes()
                    for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)}
        self.storage[node.name] = sum(storages.values())
        return value


def _interpret(root: nn.Module, gm: fx.GraphModule, inputs: Sequence, wanted: set[str]) -> _CostInterpreter:
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    parameters = {name: mode.from_tensor(p) for name, p in root.named_parameters(remove_duplicate=False)}
    buffers = {name: mode.from_tensor(b) for name, b in root.named_buffers(remove_duplicate=False)}
    # parameters and buffers exist before the step: saving them costs nothing
    ledger = _SavedLedger({t.untyped_storage()._cdata for t in (*parameters.values(), *buffers.values())})
    devices = sorted({t.device.index or 0 for t in inputs if isinstance(t, torch.Tensor) and t.is_cuda})
    counter = FlopCounterMode(display=False)
    with torch.random.fork_rng(devices=devices), mode, _reparametrize_module(root, {**parameters, **buffers}):
        fake_inputs = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in inputs]
        interpreter = _CostInterpreter(gm, ledger, counter, wanted)
        with counter, torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(ledger.pack, lambda t: t):
            interpreter.run(*fake_inputs)
    return interpreter


def measure_block_costs(
    root: nn.Module, traced: fx.Graph, blocks: Sequence[Block], inputs: Sequence, coupling: Coupling, streams: str
) -> tuple[BlockCost, ...]:
    """The ``BlockCost`` of each of ``blocks`` (in program order) of the ``traced`` graph.

    ``root`` holds the parameters the graph names; ``inputs`` are its placeholder values.
    """
    return measure_plan_costs(root, traced, blocks, inputs, coupling, streams, gaps=False)[0]


def measure_plan_costs(root: nn.Module, traced: fx.Graph, blocks: Sequence[Block], inputs: Sequence, coupling: Coupling,
                       streams: str, gaps: bool = True) -> tuple[tuple[BlockCost, ...], tuple[GapCost, ...]]:
    """The blocks' costs and (``gaps``) the graph between them with its options, from one interpretation."""
    gm = fx.GraphModule(root, traced)
    interpreter = _interpret(root, gm, inputs, {b.input for b in blocks})
    saved_by_node = interpreter.ledger.by_owner()
    costs = []
    for index, block in enumerate(blocks):
        numel, dtype = interpreter.values[block.input]
        stream = stream_dtype(streams, dtype) or dtype
        previous = blocks[index - 1] if index else None
        joins = previous is not None and block.input == previous.output
        costs.append(
            BlockCost(
                name=block.name,
                saved=sum(saved_by_node.get(n, 0) for n in block.replaces),
                input=numel * dtype.itemsize,
                forward=float(sum(interpreter.flops.get(n, 0) for n in block.replaces)),
                residue=coupling.residue_bytes(numel) * 2,  # two coupled steps per block: F and G
                stream_pair=2 * numel * stream.itemsize,
                joins_previous=joins and region_problem(gm, (previous, block)) is None,
                checkpointable=region_problem(gm, (block,)) is None,
            )
        )
    if not gaps:
        return tuple(costs), ()
    return tuple(costs), gap_costs(traced, tuple(blocks), saved_by_node, interpreter.flops, interpreter.storage)

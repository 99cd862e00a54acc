"""Replace each detected segment of a graph by one call to a reversible segment.

For every ``Segment`` of a ``Plan`` the pass

1. extracts the attention branch ``F`` and MLP branch ``G`` of each block into graphs of
   their own, with placeholders ``(stream, *side_inputs)``; parameters stay ``get_attr``
   / ``call_module`` references by qualified name, so the branches run on the model's
   own parameter objects, never on copies;
2. inserts one node ``reversible_segment_<i>(segment_input, *side_inputs)`` where the
   segment's output was, and removes the blocks' nodes.

The inserted call's target is a ``SegmentCall`` marker: the graph stays a pure compile
artifact that can be printed, drawn and bound to a module later. Binding (in
``revcompile.runtime``) swaps each marker for an executable segment.

What the segment computes with its branches -- the coupling -- is not decided here: the
rewritten graph is the same for every coupling in ``revcompile.passes.couplings``, which
the runtime applies to the branch programs.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass
from typing import ClassVar

import torch.fx as fx

from revcompile.passes.graph_module import graph_module
from revcompile.passes.graph_view import shape_key
from revcompile.passes.plan import Branch, Plan, Segment
from revcompile.passes.randomness import branch_draws_random

__all__ = ["UnboundCall", "SegmentCall", "BranchProgram", "BlockProgram", "SegmentProgram", "RewriteResult", "rewrite_reversible"]

@dataclass(frozen=True)
class UnboundCall:
    """A graph-call marker: a compile artifact that runtime binding replaces with what it names.

    Subclasses say what they stand for in ``kind``; the call node is named ``<kind>_<index>``.
    """

    index: int
    kind: ClassVar[str] = "unbound_call"

    @property
    def __name__(self) -> str:  # fx names the call after its target
        return f"{self.kind}_{self.index}"

    def __call__(self, *args):
        raise RuntimeError(
            f"{self.__name__} is an unbound compile artifact; run the module returned by revcompile.convert"
        )


@dataclass(frozen=True)
class SegmentCall(UnboundCall):
    """Graph-call marker for reversible segment ``index``."""

    kind: ClassVar[str] = "reversible_segment"


@dataclass(frozen=True)
class BranchProgram:
    """One branch as a standalone graph: ``(stream, *side_inputs) -> branch output``."""

    name: str
    kind: str
    graph: fx.Graph
    side_inputs: tuple[int, ...]  # positions in the segment's side inputs
    parameters: tuple[str, ...]
    modules: tuple[str, ...]
    draws_random: bool = True  # whether its recompute must replay generator state (passes.randomness)


@dataclass(frozen=True)
class BlockProgram:
    name: str
    f: BranchProgram
    g: BranchProgram


@dataclass(frozen=True)
class SegmentProgram:
    index: int
    name: str
    blocks: tuple[BlockProgram, ...]
    side_inputs: tuple[str, ...]

    @property
    def parameters(self) -> tuple[str, ...]:
        names = (p for b in self.blocks for br in (b.f, b.g) for p in br.parameters)
        return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class RewriteResult:
    graph_module: fx.GraphModule
    segments: tuple[SegmentProgram, ...]
    renamed: tuple[tuple[str, str], ...] = ()  # (segment output, the node that now stands for it)

    @property
    def modified(self) -> bool:
        return bool(self.segments)


def _extract_branch(nodes: dict[str, fx.Node], branch: Branch, side_inputs: tuple[str, ...], name: str, layout,
                    root: fx.GraphModule) -> BranchProgram:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    entry = nodes[branch.entry]
    env[entry] = graph.placeholder(entry.name)
    env[entry].meta = dict(entry.meta)
    for side in branch.side_inputs:
        env[nodes[side]] = graph.placeholder(side)
        env[nodes[side]].meta = dict(nodes[side].meta)

    def lookup(arg: fx.Node) -> fx.Node:
        if arg not in env:  # a parameter/buffer reference: copy it in, it resolves by name
            assert arg.op == "get_attr", f"{arg.name} is neither in the branch nor a side input"
            env[arg] = graph.get_attr(arg.target)
            env[arg].meta = dict(arg.meta)
        return env[arg]

    for node_name in branch.nodes:
        node = nodes[node_name]
        env[node] = graph.node_copy(node, lookup)
    outputs = [env[nodes[o]] for o in branch.outputs]
    value = outputs[0]
    for other in outputs[1:]:  # a decoder block's F: self- plus cross-attention
        value = graph.call_function(operator.add, (value, other))
    if shape_key(nodes[branch.outputs[0]]) != layout:
        # the branch ran in another layout (timm Swin's MLP on (B, H*W, C)): back to the stream's
        value = graph.call_method("reshape_as", (value, env[entry]))
    graph.output(value)
    graph.lint()
    return BranchProgram(
        name=name,
        kind=branch.kind,
        graph=graph,
        side_inputs=tuple(side_inputs.index(s) for s in branch.side_inputs),
        parameters=branch.parameters,
        modules=branch.modules,
        draws_random=branch_draws_random(graph, root),
    )


def _segment_program(nodes: dict[str, fx.Node], segment: Segment, root: fx.GraphModule) -> SegmentProgram:
    layout = shape_key(nodes[segment.input])
    blocks = tuple(
        BlockProgram(
            name=block.name,
            f=_extract_branch(nodes, block.f, segment.side_inputs, f"{block.name}:F", layout, root),
            g=_extract_branch(nodes, block.g, segment.side_inputs, f"{block.name}:G", layout, root),
        )
        for block in segment.blocks
    )
    return SegmentProgram(segment.index, segment.name, blocks, segment.side_inputs)


def _segment_nodes(nodes: dict[str, fx.Node], segment: Segment) -> list[fx.Node]:
    return [nodes[n] for block in segment.blocks for n in block.replaces]


def rewrite_reversible(gm: fx.GraphModule, plan: Plan) -> RewriteResult:
    """A copy of ``gm`` in which each segment of ``plan`` is one ``SegmentCall``; ``gm`` is left as it was."""
    gm = graph_module(gm, copy.deepcopy(gm.graph), type(gm).__name__)
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    order = {n: i for i, n in enumerate(graph.nodes)}
    # Extract every program before touching the graph: a segment's input may be the
    # output of the segment before it, which the rewrite replaces.
    programs = [_segment_program(nodes, segment, gm) for segment in plan.segments]
    replaced: dict[fx.Node, fx.Node] = {}
    for segment in plan.segments:
        output = nodes[segment.output]
        inputs = [nodes[segment.input], *(nodes[s] for s in segment.side_inputs)]
        with graph.inserting_before(output):
            call = graph.call_function(SegmentCall(segment.index), tuple(replaced.get(n, n) for n in inputs))
        call.meta = {k: v for k, v in output.meta.items() if k in ("val", "tensor_meta", "nn_module_stack")}
        call.meta["revcompile_segment"] = segment.index
        result = call
        if segment.output_layout is not None:
            # put the output back in the layout its readers were traced with
            reshape = nodes[segment.output_layout]
            with graph.inserting_after(call):
                result = graph.node_copy(reshape, lambda a: call if a is reshape.args[0] else replaced.get(a, a))
            result.meta = {k: v for k, v in output.meta.items() if k in ("val", "tensor_meta")}
        output.replace_all_uses_with(result)
        replaced[output] = result
        for node in sorted(_segment_nodes(nodes, segment), key=order.__getitem__, reverse=True):
            graph.erase_node(node)
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return RewriteResult(gm, tuple(programs), tuple((old.name, new.name) for old, new in replaced.items()))

"""Replace runs of blocks that stay un-coupled by one checkpointed call each.

A memory plan (``revcompile.planner``) keeps some blocks as the original computes them but
recomputes them in backward instead of storing their activations -- activation
checkpointing, the third choice beside "stored" and "reversible". For each such run of
consecutive blocks the pass

1. extracts the run's nodes (every node its blocks take over, ``Block.replaces``) into a
   graph of its own, ``(run input, *values it reads from outside) -> run output``;
   parameters stay ``get_attr``/``call_module`` references by qualified name;
2. inserts one node ``checkpointed_region_<i>(...)`` where the run's output was.

The inserted call's target is a ``CheckpointCall`` marker, bound at run time to
``torch.utils.checkpoint`` around the region (``revcompile.runtime.checkpointed``).
A run can be checkpointed only when nothing outside it reads a value from inside it
other than its output: ``checkpointable_runs`` says which runs qualify.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch.fx as fx

from revcompile.passes.plan import Block
from revcompile.passes.rewrite import UnboundCall

__all__ = ["CheckpointCall", "RegionProgram", "CheckpointRewrite", "region_problem", "rewrite_checkpointed"]


@dataclass(frozen=True)
class CheckpointCall(UnboundCall):
    """Graph-call marker for checkpointed region ``index``."""

    kind: ClassVar[str] = "checkpointed_region"


@dataclass(frozen=True)
class RegionProgram:
    """One checkpointed run of blocks as a standalone graph: ``(*inputs) -> output``."""

    index: int
    blocks: tuple[str, ...]
    graph: fx.Graph
    inputs: tuple[str, ...]  # names of the outer values it reads, in placeholder order


@dataclass(frozen=True)
class CheckpointRewrite:
    graph_module: fx.GraphModule
    regions: tuple[RegionProgram, ...]


def _region_nodes(nodes: dict[str, fx.Node], blocks: tuple[Block, ...]) -> list[fx.Node]:
    order = {n: i for i, n in enumerate(next(iter(nodes.values())).graph.nodes)}
    names = {n for block in blocks for n in block.replaces}
    return sorted((nodes[n] for n in names if n in nodes), key=order.__getitem__)


def region_problem(gm: fx.GraphModule, blocks: tuple[Block, ...]) -> str | None:
    """Why this run of blocks cannot be one checkpointed region, or None if it can."""
    nodes = {n.name: n for n in gm.graph.nodes}
    if blocks[-1].output not in nodes:
        return f"{blocks[-1].name}'s output was rewritten"
    for earlier, later in zip(blocks, blocks[1:]):
        if later.input != earlier.output:
            return f"{later.name} does not read {earlier.name}'s output directly"
    inside = set(_region_nodes(nodes, blocks))
    output = nodes[blocks[-1].output]
    for node in inside:
        if node is not output and any(user not in inside for user in node.users):
            return f"{node.name} inside {blocks[0].name} is read outside it"
    return None


def _extract(nodes: dict[str, fx.Node], index: int, blocks: tuple[Block, ...], entry: fx.Node) -> RegionProgram:
    region = _region_nodes(nodes, blocks)
    inside = set(region)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    inputs: list[str] = []

    def lookup(arg: fx.Node) -> fx.Node:
        if arg not in env:
            if arg.op == "get_attr":  # a parameter or buffer: resolves by name in the model
                env[arg] = graph.get_attr(arg.target)
            else:
                env[arg] = graph.placeholder(arg.name)
                inputs.append(arg.name)
            env[arg].meta = dict(arg.meta)
        return env[arg]

    lookup(entry)  # the run's input is always the first placeholder
    for node in region:
        env[node] = graph.node_copy(node, lookup)
        assert all(a in inside or a in env for a in node.all_input_nodes)
    graph.output(env[nodes[blocks[-1].output]])
    graph.lint()
    return RegionProgram(index, tuple(b.name for b in blocks), graph, tuple(inputs))


def rewrite_checkpointed(gm: fx.GraphModule, runs: tuple[tuple[Block, ...], ...], renamed=()) -> CheckpointRewrite:
    """A copy of ``gm`` in which each run of blocks in ``runs`` is one ``CheckpointCall``.

    ``renamed``: (name, new name) pairs of values an earlier rewrite replaced (a reversible
    segment's output, which a checkpointed run may read). Raises ``ValueError`` for a run
    ``region_problem`` rejects (the planner asks first).
    """
    renamed = dict(renamed)
    gm = fx.GraphModule(gm, copy.deepcopy(gm.graph), gm.__class__.__name__)
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    order = {n: i for i, n in enumerate(graph.nodes)}
    programs = []
    for index, blocks in enumerate(runs):
        problem = region_problem(gm, blocks)
        if problem:
            raise ValueError(f"cannot checkpoint {blocks[0].name} .. {blocks[-1].name}: {problem}")
        entry = nodes[renamed.get(blocks[0].input, blocks[0].input)]
        programs.append(_extract(nodes, index, blocks, entry))
    replaced: dict[fx.Node, fx.Node] = {}  # a run's output -> its call, which a later run may read
    for program, blocks in zip(programs, runs):
        output = nodes[blocks[-1].output]
        inputs = tuple(replaced.get(nodes[n], nodes[n]) for n in program.inputs)
        with graph.inserting_before(output):
            call = graph.call_function(CheckpointCall(program.index), inputs)
        call.meta = {k: v for k, v in output.meta.items() if k in ("val", "tensor_meta", "nn_module_stack")}
        output.replace_all_uses_with(call)
        replaced[output] = call
        for node in sorted(_region_nodes(nodes, blocks), key=order.__getitem__, reverse=True):
            graph.erase_node(node)
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return CheckpointRewrite(gm, tuple(programs))

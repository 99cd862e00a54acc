"""Cut sets of graph nodes out into checkpointed calls: runs of blocks, and parts of the regions between them.

A memory plan (``revcompile.planner``) keeps some blocks as the original computes them but
recomputes them in backward instead of storing their activations -- activation
checkpointing, the third choice beside "stored" and "reversible" -- and may do the same for
parts of the graph between blocks (the stem, a stage transition, the head:
``revcompile.passes.lower_sets`` picks them). For each such set of nodes (a ``Cut``: a run
of consecutive blocks, ``block_run``, or any single-output set, ``node_cut``) the pass

1. extracts the nodes into a graph of its own, ``(*values it reads from outside) -> output``
   (a block run's input first); parameters stay ``get_attr``/``call_module`` references by
   qualified name;
2. inserts one node ``checkpointed_region_<i>(...)`` where the cut's output was.

The inserted call's target is a ``CheckpointCall`` marker, bound at run time to
``torch.utils.checkpoint`` around the region (``revcompile.runtime.checkpointed``).
A set can be cut only when nothing outside it reads a value from inside it other than its
output: ``region_problem`` and ``cut_problem`` say which qualify.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch.fx as fx

from revcompile.passes.plan import Block
from revcompile.passes.rewrite import UnboundCall

__all__ = ["CheckpointCall", "RegionProgram", "Cut", "block_run", "node_cut", "CheckpointRewrite", "region_problem",
           "cut_problem", "rewrite_checkpointed"]


@dataclass(frozen=True)
class CheckpointCall(UnboundCall):
    """Graph-call marker for checkpointed region ``index``."""

    kind: ClassVar[str] = "checkpointed_region"


@dataclass(frozen=True)
class RegionProgram:
    """One checkpointed run of blocks, or set of nodes between blocks, as a standalone graph: ``(*inputs) -> output``."""

    index: int
    blocks: tuple[str, ...]  # the blocks it holds (none for a cut between blocks)
    graph: fx.Graph
    inputs: tuple[str, ...]  # names of the outer values it reads, in placeholder order
    nodes: tuple[str, ...] = ()  # the traced graph's nodes it holds


@dataclass(frozen=True)
class Cut:
    """What to cut out: ``nodes`` of the traced graph, read outside only through ``output``."""

    nodes: tuple[str, ...]
    output: str
    entry: str | None = None  # the value passed first (a block run's input); others follow in graph order
    blocks: tuple[str, ...] = ()


def block_run(blocks: tuple[Block, ...]) -> Cut:
    """A run of consecutive blocks: every node they take over, entered through the first one's input."""
    nodes = tuple(dict.fromkeys(n for block in blocks for n in block.replaces))
    return Cut(nodes, blocks[-1].output, blocks[0].input, tuple(b.name for b in blocks))


def node_cut(gm: fx.GraphModule, nodes) -> Cut:
    """A set of nodes with one value read outside it (raises ``ValueError`` naming the problem otherwise)."""
    inside = set(nodes)
    read_outside = [n.name for n in gm.graph.nodes if n.name in inside and any(u.name not in inside for u in n.users)]
    if len(read_outside) != 1:
        raise ValueError(f"cannot checkpoint {sorted(inside)}: {len(read_outside)} of its values are read outside it")
    order = [n.name for n in gm.graph.nodes if n.name in inside]
    return Cut(tuple(order), read_outside[0])


@dataclass(frozen=True)
class CheckpointRewrite:
    graph_module: fx.GraphModule
    regions: tuple[RegionProgram, ...]


def _cut_nodes(nodes: dict[str, fx.Node], cut: Cut) -> list[fx.Node]:
    order = {n: i for i, n in enumerate(next(iter(nodes.values())).graph.nodes)}
    return sorted((nodes[n] for n in cut.nodes if n in nodes), key=order.__getitem__)


def cut_problem(gm: fx.GraphModule, cut: Cut) -> str | None:
    """Why ``cut`` cannot be one checkpointed region, or None if it can."""
    nodes = {n.name: n for n in gm.graph.nodes}
    if cut.output not in nodes:
        return f"{cut.output} was rewritten"
    inside = set(_cut_nodes(nodes, cut))
    output = nodes[cut.output]
    for node in inside:
        if node is not output and any(user not in inside for user in node.users):
            return f"{node.name} inside {cut.blocks[0] if cut.blocks else 'the region'} is read outside it"
    return None


def region_problem(gm: fx.GraphModule, blocks: tuple[Block, ...]) -> str | None:
    """Why this run of blocks cannot be one checkpointed region, or None if it can."""
    for earlier, later in zip(blocks, blocks[1:]):
        if later.input != earlier.output:
            return f"{later.name} does not read {earlier.name}'s output directly"
    if blocks[-1].output not in {n.name for n in gm.graph.nodes}:
        return f"{blocks[-1].name}'s output was rewritten"
    return cut_problem(gm, block_run(blocks))


def _extract(nodes: dict[str, fx.Node], index: int, cut: Cut, entry: fx.Node | None) -> RegionProgram:
    region = _cut_nodes(nodes, cut)
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

    if entry is not None:
        lookup(entry)  # a run's input is always the first placeholder
    for node in region:
        env[node] = graph.node_copy(node, lookup)
        assert all(a in inside or a in env for a in node.all_input_nodes)
    graph.output(env[nodes[cut.output]])
    graph.lint()
    return RegionProgram(index, cut.blocks, graph, tuple(inputs), tuple(n.name for n in region))


def rewrite_checkpointed(gm: fx.GraphModule, cuts: tuple[Cut, ...], renamed=()) -> CheckpointRewrite:
    """A copy of ``gm`` in which each of ``cuts`` is one ``CheckpointCall``.

    ``renamed``: (name, new name) pairs of values an earlier rewrite replaced (a reversible
    segment's output, which a checkpointed run may read). Raises ``ValueError`` for a cut
    ``cut_problem`` rejects (the planner asks first).
    """
    renamed = dict(renamed)
    gm = fx.GraphModule(gm, copy.deepcopy(gm.graph), gm.__class__.__name__)
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    order = {n: i for i, n in enumerate(graph.nodes)}
    programs = []
    for index, cut in enumerate(cuts):
        problem = cut_problem(gm, cut)
        if problem:
            where = f"{cut.blocks[0]} .. {cut.blocks[-1]}" if cut.blocks else f"{cut.nodes[0]} .. {cut.output}"
            raise ValueError(f"cannot checkpoint {where}: {problem}")
        entry = nodes[renamed.get(cut.entry, cut.entry)] if cut.entry is not None else None
        programs.append(_extract(nodes, index, cut, entry))
    replaced: dict[fx.Node, fx.Node] = {}  # a cut's output -> its call, which a later cut may read
    for program, cut in zip(programs, cuts):
        output = nodes[cut.output]
        inputs = tuple(replaced.get(nodes[n], nodes[n]) for n in program.inputs)
        with graph.inserting_before(output):
            call = graph.call_function(CheckpointCall(program.index), inputs)
        call.meta = {k: v for k, v in output.meta.items() if k in ("val", "tensor_meta", "nn_module_stack")}
        output.replace_all_uses_with(call)
        replaced[output] = call
        for node in sorted(_cut_nodes(nodes, cut), key=order.__getitem__, reverse=True):
            graph.erase_node(node)
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return CheckpointRewrite(gm, tuple(programs))

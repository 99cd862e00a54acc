"""The graph between detected blocks as cost graphs: what the stem, stage transitions and head can recompute.

Every top-level node of the traced graph that no block takes over belongs to a *gap*: the
one before the first block, between two blocks, or after the last (gap ``i`` holds the
nodes after ``i`` blocks have ended, in program order). Each gap becomes a
``revcompile.passes.lower_sets.CostGraph`` -- per node the bytes autograd saves for it,
its value's storage bytes, its forward FLOPs, measured on fake tensors with the blocks'
costs (``revcompile.passes.block_costs``) -- and its lower-set options become the gap's
options in the chain DP (``revcompile.passes.recompute.GapCost``).

A set of a gap's nodes may be recomputed (cut out as one ``torch.utils.checkpoint``
region, ``revcompile.passes.checkpoint.node_cut``) when exactly one of its values is read
outside it, none of its ops writes in place, and it saves something. Values a recomputed
set reads from the model's inputs cost nothing to keep (the caller holds them); values
read from a block or another gap cost their storage.

A node's time is its FLOPs (``torch.utils.flop_counter``, which counts matmuls and
convolutions) plus the bytes of its value: norms, reshapes and elementwise ops count no
FLOPs but are not free to run again (on a CPU about one byte moved per FLOP's time), and
without this every such recompute would look free.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from revcompile.passes.lower_sets import CostGraph, CostNode, lower_set_options
from revcompile.passes.plan import Block
from revcompile.passes.recompute import GapCost, GapOption

__all__ = ["MAX_GAP_NODES_EXACT", "MAX_GAP_NODES", "MAX_GAP_OPTIONS", "Gap", "find_gaps", "gap_costs"]

# Above this many nodes a gap is planned over Kusumoto's approximate family of lower sets;
# above MAX_GAP_NODES it is left stored (the DP's O(F^2) transitions would dominate planning).
MAX_GAP_NODES_EXACT = 48
MAX_GAP_NODES = 256
# Options offered to the chain DP per gap: each multiplies its fronts (a 48-block ViT's DP
# took 4x longer with all seven of its stem's options). The cheapest, the leanest and
# evenly spaced ones between them are kept; the chain DP is exact over those.
MAX_GAP_OPTIONS = 4
_COMPUTES = ("call_function", "call_method", "call_module")


@dataclass(frozen=True)
class Gap:
    position: int  # blocks before it
    cost: CostGraph
    read_outside: frozenset[str]  # its nodes read by blocks, other gaps or the graph's output
    users: tuple[tuple[str, tuple[str, ...]], ...]  # node -> its users inside the gap
    in_place: frozenset[str]

    def recomputable(self, names: frozenset) -> bool:
        """One value read outside the set, nothing written in place, something saved."""
        if names & self.in_place or not sum(n.saved for n in self.cost.nodes if n.name in names):
            return False
        users = dict(self.users)
        exits = [n for n in names if n in self.read_outside or any(u not in names for u in users[n])]
        return len(exits) == 1


def _writes_in_place(node: fx.Node) -> bool:
    name = getattr(node.target, "__name__", str(node.target))
    return (name.endswith("_") and not name.endswith("__")) or name.startswith("i") and name[1:] in (
        "add", "sub", "mul", "truediv", "and", "or") or node.kwargs.get("inplace") is True


def find_gaps(graph: fx.Graph, blocks: tuple[Block, ...]) -> dict[int, list[fx.Node]]:
    """Gap position -> its computing nodes, in program order."""
    owned = {n for block in blocks for n in block.replaces}
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    ends = sorted(max(order[n] for n in block.replaces if n in order) for block in blocks)
    gaps: dict[int, list[fx.Node]] = {}
    ended = 0
    for node in graph.nodes:
        while ended < len(ends) and ends[ended] < order[node.name]:
            ended += 1
        if node.op in _COMPUTES and node.name not in owned:
            gaps.setdefault(ended, []).append(node)
    return gaps


def _cost_graph(nodes: list[fx.Node], saved: dict[str, int], flops: dict[str, int], storage: dict[str, int]) -> Gap:
    inside = {n.name for n in nodes}
    external: dict[str, int] = {}
    cost_nodes = []
    for node in nodes:
        inputs = []
        for arg in node.all_input_nodes:
            if arg.op == "get_attr":
                continue  # parameters and buffers: alive anyway
            if arg.name not in inside:
                external[arg.name] = 0 if arg.op == "placeholder" else storage.get(arg.name, 0)
            inputs.append(arg.name)
        cost_nodes.append(CostNode(node.name, saved.get(node.name, 0), storage.get(node.name, 0),
                                   float(flops.get(node.name, 0) + storage.get(node.name, 0)), tuple(dict.fromkeys(inputs))))
    return Gap(
        position=-1,
        cost=CostGraph(tuple(cost_nodes), tuple(external.items())),
        read_outside=frozenset(n.name for n in nodes if any(u.name not in inside for u in n.users)),
        users=tuple((n.name, tuple(u.name for u in n.users if u.name in inside)) for n in nodes),
        in_place=frozenset(n.name for n in nodes if _writes_in_place(n)),
    )


def _spread(options: list[GapOption], most: int = MAX_GAP_OPTIONS - 1) -> list[GapOption]:
    """At most ``most`` of ``options`` (least overhead first): the cheapest, the leanest, evenly spaced between."""
    if len(options) <= most:
        return options
    leanest = min(range(len(options)), key=lambda i: (options[i].kept + options[i].transient, options[i].forward))
    picked = {0, leanest}
    for k in range(1, most):
        if len(picked) >= most:
            break
        picked.add(round(k * (len(options) - 1) / (most - 1)))
    return [options[i] for i in sorted(picked)]


def gap_costs(graph: fx.Graph, blocks: tuple[Block, ...], saved: dict[str, int], flops: dict[str, int],
              storage: dict[str, int]) -> tuple[GapCost, ...]:
    """Each gap of ``graph`` with its lower-set options (the all-stored one first).

    ``saved``, ``flops``, ``storage``: per node name, the bytes autograd saves for it, its
    forward FLOPs, the storage bytes of its value.
    """
    costs = []
    for position, nodes in sorted(find_gaps(graph, blocks).items()):
        gap = _cost_graph(nodes, saved, flops, storage)
        stored = GapOption(sum(n.saved for n in gap.cost.nodes), 0, 0.0)
        if not stored.kept:
            continue  # saves nothing: nothing to plan
        if len(nodes) > MAX_GAP_NODES:
            costs.append(GapCost(f"{nodes[0].name} .. {nodes[-1].name}", position, (stored,)))
            continue
        exact = None if len(nodes) <= MAX_GAP_NODES_EXACT else False
        options = lower_set_options(gap.cost, gap.recomputable, exact)
        recomputing = [GapOption(o.kept, o.peak - o.kept, o.overhead, o.recomputed) for o in options if o.recomputed]
        costs.append(GapCost(f"{nodes[0].name} .. {nodes[-1].name}", position, (stored, *_spread(recomputing))))
    return tuple(costs)

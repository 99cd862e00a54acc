"""A networkx view of an fx graph, shared by the structural passes.

Program order in an fx graph is a topological order, which several analyses lean on:
descendants of a node that come before some later node are reachable by paths that stay
before it, and "the region between two nodes" is well defined. Shapes are compared as
strings so that symbolic sizes from torch.export (``s0``, ``s0*s1``) compare structurally
without adding guards to a shape environment.
"""

from __future__ import annotations

import networkx as nx
import torch
import torch.fx as fx

from revcompile.passes.patterns import SHAPE_QUERY

__all__ = ["GraphView", "shape_key", "is_tensor", "clean_module_path", "module_path", "tensor_bytes"]


def shape_key(node) -> tuple[str, ...] | None:
    """The node's tensor shape as strings (symbolic sizes included), or None if unknown."""
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return tuple(str(d) for d in val.shape)
    meta = node.meta.get("tensor_meta")
    return tuple(str(d) for d in meta.shape) if meta is not None and hasattr(meta, "shape") else None


def is_tensor(node) -> bool:
    """Whether a node produces a tensor (assumed so when the graph carries no metadata)."""
    if not isinstance(node, fx.Node):
        return False
    if "val" not in node.meta:
        return node.meta.get("tensor_meta") is not None or node.op not in ("output",)
    return isinstance(node.meta["val"], torch.Tensor)


def clean_module_path(path: str) -> str:
    """torch.export may spell paths as ``L['self'].layers[0].attn``; keep the dotted form."""
    path = path.replace("L['self'].", "").replace("L['self']", "")
    return path.replace("[", ".").replace("]", "").replace("'", "")


def module_path(node: fx.Node) -> str:
    """The innermost module ``node`` was traced in ("" for the model's own code).

    Module-level fx graphs and aten-level export graphs record this differently
    (``call_module`` targets, ``nn_module_stack`` metadata); this is the one place that reads it.
    """
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return "" if path.startswith("_empty_nn_module_stack") else clean_module_path(path)
    if node.op == "call_module":
        return str(node.target)
    return ""


def tensor_bytes(value) -> int:
    """Bytes of a tensor (or of the tensors in a tuple/list), from its shape and dtype."""
    if isinstance(value, torch.Tensor):
        try:
            return int(value.numel()) * value.element_size()
        except Exception:  # noqa: BLE001 -- symbolic sizes without a hint
            return 0
    if isinstance(value, (tuple, list)):
        return sum(tensor_bytes(v) for v in value)
    return 0


class GraphView:
    """Nodes by name, program positions, and a networkx DiGraph of data flow."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.nodes = {n.name: n for n in gm.graph.nodes}
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.dag = nx.DiGraph()
        self.dag.add_nodes_from(gm.graph.nodes)
        self.dag.add_edges_from((i, n) for n in gm.graph.nodes for i in n.all_input_nodes)
        self._descendants: dict[tuple[fx.Node, fx.Node], frozenset[fx.Node]] = {}

    def descendants_before(self, source: fx.Node, limit: fx.Node) -> frozenset[fx.Node]:
        """Values computed from ``source`` before ``limit`` in program order.

        A shape query on ``source`` itself does not count: it reads metadata that is known
        wherever ``source`` is (both coupled streams have its shape), so it can be a side
        input instead of making everything sized by it depend on the stream.
        """
        key = (source, limit)
        if key not in self._descendants:
            self._descendants[key] = frozenset(self._reachable_before(source, self.order[limit]))
        return self._descendants[key]

    def _reachable_before(self, source: fx.Node, bound: int) -> set[fx.Node]:
        """A walk over ``users`` (cheaper than a filtered networkx view: called per add)."""
        order = self.order
        found: set[fx.Node] = set()
        pending = [u for u in source.users if order[u] < bound and not SHAPE_QUERY.matches(u)]
        found.update(pending)
        while pending:
            for user in pending.pop().users:
                if user not in found and order[user] < bound:
                    found.add(user)
                    pending.append(user)
        return found

    def ancestors_within(self, node: fx.Node, region: set[fx.Node]) -> set[fx.Node]:
        """``node`` and the nodes of ``region`` it depends on through ``region``."""
        found, pending = {node}, [node]
        while pending:
            for inp in pending.pop().all_input_nodes:
                if inp in region and inp not in found:
                    found.add(inp)
                    pending.append(inp)
        return found

    def sorted(self, nodes) -> list[fx.Node]:
        return sorted(nodes, key=self.order.__getitem__)

    def module_path(self, node: fx.Node) -> str:
        """``module_path``, with a parameter read attributed to the module that owns it."""
        if node.op == "get_attr" and not node.meta.get("nn_module_stack"):
            return str(node.target).rsplit(".", 1)[0]
        return module_path(node)

    def describe(self, users) -> str:
        """Readable names for nodes: the model output, or node name with its module."""
        parts = []
        for user in users:
            if user.op == "output":
                parts.append("the model output")
            else:
                path = self.module_path(user)
                parts.append(user.name + (f" ({path})" if path else ""))
        return ", ".join(dict.fromkeys(parts))

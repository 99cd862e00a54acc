"""Normalise a traced graph so that residual structure is visible.

Both tracers leave nodes that hide the shape of a transformer from a structural analysis:

* guards: ``torch.export`` asserts tensor metadata and symbolic ranges, ``fx`` asserts
  concrete arguments and timm asserts image sizes. A guard reads a value without feeding
  the computation, so a guard hanging off a branch would look like the branch's value
  escaping. The converted model checks its inputs against the traced variant instead
  (see ``revcompile.converted``), so the guards can go.
* shape queries on the residual stream: ``B, N, C = x.shape`` taken on a block output and
  used by later blocks ties blocks together through metadata only. A residual add
  ``s + r`` has the shape of ``s``, so such a query is redirected to the earliest stream
  value with the same shape -- an exact rewrite that frees the blocks.
* parallel residuals written left to right: ``x + attn(h) + mlp(h)`` evaluates as
  ``(x + a) + m``, which hides that both branches read ``x``. When ``m`` does not read
  ``x + a``, the sum is reassociated to ``x + (a + m)``, the form GPT-NeoX and Phi use,
  so that detection sees one residual with two parts. (Only the rounding order changes.)

The pass edits the graph in place and returns what it did.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from revcompile.passes.graph_view import shape_key
from revcompile.passes.patterns import (
    GUARD,
    RESIDUAL_ADD,
    SHAPE_QUERY,
    is_inplace,
    is_layout_reshape,
)

__all__ = ["NormalizeResult", "normalize_graph"]


@dataclass(frozen=True)
class NormalizeResult:
    graph_module: fx.GraphModule
    guards_removed: int
    shape_queries_redirected: int
    dead_metadata_removed: int
    parallel_sums_reassociated: int = 0

    @property
    def modified(self) -> bool:
        return bool(self.guards_removed or self.shape_queries_redirected or self.dead_metadata_removed or self.parallel_sums_reassociated)


def _shape_of(node) -> tuple | None:
    return shape_key(node)


def _is_guard_call(node: fx.Node, root) -> bool:
    if GUARD.matches(node, root):
        return True
    # torch.export inserts a call to a `_guards_fn` submodule checking the inputs.
    return node.op == "call_module" and str(node.target).startswith("_guards_fn")


def _is_metadata_value(node: fx.Node) -> bool:
    """A node computing shapes, ranks or flags (never a tensor): safe to drop when dead."""
    if node.op not in ("call_function", "call_method"):
        return False
    if isinstance(node.meta.get("val"), torch.Tensor):
        return False
    if SHAPE_QUERY.matches(node) or node.target is getattr:
        return True
    pure_builtin = getattr(node.target, "__module__", None) in ("_operator", "operator")
    return node.op == "call_function" and pure_builtin and not is_inplace(node)


def _stream_origin(value: fx.Node) -> fx.Node:
    """The earliest stream value with ``value``'s shape, walking back through residual adds
    (``s + r`` has the shape of ``s``) and layout reshapes (they only re-index)."""
    shape = _shape_of(value)
    if shape is None:
        return value
    current, origin = value, value
    while True:
        if RESIDUAL_ADD.matches(current):
            operands = [a for a in current.args[:2] if isinstance(a, fx.Node)]
            same = [a for a in operands if _shape_of(a) == _shape_of(current)]
            if len(operands) != 2 or not same:
                break
            # The operand created first is the one further up the stream.
            current = same[0] if len(same) == 1 else min(same, key=_position(current.graph))
        elif is_layout_reshape(current):
            current = current.args[0]
        else:
            break
        if _shape_of(current) == shape:
            origin = current
    return origin


def _position(graph: fx.Graph):
    order = {n: i for i, n in enumerate(graph.nodes)}
    return lambda n: order[n]


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, pending = set(), [node]
    while pending:
        for inp in pending.pop().all_input_nodes:
            if inp not in seen:
                seen.add(inp)
                pending.append(inp)
    return seen


def _reassociate_parallel_sums(graph: fx.Graph) -> int:
    """``y = (x + a) + m`` with ``a`` and ``m`` both computed from ``x`` -> ``x + (a + m)``."""
    count = 0
    for y in list(graph.nodes):
        if not RESIDUAL_ADD.matches(y) or len(y.args) != 2 or y.kwargs:
            continue
        for t, m in (y.args, y.args[::-1]):
            if not (isinstance(t, fx.Node) and isinstance(m, fx.Node) and RESIDUAL_ADD.matches(t)):
                continue
            if len(t.users) != 1 or len(t.args) != 2 or t.kwargs or not all(isinstance(a, fx.Node) for a in t.args):
                continue
            m_ancestors = _ancestors(m)
            if t in m_ancestors:
                continue  # m reads x + a: a sequential block, not a parallel one
            for x, a in (t.args, t.args[::-1]):
                if x in _ancestors(a) and x in m_ancestors and _shape_of(a) == _shape_of(m) == _shape_of(x):
                    with graph.inserting_before(y):
                        branches = graph.call_function(t.target, (a, m))
                    branches.meta = dict(a.meta)
                    y.args = (x, branches)
                    graph.erase_node(t)
                    count += 1
                    break
            else:
                continue
            break
    return count


def normalize_graph(gm: fx.GraphModule) -> NormalizeResult:
    graph = gm.graph
    guards = [n for n in graph.nodes if _is_guard_call(n, gm) and not n.users]
    for node in reversed(guards):
        graph.erase_node(node)

    redirected = 0
    for node in graph.nodes:
        if not SHAPE_QUERY.matches(node):
            continue
        subject = node.args[0] if node.args else None
        if not isinstance(subject, fx.Node):
            continue
        origin = _stream_origin(subject)
        if origin is not subject:
            node.replace_input_with(subject, origin)
            redirected += 1

    dead = 0
    changed = True
    while changed:
        changed = False
        for node in reversed(list(graph.nodes)):
            if not node.users and _is_metadata_value(node):
                graph.erase_node(node)
                dead += 1
                changed = True
    # Placeholders of arguments the tracer fixed (fx `concrete_args`) are read only by
    # their guards; once the guards are gone they are unused and can be dropped.
    for node in list(graph.nodes):
        if node.op == "placeholder" and not node.users and node.meta.get("revcompile_concrete"):
            graph.erase_node(node)
            dead += 1

    reassociated = _reassociate_parallel_sums(graph)
    graph.lint()
    gm.recompile()
    return NormalizeResult(gm, len(guards), redirected, dead, reassociated)

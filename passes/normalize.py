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
* in-place adds into temporaries: ``mlp_out += attn_out; x + mlp_out`` (GPT-J, CodeGen)
  becomes ``x + (mlp_out + attn_out)``, the out-of-place parallel form. Only where that is
  provably the same computation: the target is a fresh tensor (or reaches one through ops
  that may return their input, each read by nothing else), nothing reads it before the
  in-place add, and the sum keeps its shape and dtype. Later readers read the new sum.

The pass is pure: it edits a copy of the caller's GraphModule (sharing its submodules,
parameters and buffers) and returns the copy with what it did (``in_place=True`` edits
the caller's own).
"""

from __future__ import annotations

from dataclasses import dataclass

import copy
import operator

import torch
import torch.fx as fx

from revcompile.passes.graph_module import graph_module
from revcompile.passes.graph_view import shape_key
from revcompile.passes.patterns import (
    ELEMENT_SPELLINGS,
    FRESH_RESULT,
    GUARD,
    INPLACE_ADD,
    MAY_RETURN_INPUT,
    OUT_OF_PLACE,
    VIEW,
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
    inplace_adds_made_out_of_place: int = 0
    element_sets_unbound: int = 0

    @property
    def modified(self) -> bool:
        return bool(
            self.guards_removed or self.shape_queries_redirected or self.dead_metadata_removed
            or self.parallel_sums_reassociated or self.inplace_adds_made_out_of_place or self.element_sets_unbound
        )


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


def _owns_storage(target: fx.Node, root) -> bool:
    """``target`` is a tensor nothing else can observe: a fresh result, reached (if at all)
    through ops that may return their input, each of which nothing else reads."""
    node = target
    while VIEW.matches(node) or MAY_RETURN_INPUT.matches(node, root) or is_inplace(node, root):
        parent = node.args[0] if node.args else None
        if not isinstance(parent, fx.Node) or len(parent.users) != 1:
            return False
        node = parent
    return FRESH_RESULT.matches(node, root)


def _same_result(target: fx.Node, addend) -> bool:
    """``target + addend`` has ``target``'s shape and dtype, as ``target += addend`` does."""
    value = target.meta.get("val")
    if not isinstance(value, torch.Tensor):
        return False
    if isinstance(addend, fx.Node):
        other = addend.meta.get("val")
        if not isinstance(other, torch.Tensor) or other.dtype != value.dtype:
            return False
        return tuple(torch.broadcast_shapes(value.shape, other.shape)) == tuple(value.shape)
    return isinstance(addend, (int, float)) and not isinstance(addend, bool) and value.is_floating_point()


def _out_of_place_adds(graph: fx.Graph, root) -> int:
    """``t += u`` on a temporary that nothing read before -> ``t2 = t + u``; later readers read ``t2``."""
    count = 0
    order = _position(graph)
    for node in list(graph.nodes):
        if not INPLACE_ADD.matches(node) or len(node.args) != 2:
            continue
        target, addend = node.args
        if not isinstance(target, fx.Node) or not _owns_storage(target, root) or not _same_result(target, addend):
            continue
        if any(order(u) < order(node) for u in target.users if u is not node):
            continue  # read before the write: not a private temporary
        later_readers = [u for u in target.users if u is not node]
        key = node.target if node.op == "call_function" else str(node.target)
        with graph.inserting_before(node):
            if node.op == "call_method":
                summed = graph.call_method(OUT_OF_PLACE[key], node.args, dict(node.kwargs))
            else:
                summed = graph.call_function(OUT_OF_PLACE[key], node.args, dict(node.kwargs))
        summed.meta = dict(node.meta)
        for user in later_readers:
            user.replace_input_with(target, summed)
        node.replace_all_uses_with(summed)
        graph.erase_node(node)
        count += 1
    return count


def _copy_of(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule on a copy of ``gm``'s graph (nodes, names, metadata, codegen),
    sharing ``gm``'s submodules, parameters and buffers."""
    copied = graph_module(gm, copy.deepcopy(gm.graph), type(gm).__name__)
    copied.meta.update(getattr(gm, "meta", {}))
    return copied


def normalize_graph(gm: fx.GraphModule, *, in_place: bool = False) -> NormalizeResult:
    """Normalise a copy of ``gm`` (which is left as it was); the copy is in the result.

    ``in_place=True`` normalises ``gm`` itself: for a caller that holds the only reference to
    a fresh trace (the pipeline), where copying ~2,000 nodes would be wasted.
    """
    gm = gm if in_place else _copy_of(gm)
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

    dead = _remove_dead_metadata(graph)
    out_of_place = _out_of_place_adds(graph, gm)
    reassociated = _reassociate_parallel_sums(graph)
    unbound = _unbind_element_sets(graph, gm)
    graph.lint()
    gm.recompile()
    return NormalizeResult(gm, len(guards), redirected, dead, reassociated, out_of_place, unbound)


def _remove_dead_metadata(graph: fx.Graph) -> int:
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
    return dead


def _element_of(node: fx.Node):
    """``(source, dim, index, unbind spelling)`` if ``node`` takes one element of a tensor, else None."""
    for pattern, (places, unbind) in ELEMENT_SPELLINGS.items():
        if not pattern.matches(node) or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        dim, index = (_argument_at(node, *place) for place in places)
        source = node.args[0].meta.get("val")
        if not (isinstance(source, torch.Tensor) and isinstance(dim, int) and isinstance(index, int)):
            return None
        if isinstance(index, bool) or not -source.dim() <= dim < source.dim():
            return None
        size = source.shape[dim]
        if not isinstance(size, int) or not -size <= index < size:
            return None
        return node.args[0], dim % source.dim(), index % size, unbind
    return None


def _argument_at(node: fx.Node, position, keyword, default):
    if keyword is not None and keyword in node.kwargs:
        return node.kwargs[keyword]
    if position is not None and position < len(node.args):
        return node.args[position]
    return default


def _written_through(node: fx.Node, root) -> bool:
    """Whether an in-place op writes into ``node`` or into a view of it."""
    pending, seen = [node], set()
    while pending:
        for user in pending.pop().users:
            if user in seen:
                continue
            seen.add(user)
            if is_inplace(user, root):
                return True
            if VIEW.matches(user, root):
                pending.append(user)
    return False


def _unbind_element_sets(graph: fx.Graph, root) -> int:
    """Every element of ``x`` along ``dim`` taken by index/select ops -> one ``unbind(x, dim)``."""
    sets: dict[tuple, dict[int, list[fx.Node]]] = {}
    for node in graph.nodes:
        found = _element_of(node)
        if found is not None:
            source, dim, index, unbind = found
            sets.setdefault((source, dim, unbind), {}).setdefault(index, []).append(node)
    count = 0
    for (source, dim, (op, target)), elements in sets.items():
        taken = [n for nodes in elements.values() for n in nodes]
        if sorted(elements) != list(range(source.meta["val"].shape[dim])):
            continue  # not every element: eager code would not have unbound it either
        if any(_written_through(n, root) for n in [source, *taken]):
            continue
        with graph.inserting_before(min(taken, key=_position(graph))):
            unbound = graph.create_node(op, target, (source, dim))
            unbound.meta["val"] = tuple(elements[i][0].meta.get("val") for i in sorted(elements))
            replacements = {index: graph.call_function(operator.getitem, (unbound, index)) for index in sorted(elements)}
        for index, nodes in elements.items():
            replacements[index].meta = dict(nodes[0].meta)
            for node in nodes:
                node.replace_all_uses_with(replacements[index])
                graph.erase_node(node)
        count += 1
    return count

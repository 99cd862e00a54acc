"""Find residual connections: adds ``s + r`` whose branch is a single-entry single-exit region.

For every add ``a + b`` where one operand descends from the other (the stream ``s`` and
the branch output ``r``):

    candidates = the descendants of s that come before the add
    region     = the largest subset whose values are used only inside it or by the add
                 (a greatest fixpoint; dead-end effects like `mask.div_(p)` stay in it)
    accept if  r is in the region and no region node reads a value computed from s
               outside it (single entry); side inputs that do not depend on s are fine

Accepted branches are classified: attention (softmax or a fused attention op inside), MLP
(parameters, no attention), or other. A branch whose output is itself the sum of an
attention part and an MLP part that both read the stream -- ``x + attn(ln(x)) + mlp(ln(x))``
-- is a parallel residual and is split into its two parts.

Branches that write in place into the stream or anything outside themselves, or hold a
module updating running statistics, are refused with the reason: recomputing them would
repeat the effect.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx
from torch import nn

from revcompile.passes.graph_view import GraphView, is_tensor, shape_key
from revcompile.passes.patterns import (
    ATTENTION,
    RESIDUAL_ADD,
    STATEFUL_MODULES,
    VIEW,
    is_inplace,
    module_of,
    written_arguments,
)
from revcompile.passes.plan import Branch, Residual, Skipped

__all__ = ["ResidualSearch", "find_residuals"]


@dataclass(frozen=True)
class ResidualSearch:
    """Top-level residuals, the residual-shaped adds that were refused, and why."""

    residuals: tuple[Residual, ...]
    rejected: tuple[Skipped, ...]


class _Rejected(Exception):
    pass


def _add_operands(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    if not RESIDUAL_ADD.matches(node) or len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
        return None
    a, b = node.args
    if not (is_tensor(a) and is_tensor(b)) or a is b:
        return None
    return a, b


def _branch_region(view: GraphView, stream: fx.Node, out: fx.Node, add: fx.Node) -> set[fx.Node]:
    derived = view.descendants_before(stream, add)
    region = set(derived)
    pending = list(region)
    while pending:
        node = pending.pop()
        if node in region and any(u not in region and u is not add for u in node.users):
            region.discard(node)
            pending.extend(i for i in node.all_input_nodes if i in region)
    if out not in region:
        escapes = [u.name for u in out.users if u is not add]
        if escapes:
            raise _Rejected(f"the branch result {out.name} is also used by {', '.join(escapes)}")
        raise _Rejected(f"values inside the branch ending at {out.name} are used outside it")
    boundary = [i for n in view.sorted(region) for i in n.all_input_nodes if i is not stream and i in derived and i not in region]
    if boundary:
        raise _Rejected(_shared_value_reason(view, derived - region, boundary[0], region, add))
    return region


def _shared_value_reason(view: GraphView, outside: set[fx.Node], read: fx.Node, region: set[fx.Node], add: fx.Node) -> str:
    """Why a branch that reads a stream-derived value computed outside it is rejected.

    The culprit is a value the branch's code computes that something after the residual
    add also reads (a later layer reusing a cached rotary or ALiBi table, RealFormer's
    residual scores); failing that, the first such value the branch reads.
    """
    for node in view.sorted(outside):
        later = [u for u in node.users if view.order[u] > view.order[add]]
        if later:
            return (
                f"the branch computes {node.name} from the stream and code after this residual add reads it too "
                f"({view.describe(later)}): a later layer reusing it, or the other half of a parallel-residual block"
            )
    users = ", ".join(u.name for u in read.users if u not in region)
    return (
        f"the branch reads {read.name}, which is computed from the stream outside it "
        f"(also used by {users}); a shared input like this is a parallel-residual block"
    )


def _alias_root(node: fx.Node, region: set[fx.Node]) -> fx.Node:
    # Views and in-place results share storage with their first argument.
    while node in region and (VIEW.matches(node) or is_inplace(node)) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _check_effects(view: GraphView, region: set[fx.Node], stream: fx.Node) -> None:
    """Refuse a branch that writes into anything it does not own: recomputing it would
    write again (running statistics updated twice) or read inputs it changed."""
    root = view.gm
    for node in view.sorted(region):
        module = module_of(node, root)
        if isinstance(module, STATEFUL_MODULES) and getattr(module, "track_running_stats", False):
            raise _Rejected(
                f"{node.target} ({type(module).__name__}) updates running statistics in forward; "
                "recomputing the branch would update them twice"
            )
        for target in written_arguments(node, root):
            written = _alias_root(target, region)
            if written in region and written is not stream:
                continue
            if written.op == "get_attr":
                raise _Rejected(
                    f"{node.name} ({_op_name(node)}) writes into the module state {written.target} in forward; "
                    "recomputing the branch would write it a second time (running statistics updated twice)"
                )
            what = "the residual stream" if written is stream else f"{written.name}, which lives outside the branch"
            raise _Rejected(
                f"in-place {node.name} writes into {what}; reversible recomputation needs "
                "branch inputs unchanged (make the op out-of-place)"
            )


def _op_name(node: fx.Node) -> str:
    return getattr(node.target, "__name__", None) or str(node.target)


def _parameters_of(view: GraphView, nodes) -> tuple[str, ...]:
    names: list[str] = []
    for node in nodes:
        for ref in (node, *node.all_input_nodes):
            if ref.op == "get_attr":
                try:
                    value = view.gm.get_parameter(ref.target)
                except AttributeError:
                    continue
                if isinstance(value, nn.Parameter):
                    names.append(str(ref.target))
            elif ref.op == "call_module":
                module = module_of(ref, view.gm)
                if module is not None:
                    names.extend(f"{ref.target}.{p}" for p, _ in module.named_parameters())
    return tuple(dict.fromkeys(names))


def make_branch(view: GraphView, entry: fx.Node, nodes: set[fx.Node], outputs: tuple[fx.Node, ...]) -> Branch:
    """Describe the region ``nodes`` read from ``entry`` as a Branch (side inputs, parameters)."""
    ordered = view.sorted(nodes)
    side = {
        inp
        for node in ordered
        for inp in node.all_input_nodes
        if inp is not entry and inp not in nodes and inp.op != "get_attr"
    }
    parameters = _parameters_of(view, ordered)
    attention = any(ATTENTION.matches(n, view.gm) for n in nodes)
    return Branch(
        kind="attention" if attention else "mlp" if parameters else "other",
        entry=entry.name,
        nodes=tuple(n.name for n in ordered),
        outputs=tuple(o.name for o in outputs),
        side_inputs=tuple(n.name for n in view.sorted(side)),
        parameters=parameters,
        modules=tuple(dict.fromkeys(p for p in (view.module_path(n) for n in ordered) if p)),
    )


def _parallel_parts(view: GraphView, stream: fx.Node, region: set[fx.Node], out: fx.Node):
    """Split ``x + (attn_part + mlp_part)`` into its attention and MLP parts, or None."""
    operands = _add_operands(out) if RESIDUAL_ADD.matches(out) else None
    if operands is None or not all(o in region for o in operands):
        return None
    parts = [view.ancestors_within(o, region - {out}) for o in operands]
    attention = [any(ATTENTION.matches(n, view.gm) for n in part) for part in parts]
    if sorted(attention) != [False, True]:
        return None
    a, m = (0, 1) if attention[0] else (1, 0)
    leftover = region - parts[0] - parts[1] - {out}
    for node in leftover:  # dead-end effects go with the part whose values they read
        owners = [i for i, part in enumerate(parts) if any(inp in part for inp in node.all_input_nodes)]
        if len(owners) != 1:
            return None
        parts[owners[0]].add(node)
    f = make_branch(view, stream, parts[a], (operands[a],))
    g = make_branch(view, stream, parts[m], (operands[m],))
    return (f, g) if g.kind == "mlp" else None


def _residual_at(view: GraphView, add: fx.Node) -> Residual | Skipped | None:
    operands = _add_operands(add)
    if operands is None:
        return None
    a, b = operands
    if b in view.descendants_before(a, add):
        stream, out = a, b
    elif a in view.descendants_before(b, add):
        stream, out = b, a
    else:
        return None  # both sides independent: not a residual (e.g. x + pos_embed)
    module = view.module_path(add)
    try:
        shape_s, shape_r = shape_key(stream), shape_key(out)
        if shape_s is not None and shape_r is not None and shape_s != shape_r:
            raise _Rejected(f"the branch output shape {list(shape_r)} broadcasts onto the stream {list(shape_s)}")
        region = _branch_region(view, stream, out, add)
        _check_effects(view, region, stream)
    except _Rejected as why:
        return Skipped(node=add.name, module=module, kind="residual-like", reason=str(why))
    branch = make_branch(view, stream, region, (out,))
    parallel = _parallel_parts(view, stream, region, out) if branch.kind == "attention" else None
    return Residual(add=add.name, stream=stream.name, branch=branch, parallel=parallel)


def find_residuals(gm: fx.GraphModule, view: GraphView | None = None) -> ResidualSearch:
    """All top-level residual connections of ``gm`` and the refused residual-shaped adds.

    Residuals inside another residual's branch (the ``x + c*x^3`` of a tanh-GELU) belong to
    that branch and are not reported.
    """
    view = view or GraphView(gm)
    found: list[Residual] = []
    rejected: list[Skipped] = []
    for node in gm.graph.nodes:
        result = _residual_at(view, node)
        if isinstance(result, Residual):
            found.append(result)
        elif isinstance(result, Skipped):
            rejected.append(result)
    inner = {n for r in found for n in r.branch.nodes}
    return ResidualSearch(
        residuals=tuple(r for r in found if r.add not in inner),
        rejected=tuple(s for s in rejected if s.node not in inner),
    )

"""Find residual attention/MLP pairs and chain them into reversible segments.

A residual connection is an add ``s + r`` where ``r`` is the exit of a *branch*: a region
of the data-flow graph entered only through ``s`` (plus side inputs that do not depend on
``s``: attention masks, rotary tables, position bias) and left only through ``r``. The
region is computed structurally rather than by matching module names, so it works the
same on module-level ``torch.fx`` graphs and aten-level ``torch.export`` graphs:

    candidates = descendants of s that come before the add
    region     = the largest subset whose values are used only inside it or by the add
    accept if  r is in the region, and nothing in it reads a stream-derived value from
               outside it (single entry)

Branches are classified as attention (a softmax or fused attention op inside) or MLP
(parameters, no attention). An attention residual followed on the stream by an MLP
residual is a transformer *block*, the unit of the Rev-ViT coupling
``Y1 = X1 + F(X2)``, ``Y2 = X2 + G(Y1)``. Consecutive blocks whose intermediate outputs
are not read elsewhere form a *segment*; a block output read outside the chain (a
hidden-state tap, a stage transition) ends the segment there.

Every top-level residual that is not converted is reported with the reason.
"""

from __future__ import annotations

import networkx as nx
import torch
import torch.fx as fx
from torch import nn

from passes.patterns import (
    ATTENTION,
    RESIDUAL_ADD,
    SHAPE_QUERY,
    STATEFUL_MODULES,
    STREAM_TRANSPARENT,
    VIEW,
    is_inplace,
    module_of,
)
from passes.plan import Block, Branch, Plan, Residual, Segment, Skipped

__all__ = ["find_reversible_blocks"]


class _GraphView:
    """A networkx view of an fx graph, with program positions and module lookups."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.nodes = {n.name: n for n in gm.graph.nodes}
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self._descendants: dict[tuple[fx.Node, fx.Node], frozenset[fx.Node]] = {}
        self.dag = nx.DiGraph()
        self.dag.add_nodes_from(gm.graph.nodes)
        self.dag.add_edges_from((i, n) for n in gm.graph.nodes for i in n.all_input_nodes)

    def descendants_before(self, source: fx.Node, limit: fx.Node) -> frozenset[fx.Node]:
        """Values computed from ``source`` before ``limit`` in program order.

        Program order is topological, so every path to such a node stays before ``limit``.
        A shape query on ``source`` itself does not count: it reads metadata that is known
        wherever ``source`` is (both coupled streams have its shape), so it can be a side
        input instead of making everything sized by it depend on the stream.
        """
        key = (source, limit)
        if key not in self._descendants:
            bound = self.order[limit]
            view = nx.subgraph_view(
                self.dag,
                filter_node=lambda n: self.order[n] < bound,
                filter_edge=lambda u, v: not (u is source and SHAPE_QUERY.matches(v)),
            )
            self._descendants[key] = frozenset(nx.descendants(view, source))
        return self._descendants[key]

    def sorted(self, nodes) -> list[fx.Node]:
        return sorted(nodes, key=self.order.__getitem__)

    def module_path(self, node: fx.Node) -> str:
        stack = node.meta.get("nn_module_stack")
        if stack:
            path = list(stack.values())[-1][0]
            return _clean_path(path)
        if node.op in ("call_module", "get_attr"):
            return str(node.target).rsplit(".", 1)[0] if node.op == "get_attr" else str(node.target)
        return ""


def _clean_path(path: str) -> str:
    # torch.export may spell paths as L['self'].layers[0].attn; keep the dotted form.
    path = path.replace("L['self'].", "").replace("L['self']", "")
    return path.replace("[", ".").replace("]", "").replace("'", "")


def _is_tensor(node) -> bool:
    if not isinstance(node, fx.Node):
        return False
    val = node.meta.get("val")
    if val is None:
        return node.meta.get("tensor_meta") is not None or "val" not in node.meta
    return isinstance(val, torch.Tensor)


def _shape(node: fx.Node):
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return tuple(val.shape)
    tm = node.meta.get("tensor_meta")
    return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None


def _add_operands(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    if not RESIDUAL_ADD.matches(node):
        return None
    if len(node.args) < 2 or node.kwargs.get("alpha", 1) != 1 or len(node.args) > 2:
        return None
    a, b = node.args[:2]
    if not (_is_tensor(a) and _is_tensor(b)) or a is b:
        return None
    return a, b


class _Rejected(Exception):
    pass


def _branch_region(view: _GraphView, stream: fx.Node, out: fx.Node, add: fx.Node) -> set[fx.Node]:
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
    for node in region:
        for inp in node.all_input_nodes:
            if inp is not stream and inp in derived and inp not in region:
                users = ", ".join(u.name for u in inp.users if u not in region)
                raise _Rejected(
                    f"the branch reads {inp.name}, which is computed from the stream outside it "
                    f"(also used by {users}); a shared input like this is a parallel-residual block"
                )
    return region


def _alias_root(node: fx.Node, region: set[fx.Node]) -> fx.Node:
    # Views and in-place results share storage with their first argument.
    while node in region and (VIEW.matches(node) or is_inplace(node)) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _check_effects(view: _GraphView, region: set[fx.Node], stream: fx.Node) -> None:
    """Refuse branches that write outside themselves or keep state: recompute would repeat it."""
    root = view.gm
    for node in view.sorted(region):
        module = module_of(node, root)
        if isinstance(module, STATEFUL_MODULES) and getattr(module, "track_running_stats", False):
            raise _Rejected(
                f"{node.target} ({type(module).__name__}) updates running statistics in forward; "
                "recomputing the branch would update them twice"
            )
        if not is_inplace(node, root) or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        written = _alias_root(node.args[0], region)
        if written is stream or written not in region:
            what = "the residual stream" if written is stream else f"{written.name}, which lives outside the branch"
            if written.op == "get_attr":
                what = f"the module state {written.target}"
            raise _Rejected(
                f"in-place {node.name} writes into {what}; reversible recomputation needs "
                "branch inputs unchanged (make the op out-of-place)"
            )


def _classify(view: _GraphView, region: set[fx.Node], parameters) -> str:
    if any(ATTENTION.matches(n, view.gm) for n in region):
        return "attention"
    return "mlp" if parameters else "other"


def _parameters_of(view: _GraphView, nodes) -> tuple[str, ...]:
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


def _make_branch(view: _GraphView, entry: fx.Node, nodes: set[fx.Node], out: fx.Node) -> Branch:
    ordered = view.sorted(nodes)
    side = []
    for node in ordered:
        for inp in node.all_input_nodes:
            if inp is not entry and inp not in nodes and inp.op != "get_attr":
                side.append(inp)
    side_sorted = view.sorted(set(side))
    parameters = _parameters_of(view, ordered)
    modules = tuple(dict.fromkeys(p for p in (view.module_path(n) for n in ordered) if p))
    return Branch(
        kind=_classify(view, nodes, parameters),
        entry=entry.name,
        nodes=tuple(n.name for n in ordered),
        output=out.name,
        side_inputs=tuple(n.name for n in side_sorted),
        parameters=parameters,
        modules=modules,
    )


def _residual_at(view: _GraphView, add: fx.Node) -> Residual | Skipped | None:
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
    shape_s, shape_r = _shape(stream), _shape(out)
    module = view.module_path(add)
    try:
        if shape_s is not None and shape_r is not None and shape_s != shape_r:
            raise _Rejected(f"the branch output shape {list(shape_r)} broadcasts onto the stream {list(shape_s)}")
        region = _branch_region(view, stream, out, add)
        _check_effects(view, region, stream)
    except _Rejected as why:
        return Skipped(node=add.name, module=module, kind="residual-like", reason=str(why))
    return Residual(add=add.name, stream=stream.name, branch=_make_branch(view, stream, region, out))


def _strip_transparent(view: _GraphView, node: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """Follow stream-transparent ops (casts, contiguous) up to the value they pass on."""
    chain: list[fx.Node] = []
    while STREAM_TRANSPARENT.matches(node, view.gm) and node.args and isinstance(node.args[0], fx.Node):
        chain.insert(0, node)
        node = node.args[0]
    return node, chain


def _consumed_only_by(values: list[fx.Node], allowed: set[fx.Node]) -> list[fx.Node]:
    """Users of ``values`` outside ``allowed`` (empty when the hand-over is private)."""
    return [u for v in values for u in v.users if u not in allowed]


def _handover(view: _GraphView, producer: fx.Node, consumer: Residual):
    """Can ``consumer`` take the stream directly from ``producer``?

    Returns (chain of transparent nodes in between, users that also read it).
    """
    nodes = view.nodes
    root, chain = _strip_transparent(view, nodes[consumer.stream])
    if root is not producer:
        return None, None
    allowed = set(chain) | {nodes[n] for n in consumer.branch.nodes} | {nodes[consumer.add]}
    return chain, _consumed_only_by([producer, *chain], allowed)


def _describe(view: _GraphView, users: list[fx.Node]) -> str:
    parts = []
    for user in users:
        if user.op == "output":
            parts.append("the model output")
        else:
            path = view.module_path(user)
            parts.append(f"{user.name}" + (f" ({path})" if path else ""))
    return ", ".join(dict.fromkeys(parts))


def _common_prefix(paths) -> str:
    split = [p.split(".") for p in paths if p]
    if not split:
        return ""
    prefix = []
    for parts in zip(*split):
        if len(set(parts)) != 1:
            break
        prefix.append(parts[0])
    return ".".join(prefix)


def find_reversible_blocks(gm: fx.GraphModule) -> Plan:
    """Detect residual attention/MLP blocks in ``gm`` and chain them into segments."""
    view = _GraphView(gm)
    nodes = view.nodes
    found: list[Residual] = []
    rejected: list[Skipped] = []
    for node in gm.graph.nodes:
        result = _residual_at(view, node)
        if isinstance(result, Residual):
            found.append(result)
        elif isinstance(result, Skipped):
            rejected.append(result)

    # Residuals inside another residual's branch (the `x + c*x^3` of a tanh-GELU, say)
    # belong to that branch; only top-level ones are candidates or worth reporting.
    inner = {n for r in found for n in r.branch.nodes}
    top = [r for r in found if r.add not in inner]
    rejected = [s for s in rejected if s.node not in inner]

    blocks: list[tuple[Residual, Residual, list[fx.Node]]] = []
    skipped: list[Skipped] = list(rejected)
    used: set[str] = set()
    by_stream_root: dict[fx.Node, list[Residual]] = {}
    for res in top:
        root, _ = _strip_transparent(view, nodes[res.stream])
        by_stream_root.setdefault(root, []).append(res)

    for res in top:
        if res.kind != "attention" or res.add in used:
            continue
        followers = by_stream_root.get(nodes[res.add], [])
        mlp = next((f for f in followers if f.kind == "mlp"), None)
        if mlp is None:
            after = [f for f in followers if f.kind == "attention"]
            why = (
                "it is followed by another attention residual (cross-attention?), not an MLP residual"
                if after
                else "no MLP residual reads its output"
            )
            skipped.append(Skipped(res.add, view.module_path(nodes[res.add]), "attention", why))
            continue
        chain, extra = _handover(view, nodes[res.add], mlp)
        if extra:
            why = f"its output is also used by {_describe(view, extra)}, between the attention and MLP residuals"
            skipped.append(Skipped(res.add, view.module_path(nodes[res.add]), "attention", why))
            continue
        blocks.append((res, mlp, chain))
        used.update({res.add, mlp.add})

    for res in top:
        if res.add in used or any(s.node == res.add for s in skipped):
            continue
        why = {
            "mlp": "no attention residual precedes it on the stream",
            "other": "its branch has no parameters and no attention; nothing to gain",
            "attention": "it is not paired with an MLP residual",
        }[res.kind]
        skipped.append(Skipped(res.add, view.module_path(nodes[res.add]), res.kind, why))

    segments = _chain_segments(view, blocks)
    skipped.sort(key=lambda s: view.order[nodes[s.node]])
    return Plan(segments=tuple(segments), skipped=tuple(skipped), residuals_found=len(top) + len(rejected))


def _reads_from(view: _GraphView, run, block) -> list[fx.Node]:
    """Side inputs of ``block`` computed from values inside ``run`` (which the rewrite removes)."""
    nodes = view.nodes
    inside = {nodes[n] for attn, mlp, chain, link in run for r in (attn, mlp) for n in (*r.branch.nodes, r.add)}
    inside |= {n for _, _, chain, link in run for n in (*chain, *link)}
    side = {nodes[s] for r in block for s in r.branch.side_inputs}
    return [s for s in view.sorted(side) if s in inside or nx.ancestors(view.dag, s) & inside]


def _chain_segments(view: _GraphView, blocks) -> list[Segment]:
    nodes = view.nodes
    blocks = sorted(blocks, key=lambda b: view.order[nodes[b[0].add]])
    runs: list[list[tuple]] = []  # each entry: (attention, mlp, a->m chain, entry chain)
    ends: list[str] = []
    for attn, mlp, chain in blocks:
        if runs:
            prev_attn, prev_mlp, _, _ = runs[-1][-1]
            link, extra = _handover(view, nodes[prev_mlp.add], attn)
            inside_reads = _reads_from(view, runs[-1], (attn, mlp)) if link is not None and not extra else []
            if link is not None and not extra and not inside_reads:
                runs[-1].append((attn, mlp, chain, link))
                continue
            if extra:
                ends[-1] = f"its output is also used by {_describe(view, extra)}"
            elif inside_reads:
                ends[-1] = f"the next block reads {_describe(view, inside_reads)}, computed inside this segment"
        runs.append([(attn, mlp, chain, [])])
        ends.append("")

    segments = []
    for index, (run, end) in enumerate(zip(runs, ends)):
        built = []
        for position, (attn, mlp, chain, link) in enumerate(run):
            a_region = {nodes[n] for n in attn.branch.nodes}
            m_region = {nodes[n] for n in mlp.branch.nodes}
            # Inside a segment the attention branch reads the previous block's output and
            # takes over any cast in between; the first block reads the segment input.
            f_entry = link[0].args[0] if position and link else nodes[attn.stream]
            f = _make_branch(view, f_entry, a_region | set(link), nodes[attn.branch.output])
            g = _make_branch(view, nodes[attn.add], m_region | set(chain), nodes[mlp.branch.output])
            name = _common_prefix(f.modules + g.modules) or f"{attn.add}/{mlp.add}"
            built.append(Block(name, f.entry, mlp.add, attn, mlp, f, g))
        last = nodes[built[-1].output]
        if not end:
            end = f"its output goes to {_describe(view, list(last.users))}"
        side = view.sorted({nodes[s] for b in built for s in b.f.side_inputs + b.g.side_inputs})
        segments.append(
            Segment(
                index=index,
                blocks=tuple(built),
                input=built[0].input,
                output=built[-1].output,
                side_inputs=tuple(n.name for n in side),
                ends_because=end,
            )
        )
    return segments

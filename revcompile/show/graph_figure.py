"""What the compiler did to a graph, as a picture: the figure of a rewritten (or original) graph.

A user asking "which parts of my model became reversible?" needs the answer in the model's
own terms, at a size they can read. This module turns a graph into a ``Figure``: boxes,
clusters and edges, decided from the graph and the plan, with no geometry yet
(``revcompile.show.render`` lays it out and writes SVG or DOT; the CLI also prints it as a tree).

* Each reversible segment is a cluster. Collapsed (the default), each block is one box
  naming its F and G branches by the original module names, and consecutive blocks are
  joined by a double line: the coupling's two streams (``X1, X2`` for Rev-ViT). Expanded,
  each block shows its F and G graphs op by op and each coupling step's formula.
* Everything the rewrite left alone is grey. Collapsed, consecutive untouched nodes from
  the same module become one box; stretches between two segments are stage transitions,
  and a residual that was not converted carries its reason.
* Side inputs (masks, position tables, shapes) are drawn beside the segment, dashed.

The original graph is drawn the same way, with the blocks that will become each segment
inside a dashed cluster, so that ``--before`` puts the two side by side.
"""

from __future__ import annotations

import textwrap
from typing import Sequence

import torch
import torch.fx as fx

from revcompile.show.figure import Box, Cluster, Edge, Figure, Item
from revcompile.passes.couplings import Coupling, RevViT
from revcompile.passes.graph_view import module_path
from revcompile.passes.plan import Plan
from revcompile.passes.rewrite import SegmentCall, SegmentProgram

__all__ = ["figure_of_rewritten", "figure_of_original"]

ELIDE_ABOVE = 16  # collapsed segments longer than this show their first and last blocks only
KEEP_AT_ENDS = 3


# --- describing values and modules --------------------------------------------------------------


def short_target(node: fx.Node) -> str:
    """The operation a node performs, briefly: ``linear``, ``softmax``, ``view``."""
    if node.op == "call_module":
        return str(node.target).rsplit(".", 1)[-1]
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_function":
        name = (getattr(node.target, "__name__", None) or str(node.target)).split(".")[0]  # aten: "linear.default"
        return {"add": "+", "mul": "*", "sub": "-", "truediv": "/", "getitem": "[]"}.get(name, name)
    return node.op


def _dim(d) -> str:
    """A size; a symbolic one (torch.export) is shown by its example value."""
    if isinstance(d, torch.SymInt):
        hint = getattr(d.node, "hint", None)
        return str(hint) if hint is not None else str(d)
    return str(d)


def _is_metadata(node: fx.Node) -> bool:
    """A value that is a size, not a tensor: its edges only clutter the collapsed view."""
    val = node.meta.get("val")
    return val is not None and not isinstance(val, torch.Tensor)


def _shape(node: fx.Node) -> str:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        dims = "×".join(_dim(d) for d in val.shape) or "scalar"
        return f"{dims} {str(val.dtype).replace('torch.', '')}"
    if isinstance(val, (int, torch.SymInt)):
        return "int"
    return ""


def _module_class(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    kind = list(stack.values())[-1][1]
    name = kind.__name__ if isinstance(kind, type) else str(kind)
    return name.rsplit(".", 1)[-1].strip("'>")


def _group_key(node: fx.Node, depth: int) -> str:
    path = module_path(node)
    return ".".join(path.split(".")[:depth]) if path else ""


def _ops_line(nodes: Sequence[fx.Node], width: int = 44) -> str:
    ops = list(dict.fromkeys(short_target(n) for n in nodes))
    text = ", ".join(ops)
    if len(text) > width:
        text = text[: width - 12].rsplit(",", 1)[0] + f", … ({len(nodes)} ops)"
    return text


def _branch_modules(block_name: str, modules: Sequence[str]) -> str:
    """``blocks.3.norm1, blocks.3.attn.qkv, ...`` -> ``norm1 → attn``."""
    parts = [m[len(block_name) + 1 :].split(".")[0] for m in modules if m.startswith(block_name + ".")]
    parts = list(dict.fromkeys(p for p in parts if p))
    return " → ".join(parts) if parts else "(functional ops)"


def _visible(node: fx.Node) -> bool:
    if node.op == "get_attr":
        return False
    if node.op == "placeholder":
        return bool(node.users) and not node.meta.get("revcompile_concrete")
    return True


def _block_depth(plan: Plan) -> int:
    return max((len(b.name.split(".")) for b in plan.blocks), default=1)


# --- untouched nodes ---------------------------------------------------------------------------


def _untouched_box(nodes: list[fx.Node], key: str, transition: bool, skipped: dict[str, str]) -> Box:
    first, last = nodes[0], nodes[-1]
    if first.op == "placeholder":
        return Box(f"n_{first.name}", (f"input {first.name}", _shape(first)), "input")
    if first.op == "output":
        return Box(f"n_{first.name}", ("output",), "output")
    cls = _module_class(last) if key else ""
    lines = [(f"{key} ({cls})" if cls else key) or "model code"]
    if not (len(nodes) == 1 and first.op == "call_module"):  # a leaf module: its class says it
        lines.append(_ops_line(nodes))
    if _shape(last):
        lines.append(f"→ {_shape(last)}")
    style = "transition" if transition else "untouched"
    reasons = [skipped[n.name] for n in nodes if n.name in skipped]
    if reasons:
        style = "skipped"
        wrapped = textwrap.wrap(f"residual left as is: {reasons[0]}", 56)
        lines.extend(wrapped[:2] if len(wrapped) <= 2 else [wrapped[0], _clip(" ".join(wrapped[1:]), 56)])
    elif transition:
        lines.append("between segments: stage transition")
    tooltip = "\n".join(f"{n.name}: {short_target(n)} {_shape(n)}" for n in nodes[:40])
    return Box(f"n_{first.name}", tuple(lines), style, tooltip)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _alone(node: fx.Node, special: set[str]) -> bool:
    return node.name in special or node.op in ("placeholder", "output")


def _group_untouched(nodes: list[fx.Node], special: set[str], depth: int, expand: bool, inside: set[str] = frozenset()) -> list[list[fx.Node]]:
    """Consecutive nodes from the same module form one group (each node alone when expanded).

    Nodes named in ``inside`` (a segment's blocks) are not grouped and separate groups:
    a group is a contiguous stretch of the program, so edges between groups go forward.
    """
    groups: list[list[fx.Node]] = []
    previous_inside = False
    for node in nodes:
        if node.name in inside:
            previous_inside = True
            continue
        if groups and not expand and not previous_inside and not _alone(node, special) and not _alone(groups[-1][-1], special):
            if _group_key(groups[-1][-1], depth) == _group_key(node, depth):
                groups[-1].append(node)
                continue
        groups.append([node])
        previous_inside = False
    return groups


def _skip_reasons(plan: Plan) -> dict[str, str]:
    return {s.node: s.reason for s in plan.skipped}


class _Builder:
    """Items in program order, and edges between graph values mapped onto the boxes that show them."""

    def __init__(self):
        self.items: list[Item] = []
        self.entry: dict[str, str] = {}  # node name -> box its inputs arrive at
        self.exit: dict[str, str] = {}  # node name -> box its value leaves from
        self.edges: list[tuple[str, str, str]] = []  # box ids

    def show(self, nodes: Sequence[fx.Node], box_id: str, exit_id: str | None = None) -> None:
        for node in nodes:
            self.entry[node.name] = box_id
            self.exit[node.name] = exit_id or box_id

    def connect(self, graph_nodes: Sequence[fx.Node], expand: bool, skip_args: dict[str, set[str]] | None = None) -> None:
        for node in graph_nodes:
            for arg in node.all_input_nodes:
                if arg.name in (skip_args or {}).get(node.name, ()):
                    continue
                if not expand and (_is_metadata(arg) or _is_metadata(node)):  # sizes, not data
                    continue
                self.edges.append((arg.name, node.name, "data"))

    def figure(self, title: str, extra_edges: Sequence[Edge] = (), stream_names: tuple[str, str] = RevViT.stream_names) -> Figure:
        seen: dict[tuple[str, str, str], None] = {}
        for source, target, style in self.edges:
            a, b = self.exit.get(source), self.entry.get(target)
            if a and b and a != b:
                seen[(a, b, style)] = None
        for edge in extra_edges:
            seen[(edge.source, edge.target, edge.style)] = None
        return Figure(title, tuple(self.items), tuple(Edge(*key) for key in seen), stream_names)


def _transitions(nodes: list[fx.Node], is_segment) -> set[str]:
    """Untouched nodes the stream flows through from one segment to the next: stage transitions.

    Values computed between two segments from something else (a window mask read by the
    next segment) are side computations, not transitions.
    """
    marks = [i for i, n in enumerate(nodes) if is_segment(n)]
    if len(marks) < 2:
        return set()
    reached: set[str] = set()
    for node in nodes[marks[0] : marks[-1]]:
        if is_segment(node) or _is_metadata(node):  # a size read off the stream is not the stream
            continue
        if any(is_segment(a) or a.name in reached for a in node.all_input_nodes):
            reached.add(node.name)
    return reached


def _side_box(prefix: str, index: int, side_inputs: Sequence[str], nodes: dict[str, fx.Node]) -> Box:
    side_inputs = sorted(side_inputs, key=lambda name: name in nodes and _is_metadata(nodes[name]))  # tensors first
    lines = [f"side inputs of segment {index}"]
    for name in side_inputs[:6]:
        lines.append(_clip(f"{name}  {_shape(nodes[name]) if name in nodes else ''}".rstrip(), 48))
    if len(side_inputs) > 6:
        lines.append(f"+ {len(side_inputs) - 6} more")
    return Box(f"{prefix}_side", tuple(lines), "side", tooltip="\n".join(side_inputs))


# --- the rewritten graph ------------------------------------------------------------------------


def _block_box(prefix: str, index: int, block) -> Box:
    f_line = "F  " + _branch_modules(block.name, block.f.modules)
    g_line = "G  " + _branch_modules(block.name, block.g.modules)
    return Box(f"{prefix}_b{index}", (block.name, f_line, g_line), "block", "\n".join((*block.f.modules, *block.g.modules)))


def _expanded_block(prefix: str, index: int, block, edges: list[Edge], coupling: Coupling) -> tuple[Cluster, str, str]:
    """A block op by op: F's graph, F's coupling step (``Y1 = X1 + F(X2)``), G's graph, G's step."""
    bid = f"{prefix}_b{index}"
    children: list[Item] = []
    ends = {}
    for step, (which, program) in enumerate((("F", block.f), ("G", block.g))):
        boxes: list[Box] = []
        for node in program.graph.nodes:
            if node.op in ("get_attr", "output"):
                continue
            box_id = f"{bid}_{which}_{node.name}"
            if node.op == "placeholder" and not boxes:  # the stream the step reads (Rev-ViT: X2 for F, Y1 for G)
                boxes.append(Box(box_id, (coupling.step_inputs[step], _shape(node)), "coupling", f"stream input ({node.name})"))
            elif node.op == "placeholder":
                boxes.append(Box(box_id, (f"{node.name} (side input)", _shape(node)), "side"))
            else:
                boxes.append(Box(box_id, (short_target(node), _clip(module_path(node) or node.name, 40)), "op", _shape(node)))
            for arg in node.all_input_nodes:
                if arg.op != "get_attr":
                    edges.append(Edge(f"{bid}_{which}_{arg.name}", box_id))
        ends[which] = (boxes[0].id, boxes[-1].id)
        label = f"{which} = {_branch_modules(block.name, program.modules)}"
        children.append(Cluster(f"cluster_{bid}_{which}", label, f"branch_{which.lower()}", tuple(boxes)))
        children.append(Box(f"{bid}_{which}_out", (coupling.step_formulas[step],), "coupling"))
        edges.append(Edge(ends[which][1], f"{bid}_{which}_out"))
    edges.append(Edge(f"{bid}_F_out", ends["G"][0]))
    return Cluster(f"cluster_{bid}", block.name, "block", tuple(children)), ends["F"][0], f"{bid}_G_out"


def _segment_cluster(program: SegmentProgram, name: str, expand: bool, edges: list[Edge], coupling: Coupling) -> tuple[Cluster, str, str]:
    prefix = f"s{program.index}"
    blocks = list(enumerate(program.blocks))
    if not expand and len(blocks) > ELIDE_ABOVE:
        blocks = blocks[:KEEP_AT_ENDS] + [(-1, None)] + blocks[-KEEP_AT_ENDS:]
    children: list[Item] = []
    ends: list[tuple[str, str]] = []
    for index, block in blocks:
        if block is None:
            hidden = program.blocks[KEEP_AT_ENDS:-KEEP_AT_ENDS]
            box = Box(f"{prefix}_elided", (f"… {len(hidden)} more blocks", f"{hidden[0].name} .. {hidden[-1].name}"), "elided")
            children.append(box)
            ends.append((box.id, box.id))
        elif expand:
            cluster, entry, exit_ = _expanded_block(prefix, index, block, edges, coupling)
            children.append(cluster)
            ends.append((entry, exit_))
        else:
            box = _block_box(prefix, index, block)
            children.append(box)
            ends.append((box.id, box.id))
    edges.extend(Edge(a[1], b[0], "streams") for a, b in zip(ends, ends[1:]))
    label = f"reversible segment {program.index}: {name} · {len(program.blocks)} blocks · {coupling.keeps()}"
    return Cluster(f"cluster_{prefix}", label, "segment", tuple(children), program.index), ends[0][0], ends[-1][1]


def figure_of_rewritten(
    graph: fx.Graph, plan: Plan, segments: Sequence[SegmentProgram], *, expand: bool = False, title: str = "",
    coupling: Coupling = RevViT(),
) -> Figure:
    """The rewritten graph: segment clusters, untouched parts grey, side inputs beside them.

    ``coupling`` is what the segments compute (``convert(..., coupling=)``): it names the
    streams and, expanded, each step's formula.
    """
    nodes = [n for n in graph.nodes if _visible(n)]
    by_name = {n.name: n for n in graph.nodes}
    programs = {p.index: p for p in segments}
    is_segment = lambda n: n.op == "call_function" and isinstance(n.target, SegmentCall)  # noqa: E731
    transitions = _transitions(nodes, is_segment)
    skipped = _skip_reasons(plan)
    builder = _Builder()
    extra: list[Edge] = []
    side_args: dict[str, set[str]] = {}
    special = {n.name for n in nodes if is_segment(n)}
    for group in _group_untouched(nodes, special, _block_depth(plan), expand):
        node = group[0]
        if not is_segment(node):
            if not expand and all(_is_metadata(n) for n in group):
                continue  # only sizes: their edges are not drawn collapsed, so neither are they
            box = _untouched_box(group, _group_key(node, _block_depth(plan)), bool(transitions.intersection(n.name for n in group)), skipped)
            builder.items.append(box)
            builder.show(group, box.id)
            continue
        program = programs[node.target.index]
        cluster, entry, exit_ = _segment_cluster(program, plan.segments[program.index].name, expand, extra, coupling)
        side_nodes = [a for a in node.args[1:] if isinstance(a, fx.Node)]
        if side_nodes:
            side = _side_box(f"s{program.index}", program.index, [a.name for a in side_nodes], by_name)
            builder.items.append(side)
            for arg in side_nodes:
                if expand or not _is_metadata(arg):
                    builder.edges.append((arg.name, f"@{side.id}", "side"))
            builder.entry[f"@{side.id}"] = side.id
            extra.append(Edge(side.id, entry, "side"))
            side_args[node.name] = {a.name for a in side_nodes}
        builder.items.append(cluster)
        builder.show([node], entry, exit_)
    builder.connect(nodes, expand, side_args)
    return builder.figure(title or "after: the rewritten graph", extra, coupling.stream_names)


# --- the original graph -------------------------------------------------------------------------


def figure_of_original(graph: fx.Graph, plan: Plan, *, expand: bool = False, title: str = "") -> Figure:
    """The traced graph before the rewrite; the blocks each segment will take are framed, dashed."""
    nodes = [n for n in graph.nodes if _visible(n)]
    owner: dict[str, tuple[int, int]] = {}
    for segment in plan.segments:
        for b, block in enumerate(segment.blocks):
            for name in (*block.f.nodes, *block.g.nodes, *block.residuals):
                owner[name] = (segment.index, b)
    is_block = lambda n: n.name in owner  # noqa: E731
    transitions = _transitions(nodes, is_block) - set(owner)
    skipped = _skip_reasons(plan)
    depth = _block_depth(plan)
    builder = _Builder()
    position = {n.name: i for i, n in enumerate(nodes)}
    placed: list[tuple[int, Item]] = []
    for group in _group_untouched(nodes, set(), depth, expand, inside=set(owner)):
        if not expand and all(_is_metadata(n) for n in group):
            continue
        box = _untouched_box(group, _group_key(group[0], depth), bool(transitions.intersection(n.name for n in group)), skipped)
        placed.append((position[group[0].name], box))
        builder.show(group, box.id)
    members: dict[tuple[int, int], list[fx.Node]] = {}
    for node in nodes:
        if node.name in owner:
            members.setdefault(owner[node.name], []).append(node)
    for segment in plan.segments:
        children: list[Item] = []
        for b, block in enumerate(segment.blocks):
            own = members.get((segment.index, b), [])
            if expand:
                boxes = tuple(Box(f"o_{n.name}", (short_target(n), _clip(module_path(n) or n.name, 40)), "op", _shape(n)) for n in own)
                children.append(Cluster(f"cluster_o_{block.name}", block.name, "block", boxes))
                for n in own:
                    builder.show([n], f"o_{n.name}")
            else:
                lines = (block.name, *(f"{br.kind} branch: {_branch_modules(block.name, br.modules)}" for br in (block.f, block.g)))
                children.append(Box(f"o_{block.name}", lines, "plain", "\n".join(n.name for n in own)))
                builder.show(own, f"o_{block.name}")
        label = f"becomes reversible segment {segment.index}: {segment.name} ({len(segment.blocks)} blocks)"
        # placed at its last op: values computed among the blocks for them (masks) come first
        last = max((position[n.name] for key, own in members.items() if key[0] == segment.index for n in own), default=0)
        placed.append((last, Cluster(f"cluster_before_s{segment.index}", label, "planned", tuple(children), segment.index)))
    builder.items = [item for _, item in sorted(placed, key=lambda p: p[0])]
    builder.connect(nodes, expand)
    return builder.figure(title or "before: the traced graph")

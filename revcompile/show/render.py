"""Lay out a ``Figure`` and write it as SVG or Graphviz DOT, with no system dependency.

Graphviz is the usual tool, but its ``dot`` program is a system package that many machines
(and CI) lack; a figure of a rewritten transformer is nearly a chain, which a small layered
layout draws well. DOT text is always available too, for users who have Graphviz.

The layout is recursive: a cluster is laid out first, then placed in its parent as one
item. Within one container, items get ranks by longest path along the edges between them
(an edge to a box nested in a cluster counts as an edge to that cluster), rows are
stacked top to bottom, and each item is centred under its first predecessor where there
is room. An edge that skips rows bends around the rows it skips.
"""

from __future__ import annotations

from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

from revcompile.show.figure import Box, Cluster, Edge, Figure

__all__ = ["to_svg", "to_dot", "STYLES"]

CHAR_W, LINE_H, PAD, GAP_X, GAP_Y, LABEL_H = 7.4, 15.0, 8.0, 22.0, 30.0, 20.0
FONT = "font-family=\"DejaVu Sans Mono, Menlo, Consolas, monospace\" font-size=\"12\""

# style -> fill, stroke, text colour, dashed, corner radius
STYLES = {
    "input": ("#ffffff", "#424242", "#212121", False, 14),
    "output": ("#ffffff", "#424242", "#212121", False, 14),
    "untouched": ("#f4f4f4", "#c8c8c8", "#8c8c8c", False, 4),
    "transition": ("#ececec", "#9e9e9e", "#6d6d6d", False, 4),
    "skipped": ("#fff4e5", "#f0b46a", "#8d6e63", False, 4),
    "block": ("#ffffff", "#2e7d32", "#1b5e20", False, 4),
    "plain": ("#ffffff", "#616161", "#212121", False, 4),
    "elided": ("#ffffff", "#2e7d32", "#2e7d32", True, 4),
    "side": ("#fffbe6", "#d4a20b", "#6d5200", True, 4),
    "op": ("#ffffff", "#9e9e9e", "#424242", False, 3),
    "coupling": ("#e8f5e9", "#2e7d32", "#1b5e20", False, 3),
    "segment": ("#e8f5e9", "#2e7d32", "#1b5e20", False, 8),
    "planned": ("none", "#2e7d32", "#1b5e20", True, 8),
    "block_cluster": ("#ffffff", "#66bb6a", "#1b5e20", False, 6),
    "branch_f": ("#e3f2fd", "#1565c0", "#0d47a1", False, 6),
    "branch_g": ("#fff3e0", "#e65100", "#bf360c", False, 6),
}
LINE_COLOURS = {"F  ": "#1565c0", "G  ": "#e65100", "attention branch": "#1565c0", "mlp branch": "#e65100"}


def _style(item) -> tuple:
    key = "block_cluster" if isinstance(item, Cluster) and item.style == "block" else item.style
    return STYLES.get(key, STYLES["op"])


@dataclass
class _Geom:
    x: float
    y: float
    w: float
    h: float


class _Layout:
    def __init__(self, figure: Figure):
        self.figure = figure
        self.geom: dict[str, _Geom] = {}
        self.path: dict[str, tuple[str, ...]] = {}  # box id -> container ids from the top, then itself
        self.rank: dict[str, int] = {}
        self.rows: dict[str, list[list[str]]] = {}  # container id -> rows of child ids
        self.children: dict[str, tuple] = {"": figure.items}
        self._index("", figure.items, ("",))
        self.width, self.height = self._place("", figure.items, pad_top=0.0)
        self._absolute("", 0.0, 0.0)

    def _index(self, container: str, items, prefix: tuple[str, ...]) -> None:
        for item in items:
            self.path[item.id] = prefix + (item.id,)
            if isinstance(item, Cluster):
                self.children[item.id] = item.children
                self._index(item.id, item.children, prefix + (item.id,))

    def _lifted(self, container: str, edge: Edge) -> tuple[str, str] | None:
        """The children of ``container`` an edge runs between, if it runs between two of them."""
        a, b = self.path.get(edge.source), self.path.get(edge.target)
        if a is None or b is None:
            return None
        base = self.path[container] if container else ("",)
        n = len(base)
        if a[:n] != base or b[:n] != base or len(a) <= n or len(b) <= n or a[n] == b[n]:
            return None
        return a[n], b[n]

    def _place(self, container: str, items, pad_top: float) -> tuple[float, float]:
        order = {item.id: i for i, item in enumerate(items)}
        for item in items:
            if isinstance(item, Box):
                width = max(len(line) for line in item.lines) * CHAR_W + 2 * PAD
                self.geom[item.id] = _Geom(0, 0, width, len(item.lines) * LINE_H + 2 * PAD - 2)
            else:
                w, h = self._place(item.id, item.children, pad_top=LABEL_H)
                label_w = len(item.label) * CHAR_W + 2 * PAD
                if label_w > w:  # centre the contents under a wider label
                    for child in item.children:
                        self.geom[child.id].x += (label_w - w) / 2
                self.geom[item.id] = _Geom(0, 0, max(w, label_w), h)
        pairs = {p for e in self.figure.edges if (p := self._lifted(container, e)) and order[p[0]] < order[p[1]]}
        preds = {i.id: [a for a, b in pairs if b == i.id] for i in items}
        succs = {i.id: [b for a, b in pairs if a == i.id] for i in items}
        for item in items:
            self.rank[item.id] = max((self.rank[p] + 1 for p in preds[item.id]), default=0)
        for item in reversed(items):  # side computations sit just above their first user, not at the top
            if succs[item.id]:
                self.rank[item.id] = max(self.rank[item.id], min(self.rank[s] for s in succs[item.id]) - 1)
        rows: list[list[str]] = [[] for _ in range(max((self.rank[i.id] for i in items), default=-1) + 1)]
        for item in items:
            rows[self.rank[item.id]].append(item.id)
        self.rows[container] = rows
        y = pad_top + PAD
        for row in rows:
            self._place_row(row, preds, order, y)
            y += max(self.geom[i].h for i in row) + GAP_Y if row else 0
        left = min((self.geom[i.id].x for i in items), default=0)
        for item in items:
            self.geom[item.id].x += PAD - left
        width = max((self.geom[i.id].x + self.geom[i.id].w for i in items), default=0) + PAD
        return width, y - GAP_Y + PAD

    def _place_row(self, row: list[str], preds: dict, order: dict, y: float) -> None:
        """Centre each item under its first predecessor; items without any go to the right.

        The row is then shifted as a whole so that the items with predecessors sit, on
        average, where they want to: a chain stays straight.
        """

        def centre(item: str) -> float:
            g = self.geom[item]
            return g.x + g.w / 2

        # under the first predecessor in program order: the stream, not a mask computed beside it
        desired = {i: centre(min(preds[i], key=order.__getitem__)) for i in row if preds[i]}
        row.sort(key=lambda i: (i not in desired, desired.get(i, 0.0), order[i]))
        right = None
        for item in row:
            g = self.geom[item]
            x = desired.get(item, right + GAP_X + g.w / 2 if right is not None else 0.0) - g.w / 2
            g.x = x if right is None else max(x, right + GAP_X)
            g.y = y
            right = g.x + g.w
        if desired:
            shift = sum(want - centre(i) for i, want in desired.items()) / len(desired)
            for item in row:
                self.geom[item].x += shift

    def _absolute(self, container: str, dx: float, dy: float) -> None:
        for item in self.children[container]:
            g = self.geom[item.id]
            g.x += dx
            g.y += dy
            if isinstance(item, Cluster):
                self._absolute(item.id, g.x, g.y)

    def route(self, edge: Edge, lane: int) -> str:
        """An SVG path for ``edge``: a curve, or a detour along a lane right of what it would cross.

        An edge into a box deep inside a cluster (a mask read by every block) comes in from the
        box's right side, so that lanes do not run through the boxes above it.
        """
        a, b = self.geom[edge.source], self.geom[edge.target]
        sx, sy, tx, ty = a.x + a.w / 2, a.y + a.h, b.x + b.w / 2, b.y
        container = next((c for c in self.rows if self._lifted(c, edge)), None)
        blocking: list[_Geom] = []
        nested = False
        if container is not None:
            u, v = self._lifted(container, edge)
            between = [i for row in self.rows[container][self.rank[u] + 1 : self.rank[v]] for i in row]
            lo, hi = min(sx, tx) - 4, max(sx, tx) + 4
            blocking = [self.geom[i] for i in between if self.geom[i].x < hi and self.geom[i].x + self.geom[i].w > lo]
            nested = v != edge.target and self.rank[edge.target] > 0
        if not blocking and not nested:
            dy = max((ty - sy) / 2, 12)
            return f"M{sx:.1f},{sy:.1f} C{sx:.1f},{sy + dy:.1f} {tx:.1f},{ty - dy:.1f} {tx:.1f},{ty:.1f}"
        x = max([g.x + g.w for g in blocking] + ([b.x + b.w] if nested else [])) + 14 + 6 * lane
        start = f"M{sx:.1f},{sy:.1f} C{sx:.1f},{sy + 24:.1f} {x:.1f},{sy + 6:.1f} {x:.1f},{sy + 30:.1f}"
        if nested:
            my = b.y + b.h / 2
            return f"{start} L{x:.1f},{my - 8:.1f} Q{x:.1f},{my:.1f} {x - 8:.1f},{my:.1f} L{b.x + b.w:.1f},{my:.1f}"
        return f"{start} L{x:.1f},{ty - 30:.1f} C{x:.1f},{ty - 6:.1f} {tx:.1f},{ty - 24:.1f} {tx:.1f},{ty:.1f}"


def _svg_box(box: Box, g: _Geom, prefix: str) -> list[str]:
    fill, stroke, colour, dashed, radius = _style(box)
    dash = ' stroke-dasharray="5,3"' if dashed else ""
    out = [f'<g class="box {box.style}" id={quoteattr(prefix + box.id)}>']
    if box.tooltip:
        out.append(f"<title>{escape(box.tooltip)}</title>")
    out.append(f'<rect x="{g.x:.1f}" y="{g.y:.1f}" width="{g.w:.1f}" height="{g.h:.1f}" rx="{radius}" fill="{fill}" stroke="{stroke}"{dash}/>')
    for i, line in enumerate(box.lines):
        tint = next((c for prefix, c in LINE_COLOURS.items() if line.startswith(prefix)), colour)
        weight = ' font-weight="bold"' if i == 0 else ""
        y = g.y + PAD + LINE_H * (i + 1) - 4
        out.append(f'<text x="{g.x + PAD:.1f}" y="{y:.1f}" fill="{tint}"{weight} {FONT}>{escape(line)}</text>')
    out.append("</g>")
    return out


def _svg_items(items, layout: _Layout, prefix: str) -> list[str]:
    out: list[str] = []
    for item in items:
        g = layout.geom[item.id]
        if isinstance(item, Box):
            out.extend(_svg_box(item, g, prefix))
            continue
        fill, stroke, colour, dashed, radius = _style(item)
        dash = ' stroke-dasharray="7,4"' if dashed else ""
        out.append(f'<g class="cluster {item.style}" id={quoteattr(prefix + item.id)}>')
        out.append(f'<rect x="{g.x:.1f}" y="{g.y:.1f}" width="{g.w:.1f}" height="{g.h:.1f}" rx="{radius}" fill="{fill}" stroke="{stroke}" stroke-width="1.5"{dash}/>')
        out.append(f'<text x="{g.x + PAD:.1f}" y="{g.y + 15:.1f}" fill="{colour}" font-weight="bold" {FONT}>{escape(item.label)}</text>')
        out.extend(_svg_items(item.children, layout, prefix))
        out.append("</g>")
    return out


def _svg_edges(figure: Figure, layout: _Layout) -> list[str]:
    out = ['<g class="edges" fill="none">']
    lanes: dict[str, int] = {}
    for edge in figure.edges:
        if edge.source not in layout.geom or edge.target not in layout.geom:
            continue
        key = edge.source
        lanes[key] = lanes.get(key, len(lanes) % 4)
        d = layout.route(edge, lanes[key])
        if edge.style == "streams":
            out.append(f'<path d="{d}" stroke="#1b5e20" stroke-width="5" marker-end="url(#arrow-streams)"/>')
            out.append(f'<path d="{d}" stroke="#e8f5e9" stroke-width="1.6"/>')
        elif edge.style == "side":
            out.append(f'<path d="{d}" stroke="#d4a20b" stroke-width="1.3" stroke-dasharray="5,3" marker-end="url(#arrow-side)"/>')
        else:
            out.append(f'<path d="{d}" stroke="#757575" stroke-width="1.2" marker-end="url(#arrow)"/>')
    out.append("</g>")
    return out


_DEFS = """<defs>
<marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#757575"/></marker>
<marker id="arrow-side" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#d4a20b"/></marker>
<marker id="arrow-streams" viewBox="0 0 10 10" refX="8" refY="5" markerWidth="4" markerHeight="4" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#1b5e20"/></marker>
</defs>"""

_LEGEND = (
    ("segment", "reversible segment"),
    ("block", "block: F, G by module"),
    ("untouched", "left as it was"),
    ("side", "side input"),
)


def _streams_text(figures: list[Figure]) -> str:
    return "two streams " + ", ".join(figures[-1].stream_names)


def _legend(x: float, y: float, streams: str) -> list[str]:
    out = [f'<g class="legend" transform="translate({x:.1f},{y:.1f})">']
    offset = 0.0
    for style, text in _LEGEND:
        fill, stroke, colour, dashed, _ = STYLES[style]
        dash = ' stroke-dasharray="5,3"' if dashed else ""
        out.append(f'<rect x="{offset:.1f}" y="0" width="16" height="12" fill="{fill}" stroke="{stroke}"{dash}/>')
        out.append(f'<text x="{offset + 22:.1f}" y="10" fill="#424242" {FONT}>{escape(text)}</text>')
        offset += 30 + len(text) * CHAR_W
    out.append(f'<path d="M{offset:.1f},6 L{offset + 26:.1f},6" stroke="#1b5e20" stroke-width="5"/>')
    out.append(f'<path d="M{offset:.1f},6 L{offset + 26:.1f},6" stroke="#e8f5e9" stroke-width="1.6"/>')
    out.append(f'<text x="{offset + 32:.1f}" y="10" fill="#424242" {FONT}>{escape(streams)}</text>')
    out.append("</g>")
    return out


def to_svg(figures: list[Figure], title: str = "") -> str:
    """One SVG document with the figures side by side (``[before, after]`` or ``[after]``).

    Element ids are the figure's item ids prefixed by ``f<n>_`` (its position).
    """
    layouts = [_Layout(f) for f in figures]
    top = 34.0 + (22.0 if title else 0.0)
    width = sum(lay.width for lay in layouts) + 40.0 * (len(layouts) + 1)
    height = top + max(lay.height for lay in layouts) + 50.0
    body: list[str] = []
    if title:
        body.append(f'<text x="20" y="24" fill="#212121" font-weight="bold" font-size="15" font-family="sans-serif">{escape(title)}</text>')
    x = 40.0
    for n, (figure, layout) in enumerate(zip(figures, layouts)):
        for g in layout.geom.values():  # absolute coordinates: no transforms to undo for readers of the SVG
            g.x += x
            g.y += top
        body.append('<g class="figure">')
        body.append(f'<text x="{x:.1f}" y="{top - 10:.1f}" fill="#424242" font-weight="bold" font-size="13" font-family="sans-serif">{escape(figure.title)}</text>')
        body.extend(_svg_items(figure.items, layout, f"f{n}_"))
        body.extend(_svg_edges(figure, layout))
        body.append("</g>")
        x += layout.width + 40.0
    body.extend(_legend(40.0, height - 28, _streams_text(figures)))
    legend_width = sum(30 + len(text) * CHAR_W for _, text in _LEGEND) + 60 + len(_streams_text(figures)) * CHAR_W
    width = max(width, legend_width + 80.0)
    head = f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}">'
    return "\n".join([head, _DEFS, '<rect width="100%" height="100%" fill="#ffffff"/>', *body, "</svg>"]) + "\n"


# --- DOT ------------------------------------------------------------------------------------


def _dot_string(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return '"' + escaped + '"'


def _dot_items(items, prefix: str, indent: str) -> list[str]:
    out: list[str] = []
    for item in items:
        fill, stroke, colour, dashed, _ = _style(item)
        if isinstance(item, Box):
            style = "rounded,filled" + (",dashed" if dashed else "")
            label = _dot_string("\n".join(item.lines))
            out.append(f'{indent}{_dot_string(prefix + item.id)} [label={label}, style="{style}", fillcolor="{fill}", color="{stroke}", fontcolor="{colour}"];')
        else:
            out.append(f"{indent}subgraph {_dot_string('cluster_' + prefix + item.id)} {{")
            style = "rounded" + (",dashed" if dashed else ",filled")
            out.append(f'{indent}  label={_dot_string(item.label)}; style="{style}"; fillcolor="{fill}"; color="{stroke}"; fontcolor="{colour}";')
            out.extend(_dot_items(item.children, prefix, indent + "  "))
            out.append(f"{indent}}}")
    return out


def to_dot(figures: list[Figure], title: str = "") -> str:
    """Graphviz DOT for the same figures (``dot -Tsvg`` renders it where Graphviz is installed)."""
    out = [
        "digraph revcompile {",
        f'  graph [rankdir=TB, compound=true, fontname="monospace", label={_dot_string(title)}, labelloc=t];',
        '  node [shape=box, fontname="monospace", fontsize=10];',
        '  edge [color="#757575"];',
    ]
    for n, figure in enumerate(figures):
        prefix = f"f{n}_"
        out.append(f'  subgraph "cluster_{prefix}figure" {{ label={_dot_string(figure.title)}; color="#ffffff";')
        out.extend(_dot_items(figure.items, prefix, "    "))
        for edge in figure.edges:
            attrs = {"streams": ' [color="#1b5e20:#1b5e20", penwidth=1.5]', "side": ' [style=dashed, color="#d4a20b"]'}.get(edge.style, "")
            out.append(f"    {_dot_string(prefix + edge.source)} -> {_dot_string(prefix + edge.target)}{attrs};")
        out.append("  }")
    out.append("}")
    return "\n".join(out) + "\n"

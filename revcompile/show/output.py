"""Seeing what the compiler did: the rewritten graph as SVG, DOT or HTML, or the plan as a tree.

The figure itself is decided at compile time (``revcompile.show.graph_figure``) and laid out without any
system dependency (``revcompile.show.render``); this module picks the compiled variant of a
converted model, writes the file the user asked for, and builds the terminal tree.
"""

from __future__ import annotations

from html import escape
from pathlib import Path

from rich.text import Text
from rich.tree import Tree
from torch import nn

from revcompile.show.graph_figure import figure_of_original, figure_of_rewritten
from revcompile.show.figure import Box, Figure
from revcompile.show.render import to_dot, to_svg

__all__ = ["FORMATS", "figures", "draw", "plan_tree"]

FORMATS = (".svg", ".dot", ".html")


def _compiled(module: nn.Module):
    from revcompile.api import find_converted

    found = find_converted(module)
    if not found or not found[0].reversible_variants:
        raise ValueError(
            f"{type(module).__name__} is not a converted model; call revcompile.convert(model, example_inputs) first"
        )
    return found[0], found[0].reversible_variants[0].compiled


def figures(module: nn.Module, *, before: bool = False, expand: bool = False) -> list[Figure]:
    """The figures of a converted model: ``[after]``, or ``[before, after]``."""
    converted, compiled = _compiled(module)
    coupling = converted.reversible_settings.coupling
    after = figure_of_rewritten(compiled.graph, compiled.plan, compiled.segments, expand=expand, coupling=coupling)
    if not before:
        return [after]
    return [figure_of_original(compiled.traced_graph, compiled.plan, expand=expand), after]


def draw(module: nn.Module, path: str | Path | None = None, *, before: bool = False, expand: bool = False,
         title: str | None = None) -> str:
    """Draw the rewritten graph of a converted model; write it to ``path`` if given.

    The format follows the suffix: ``.svg`` (laid out here, no Graphviz needed), ``.dot``
    (Graphviz source) or ``.html`` (the SVG with the plan beside it). Each reversible
    segment is a cluster, each block one box naming its F and G branches (``expand=True``:
    op by op); untouched parts are grey. ``before=True`` draws the original graph beside it.
    Returns the text written (SVG when no path is given).
    """
    converted, compiled = _compiled(module)
    title = title or f"{type(converted.original_model).__name__}: what revcompile made reversible"
    figs = figures(module, before=before, expand=expand)
    suffix = Path(path).suffix.lower() if path is not None else ".svg"
    if suffix not in FORMATS:
        raise ValueError(f"cannot draw to {str(path)!r}: the file name must end in one of {', '.join(FORMATS)}")
    if suffix == ".dot":
        text = to_dot(figs, title)
    elif suffix == ".svg":
        text = to_svg(figs, title)
    else:
        text = (
            f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{escape(title)}</title></head>\n"
            f"<body style=\"font-family: sans-serif\">\n{to_svg(figs, title)}\n"
            f"<h3>Plan</h3>\n<pre>{escape(str(compiled.plan))}</pre>\n</body></html>\n"
        )
    if path is not None:
        Path(path).write_text(text, encoding="utf-8")
    return text


_TREE_STYLES = {"untouched": "grey50", "transition": "grey50 italic", "skipped": "yellow", "side": "dark_goldenrod",
                "input": "bold", "output": "bold", "elided": "green"}


def _box_text(box: Box) -> Text:
    text = Text(box.lines[0], style=_TREE_STYLES.get(box.style, ""))
    for line in box.lines[1:]:
        colour = "blue" if line.startswith("F ") else "dark_orange" if line.startswith("G ") else _TREE_STYLES.get(box.style, "")
        text.append("   " + line, style=colour)
    return text


def plan_tree(module: nn.Module, title: str | None = None) -> Tree:
    """The model in program order, as a rich tree: untouched stretches grey, segments with their blocks."""
    converted, compiled = _compiled(module)
    plan = compiled.plan
    (figure,) = figures(module)
    root = Tree(Text(
        f"{title or type(converted.original_model).__name__}: {len(plan.blocks)} blocks in "
        f"{len(plan.segments)} reversible segment{'s' if len(plan.segments) != 1 else ''} ({plan.tracer} tracer)",
        style="bold",
    ))
    for item in figure.items:
        if isinstance(item, Box):
            root.add(_box_text(item))
            continue
        segment = plan.segments[item.segment]
        branch = root.add(Text(item.label, style="bold green"))
        for child in item.children:
            branch.add(_box_text(child) if isinstance(child, Box) else Text(child.label))
        branch.add(Text(f"ends: {segment.ends_because}", style="green"))
    for note in plan.notes:
        root.add(Text(f"note: {note}", style="grey50"))
    return root

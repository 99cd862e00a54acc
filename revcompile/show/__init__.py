"""Seeing what the compiler did: the rewritten graph as a picture, the plan as a tree.

Drawing is not a compile pass; it reads the compiled graphs and plan:

    graph_figure   a graph + plan -> a ``Figure`` (boxes, clusters, edges; no geometry)
    render         a ``Figure`` -> SVG (laid out here, no Graphviz) or DOT
    output         a converted model -> the file the user asked for, or a rich tree
"""

from revcompile.show.output import FORMATS, draw, figures, plan_tree

__all__ = ["FORMATS", "draw", "figures", "plan_tree"]

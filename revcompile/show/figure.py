"""A figure of a graph, before any geometry: boxes, clusters of boxes, and edges between boxes.

``revcompile.show.graph_figure`` decides what a figure shows; ``revcompile.show.render`` lays it out and writes SVG
or DOT; the CLI prints it as a tree. Keeping the figure a plain value between them means
each reader sees the same content, and tests can check what is shown without parsing
pictures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

__all__ = ["Box", "Cluster", "Item", "Edge", "Figure"]


@dataclass(frozen=True)
class Box:
    id: str
    lines: tuple[str, ...]  # the first line is the title
    style: str  # input | output | untouched | transition | skipped | block | side | op | coupling | elided
    tooltip: str = ""


@dataclass(frozen=True)
class Cluster:
    id: str
    label: str
    style: str  # segment | planned | block | branch_f | branch_g
    children: tuple["Item", ...]
    segment: int | None = None  # the reversible segment a segment/planned cluster stands for


Item = Union[Box, Cluster]


@dataclass(frozen=True)
class Edge:
    source: str  # Box ids
    target: str
    style: str = "data"  # data | streams (the two coupled streams) | side (a side input)


@dataclass(frozen=True)
class Figure:
    title: str
    items: tuple[Item, ...]  # top level, in program order
    edges: tuple[Edge, ...]
    stream_names: tuple[str, str] = ("X1", "X2")  # the coupling's two streams (the double line)

    def walk(self, items=None):
        """Every box and cluster, depth first."""
        for item in self.items if items is None else items:
            yield item
            if isinstance(item, Cluster):
                yield from self.walk(item.children)

    def boxes(self) -> list[Box]:
        return [item for item in self.walk() if isinstance(item, Box)]

    def clusters(self, style: str | None = None) -> list[Cluster]:
        return [i for i in self.walk() if isinstance(i, Cluster) and (style is None or i.style == style)]

"""The drawing pass: what a figure shows (revcompile.show.graph_figure) and how it is laid out (revcompile.show.render)."""

from __future__ import annotations

import itertools
import xml.etree.ElementTree as ET

import pytest
import torch
from torch import nn

import revcompile
from revcompile.show.graph_figure import figure_of_original, figure_of_rewritten
from revcompile.show.figure import Box, Cluster
from revcompile.show.render import to_dot, to_svg
from revcompile.reference import Block, example_inputs, reference_vit

SVG = "{http://www.w3.org/2000/svg}"


class TwoStages(nn.Module):
    """Two stacks of blocks joined by a projection (a stage transition): two segments."""

    def __init__(self, width=(32, 48), depth=2):
        super().__init__()
        self.embed = nn.Linear(8, width[0])
        self.stage1 = nn.Sequential(*(Block(width[0], 2, 2.0, 0.0, 0.0, 0.0) for _ in range(depth)))
        self.merge = nn.Linear(width[0], width[1])
        self.stage2 = nn.Sequential(*(Block(width[1], 2, 2.0, 0.0, 0.0, 0.0) for _ in range(depth)))
        self.head = nn.Linear(width[1], 4)

    def forward(self, x):
        return self.head(self.stage2(self.merge(self.stage1(self.embed(x)))).mean(1))


def two_stages():
    """For the CLI: ``tests.test_draw:two_stages`` returns a model and its inputs."""
    return TwoStages(), torch.randn(2, 6, 8)


def _compiled(model, *args):
    converted = revcompile.convert(model, *args)
    return converted, converted.reversible_variants[0].compiled


@pytest.fixture(scope="module")
def two_stage_variant():
    torch.manual_seed(0)
    return _compiled(*two_stages())[1]


@pytest.fixture(scope="module")
def gpt2_variant():
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    model = AutoModel.from_config(AutoConfig.for_model("gpt2", n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32))
    return _compiled(model.train(), torch.randint(0, 100, (2, 12)))[1]


def _top_level_boxes(figure) -> list[Box]:
    return [item for item in figure.items if isinstance(item, Box)]


def test_each_segment_is_a_cluster_of_its_blocks_named_by_module(two_stage_variant):
    v = two_stage_variant
    figure = figure_of_rewritten(v.graph, v.plan, v.segments)
    segments = figure.clusters("segment")
    assert len(segments) == len(v.plan.segments) == 2
    for cluster, segment in zip(segments, v.plan.segments):
        titles = [child.lines[0] for child in cluster.children]
        assert titles == [b.name for b in segment.blocks]
        for child in cluster.children:
            assert child.lines[1] == "F  norm1 → attn" and child.lines[2] == "G  norm2 → mlp", child.lines
    streams = [e for e in figure.edges if e.style == "streams"]
    assert len(streams) == sum(len(s.blocks) - 1 for s in v.plan.segments)


def test_untouched_parts_are_grey_and_the_merge_is_a_transition(two_stage_variant):
    v = two_stage_variant
    figure = figure_of_rewritten(v.graph, v.plan, v.segments)
    boxes = _top_level_boxes(figure)
    assert {b.style for b in boxes} <= {"input", "output", "untouched", "transition", "skipped", "side"}
    transitions = [b for b in boxes if b.style == "transition"]
    assert [b.lines[0] for b in transitions] == ["merge (Linear)"]
    # the stream goes input -> ... -> segment 0 -> merge -> segment 1 -> ... -> output
    order = [item.id for item in figure.items]
    assert order.index("cluster_s0") < order.index(transitions[0].id) < order.index("cluster_s1")


def test_side_inputs_are_drawn_beside_the_segment(gpt2_variant):
    v = gpt2_variant
    (segment,) = v.plan.segments
    assert segment.side_inputs, "GPT-2's attention mask should be a side input"
    figure = figure_of_rewritten(v.graph, v.plan, v.segments)
    side = [b for b in figure.boxes() if b.style == "side"]
    assert len(side) == 1
    assert all(name in "\n".join(side[0].lines) for name in segment.side_inputs[:5])
    (into,) = [e for e in figure.edges if e.source == side[0].id]
    assert into.style == "side" and into.target == "s0_b0"
    assert figure.clusters("segment")[0].children[0].lines[1] == "F  ln_1 → attn"


def test_long_segments_collapse_unless_expanded():
    torch.manual_seed(0)
    model = reference_vit(depth=18, dim=16, heads=2)
    _, v = _compiled(model, example_inputs(model, 2))
    collapsed = figure_of_rewritten(v.graph, v.plan, v.segments)
    (cluster,) = collapsed.clusters("segment")
    assert [c.style for c in cluster.children] == ["block"] * 3 + ["elided"] + ["block"] * 3
    assert "blocks.3 .. blocks.14" in cluster.children[3].lines[1]
    expanded = figure_of_rewritten(v.graph, v.plan, v.segments, expand=True)
    assert len(expanded.clusters("block")) == 18
    assert len(expanded.clusters("branch_f")) == len(expanded.clusters("branch_g")) == 18


def test_original_frames_the_blocks_each_segment_takes(two_stage_variant):
    v = two_stage_variant
    figure = figure_of_original(v.traced_graph, v.plan)
    planned = figure.clusters("planned")
    assert len(planned) == 2 and not figure.clusters("segment")
    assert [[c.lines[0] for c in cluster.children] for cluster in planned] == [
        [b.name for b in s.blocks] for s in v.plan.segments
    ]


class ExtraResidual(nn.Module):
    """Two blocks, then an MLP residual with no attention before it: left as it is."""

    def __init__(self):
        super().__init__()
        self.vit = reference_vit(depth=2, dim=16, heads=2)
        self.extra = nn.Sequential(nn.Linear(16, 16), nn.GELU())

    def forward(self, x):
        x = self.vit.blocks(self.vit.patch_embed(x).flatten(2).transpose(1, 2))
        x = x + self.extra(x)
        return self.vit.head(self.vit.norm(x).mean(1))


def test_a_residual_left_alone_carries_its_reason():
    torch.manual_seed(0)
    _, v = _compiled(ExtraResidual(), torch.randn(2, 3, 32, 32))
    (skipped,) = v.plan.skipped
    figure = figure_of_rewritten(v.graph, v.plan, v.segments)
    (box,) = [b for b in figure.boxes() if b.style == "skipped"]
    text = " ".join(box.lines)
    assert "residual left as is" in text and skipped.reason.split("(")[0].strip() in text


def _rects(svg: str, kind: str) -> dict[str, tuple[float, float, float, float]]:
    root = ET.fromstring(svg)
    found = {}
    for g in root.iter(f"{SVG}g"):
        if (g.get("class") or "").startswith(kind):
            rect = g.find(f"{SVG}rect")
            found[g.get("id")] = tuple(float(rect.get(k)) for k in ("x", "y", "width", "height"))
    return found


def _overlap(a, b) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def _inside(inner, outer) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and inner[0] + inner[2] <= outer[0] + outer[2] and inner[1] + inner[3] <= outer[1] + outer[3]


@pytest.mark.parametrize("expand", [False, True])
def test_layout_has_no_overlapping_boxes_and_clusters_hold_their_boxes(two_stage_variant, expand):
    v = two_stage_variant
    figures = [figure_of_original(v.traced_graph, v.plan, expand=expand), figure_of_rewritten(v.graph, v.plan, v.segments, expand=expand)]
    svg = to_svg(figures, "two stages")
    boxes, clusters = _rects(svg, "box"), _rects(svg, "cluster")
    assert len(boxes) == sum(len(f.boxes()) for f in figures)
    for (a, ra), (b, rb) in itertools.combinations(boxes.items(), 2):
        assert not _overlap(ra, rb), f"{a} overlaps {b}"

    def check(items, outer, prefix):
        for item in items:
            rect = (clusters if isinstance(item, Cluster) else boxes)[prefix + item.id]
            if outer is not None:
                assert _inside(rect, outer), item.id
            if isinstance(item, Cluster):
                check(item.children, rect, prefix)

    for n, figure in enumerate(figures):
        check(figure.items, None, f"f{n}_")


def test_dot_has_one_cluster_per_segment_and_every_edge(two_stage_variant):
    v = two_stage_variant
    figure = figure_of_rewritten(v.graph, v.plan, v.segments)
    dot = to_dot([figure], "t")
    assert dot.count('subgraph "cluster_f0_cluster_s') == 2
    assert dot.count(" -> ") == len(figure.edges)
    assert dot.count("{") == dot.count("}")


def test_draw_api_writes_each_format(tmp_path):
    torch.manual_seed(0)
    model = reference_vit(depth=2, dim=16, heads=2)
    converted = revcompile.convert(model, example_inputs(model, 2))
    for suffix in (".svg", ".dot", ".html"):
        text = revcompile.draw(converted, tmp_path / f"m{suffix}", before=True)
        assert (tmp_path / f"m{suffix}").read_text() == text
    ET.parse(tmp_path / "m.svg")
    assert "<svg" in (tmp_path / "m.html").read_text() and "Plan (fx tracer)" in (tmp_path / "m.html").read_text()
    with pytest.raises(ValueError, match="must end in one of"):
        revcompile.draw(converted, tmp_path / "m.png")
    with pytest.raises(ValueError, match="not a converted model"):
        revcompile.draw(model, tmp_path / "m.svg")

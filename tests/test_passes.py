"""normalize_graph and rewrite_reversible: each keeps what the graph computes."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx

from revcompile.passes.detect import find_reversible_blocks
from revcompile.passes.normalize import normalize_graph
from revcompile.passes.patterns import SHAPE_QUERY
from revcompile.passes.couplings import FUSIONS, RevViT
from revcompile.passes.rewrite import SegmentCall, rewrite_reversible
from revcompile.frontend import _propagate_fake
from tests import blocks as B


class ShapeReadingStack(torch.nn.Module):
    """Each attention branch reshapes by ``x.shape`` read off the running stream, and the
    model asserts the width: a shape query on every block's input, and a guard."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(B.PreNormBlock() for _ in range(3))

    def forward(self, x):
        for block in self.blocks:
            batch, length, dim = x.shape
            torch._assert(dim == B.DIM, "width")
            x = x + block.attn(block.norm1(x)).reshape(batch, length, dim)
            x = x + block.mlp(block.norm2(x))
        return x


def _traced(model, *inputs):
    gm = fx.symbolic_trace(model)
    _propagate_fake(gm, list(inputs))
    return gm


def test_normalize_removes_guards_and_redirects_shape_queries():
    x = B.tokens()
    model = ShapeReadingStack()
    result = normalize_graph(_traced(model, x))
    gm = result.graph_module
    assert result.guards_removed == 3
    assert result.shape_queries_redirected >= 2
    queried = {n.args[0].name for n in gm.graph.nodes if SHAPE_QUERY.matches(n)}
    assert queried == {"x"}  # all shape queries now read the stream's origin
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    plan = find_reversible_blocks(gm)  # ... which lets the three blocks chain
    assert [len(s.blocks) for s in plan.segments] == [3]


def test_normalize_keeps_effects_that_look_dead():
    class Scaled(torch.nn.Module):
        def forward(self, x):
            y = x * 2
            y.div_(4)  # unused result, but it changes y
            return y + 1

    gm = normalize_graph(_traced(Scaled(), B.tokens())).graph_module
    x = B.tokens()
    torch.testing.assert_close(gm(x), x * 2 / 4 + 1)


def _rewritten(model, x):
    gm = normalize_graph(_traced(model, x)).graph_module
    plan = find_reversible_blocks(gm)
    result = rewrite_reversible(gm, plan)
    return result.graph_module, plan, result


def test_rewrite_leaves_its_input_graph_as_it_was():
    gm = normalize_graph(_traced(B.TappedStack(depth=4), B.tokens())).graph_module
    plan = find_reversible_blocks(gm)
    before = gm.code
    result = rewrite_reversible(gm, plan)
    assert gm.code == before
    assert result.graph_module is not gm and result.graph_module.code != before


def test_rewrite_replaces_each_segment_by_one_call():
    x = B.tokens()
    gm, plan, result = _rewritten(B.TappedStack(depth=4), x)
    calls = [n for n in gm.graph.nodes if isinstance(n.target, SegmentCall)]
    assert [c.target.index for c in calls] == [0, 1]
    assert len(result.segments) == 2
    # no trace of the blocks' parameters is left outside the segments
    attrs = [str(n.target) for n in gm.graph.nodes if n.op in ("get_attr", "call_module")]
    assert not any(a.startswith("blocks.") for a in attrs)
    program = result.segments[0]
    assert [b.name for b in program.blocks] == ["blocks.0", "blocks.1"]
    f_graph = program.blocks[0].f.graph
    placeholders = [n for n in f_graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == 1 + len(program.blocks[0].f.side_inputs)
    assert set(program.parameters) == {p for b in plan.segments[0].blocks for p in b.f.parameters + b.g.parameters}


def _run_coupled(model, program, x, fusion):
    """Evaluate a segment program directly: X1 = X2 = x, Y1 = X1 + F(X2), Y2 = X2 + G(Y1)."""
    x1 = x2 = x
    for block in program.blocks:
        f = fx.GraphModule(model, block.f.graph)
        g = fx.GraphModule(model, block.g.graph)
        y1 = x1 + f(x2)
        y2 = x2 + g(y1)
        x1, x2 = y1, y2
    return {"mean": (x1 + x2) / 2, "sum": x1 + x2}[fusion]


@pytest.mark.parametrize("fusion", sorted(FUSIONS))
def test_extracted_branches_compute_the_coupling(fusion):
    torch.manual_seed(0)
    model = B.Stack(depth=3).eval()
    x = B.tokens()
    gm, plan, result = _rewritten(model, x)
    program = result.segments[0]
    stream = model.embed(x)
    expected = model.head(_run_coupled(model, program, stream, fusion))
    from revcompile.runtime import ReversibleSegment, RuntimeSettings

    # "model" streams: the same float32 arithmetic as the reference loop above.
    segment = ReversibleSegment(program, model, RuntimeSettings(streams="model", coupling=RevViT(fusion)))
    for node in gm.graph.nodes:
        if isinstance(node.target, SegmentCall):
            node.target = segment
    gm.recompile()
    torch.testing.assert_close(gm(x), expected, rtol=0, atol=0)


def test_unknown_fusion_is_rejected():
    with pytest.raises(ValueError, match="fusion"):
        RevViT("concat")


def test_segment_marker_cannot_run_unbound():
    with pytest.raises(RuntimeError, match="unbound"):
        SegmentCall(0)(torch.zeros(1))


def test_add_patterns_cover_both_dialects():
    from revcompile.passes.patterns import RESIDUAL_ADD

    graph = fx.Graph()
    a, b = graph.placeholder("a"), graph.placeholder("b")
    for target in (operator.add, torch.add, torch.ops.aten.add.Tensor):
        assert RESIDUAL_ADD.matches(graph.call_function(target, (a, b)))
    assert RESIDUAL_ADD.matches(graph.call_method("add", (a, b)))
    assert not RESIDUAL_ADD.matches(graph.call_function(torch.mul, (a, b)))


def test_normalize_leaves_the_callers_graph_untouched():
    gm = _traced(ShapeReadingStack(), B.tokens())
    code, nodes = gm.code, [n.name for n in gm.graph.nodes]
    result = normalize_graph(gm)
    assert result.modified and result.graph_module is not gm
    assert gm.code == code and [n.name for n in gm.graph.nodes] == nodes
    assert result.graph_module.code != code


def test_in_place_sum_into_a_temporary_becomes_the_out_of_place_parallel_form():
    x = B.tokens()
    model = B.sequential(B.InplaceMethodParallelBlock(), B.InplaceMethodParallelBlock()).eval()
    result = normalize_graph(_traced(model, x))
    assert result.inplace_adds_made_out_of_place == 2
    torch.testing.assert_close(result.graph_module(x), model(x), rtol=0, atol=0)
    plan = find_reversible_blocks(result.graph_module)
    assert [b.form for b in plan.blocks] == ["parallel", "parallel"] and plan.skipped == ()


def test_in_place_add_into_a_value_read_before_is_left_alone():
    class ReadBefore(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(B.DIM, B.DIM)

        def forward(self, x):
            h = self.fc(x)
            doubled = h * 2
            h.add_(x)
            return doubled * h

    class ViewTaken(ReadBefore):
        def forward(self, x):
            h = self.fc(x)
            first = h[:, :1]  # a view taken before the write sees it
            h.add_(x)
            return first * h

    x = B.tokens()
    for model in (ReadBefore(), ViewTaken()):
        result = normalize_graph(_traced(model, x))
        assert result.inplace_adds_made_out_of_place == 0, type(model).__name__
        torch.testing.assert_close(result.graph_module(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("tracer, block", [("fx", B.InplaceMethodParallelBlock), ("export", B.InplaceParallelBlock)])
def test_parallel_block_summed_in_place_converts_with_exact_gradients(tracer, block):
    import revcompile
    from tests.conftest import assert_gradients_match, perturb_parameters

    torch.manual_seed(0)
    model = perturb_parameters(B.sequential(block(), block()).double())
    x = B.tokens(dtype=torch.float64)
    converted = revcompile.convert(model, x, tracer=tracer)
    plan = revcompile.explain(converted)
    assert [b.form for b in plan.blocks] == ["parallel", "parallel"] and len(plan.segments) == 1, str(plan)
    assert_gradients_match(converted, (x,), tol=1e-10)

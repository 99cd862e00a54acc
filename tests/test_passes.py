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


class UnpackingAttention(torch.nn.Module):
    """Attention written ``q, k, v = qkv.reshape(...).permute(...)`` (eager: one unbind;
    fx: one getitem per element) or, with ``indexed``, ``qkv[0], qkv[1], qkv[2]``."""

    def __init__(self, attention, indexed: bool = False):
        super().__init__()
        self.qkv, self.proj, self.attn_drop, self.proj_drop = attention.qkv, attention.proj, attention.attn_drop, attention.proj_drop
        self.heads, self.scale, self.indexed = attention.heads, attention.scale, indexed

    def forward(self, x):
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = (qkv[0], qkv[1], qkv[2]) if self.indexed else qkv
        attn = self.attn_drop(((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1))
        return self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(batch, tokens, dim)))


def _unpacking_vit(indexed: bool = False, **options):
    from revcompile.reference import reference_vit

    model = reference_vit(dim=32, depth=3, heads=2, img_size=16, patch_size=4, **options)
    for block in model.blocks:
        block.attn = UnpackingAttention(block.attn, indexed)
    return model


def _element_ops(graph: fx.Graph) -> list[fx.Node]:
    """Index/select ops taking one element of a tensor (not of a tuple)."""
    return [n for n in graph.nodes if n.target in (operator.getitem, torch.select, torch.ops.aten.select.int, "select")
            and n.args and isinstance(n.args[0].meta.get("val"), torch.Tensor) and isinstance(n.args[-1], int)]


def _unbinds(graph: fx.Graph) -> int:
    return sum(n.target in ("unbind", torch.ops.aten.unbind.int) for n in graph.nodes)


@pytest.mark.parametrize("indexed", [False, True])
def test_every_element_taken_by_index_becomes_one_unbind_with_identical_values_and_gradients(indexed):
    torch.manual_seed(0)
    model = _unpacking_vit(indexed).double().eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    traced = _traced(model, x)
    assert len(_element_ops(traced.graph)) == 9 and _unbinds(traced.graph) == 0  # the case being fixed
    result = normalize_graph(traced)
    assert result.element_sets_unbound == 3
    assert _element_ops(result.graph_module.graph) == [] and _unbinds(result.graph_module.graph) == 3

    def values_and_gradients(module):
        images = x.clone().requires_grad_(True)
        out = module(images)
        grads = torch.autograd.grad(out.square().sum(), [images, *model.parameters()])
        return out, grads

    out, grads = values_and_gradients(result.graph_module)
    ref_out, ref_grads = values_and_gradients(traced)
    assert torch.equal(out, ref_out)
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))


def test_elements_written_in_place_or_taken_in_part_are_left_as_index_ops():
    class Partial(torch.nn.Module):
        def forward(self, x):
            return x[0] * x[1]  # element 2 is never taken: eager code would not unbind either

    class Written(torch.nn.Module):
        def forward(self, x):
            a, b = x * 1
            a.mul_(2)  # unbind's views refuse in-place writes
            return a + b

    for model, x in ((Partial(), torch.randn(3, 4)), (Written(), torch.randn(2, 4))):
        result = normalize_graph(_traced(model, x))
        assert result.element_sets_unbound == 0, type(model).__name__
        torch.testing.assert_close(result.graph_module(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("source", ["reference", "timm", "unpacking"])
def test_qkv_of_every_attention_branch_is_one_unbind_after_conversion(source):
    import revcompile

    if source == "timm":
        timm = pytest.importorskip("timm")
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, depth=3)
    elif source == "reference":
        from revcompile.reference import reference_vit

        model = reference_vit(dim=32, depth=3, heads=2, img_size=16, patch_size=4)
    else:
        model = _unpacking_vit()
    converted = revcompile.convert(model, torch.randn(2, 3, 16, 16))
    segments = [s for v in converted.reversible_variants for s in v.segments]
    attention = [f.module.graph for s in segments for f, _ in s.blocks]
    assert len(attention) == 3
    assert all(_unbinds(g) == 1 and _element_ops(g) == [] for g in attention)


def test_unpacked_qkv_converts_with_exact_gradients_dropout_on():
    import revcompile
    from tests.conftest import assert_gradients_match, perturb_parameters

    torch.manual_seed(0)
    model = perturb_parameters(_unpacking_vit().double())
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    converted = revcompile.convert(model, x)
    assert len(revcompile.explain(converted).blocks) == 3
    assert_gradients_match(converted, (x,), tol=1e-10)

"""torch.export of identical layer stacks: two layers traced, the rest copied (revcompile.layer_reuse)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import revcompile
from revcompile.frontend import _export, bind_call, trace_model
from tests import blocks as B
from tests.conftest import assert_gradients_match, perturb_parameters
from tests.models import hf_llama

REUSED = "identical layers"


def _reused(plan_or_trace) -> bool:
    return any(REUSED in note for note in plan_or_trace.notes)


def _steps(graph) -> list:
    """The graph's computation in order, and the attributes it reads."""
    calls = [(n.op, str(n.target)) for n in graph.nodes if n.op not in ("get_attr", "placeholder", "output")]
    return calls + sorted(str(n.target) for n in graph.nodes if n.op == "get_attr")


def test_llama_stack_is_exported_once_and_the_graph_is_the_full_export():
    torch.manual_seed(0)
    model, (ids,), _, depth = hf_llama(depth=5)
    call = bind_call(model, (ids,), {}, {"use_cache": False})
    trace = trace_model(model, call, "export", training=True)
    assert _reused(trace) and len(model.layers) == depth  # the model's own stack is restored
    full = _export(model, call).module()
    assert _steps(trace.graph_module.graph) == _steps(full.graph)
    # each copy carries its own layer's module path (blocks are named after it)
    paths = {list(n.meta["nn_module_stack"].values())[-1][0].split(".")[1]
             for n in trace.graph_module.graph.nodes if n.meta.get("nn_module_stack") and
             list(n.meta["nn_module_stack"].values())[-1][0].startswith("layers.")}
    assert paths == {str(i) for i in range(depth)}


def test_llama_stack_gradients_are_exact():
    torch.manual_seed(0)
    model, (ids,), _, depth = hf_llama(depth=5)  # attention dropout on
    model = perturb_parameters(model.double())
    converted = revcompile.convert(model, ids)
    plan = revcompile.explain(converted)
    assert _reused(plan) and [b.name for b in plan.blocks] == [f"layers.{i}" for i in range(depth)]
    assert_gradients_match(converted, (ids,), tol=1e-10)


class _IndexedBlock(B.PreNormBlock):
    """A pre-norm block that knows its position, and may use it."""

    def __init__(self, layer_idx: int, use: str):
        super().__init__()
        self.layer_idx, self.use = layer_idx, use

    def forward(self, x):
        x = super().forward(x)
        if self.use == "late layers differ" and self.layer_idx >= 3:
            x = x * 2
        if self.use == "scale by position":
            x = x * (self.layer_idx + 1)
        return x


def _indexed_stack(use: str, depth: int = 5) -> nn.Module:
    stack = B.Stack(depth=depth)
    stack.blocks = nn.ModuleList(_IndexedBlock(i, use) for i in range(depth))
    return stack


class _CountedStack(B.Stack):
    """Walks its layers by a count of its own: a stack cut short fails to export."""

    def forward(self, x):
        x = self.embed(x)
        for i in range(4):
            x = self.blocks[i](x)
        return self.head(x)


CASES = {
    # same graph for layers 0 and 1, different from layer 3 on: the output check catches it
    "late layers differ": lambda: _indexed_stack("late layers differ"),
    # layers 0 and 1 trace to different graphs
    "scale by position": lambda: _indexed_stack("scale by position"),
    # the code after the stack reads layer 1's output, which a copy would move to the last layer
    "hidden-state tap": lambda: B.TappedStack(depth=4),
    "forward needs the full stack": lambda: _CountedStack(depth=4),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_stacks_that_are_not_copies_of_one_layer_are_exported_whole(case):
    torch.manual_seed(0)
    model = CASES[case]()
    x = B.tokens()
    call = bind_call(model, (x,), {})
    trace = trace_model(model, call, "export", training=True)
    assert not _reused(trace)
    assert len(model.blocks) >= 4
    for got, want in zip(torch.utils._pytree.tree_leaves(trace.graph_module(x)), torch.utils._pytree.tree_leaves(model(x))):
        assert torch.equal(got, want)


def test_a_stack_whose_copies_are_exact_converts_with_exact_gradients():
    torch.manual_seed(0)
    model = perturb_parameters(_indexed_stack("none").double())
    x = B.tokens(dtype=torch.float64)
    converted = revcompile.convert(model, x, tracer="export")
    plan = revcompile.explain(converted)
    assert _reused(plan) and len(plan.blocks) == 5
    assert_gradients_match(converted, (x,), tol=1e-10)


def test_a_list_with_empty_slots_is_not_a_stack():
    """x-transformers keeps ``None`` in some of its ModuleLists: such a list is no layer stack."""
    from revcompile.layer_reuse import find_layer_stack

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(5)])
            self.layers.append(None)
            self.norms = nn.ModuleList([None, nn.LayerNorm(4), None, nn.LayerNorm(4), nn.LayerNorm(4)])

    assert find_layer_stack(Holder()) is None


class _SubblockMlp(nn.Module):
    """An MLP kept in a list named like the stack's own (``blocks.1.mlp.subblocks.1``)."""

    def __init__(self, dim: int = B.DIM):
        super().__init__()
        self.subblocks = nn.ModuleList([nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)])

    def forward(self, x):
        for part in self.subblocks:
            x = part(x)
        return x


def test_copies_move_only_the_layer_prefix_of_module_paths():
    """Layer 1's ``blocks.1.mlp.subblocks.1`` becomes ``blocks.4.mlp.subblocks.1`` in layer 4's copy,
    as a full export names it (a textual replace would also turn ``subblocks.1`` into ``subblocks.4``)."""
    torch.manual_seed(0)
    model = B.Stack(depth=5)
    for block in model.blocks:
        block.mlp = _SubblockMlp()
    x = B.tokens()
    call = bind_call(model, (x,), {})
    trace = trace_model(model, call, "export", training=True)
    assert _reused(trace)
    full = _export(model, call).module()

    def paths(graph):
        return [[path for path, _ in n.meta["nn_module_stack"].values()] for n in graph.nodes
                if n.op not in ("get_attr", "placeholder", "output") and n.meta.get("nn_module_stack")]

    assert paths(trace.graph_module.graph) == paths(full.graph)
    assert "blocks.4.mlp.subblocks.2" in {p for stack in paths(trace.graph_module.graph) for p in stack}


def test_the_stitched_graph_is_compared_with_the_reference_the_caller_passes():
    """``convert``'s input check hands its run of the model to the layer-reuse check
    (``CallSignature.reference``): a reference the graph does not reproduce means a full export."""
    import dataclasses

    from revcompile.layer_reuse import training_output

    torch.manual_seed(0)
    model = _indexed_stack("none")
    x = B.tokens()
    call = bind_call(model, (x,), {})
    reference = training_output(model, call)
    assert _reused(trace_model(model, dataclasses.replace(call, reference=reference), "export", training=True))
    off = [t + 1e-6 for t in reference]
    assert not _reused(trace_model(model, dataclasses.replace(call, reference=off), "export", training=True))

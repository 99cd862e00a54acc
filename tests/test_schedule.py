"""The backward scheduler: dependencies derived from data, independence proved, schedules checked."""

from __future__ import annotations

import dataclasses

import networkx as nx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import revcompile
from revcompile.passes.schedule import (
    GRAD,
    RECOMPUTE,
    Independence,
    ScheduleError,
    check_program,
    grad_value,
    schedule_backward,
    side_value,
)

DEPTHS = [1, 2, 3, 5, 8]


def recompute(i):
    return (RECOMPUTE, i)


def grad(i):
    return (GRAD, i)


@pytest.mark.parametrize("depth", DEPTHS)
def test_dependencies_are_the_data_flow_of_reversible_backprop(depth):
    program = schedule_backward(depth)
    expected = (
        {(recompute(i), grad(i)) for i in range(depth)}  # grad i differentiates the graph recompute i rebuilt
        | {(recompute(i), recompute(i - 1)) for i in range(1, depth)}  # X_i = Y_{i-1} is rebuilt by recompute i
        | {(grad(i), grad(i - 1)) for i in range(1, depth)}  # dX_i = dY_{i-1}
    )
    assert set(program.graph.nodes) == {s for i in range(depth) for s in (recompute(i), grad(i))}
    assert set(program.graph.edges) == expected


@pytest.mark.parametrize("depth", DEPTHS)
def test_independent_pairs_are_grad_i_and_any_earlier_recompute(depth):
    """PaReprop's observation, found by reachability: grad i never feeds recompute j < i."""
    program = schedule_backward(depth)
    expected = {frozenset((grad(i), recompute(j))) for i in range(depth) for j in range(i)}
    assert program.independent == expected
    for pair in program.independent:
        a, b = tuple(pair)
        assert not nx.has_path(program.graph, a, b) and not nx.has_path(program.graph, b, a)


@pytest.mark.parametrize("depth", DEPTHS)
def test_parallel_program_overlaps_each_grad_with_the_next_recompute(depth):
    program = schedule_backward(depth, streams=2)
    order = {step: k for k, step in enumerate(program.order)}
    assert all(order[u] < order[v] for u, v in program.graph.edges)
    for i in range(depth):  # at odd depths too: the last block is differentiated where it was rebuilt
        assert program.streams[grad(i)] == program.streams[recompute(i)]
    assert {(p.first, p.second) for p in program.concurrent} == {(grad(i), recompute(i - 1)) for i in range(1, depth)}
    for proof in program.concurrent:
        assert proof.holds(program.graph)
        assert program.streams[proof.first] != program.streams[proof.second]
    assert program.stream_count == (1 if depth == 1 else 2)
    assert program.live_graphs == (1 if depth == 1 else 2)
    crossing = {(v, u) for u, v in nx.transitive_reduction(program.graph).edges if program.streams[u] != program.streams[v]}
    assert set(program.waits) == crossing
    assert len(program.waits) == 2 * (depth - 1)


@pytest.mark.parametrize("depth", DEPTHS)
def test_sequential_program_keeps_one_block_graph_alive(depth):
    program = schedule_backward(depth, streams=1)
    assert program.order == tuple(s for i in reversed(range(depth)) for s in (recompute(i), grad(i)))
    assert set(program.streams.values()) == {0}
    assert program.waits == () and program.concurrent == ()
    assert program.live_graphs == 1
    assert all(len(group) == 2 for group in program.groups)  # recompute i and grad i issued together


@settings(max_examples=30, deadline=None)
@given(depth=st.integers(1, 24), streams=st.integers(1, 4))
def test_every_schedule_passes_its_own_checker(depth, streams):
    program = schedule_backward(depth, streams=streams)
    check_program(program)
    assert program.live_graphs <= streams
    assert len(program.order) == 2 * depth


# --- the checker rejects unsafe programs (negative controls) ------------------------------------


def _parallel(depth=3):
    return schedule_backward(depth, streams=2)


def test_checker_rejects_an_order_that_differentiates_before_rebuilding():
    program = _parallel()
    order = list(program.order)
    order[0], order[1] = order[1], order[0]  # grad 2 before recompute 2
    bad = dataclasses.replace(program, order=tuple(order), groups=tuple((s,) for s in order))
    with pytest.raises(ScheduleError, match="not a topological order"):
        check_program(bad)


@pytest.mark.parametrize("depth", [3, 5])
def test_checker_rejects_a_hard_coded_alternation(depth):
    """The reference code alternates streams by block parity; differentiating block i on the
    other stream than the one that rebuilt its graph is refused."""
    program = _parallel(depth)
    streams = {(kind, i): (i + (kind == GRAD)) % 2 for kind, i in program.order}
    with pytest.raises(ScheduleError, match="rebuilt on"):
        check_program(dataclasses.replace(program, streams=streams))


def test_checker_rejects_a_missing_wait():
    program = _parallel()
    for dropped in range(len(program.waits)):
        waits = program.waits[:dropped] + program.waits[dropped + 1 :]
        with pytest.raises(ScheduleError, match="a wait is missing"):
            check_program(dataclasses.replace(program, waits=waits))


def test_checker_rejects_dependent_steps_issued_together():
    program = _parallel()
    groups = ((recompute(2),), (recompute(1), grad(2)), (grad(1), recompute(0)), (grad(0),))
    streams = dict(program.streams) | {recompute(1): 1, grad(2): 0}
    bad = dataclasses.replace(program, groups=groups, order=tuple(s for g in groups for s in g), streams=streams)
    check_program(bad)  # an equivalent regrouping is fine ...
    groups = ((recompute(2), recompute(1)), (grad(2),), (grad(1), recompute(0)), (grad(0),))
    bad = dataclasses.replace(program, groups=groups, order=tuple(s for g in groups for s in g))
    with pytest.raises(ScheduleError, match="one depends on the other"):  # ... a dependent pair is not
        check_program(bad)


def test_checker_rejects_a_false_independence_proof():
    program = _parallel()
    forged = Independence(grad(2), recompute(1), frozenset(), frozenset())
    with pytest.raises(ScheduleError, match="proof does not hold"):
        check_program(dataclasses.replace(program, concurrent=program.concurrent + (forged,)))
    assert Independence.prove(program.graph, recompute(2), recompute(1)) is None


def test_checker_enforces_the_live_graph_bound():
    program = schedule_backward(4, streams=1)
    order = tuple(recompute(i) for i in reversed(range(4))) + tuple(grad(i) for i in reversed(range(4)))
    greedy = dataclasses.replace(program, order=order, groups=tuple((s,) for s in order))
    with pytest.raises(ScheduleError, match="4 block graphs alive"):
        check_program(greedy)
    check_program(dataclasses.replace(greedy, live_graphs=4))


# --- real segments: parameters and side inputs ---------------------------------------------------


class _SharedBiasBlocks(torch.nn.Module):
    """Three blocks that all read one learned attention bias: its gradient accumulates."""

    def __init__(self, dim=8, tokens=4, depth=3):
        super().__init__()
        self.bias_table = torch.nn.Parameter(torch.randn(tokens, tokens))
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(dim, 3 * dim) for _ in range(depth))
        self.mlp = torch.nn.ModuleList(torch.nn.Linear(dim, dim) for _ in range(depth))

    def forward(self, x):
        bias = self.bias_table * 2.0
        for qkv, mlp in zip(self.qkv, self.mlp):
            q, k, v = qkv(x).chunk(3, dim=-1)
            x = x + torch.softmax(q @ k.transpose(-2, -1) + bias, dim=-1) @ v
            x = x + mlp(x)
        return x


def test_a_segment_with_side_inputs_schedules_from_its_accesses():
    model = _SharedBiasBlocks()
    converted = revcompile.convert(model, torch.randn(2, 4, 8))
    program = revcompile.backward_program(converted, 0)
    assert program.depth == 3 and program.blocks[0] == revcompile.explain(converted).blocks[0].name
    bias_grad = grad_value(side_value(0))
    for i in range(3):
        assert side_value(0) in program.reads[recompute(i)]
        assert bias_grad in program.writes[grad(i)]
        assert grad_value(f"qkv.{i}.weight") in program.writes[grad(i)]
    for i in range(1, 3):  # the shared accumulator adds to the gradient chain's edges
        assert {bias_grad, f"dY{i - 1}"} <= program.graph.edges[grad(i), grad(i - 1)]["values"]
    assert program.independent == schedule_backward(3).independent


def test_backward_program_api_and_listing():
    model = _SharedBiasBlocks(depth=3)
    converted = revcompile.convert(model, torch.randn(2, 4, 8))
    parallel = revcompile.backward_program(converted)
    sequential = revcompile.backward_program(converted, mode="reversible")
    assert parallel.stream_count == 2 and sequential.stream_count == 1
    listing = str(parallel)
    for step in parallel.order:
        assert f"{step[0]} {step[1]}" in listing
    assert "grad 2 || recompute 1" in listing and "[s0 -> s1: wait]" in listing
    with pytest.raises(IndexError):
        revcompile.backward_program(converted, 1)
    with pytest.raises(ValueError, match="backward program"):
        revcompile.backward_program(converted, mode="autograd")


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="at least one block"):
        schedule_backward(0)

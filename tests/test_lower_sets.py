"""Kusumoto's lower-set DP (``passes/lower_sets.py``) against brute force on small graphs.

Brute force enumerates every chain of lower sets ``L1 < ... < Lk = V`` of the family the DP
walks (every lower set, or Kusumoto's approximate family) with every choice of stored /
recomputed per block, prices each with ``strategy_cost`` (the same cost model) and keeps
the least overhead within the budget. Graphs: chains, diamonds, and random layered DAGs of
up to 7 nodes.
"""

from __future__ import annotations

import itertools
import random

import pytest

from revcompile.passes.lower_sets import (
    CostGraph,
    CostNode,
    family_of,
    lower_set_options,
    lower_sets,
    plan_lower_sets,
    strategy_cost,
)


def _node(rng: random.Random, name: str, inputs: tuple[str, ...]) -> CostNode:
    return CostNode(name, saved=rng.randint(0, 40), output=rng.randint(1, 12), time=float(rng.randint(0, 9)), inputs=inputs)


def _chain(rng: random.Random, n: int) -> CostGraph:
    return CostGraph(tuple(_node(rng, f"n{i}", (f"n{i - 1}",) if i else ("x",)) for i in range(n)), (("x", rng.randint(0, 8)),))


def _diamond(rng: random.Random, n: int) -> CostGraph:
    """x -> a -> (b, c) -> d, then a tail of n - 4 nodes."""
    edges = {"a": ("x",), "b": ("a",), "c": ("a",), "d": ("b", "c")}
    nodes = [_node(rng, name, inputs) for name, inputs in edges.items()]
    nodes += [_node(rng, f"t{i}", (nodes[-1].name,)) for i in range(n - 4)]
    return CostGraph(tuple(nodes), (("x", rng.randint(0, 8)),))


def _layered(rng: random.Random, n: int) -> CostGraph:
    """Random layers; every node reads one to three nodes of the layers before (or the input)."""
    nodes, layers, made = [], [["x"]], 0
    while made < n:
        width = min(rng.randint(1, 3), n - made)
        layer = []
        for _ in range(width):
            earlier = [name for lay in layers for name in lay]
            inputs = {rng.choice(layers[-1])} | set(rng.sample(earlier, min(len(earlier), rng.randint(0, 2))))
            nodes.append(_node(rng, f"v{made}", tuple(sorted(inputs))))
            layer.append(f"v{made}")
            made += 1
        layers.append(layer)
    return CostGraph(tuple(nodes), (("x", rng.randint(0, 8)),))


def _every_strategy(graph: CostGraph, exact: bool):
    """Every chain of lower sets in the family from the empty set to V, with a mode per block."""
    family, _ = family_of(graph, exact)
    names = [n.name for n in graph.nodes]
    full = (1 << len(names)) - 1

    def chains(lower: int):
        if lower == full:
            yield ()
            return
        for upper in family:
            if upper != lower and not lower & ~upper:
                for rest in chains(upper):
                    yield (upper & ~lower, *rest)

    for blocks in chains(0):
        for modes in itertools.product((False, True), repeat=len(blocks)):
            yield [(tuple(n for i, n in enumerate(names) if b >> i & 1), m) for b, m in zip(blocks, modes)]


GRAPHS = [(_chain, 5), (_chain, 7), (_diamond, 4), (_diamond, 6), (_layered, 5), (_layered, 6), (_layered, 7)]


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("make, n", GRAPHS)
def test_the_lower_set_dp_finds_the_brute_force_optimum(make, n, seed, exact):
    rng = random.Random(seed * 1000 + n)
    graph = make(rng, n)
    plans = [strategy_cost(graph, strategy, exact) for strategy in _every_strategy(graph, exact)]
    peaks = sorted({p.peak for p in plans})
    for budget in [peaks[0] - 1, *rng.sample(peaks, min(5, len(peaks))), peaks[-1]]:
        fitting = [p.overhead for p in plans if p.peak <= budget]
        found = plan_lower_sets(graph, budget, exact=exact)
        if not fitting:
            assert found is None
            continue
        assert found is not None and found.peak <= budget
        assert found.overhead == pytest.approx(min(fitting))
        assert found.lower_sets()[-1] == frozenset(n.name for n in graph.nodes)
        assert strategy_cost(graph, [(s.nodes, s.recomputed) for s in found.steps]).peak == found.peak


def test_the_exact_family_is_every_lower_set_and_the_approximate_one_the_ancestor_closures():
    graph = _diamond(random.Random(0), 4)  # a -> (b, c) -> d: {}, a, ab, ac, abc, abcd
    assert len(lower_sets(graph)) == 6
    approximate, exact = family_of(graph, False)
    assert not exact and len(approximate) == 5  # {}, a, ab, ac, abcd: "abc" is nobody's closure
    assert lower_sets(graph, limit=3) is None


def test_a_recompute_predicate_is_respected():
    graph = _chain(random.Random(1), 6)
    allowed = lambda names: len(names) <= 2  # noqa: E731
    for plan in lower_set_options(graph, allowed):
        assert all(len(nodes) <= 2 for nodes in plan.recomputed)
    stored = strategy_cost(graph, [(tuple(n.name for n in graph.nodes), False)])
    never = plan_lower_sets(graph, stored.peak, recomputable=lambda names: False)
    assert never.overhead == 0 and not never.recomputed
    assert plan_lower_sets(graph, stored.peak - 1, recomputable=lambda names: False) is None


@pytest.mark.parametrize("seed", range(3))
def test_overhead_never_rises_with_the_budget_and_vanishes_when_everything_fits(seed):
    rng = random.Random(seed)
    graph = _layered(rng, 12)  # beyond brute force; the DP still runs over every lower set or the closures
    stored = strategy_cost(graph, [(tuple(n.name for n in graph.nodes), False)])
    overheads = []
    for budget in range(0, stored.peak + 1, max(1, stored.peak // 25)):
        plan = plan_lower_sets(graph, budget)
        if plan is not None:
            assert plan.peak <= budget
            overheads.append(plan.overhead)
    assert overheads and all(a >= b for a, b in zip(overheads, overheads[1:]))
    loose = plan_lower_sets(graph, stored.peak)
    assert loose.overhead == 0 and loose.peak <= stored.peak


def test_the_options_are_a_pareto_front_led_by_the_cheapest():
    graph = _layered(random.Random(5), 7)
    options = lower_set_options(graph)
    assert options[0].overhead == 0
    for a, b in itertools.permutations(options, 2):
        assert not (a.kept <= b.kept and a.peak <= b.peak and a.overhead <= b.overhead), (a, b)
    tightest = min(o.peak for o in options)
    assert plan_lower_sets(graph, tightest).peak == tightest


def test_a_graph_reading_an_unknown_value_is_refused():
    with pytest.raises(ValueError, match="neither an earlier node"):
        CostGraph((CostNode("a", 1, 1, 1.0, ("missing",)),))

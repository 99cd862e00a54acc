"""Which activations of a non-reversible region to keep and which to recompute: Kusumoto's lower-set DP.

The parts of a model that are not detected blocks -- the stem, a hierarchical model's stage
transitions (patch merging), the final norm and head -- cannot be coupled. They can still
trade compute for memory: Kusumoto et al. (NeurIPS 2019) plan recomputation on a general
computation graph with *lower sets*. A lower set ``L`` holds every predecessor of its
members; a *canonical strategy* is a chain of lower sets ``L1 < L2 < ... < Lk = V``, and
block ``Vi = Li \\ L(i-1)`` runs once in the forward and once more in the backward, keeping
only the values it reads from earlier blocks. This module plans that for one region given
as a ``CostGraph``; ``revcompile.planner`` cuts each recomputed block out of the graph as a
``torch.utils.checkpoint`` region (``revcompile.passes.checkpoint``).

The cost model, stated in autograd's terms (a node's ``saved`` bytes are what autograd
keeps for its backward, ``output`` the bytes of its value, ``time`` its forward FLOPs). Each
block ``Vi`` of the chain is either

* *stored*: keeps ``K = saved(Vi)``, no transient, no extra time (Kusumoto's singleton
  blocks, whose boundary is kept and not recomputed, do the same; ``torch.utils.checkpoint``
  recomputes a block whole, so storing is its own choice here), or
* *recomputed*: keeps ``K = output(inputs(Vi))``, the values it reads from outside itself
  (earlier blocks' boundary, or the region's inputs); its backward first re-saves everything,
  transient ``T = saved(Vi)``; extra time ``time(Vi)``.

Backward walks the blocks in reverse; while block ``i``'s backward runs, everything blocks
before it keep is alive. So a strategy's modelled peak is Kusumoto's peak formula in these
terms::

    peak = max( K1 + ... + Kk,  max over i of (K1 + ... + K(i-1) + Ki + Ti) )

and its overhead is the summed ``time`` of its recomputed blocks. A value read by two
recomputed blocks is counted by each (an over-estimate; the planner simulates the result).

``plan_lower_sets`` minimises the overhead subject to ``peak <= budget`` by dynamic
programming over the lower sets, keeping per lower set the Pareto front of partial
strategies on (kept bytes, overhead, peak): exact for this model over the family of lower
sets it walks (tests compare it with brute force over every chain). The family is every
lower set when there are at most ``MAX_EXACT_LOWER_SETS`` of them (graphs of the planner's
regions are near-chains: a chain of n nodes has n + 1), else Kusumoto's approximate family:
the empty set, ``V`` and, per node, the node with its ancestors (|V| + 2 sets). With F lower
sets it takes O(F^2 * |V|) to price the transitions plus O(F^2 * P) for fronts of size P.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

__all__ = ["MAX_EXACT_LOWER_SETS", "CostNode", "CostGraph", "Step", "LowerSetPlan", "lower_sets", "family_of",
           "strategy_cost", "plan_lower_sets", "lower_set_options"]

MAX_EXACT_LOWER_SETS = 512


@dataclass(frozen=True)
class CostNode:
    name: str
    saved: int  # bytes autograd keeps for its backward
    output: int  # bytes of its value
    time: float  # forward FLOPs (or seconds)
    inputs: tuple[str, ...] = ()  # nodes of the graph, or ``CostGraph.external`` values, it reads


@dataclass(frozen=True)
class CostGraph:
    """A region's nodes in a topological order, and the bytes of the values it reads from outside."""

    nodes: tuple[CostNode, ...]
    external: tuple[tuple[str, int], ...] = ()  # (name, bytes a recomputed block pays to keep it)

    def __post_init__(self):
        seen = {name for name, _ in self.external}
        for node in self.nodes:
            unknown = [i for i in node.inputs if i not in seen]
            if unknown:
                raise ValueError(f"{node.name} reads {unknown}, neither an earlier node nor an external value")
            seen.add(node.name)


@dataclass(frozen=True)
class Step:
    """One block ``Vi`` of the chain."""

    nodes: tuple[str, ...]  # in graph order
    recomputed: bool
    kept: int
    transient: int
    overhead: float


@dataclass(frozen=True)
class LowerSetPlan:
    steps: tuple[Step, ...]
    peak: int  # modelled, bytes
    kept: int  # kept at the end of the forward
    overhead: float
    exact: bool  # planned over every lower set (else over Kusumoto's approximate family)

    def lower_sets(self) -> tuple[frozenset[str], ...]:
        """``L1 < L2 < ... < Lk = V``."""
        sets, current = [], frozenset()
        for step in self.steps:
            current = current | frozenset(step.nodes)
            sets.append(current)
        return tuple(sets)

    @property
    def recomputed(self) -> tuple[tuple[str, ...], ...]:
        return tuple(step.nodes for step in self.steps if step.recomputed)


class _Indexed:
    """The graph as bitmasks: bit i is node i."""

    def __init__(self, graph: CostGraph):
        self.graph = graph
        self.index = {n.name: i for i, n in enumerate(graph.nodes)}
        self.external = dict(graph.external)
        self.full = (1 << len(graph.nodes)) - 1
        self.ancestors = []
        for node in graph.nodes:
            mask = 1 << self.index[node.name]
            for name in node.inputs:
                if name in self.index:
                    mask |= self.ancestors[self.index[name]]
            self.ancestors.append(mask)

    def members(self, mask: int) -> list[CostNode]:
        return [n for i, n in enumerate(self.graph.nodes) if mask >> i & 1]

    def step(self, block: int, recomputed: bool) -> Step:
        nodes = self.members(block)
        names = tuple(n.name for n in nodes)
        saved = sum(n.saved for n in nodes)
        if not recomputed:
            return Step(names, False, saved, 0, 0.0)
        inside = set(names)
        read = {i for n in nodes for i in n.inputs if i not in inside}
        kept = sum(self.external[i] if i in self.external else self.graph.nodes[self.index[i]].output for i in read)
        return Step(names, True, kept, saved, float(sum(n.time for n in nodes)))


def lower_sets(graph: CostGraph, limit: int | None = None) -> list[int] | None:
    """Every lower set as a bitmask, smallest first; None when there are more than ``limit``."""
    indexed = _Indexed(graph)
    found, frontier = {0}, [0]
    while frontier:
        grown = []
        for mask in frontier:
            for i, ancestors in enumerate(indexed.ancestors):
                if not mask >> i & 1 and ancestors & ~(1 << i) & ~mask == 0 and (bigger := mask | 1 << i) not in found:
                    found.add(bigger)
                    grown.append(bigger)
                    if limit is not None and len(found) > limit:
                        return None
        frontier = grown
    return sorted(found, key=lambda m: (bin(m).count("1"), m))


def _approximate_family(indexed: _Indexed) -> list[int]:
    return sorted({0, indexed.full, *indexed.ancestors}, key=lambda m: (bin(m).count("1"), m))


def strategy_cost(graph: CostGraph, chain: Iterable[tuple[Iterable[str], bool]], exact: bool = True) -> LowerSetPlan:
    """The modelled cost of a strategy: (block's nodes, recomputed?) per block, in order."""
    indexed = _Indexed(graph)
    steps = [indexed.step(sum(1 << indexed.index[n] for n in nodes), recomputed) for nodes, recomputed in chain]
    return _plan(steps, exact)


def _plan(steps: list[Step], exact: bool) -> LowerSetPlan:
    kept = peak = 0
    for step in steps:
        peak = max(peak, kept + step.kept + step.transient)
        kept += step.kept
    return LowerSetPlan(_merge_stored(steps), max(peak, kept), kept, sum(s.overhead for s in steps), exact)


def _merge_stored(steps: list[Step]) -> tuple[Step, ...]:
    """Adjacent stored blocks are one stored block (same cost)."""
    merged: list[Step] = []
    for step in steps:
        if merged and not step.recomputed and not merged[-1].recomputed:
            last = merged.pop()
            step = Step(last.nodes + step.nodes, False, last.kept + step.kept, 0, 0.0)
        merged.append(step)
    return tuple(merged)


@dataclass(frozen=True)
class _Partial:
    kept: int
    overhead: float
    peak: int
    back: "_Partial | None"
    step: Step | None


def _pareto(partials: list[_Partial], with_peak: bool) -> list[_Partial]:
    """Drop partial strategies another one beats on kept bytes and overhead (and peak, ``with_peak``).

    Under a budget the peak need not be compared: a partial strategy's completions fit iff
    the bytes it keeps leave room, so less kept and less overhead is better whatever its peak.
    """
    front: list[_Partial] = []
    for p in sorted(partials, key=lambda p: (p.kept, p.overhead, p.peak)):
        if with_peak:
            if not any(q.overhead <= p.overhead and q.peak <= p.peak for q in front):
                front.append(p)
        elif not front or p.overhead < front[-1].overhead:
            front.append(p)
    return front


def family_of(graph: CostGraph, exact: bool | None = None) -> tuple[list[int], bool]:
    """The lower sets the DP walks, as bitmasks smallest first, and whether that is all of them.

    ``exact``: True for every lower set, False for the approximate family, None for every
    lower set when there are at most ``MAX_EXACT_LOWER_SETS``.
    """
    family = None if exact is False else lower_sets(graph, None if exact else MAX_EXACT_LOWER_SETS)
    if family is None:
        return _approximate_family(_Indexed(graph)), False
    return family, True


def _fronts(graph: CostGraph, budget: float, recomputable, exact: bool | None) -> tuple[list[_Partial], bool]:
    indexed = _Indexed(graph)
    family, exact = family_of(graph, exact)
    fronts: dict[int, list[_Partial]] = {0: [_Partial(0, 0.0, 0, None, None)]}
    for position, lower in enumerate(family):
        here = _pareto(fronts.pop(lower, []), budget == float("inf"))
        if lower == indexed.full:
            return here, exact
        for upper in family[position + 1:]:
            if lower & ~upper:
                continue
            block = upper & ~lower
            names = None
            for recomputed in (False, True):
                if recomputed and recomputable is not None:
                    names = names or frozenset(n.name for n in indexed.members(block))
                    if not recomputable(names):
                        continue
                step = indexed.step(block, recomputed)
                for p in here:
                    peak = max(p.peak, p.kept + step.kept + step.transient)
                    if peak <= budget:
                        fronts.setdefault(upper, []).append(_Partial(p.kept + step.kept, p.overhead + step.overhead, peak, p, step))
    return [], exact


def _unwind(partial: _Partial, exact: bool) -> LowerSetPlan:
    steps = []
    while partial.step is not None:
        steps.append(partial.step)
        partial = partial.back
    return _plan(steps[::-1], exact)


Recomputable = Callable[[frozenset], bool]


def plan_lower_sets(graph: CostGraph, budget: float, recomputable: Recomputable | None = None,
                    exact: bool | None = None) -> LowerSetPlan | None:
    """The strategy with the least overhead whose modelled peak is within ``budget``, or None.

    ``recomputable(names)``: whether a block of these nodes may be recomputed (the planner
    asks for one output and no in-place op); None allows every block. ``exact``: see ``family_of``.
    """
    finals, exact = _fronts(graph, budget, recomputable, exact)
    finals = [p for p in finals if p.kept <= budget]
    if not finals:
        return None
    return _unwind(min(finals, key=lambda p: (p.overhead, p.peak, p.kept)), exact)


def lower_set_options(graph: CostGraph, recomputable: Recomputable | None = None,
                      exact: bool | None = None) -> tuple[LowerSetPlan, ...]:
    """Every strategy no other beats on kept bytes, peak and overhead at once; least overhead first."""
    finals, exact = _fronts(graph, float("inf"), recomputable, exact)
    plans = sorted((_unwind(p, exact) for p in finals), key=lambda p: (p.overhead, p.peak, p.kept))
    return tuple(plans)

"""Schedule a reversible segment's backward: steps, their dependencies, streams and waits.

Backward through a segment of ``n`` blocks is a program of ``2n`` steps:

* ``("recompute", i)`` rebuilds block ``i``'s branch graphs from its outputs ``Y_i`` and
  reconstructs its inputs ``X_i = Y_{i-1}``: ``X2 = Y2 - G(Y1)``, ``X1 = Y1 - F(X2)``;
* ``("grad", i)`` pulls ``dY_i`` back through the rebuilt graphs: ``dX_i`` and the
  gradients of block ``i``'s parameters and side inputs.

PaReprop's observation is that ``grad i`` and ``recompute i-1`` do not depend on each
other, so they can run on two CUDA streams at once. The reference code hard-codes that
alternation per model (and gets the parity wrong at odd depths). This pass *derives* it:

1. every step declares the values it reads and writes; the dependency graph has an edge
   wherever the sequential backward orders a write before a read (or a read or write
   before a write) of the same value;
2. two steps are independent iff neither reaches the other in that graph (the proof);
3. a list scheduler groups ready steps into *stages* of at most ``streams`` steps, with at
   most ``streams`` block graphs alive at once (the memory bound), and colours them:
   ``grad i`` goes to the stream that rebuilt block ``i``'s graph (autograd runs each
   backward op on its forward op's stream), a recompute to the lowest stream free in
   its stage;
4. a dependency between steps on different streams becomes a wait (an event recorded
   after the producer, waited for by the consumer's stream), taken from the transitive
   reduction so that implied waits are not repeated;
5. ``check_program`` re-verifies all of it: topological order, stream rules, that every
   dependency is ordered by stream order and waits, and the live-graph bound.

Stream 0 is the stream the backward was called on: the program's inputs come from it
and its outputs go back to it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

import networkx as nx

__all__ = [
    "RECOMPUTE",
    "GRAD",
    "Step",
    "Independence",
    "BackwardProgram",
    "ScheduleError",
    "schedule_backward",
    "check_program",
    "streams_value",
    "cotangent_value",
    "graph_value",
    "grad_value",
    "side_value",
    "saved_value",
]

RECOMPUTE, GRAD = "recompute", "grad"
Step = tuple[str, int]


class ScheduleError(ValueError):
    """A backward program that is not safe to run: wrong order, stream or missing wait."""


# --- the values steps read and write (names shared with the runtime's environment) -------


def streams_value(i: int) -> str:
    """The two residual streams after block ``i``; ``"X"`` is the segment's input."""
    return f"Y{i}" if i >= 0 else "X"


def cotangent_value(i: int) -> str:
    return f"dY{i}" if i >= 0 else "dX"


def graph_value(i: int) -> str:
    """Block ``i``'s rebuilt branch graphs (written by its recompute, consumed by its grad)."""
    return f"graph{i}"


def grad_value(name: str) -> str:
    """The running gradient of a parameter (by qualified name) or side input (``side<j>``)."""
    return f"grad:{name}"


def side_value(j: int) -> str:
    return f"side{j}"


def saved_value(name: str, i: int) -> str:
    """What the forward kept for block ``i``'s inverse besides the streams (a coupling's ``saves_per_step``)."""
    return f"{name}{i}"


@dataclass(frozen=True)
class _BlockAccess:
    name: str
    parameters: tuple[str, ...]
    side_inputs: tuple[int, ...]


def _block_accesses(segment) -> tuple[_BlockAccess, ...]:
    """Blocks of a depth (anonymous), a ``revcompile.passes.rewrite.SegmentProgram`` or a plan ``Segment``."""
    if isinstance(segment, int):
        if segment < 1:
            raise ValueError(f"a segment has at least one block, got depth {segment}")
        return tuple(_BlockAccess(f"block {i}", (), ()) for i in range(segment))
    names = tuple(segment.side_inputs)

    def position(side) -> int:
        return side if isinstance(side, int) else names.index(side)

    return tuple(
        _BlockAccess(
            block.name,
            tuple(dict.fromkeys(block.f.parameters + block.g.parameters)),
            tuple(sorted({position(s) for s in block.f.side_inputs + block.g.side_inputs})),
        )
        for block in segment.blocks
    )


def _accesses(blocks: tuple[_BlockAccess, ...], saves_per_step: tuple[str, ...] = ()) -> tuple[dict, dict, frozenset]:
    """What each step reads and writes, and the gradient accumulators among those values."""
    reads, writes, all_accumulators = {}, {}, set()
    for i, block in enumerate(blocks):
        sides = {side_value(j) for j in block.side_inputs} | {saved_value(name, i) for name in saves_per_step}
        accumulators = {grad_value(p) for p in block.parameters} | {grad_value(side_value(j)) for j in block.side_inputs}
        all_accumulators |= accumulators
        reads[(RECOMPUTE, i)] = frozenset({streams_value(i)} | sides)
        writes[(RECOMPUTE, i)] = frozenset({streams_value(i - 1), graph_value(i)})
        reads[(GRAD, i)] = frozenset({graph_value(i), cotangent_value(i)} | accumulators)
        writes[(GRAD, i)] = frozenset({cotangent_value(i - 1)} | accumulators)
    return reads, writes, frozenset(all_accumulators)


def _sequential_order(depth: int) -> list[Step]:
    """The semantics: the sequential reversible backward, last block first."""
    return [step for i in reversed(range(depth)) for step in ((RECOMPUTE, i), (GRAD, i))]


def _dependency_graph(depth: int, reads: dict, writes: dict) -> nx.DiGraph:
    """Read-after-write, write-after-read and write-after-write hazards of the sequential order."""
    graph = nx.DiGraph()
    last_writer: dict[str, Step] = {}
    readers: dict[str, list[Step]] = {}

    def depend(before: Step, after: Step, value: str, hazard: str) -> None:
        if before == after:
            return
        if not graph.has_edge(before, after):
            graph.add_edge(before, after, values=set(), hazards=set())
        graph.edges[before, after]["values"].add(value)
        graph.edges[before, after]["hazards"].add(hazard)

    for step in _sequential_order(depth):
        graph.add_node(step)
        for value in reads[step]:
            if value in last_writer:
                depend(last_writer[value], step, value, "read after write")
        for value in writes[step]:
            if value in last_writer:
                depend(last_writer[value], step, value, "write after write")
            for reader in readers.get(value, ()):
                depend(reader, step, value, "write after read")
        for value in reads[step]:
            readers.setdefault(value, []).append(step)
        for value in writes[step]:
            last_writer[value] = step
            readers[value] = []
    return graph


# --- the proof of independence ----------------------------------------------------------------


def step_name(step: Step) -> str:
    return f"{step[0]} {step[1]}"


@dataclass(frozen=True)
class Independence:
    """Certificate that two steps may run at once: neither is reachable from the other."""

    first: Step
    second: Step
    first_reaches: frozenset
    second_reaches: frozenset

    @classmethod
    def prove(cls, graph: nx.DiGraph, first: Step, second: Step, reach: dict | None = None) -> "Independence | None":
        """The certificate, or None when one step reaches the other (``reach``: precomputed descendants)."""
        reach = reach or {s: frozenset(nx.descendants(graph, s)) for s in (first, second)}
        if second in reach[first] or first in reach[second]:
            return None
        return cls(first, second, reach[first], reach[second])

    def holds(self, graph: nx.DiGraph) -> bool:
        """Re-check against ``graph``: the reachable sets are right and exclude each other."""
        return (
            self.first_reaches == frozenset(nx.descendants(graph, self.first))
            and self.second_reaches == frozenset(nx.descendants(graph, self.second))
            and self.second not in self.first_reaches
            and self.first not in self.second_reaches
        )

    def __str__(self) -> str:
        def reach(steps) -> str:
            return "{" + ", ".join(step_name(s) for s in sorted(steps, key=_issue_key)) + "}"

        return (
            f"{step_name(self.first)} || {step_name(self.second)}: {step_name(self.first)} reaches "
            f"{reach(self.first_reaches)}, {step_name(self.second)} reaches {reach(self.second_reaches)}; "
            "neither reaches the other"
        )


def _issue_key(step: Step):
    return (-step[1], step[0] == GRAD)


# --- the program --------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class BackwardProgram:
    """The backward of one segment as scheduled steps on streams.

    ``groups`` are the units the executor issues, in ``order``: a *stage* of independent
    steps on distinct streams, or a recompute followed at once by the grad of the same
    block on one stream. The executor issues a group branch by branch (G, then F, of each
    step in turn), so a grad frees each branch graph before the next one is rebuilt.
    """

    blocks: tuple[str, ...]
    graph: nx.DiGraph
    reads: Mapping[Step, frozenset]
    writes: Mapping[Step, frozenset]
    inputs: frozenset
    outputs: frozenset
    order: tuple[Step, ...]
    groups: tuple[tuple[Step, ...], ...]
    streams: Mapping[Step, int]
    waits: tuple[tuple[Step, Step], ...]  # (step, the step on another stream it waits for)
    independent: frozenset
    concurrent: tuple[Independence, ...]
    live_graphs: int

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def stream_count(self) -> int:
        return max(self.streams.values()) + 1

    def waits_for(self, step: Step) -> tuple[Step, ...]:
        return tuple(awaited for waiter, awaited in self.waits if waiter == step)

    def __str__(self) -> str:
        lines = [
            f"BackwardProgram: {self.depth} blocks, {len(self.order)} steps on {self.stream_count} "
            f"stream{'s' if self.stream_count > 1 else ''}, at most {self.live_graphs} block graph"
            f"{'s' if self.live_graphs > 1 else ''} alive",
            "  group  stream  step          waits for              reads -> writes",
        ]
        for number, group in enumerate(self.groups):
            for position, step in enumerate(group):
                waits = ", ".join(f"{step_name(u)} (s{self.streams[u]})" for u in self.waits_for(step)) or "-"
                lines.append(
                    f"  {str(number) if position == 0 else '':>5}  s{self.streams[step]:<5}  {step_name(step):<12}  "
                    f"{waits:<21}  {_values(self.reads[step])} -> {_values(self.writes[step])}"
                )
        lines.append("  dependencies (transitive reduction):")
        reduced = nx.transitive_reduction(self.graph)
        for u, v in sorted(reduced.edges, key=lambda e: (self.order.index(e[1]), self.order.index(e[0]))):
            across = f"  [s{self.streams[u]} -> s{self.streams[v]}: wait]" if self.streams[u] != self.streams[v] else ""
            lines.append(f"    {step_name(u)} -> {step_name(v)}: {_values(self.graph.edges[u, v]['values'])}{across}")
        lines.append(f"  independent pairs: {len(self.independent)}; run concurrently (proof by reachability):")
        lines.extend(f"    {proof}" for proof in self.concurrent)
        if not self.concurrent:
            lines.append("    none")
        return "\n".join(lines)


def _values(values) -> str:
    shown = sorted(v for v in values if not v.startswith("grad:"))
    grads = sum(1 for v in values if v.startswith("grad:"))
    if grads:
        shown.append(f"{grads} grad{'s' if grads > 1 else ''}")
    return ", ".join(shown) or "-"


# --- scheduling --------------------------------------------------------------------------------


def _stages(graph: nx.DiGraph, width: int, live_limit: int) -> list[tuple[Step, ...]]:
    """List scheduling in unit time: each stage takes ready steps, grads first (they free a
    graph and carry the gradient chain), at most ``width`` of them, and admits a recompute
    only while fewer than ``live_limit`` block graphs would be alive during the stage."""
    done: set[Step] = set()
    live = 0  # graphs rebuilt in earlier stages, not yet differentiated
    stages = []
    while len(done) < graph.number_of_nodes():
        ready = sorted(
            (s for s in graph.nodes if s not in done and all(p in done for p in graph.predecessors(s))),
            key=lambda s: (s[0] != GRAD, -s[1]),
        )
        stage: list[Step] = []
        for step in ready:
            if len(stage) == width:
                break
            if step[0] == RECOMPUTE and live + sum(s[0] == RECOMPUTE for s in stage) >= live_limit:
                continue
            stage.append(step)
        if not stage:
            raise ScheduleError(f"no step can run with {live_limit} live graphs; ready: {ready}")
        live += sum(s[0] == RECOMPUTE for s in stage) - sum(s[0] == GRAD for s in stage)
        done.update(stage)
        stages.append(tuple(stage))
    return stages


def _colour(stages: list[tuple[Step, ...]]) -> dict[Step, int]:
    streams: dict[Step, int] = {}
    for stage in stages:
        taken = set()
        for step in sorted(stage, key=lambda s: s[0] != GRAD):  # grads are placed by rule first
            if step[0] == GRAD:
                stream = streams[(RECOMPUTE, step[1])]
                if stream in taken:
                    raise ScheduleError(f"{step_name(step)} must run on s{stream}, already taken in its stage {stage}")
            else:
                stream = next(k for k in itertools.count() if k not in taken)
            streams[step] = stream
            taken.add(stream)
    return streams


def _groups(stages: list[tuple[Step, ...]], streams: dict) -> list[tuple[Step, ...]]:
    """Merge a lone recompute with the lone grad of the same block right after it."""
    groups: list[tuple[Step, ...]] = []
    for stage in stages:
        previous = groups[-1] if groups else ()
        if (
            len(stage) == 1 and len(previous) == 1 and stage[0][0] == GRAD and previous[0] == (RECOMPUTE, stage[0][1])
            and streams[stage[0]] == streams[previous[0]]
        ):
            groups[-1] = previous + stage
        else:
            groups.append(stage)
    return groups


def schedule_backward(segment, *, streams: int = 2, coupling=None) -> BackwardProgram:
    """The backward program of a segment: a depth, a ``SegmentProgram`` or a plan ``Segment``.

    ``streams=1`` is the sequential reversible backward (one block graph alive);
    ``streams=2`` overlaps ``grad i`` with ``recompute i-1`` (PaReprop), with at most two
    block graphs alive. ``coupling`` (a ``revcompile.passes.couplings.Coupling``) declares
    what each block's recompute reads besides the streams (``saves_per_step``: the dual
    coupling's residues). The result has passed ``check_program``.
    """
    if streams < 1:
        raise ValueError(f"streams must be at least 1, got {streams}")
    blocks = _block_accesses(segment)
    depth = len(blocks)
    reads, writes, accumulators = _accesses(blocks, coupling.saves_per_step if coupling is not None else ())
    graph = _dependency_graph(depth, reads, writes)
    stages = _stages(graph, streams, live_limit=streams)
    colours = _colour(stages)
    groups = _groups(stages, colours)
    reduced = nx.transitive_reduction(graph)
    waits = tuple(sorted(((v, u) for u, v in reduced.edges if colours[u] != colours[v]), key=lambda w: _issue_key(w[0])))
    reach = {step: frozenset(nx.descendants(graph, step)) for step in graph.nodes}
    independent = frozenset(
        frozenset((a, b)) for a, b in itertools.combinations(graph.nodes, 2) if b not in reach[a] and a not in reach[b]
    )
    concurrent = tuple(
        Independence.prove(graph, a, b, reach) for group in groups if colours[group[0]] != colours[group[-1]]
        for a, b in itertools.combinations(group, 2)
    )
    written = {v for w in writes.values() for v in w}
    program = BackwardProgram(
        blocks=tuple(b.name for b in blocks),
        graph=graph,
        reads=MappingProxyType(reads),
        writes=MappingProxyType(writes),
        inputs=frozenset(v for r in reads.values() for v in r if v not in written),
        outputs=frozenset({cotangent_value(-1)} | accumulators),
        order=tuple(step for group in groups for step in group),
        groups=tuple(groups),
        streams=MappingProxyType(colours),
        waits=waits,
        independent=independent,
        concurrent=concurrent,
        live_graphs=_peak_live_graphs(groups),
    )
    check_program(program)
    return program


# --- the checker ----------------------------------------------------------------------------------


def _peak_live_graphs(groups) -> int:
    """Block graphs alive at once: rebuilt in this or an earlier group and not yet differentiated."""
    live = peak = 0
    for group in groups:
        live += sum(s[0] == RECOMPUTE for s in group)
        peak = max(peak, live)
        live -= sum(s[0] == GRAD for s in group)
    return peak


def _happens_before(program: BackwardProgram) -> nx.DiGraph:
    """What the device enforces: issue order within a stream, and each wait."""
    order = nx.DiGraph()
    order.add_nodes_from(program.order)
    last_on: dict[int, Step] = {}
    for step in program.order:
        stream = program.streams[step]
        if stream in last_on:
            order.add_edge(last_on[stream], step)
        last_on[stream] = step
    for waiter, awaited in program.waits:
        order.add_edge(awaited, waiter)
    return order


def check_program(program: BackwardProgram) -> None:
    """Raise ``ScheduleError`` unless ``program`` is safe to run as the executor runs it."""
    _check_order_and_streams(program)
    _check_concurrency(program)
    peak = _peak_live_graphs(program.groups)
    if peak > program.live_graphs:
        raise ScheduleError(f"{peak} block graphs alive at once, more than the bound of {program.live_graphs}")


def _check_order_and_streams(program: BackwardProgram) -> None:
    """Every step once, in a topological order; a grad on the stream that rebuilt its graph."""
    graph, order, streams = program.graph, program.order, program.streams
    if len(set(order)) != len(order) or set(order) != set(graph.nodes):
        raise ScheduleError(f"the order must run every step exactly once; got {[step_name(s) for s in order]}")
    if tuple(s for g in program.groups for s in g) != order:
        raise ScheduleError("the groups, in turn, must be the order")
    position = {step: k for k, step in enumerate(order)}
    for u, v in graph.edges:
        if position[u] >= position[v]:
            raise ScheduleError(f"not a topological order: {step_name(v)} runs before {step_name(u)}, which it depends on")
    for step in order:
        if step[0] == GRAD and streams[step] != streams[(RECOMPUTE, step[1])]:
            raise ScheduleError(
                f"{step_name(step)} runs on s{streams[step]} but block {step[1]}'s graph was rebuilt on "
                f"s{streams[(RECOMPUTE, step[1])]}: autograd would run its backward ops on the other stream"
            )


def _check_concurrency(program: BackwardProgram) -> None:
    """Concurrent steps are proven independent, and every dependency is ordered on the device."""
    graph, streams = program.graph, program.streams
    group_of = {step: k for k, group in enumerate(program.groups) for step in group}
    for group in program.groups:
        fused = len(group) == 2 and group[0][0] == RECOMPUTE and group[1] == (GRAD, group[0][1])
        if fused:
            continue
        if len({streams[s] for s in group}) != len(group):
            raise ScheduleError(f"the steps of a concurrent group need distinct streams: {group}")
        for a, b in itertools.combinations(group, 2):
            if Independence.prove(graph, a, b) is None:
                raise ScheduleError(f"{step_name(a)} and {step_name(b)} are issued together but one depends on the other")
    for proof in program.concurrent:
        if not proof.holds(graph):
            raise ScheduleError(f"independence proof does not hold: {proof}")
    for waiter, awaited in program.waits:
        if group_of[awaited] >= group_of[waiter]:
            raise ScheduleError(f"{step_name(waiter)} waits for {step_name(awaited)}, which is not issued before it")
    device_order = _happens_before(program)
    for u, v in graph.edges:
        if not nx.has_path(device_order, u, v):
            raise ScheduleError(
                f"{step_name(v)} (s{streams[v]}) depends on {step_name(u)} (s{streams[u]}) but nothing orders them "
                "on the device: a wait is missing"
            )

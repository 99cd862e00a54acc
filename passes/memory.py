"""Predict the activation memory of a training step from the graphs, before running it.

Which tensors autograd keeps for backward is decided op by op (a linear layer keeps its
input, a softmax its output, a dropout its mask, a view nothing); writing that table by
hand for every op and both graph dialects would be long and would drift from PyTorch.
Instead this pass *propagates shapes through autograd*: it interprets the graph on fake
tensors (``FakeTensorMode``: shapes, dtypes and devices, no data, no memory, no kernels)
with gradients enabled, and records every tensor autograd saves, through
``saved_tensors_hooks``, attributed to the node that saved it first and deduplicated by
storage (views and a tensor saved twice count once). Parameters are excluded, as in the
measurement (``revcompile.measure``): they exist whether or not activations are kept.

* The **original** graph is interpreted as it is.
* In the **rewritten** graph each ``reversible_segment_<i>`` call is interpreted as the
  reversible runtime behaves: the blocks run as the steps of the model's coupling
  (``revcompile.passes.couplings``, the same definition the runtime runs) without a graph,
  and the segment keeps only its two final streams, its side inputs and whatever the
  coupling keeps per step (the dual coupling's packed residue bits).
* The step's *peak* -- saved tensors plus the backward's working memory (gradients flowing
  back, temporaries, a segment's rebuilt branch graph) -- is not a count of saved tensors:
  ``revcompile.simulate`` runs the whole training step, through the real runtime, on fake
  tensors and follows every storage from creation to release. The caller puts those lines
  into ``MemoryPrediction.original_peak``/``converted_peak``.

Activation memory is linear in the batch for these models, so the graph is interpreted
at two batch sizes and every quantity is fitted as ``fixed + per_sample * batch``: the
prediction then holds for any batch, and the largest batch under a memory cap follows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module

from revcompile.passes.checkpoint import CheckpointCall, RegionProgram
from revcompile.passes.couplings import Coupling, RevViT, StreamArithmetic
from revcompile.passes.graph_view import module_path
from revcompile.passes.plan import Plan
from revcompile.passes.rewrite import SegmentCall, SegmentProgram

__all__ = ["LinearBytes", "PartMemory", "MemoryPrediction", "PredictionFailed", "predict_activation_memory"]

@dataclass(frozen=True)
class LinearBytes:
    """Bytes as a function of the batch size: ``fixed + per_sample * batch``."""

    fixed: float
    per_sample: float

    def at(self, batch: int) -> int:
        return max(int(round(self.fixed + self.per_sample * batch)), 0)

    def __add__(self, other: "LinearBytes") -> "LinearBytes":
        return LinearBytes(self.fixed + other.fixed, self.per_sample + other.per_sample)

    @staticmethod
    def fit(points: Sequence[tuple[int, float]]) -> "LinearBytes":
        """Through two (batch, bytes) points; through the origin from one."""
        if len(points) == 1 or points[0][0] == points[-1][0]:
            batch, value = points[0]
            return LinearBytes(0.0, value / batch)
        (b1, v1), (b2, v2) = points[0], points[-1]
        slope = (v2 - v1) / (b2 - b1)
        return LinearBytes(v1 - slope * b1, slope)


@dataclass(frozen=True)
class PartMemory:
    """Saved-for-backward bytes of one stretch of the model, before and after conversion."""

    name: str  # "segment 0: blocks.0 .. blocks.11" or the modules of an untouched stretch
    kind: str  # "segment" | "untouched"
    original: LinearBytes
    converted: LinearBytes


@dataclass(frozen=True)
class MemoryPrediction:
    batches: tuple[int, ...]  # the batch sizes the graphs were interpreted at
    parts: tuple[PartMemory, ...]
    original_saved: LinearBytes
    converted_saved: LinearBytes
    notes: tuple[str, ...] = ()
    # the training step's peak above its start (saved + working memory), from a simulation of
    # the step (``revcompile.simulate``); None until the caller has run it
    original_peak: LinearBytes | None = None
    converted_peak: LinearBytes | None = None


# --- interpreting a graph on fake tensors, counting what autograd saves ----------------------


class PredictionFailed(RuntimeError):
    """The graph could not be interpreted on fake tensors (data-dependent shapes, say)."""


class _SavedLedger:
    """Storages saved for backward, each owned by the first node that saves it; parameters never count."""

    def __init__(self, parameter_storages: set):
        self.parameter_storages = parameter_storages
        self.owner: dict[int, str] = {}
        self.nbytes: dict[int, int] = {}
        self.current = ""
        self._alive: list[torch.Tensor] = []  # keeps storages alive, so their ids are not reused

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in self.parameter_storages and key not in self.owner:
            self.owner[key] = self.current
            self.nbytes[key] = storage.nbytes()
            self._alive.append(tensor)
        return tensor

    def by_owner(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for key, owner in self.owner.items():
            totals[owner] = totals.get(owner, 0) + self.nbytes[key]
        return totals

    def total(self) -> int:
        return sum(self.nbytes.values())


class _ReversibleStandIn(torch.autograd.Function):
    """What a reversible segment keeps for backward: its final streams, side inputs and residues."""

    @staticmethod
    def forward(ctx, run_blocks, x: torch.Tensor, *side):
        out, kept = run_blocks(x, side)
        ctx.save_for_backward(*kept, *(s for s in side if isinstance(s, torch.Tensor)))
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: only the forward's bookkeeping matters here
        raise NotImplementedError


class _SavedTensorInterpreter(fx.Interpreter):
    """Runs a graph, attributing each saved tensor to the node being run; segments run as stand-ins."""

    def __init__(self, gm: fx.GraphModule, ledger: _SavedLedger, segments: dict, regions: dict | None = None):
        super().__init__(gm)
        self.ledger = ledger
        self.segments = segments
        self.regions = regions or {}

    def run_node(self, node: fx.Node):
        self.ledger.current = node.name
        if node.op == "placeholder" and node.meta.get("revcompile_concrete"):
            return node.args[0] if node.args else None  # fx specialised it; its default stands in
        return super().run_node(node)

    def call_function(self, target, args, kwargs):
        if isinstance(target, SegmentCall):
            return self.segments[target.index](*args)
        if isinstance(target, CheckpointCall):
            return self.regions[target.index](*args)
        return super().call_function(target, args, kwargs)


def _segment_stand_in(program: SegmentProgram, root: nn.Module, coupling: Coupling, streams: str):
    branches = [(fx.GraphModule(root, br.graph), br) for b in program.blocks for br in (b.f, b.g)]

    def run_blocks(x: torch.Tensor, side: tuple):
        # the streams are kept as the runtime keeps them; branches run in the model's precision
        arith = StreamArithmetic(streams, x.dtype)
        steps = [lambda s, gm=gm, b=b: gm(s, *(side[i] for i in b.side_inputs)) for gm, b in branches]
        prev, cur, residues = coupling.run(arith, x, steps)
        kept = [prev, cur] + ([r for r in residues if r is not None] if coupling.saves_per_step else [])
        return coupling.leave(arith, prev, cur), kept

    return lambda x, *side: _ReversibleStandIn.apply(run_blocks, x, *side)


def _region_stand_in(program: RegionProgram, root: nn.Module):
    """A checkpointed region keeps its inputs only (``torch.utils.checkpoint``)."""
    gm = fx.GraphModule(root, program.graph)

    def run_blocks(x: torch.Tensor, side: tuple):
        with torch.no_grad():
            return gm(x, *side), []

    return lambda x, *side: _ReversibleStandIn.apply(run_blocks, x, *side)


@dataclass(frozen=True)
class _Run:
    """One interpretation at one batch size."""

    original: dict[str, int]  # node name -> bytes it saved first
    converted: dict[str, int]


def _run_at(root: nn.Module, original: fx.Graph, rewritten: fx.Graph, segments, inputs: Sequence, coupling: Coupling,
            streams: str, regions=()) -> _Run:
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    parameters = {name: mode.from_tensor(p) for name, p in root.named_parameters(remove_duplicate=False)}
    buffers = {name: mode.from_tensor(b) for name, b in root.named_buffers(remove_duplicate=False)}
    parameter_storages = {p.untyped_storage()._cdata for p in parameters.values()}
    devices = sorted({t.device.index or 0 for t in inputs if isinstance(t, torch.Tensor) and t.is_cuda})
    with torch.random.fork_rng(devices=devices), mode, _reparametrize_module(root, {**parameters, **buffers}):
        fake_inputs = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in inputs]
        stand_ins = {p.index: _segment_stand_in(p, root, coupling, streams) for p in segments}
        region_stand_ins = {p.index: _region_stand_in(p, root) for p in regions}
        ledgers = []
        for graph in (original, rewritten):
            ledger = _SavedLedger(parameter_storages)
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(ledger.pack, lambda t: t):
                _SavedTensorInterpreter(fx.GraphModule(root, graph), ledger, stand_ins, region_stand_ins).run(*fake_inputs)
            ledgers.append(ledger)
    return _Run(
        original=ledgers[0].by_owner(),
        converted=ledgers[1].by_owner(),
    )


# --- from per-node bytes to parts of the model ------------------------------------------------


def _is_size(value) -> bool:
    if isinstance(value, (int, float, torch.SymInt, torch.SymFloat, torch.SymBool)):
        return True
    return isinstance(value, (tuple, list)) and bool(value) and all(isinstance(v, (int, torch.SymInt)) for v in value)


def _parts(original: fx.Graph, plan: Plan) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """Assign every node to a part: a segment, or a stretch of untouched nodes between them.

    Returns node name -> part name, and the parts as (name, kind) in program order. In the
    rewritten graph the untouched nodes keep their names and ``reversible_segment_<i>``
    stands for segment ``i``.
    """
    in_segment = plan.node_owners()
    segment_names = {s.index: f"segment {s.index}: {s.name}" for s in plan.segments}
    assignment: dict[str, str] = {}
    parts: list[tuple[str, str]] = []
    stretch: list[fx.Node] = []

    def close_stretch() -> None:
        modules = [m for m in dict.fromkeys(module_path(n) for n in stretch) if m]
        name = (modules[0] if len(modules) == 1 else f"{modules[0]} .. {modules[-1]}") if modules else "model code"
        name = f"untouched: {name}"
        while name in dict(parts):
            name += "'"
        parts.append((name, "untouched"))
        assignment.update({n.name: name for n in stretch})
        stretch.clear()

    for node in original.nodes:
        index = in_segment.get(node.name)
        if node.op == "get_attr" or (index is None and _is_size(node.meta.get("val"))):
            continue  # parameters and sizes save nothing: they must not split a segment's stretch
        if index is None:
            stretch.append(node)
            continue
        if stretch:
            close_stretch()
        name = segment_names[index]
        if name not in dict(parts):
            parts.append((name, "segment"))
        assignment[node.name] = name
    if stretch:
        close_stretch()
    for index, name in segment_names.items():
        assignment[f"reversible_segment_{index}"] = name
    return assignment, parts


def _interpret_at_batches(batches: Sequence[int], run_at: Callable[[int], _Run]) -> tuple[list[tuple[int, _Run]], list[str]]:
    """The runs that worked, and a note when only one batch size could be interpreted."""
    runs: list[tuple[int, _Run]] = []
    failures: list[str] = []
    for batch in batches:
        try:
            runs.append((batch, run_at(batch)))
        except Exception as err:  # noqa: BLE001 -- any failure of the fake run is reported, not raised
            first_line = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
            failures.append(f"batch {batch}: {type(err).__name__}: {first_line}")
    if not runs:
        raise PredictionFailed("; ".join(failures))
    notes = []
    if len(runs) == 1:
        notes.append(f"interpreted at batch {runs[0][0]} only ({failures[0]}); assumed proportional to the batch")
    return runs, notes


def predict_activation_memory(
    root: nn.Module,
    original: fx.Graph,
    rewritten: fx.Graph,
    plan: Plan,
    segments: Sequence[SegmentProgram],
    inputs_for_batch: Callable[[int], Sequence],
    batches: Sequence[int],
    coupling: Coupling = RevViT(),
    streams: str = "model",
    regions: Sequence[RegionProgram] = (),
) -> MemoryPrediction:
    """Predict saved-for-backward bytes, per part, as lines in the batch size.

    ``root`` holds the parameters the graphs refer to by name; ``original`` is the traced
    graph, ``rewritten`` the same graph with segment calls; ``inputs_for_batch(b)`` returns
    the graphs' placeholder values (non-specialised ones, in order) for batch size ``b``.
    The graphs are interpreted at each of ``batches`` (two give the fit; a batch that fails
    to interpret, say because the trace specialised the batch size, is dropped).
    ``coupling`` and ``streams`` are the converted model's (``convert(..., coupling=,
    streams=)``): they decide what a segment keeps. ``regions``: the checkpointed runs of blocks
    a memory plan made (each keeps its inputs only). Raises ``PredictionFailed`` if no batch size can be interpreted.
    """
    runs, notes = _interpret_at_batches(
        batches, lambda b: _run_at(root, original, rewritten, segments, inputs_for_batch(b), coupling, streams, regions)
    )
    assignment, part_list = _parts(original, plan)
    if any(owner not in assignment for _, run in runs for owner in (*run.original, *run.converted)):
        part_list.append(("untouched: other", "untouched"))  # saved by a node no part claims

    def fit(select: Callable[[_Run], float]) -> LinearBytes:
        return LinearBytes.fit([(batch, select(run)) for batch, run in runs])

    def part_bytes(by_node: dict[str, int], part: str) -> int:
        return sum(v for k, v in by_node.items() if assignment.get(k, "untouched: other") == part)

    parts = tuple(
        PartMemory(
            name=name,
            kind=kind,
            original=fit(lambda run, p=name: part_bytes(run.original, p)),
            converted=fit(lambda run, p=name: part_bytes(run.converted, p)),
        )
        for name, kind in part_list
        if kind == "segment" or any(part_bytes(run.original, name) or part_bytes(run.converted, name) for _, run in runs)
    )
    return MemoryPrediction(
        batches=tuple(batch for batch, _ in runs),
        parts=parts,
        original_saved=fit(lambda run: sum(run.original.values())),
        converted_saved=fit(lambda run: sum(run.converted.values())),
        notes=tuple(notes),
    )

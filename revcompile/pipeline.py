"""The compile pipeline for one call signature: trace -> normalize -> detect -> rewrite.

    model, call ──trace (fx, else export)──> GraphModule
                ──normalize_graph──────────> a normalised copy: guards gone, shape queries on the
                                              stream origin, in-place adds into temporaries out of place
                ──find_reversible_blocks───> Plan (segments, skipped residuals + reasons)
                ──rewrite_reversible───────> graph with reversible_segment_<i> calls
                                              + one SegmentProgram per segment
                ──sketch_linears (opt-in)──> chosen linears call sketched_linear (docs/sketch.md)

The result, a ``CompiledVariant``, holds no reference to the model: it is bound to one
(``revcompile.converted``) to run.
"""

from __future__ import annotations

import copy
import time
import uuid
from dataclasses import dataclass, field, replace

import torch.fx as fx
from torch import nn

from revcompile.passes.checkpoint import RegionProgram, block_run, node_cut, rewrite_checkpointed
from revcompile.passes.detect import find_reversible_blocks
from revcompile.passes.normalize import normalize_graph
from revcompile.passes.plan import Plan
from revcompile.passes.rewrite import SegmentProgram, rewrite_reversible
from revcompile.errors import ConversionError
from revcompile.frontend import CallSignature, Trace, TraceFailed, trace_model
from revcompile.passes.graph_module import graph_module
from revcompile.sketch import sketch_compiled

__all__ = ["BlockModes", "CompiledVariant", "TracedCall", "compile_variant", "trace_call", "ORIGINAL_ATTRIBUTES"]

# Where a converted graph reads the original model's plain attributes (tensors assigned to
# the model that are neither parameters nor buffers): a submodule of that name on the
# converted model looks them up on the original at call time (``revcompile.converted``).
ORIGINAL_ATTRIBUTES = "_revcompile_constant_original_attributes"


@dataclass(frozen=True)
class CompiledVariant:
    tracer: str
    plan: Plan
    graph: fx.Graph  # rewritten: segments are SegmentCall markers
    traced_graph: fx.Graph  # normalised graph before the rewrite (for drawing)
    segments: tuple[SegmentProgram, ...]
    input_names: tuple[str, ...]  # fx: the keyword arguments, in placeholder order
    guard: object | None  # export: raises when a call's inputs don't fit the trace
    constants: dict = field(default_factory=dict)  # attribute name -> tensor made during tracing
    original_attributes: tuple[str, ...] = ()  # plain attributes of the model the graph reads
    sketched: tuple = ()  # revcompile.sketch.SketchedLinear ops (convert(..., sketch_linears=))
    regions: tuple[RegionProgram, ...] = ()  # checkpointed runs of blocks (a memory plan's)


@dataclass(frozen=True)
class BlockModes:
    """What a memory plan does with blocks other than coupling them (every other block is reversible).

    ``stored``: left as the original computes them, activations kept by autograd.
    ``checkpointed``: runs of consecutive blocks, each run recomputed once in backward.
    ``recomputed``: sets of traced-graph nodes outside blocks (stem, stage transitions,
    head), each with one output, recomputed once in backward (``revcompile.passes.lower_sets``).
    """

    stored: tuple[str, ...] = ()
    checkpointed: tuple[tuple[str, ...], ...] = ()
    recomputed: tuple[tuple[str, ...], ...] = ()

    def kept_blocks(self) -> tuple[str, ...]:
        return self.stored + tuple(name for run in self.checkpointed for name in run)

    def reasons(self) -> dict[str, str]:
        reasons = {name: "stored: the memory plan keeps its activations" for name in self.stored}
        for run in self.checkpointed:
            where = f" (with {run[0]} .. {run[-1]})" if len(run) > 1 else ""
            reasons.update({name: f"checkpointed{where}: the memory plan recomputes it in backward" for name in run})
        return reasons


def _resolves(model: nn.Module, target: str) -> bool:
    try:
        obj = model
        for part in target.split("."):
            obj = getattr(obj, part)
        return True
    except AttributeError:
        return False


def _registered_at_top(model: nn.Module, target: str) -> bool:
    """The first step of ``target`` is a submodule, parameter or buffer of ``model``."""
    first = target.split(".")[0]
    return first in model._modules or first in model._parameters or first in model._buffers


def _lift_constants(gm: fx.GraphModule, model: nn.Module) -> tuple[dict, tuple[str, ...]]:
    """Give every attribute the graph reads a home on the converted model.

    Attributes the tracer created (tensor constants, higher-order-op subgraphs) are not part
    of the model: they get names of their own and the converted model holds them itself, as
    non-persistent buffers or parameter-free submodules (``state_dict`` is unaffected).
    Plain attributes of the model (``self.pos_embedding = tensor``, neither parameter nor
    buffer) are read from the original model when the graph runs, through
    ``ORIGINAL_ATTRIBUTES``, so they are whatever the original holds at that moment.
    Attributes under a registered submodule need nothing: the converted model shares them.
    """
    constants, plain = {}, []
    stand_in = nn.Module()  # the trace's view of ORIGINAL_ATTRIBUTES: the values seen while tracing
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        target = str(node.target)
        if _resolves(model, target):
            if not _registered_at_top(model, target):
                plain.append(target)
                first = target.split(".")[0]
                stand_in.__dict__[first] = getattr(model, first)
                node.target = f"{ORIGINAL_ATTRIBUTES}.{target}"
            continue
        value = gm
        for part in target.split("."):
            value = getattr(value, part)
        name = f"_revcompile_constant_{uuid.uuid4().hex[:12]}"
        constants[name] = value
        setattr(gm, name, value)
        node.target = name
    if plain:
        setattr(gm, ORIGINAL_ATTRIBUTES, stand_in)
    if constants or plain:
        gm.recompile()
    return constants, tuple(dict.fromkeys(plain))


def _nothing_convertible(model: nn.Module, plan: Plan) -> ConversionError:
    name = type(model).__name__
    if not plan.residuals_found:
        return ConversionError(
            f"no residual connections found in {name} (traced with {plan.tracer}). revcompile converts "
            "pre-norm transformer blocks `x = x + attn(norm(x)); x = x + mlp(norm(x))`. If the blocks "
            "are hidden inside modules fx keeps opaque, try tracer='export'."
        )
    reasons = "; ".join(f"{s.node}{f' ({s.module})' if s.module else ''}: {s.reason}" for s in plan.skipped[:6])
    more = f" (and {len(plan.skipped) - 6} more)" if len(plan.skipped) > 6 else ""
    return ConversionError(
        f"found {plan.residuals_found} residual connections in {name} (traced with {plan.tracer}) but no "
        f"attention/MLP pair converts: {reasons}{more}. Each block needs an attention residual followed "
        "by an MLP residual on the same stream, with branches that do not write to their inputs."
    )


@dataclass(frozen=True)
class TracedCall:
    """A model traced and normalised for one call: what the conversions of one call share.

    A memory plan's candidates (``revcompile.planner``) differ only in which blocks they
    leave out and how, i.e. in detection's ``excluded`` and in the rewrite: tracing and
    normalising -- most of a conversion's time -- is done once and the graph copied per
    candidate. ``notes``: what tracing adds to a plan's notes (tracer fallbacks, injected
    arguments). Holds the model's submodules (the graph module calls them).
    """

    trace: Trace  # normalised; never modified (compile_variant works on a copy)
    notes: tuple[str, ...]
    seconds: float = field(default=0.0, compare=False)  # what tracing, normalising and detecting took
    # (post_norm, exclusions) -> detection's plan on this trace: candidates share most of theirs
    detections: dict = field(default_factory=dict, compare=False, repr=False)


def trace_call(model: nn.Module, call: CallSignature, tracer: str, training: bool, post_norm: str = "skip",
               excluded: dict | None = None) -> tuple[TracedCall, Plan]:
    """Trace (fx, then export for ``"auto"``), normalize and detect; the trace that converts most.

    The plan's notes say which tracer failed and why, and which arguments revcompile fixed.
    """
    started = time.perf_counter()
    attempts = ("fx", "export") if tracer == "auto" else (tracer,)
    failures: list[TraceFailed] = []
    notes: list[str] = []
    best: tuple[Trace, Plan] | None = None
    for name in attempts:
        try:
            trace = trace_model(model, call, name, training=training)
        except TraceFailed as failure:
            failures.append(failure)
            continue
        # a fresh trace nothing else holds: normalised in place, not copied
        trace = replace(trace, graph_module=normalize_graph(trace.graph_module, in_place=True).graph_module)
        plan = find_reversible_blocks(trace.graph_module, post_norm=post_norm, excluded=excluded)
        if best is None or len(plan.blocks) > len(best[1].blocks):
            best = (trace, plan)
        requested = set((excluded or {}).values())
        if plan.blocks or (plan.skipped and all(s.reason in requested for s in plan.skipped)):
            break  # blocks found, or every residual left alone on request (a memory plan's, say)
        notes.append(f"{name} tracing found no convertible blocks")
    if best is None:
        summary = "; ".join(str(f) for f in failures)
        raise ConversionError(
            f"could not trace {type(model).__name__} ({summary}). Try: pass example inputs exactly as the "
            "model is called in training (batch size >= 2); tracer='export' for models with data-dependent "
            "control flow; for fx, make custom modules leaves (torch.fx.wrap) where their code branches on tensors."
        ) from failures[-1].error
    trace, plan = best
    notes.extend(trace.notes)
    notes.extend(f"{f.tracer} tracing failed ({f}); used {trace.tracer}" for f in failures)
    notes.extend(
        f"{key}={value!r} is passed to the model: a key/value cache would keep every layer's keys and values alive"
        for key, value in call.injected.items()
    )
    traced = TracedCall(trace, tuple(notes), seconds=time.perf_counter() - started)
    traced.detections[_detection_key(post_norm, excluded)] = plan
    return traced, replace(plan, tracer=trace.tracer, notes=plan.notes + traced.notes)


def _detection_key(post_norm: str, excluded: dict | None) -> tuple:
    return post_norm, tuple(sorted((excluded or {}).items()))


def _detect(traced: TracedCall, post_norm: str, excluded: dict | None) -> Plan:
    """Detection on an existing trace (once per exclusions): the plan ``trace_call`` would give."""
    key = _detection_key(post_norm, excluded)
    if key not in traced.detections:
        traced.detections[key] = find_reversible_blocks(traced.trace.graph_module, post_norm=post_norm, excluded=excluded)
    plan = traced.detections[key]
    return replace(plan, tracer=traced.trace.tracer, notes=plan.notes + traced.notes)


def _own_copy(trace: Trace, model: nn.Module) -> Trace:
    """``trace`` with a graph module of its own if lifting constants would rename its nodes'
    targets (the rest of compiling copies before it changes anything)."""
    gm = trace.graph_module
    reads = (str(node.target) for node in gm.graph.nodes if node.op == "get_attr")
    if all(_resolves(model, target) and _registered_at_top(model, target) for target in reads):
        return trace
    return replace(trace, graph_module=graph_module(gm, copy.deepcopy(gm.graph), type(gm).__name__))


def compile_variant(
    model: nn.Module,
    call: CallSignature,
    *,
    tracer: str,
    training: bool,
    post_norm: str = "skip",
    require_blocks: bool = True,
    excluded: dict | None = None,
    sketch_linears=None,
    block_modes: BlockModes | None = None,
    traced: TracedCall | None = None,
) -> CompiledVariant:
    """Compile ``model`` for one call. ``tracer='auto'`` tries fx, then torch.export.

    With ``require_blocks`` (the first conversion) finding nothing to convert is an error;
    later variants are compared with the first one by the caller instead. ``excluded``
    maps block names to the reason they stay as they are. ``block_modes`` (a memory plan's,
    ``revcompile.planner``) keeps some blocks stored and checkpoints runs of others.
    ``traced``: ``model`` already traced for ``call`` (``trace_call``; same ``training``),
    reused instead of tracing again.
    """
    modes = block_modes or BlockModes()
    excluded_here = {**(excluded or {}), **modes.reasons()}
    if traced is None:  # a trace of its own: modified in place below
        traced, plan = trace_call(model, call, tracer, training, post_norm, excluded_here)
        trace = traced.trace
    else:
        plan, trace = _detect(traced, post_norm, excluded_here), _own_copy(traced.trace, model)
    if not plan.blocks and require_blocks and not modes.kept_blocks():
        raise _nothing_convertible(model, plan)

    constants, plain = _lift_constants(trace.graph_module, model)
    traced_graph = trace.graph_module.graph  # normalize made it; the passes below copy before editing
    result = rewrite_reversible(trace.graph_module, plan)
    rewritten, regions = result.graph_module, ()
    if modes.checkpointed or modes.recomputed:
        every_block = _detect(traced, post_norm, excluded).blocks
        by_name = {block.name: block for block in every_block}
        cuts = tuple(block_run(tuple(by_name[n] for n in run)) for run in modes.checkpointed)
        cuts += tuple(node_cut(trace.graph_module, nodes) for nodes in modes.recomputed)
        checkpoint = rewrite_checkpointed(rewritten, cuts, result.renamed)
        rewritten, regions = checkpoint.graph_module, checkpoint.regions
    graph_module, segments, sketched = sketch_compiled(rewritten, result.segments, model, sketch_linears)
    return CompiledVariant(
        tracer=trace.tracer,
        plan=plan,
        graph=graph_module.graph,
        traced_graph=traced_graph,
        segments=segments,
        input_names=trace.input_names,
        guard=trace.guard,
        constants=constants,
        original_attributes=plain,
        sketched=sketched,
        regions=regions,
    )

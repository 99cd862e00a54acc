"""The compile pipeline for one call signature: trace -> normalize -> detect -> rewrite.

    model, call ──trace (fx, else export)──> GraphModule
                ──normalize_graph──────────> guards gone, shape queries on the stream origin
                ──find_reversible_blocks───> Plan (segments, skipped residuals + reasons)
                ──rewrite_reversible───────> graph with reversible_segment_<i> calls
                                              + one SegmentProgram per segment

The result, a ``CompiledVariant``, holds no reference to the model: it is bound to one
(``revcompile.converted``) to run.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, replace

import torch.fx as fx
from torch import nn

from revcompile.passes.detect import find_reversible_blocks
from revcompile.passes.normalize import normalize_graph
from revcompile.passes.plan import Plan
from revcompile.passes.rewrite import SegmentProgram, rewrite_reversible
from revcompile.errors import ConversionError
from revcompile.frontend import CallSignature, Trace, TraceFailed, trace_model

__all__ = ["CompiledVariant", "compile_variant"]


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


def _resolves(model: nn.Module, target: str) -> bool:
    try:
        obj = model
        for part in target.split("."):
            obj = getattr(obj, part)
        return True
    except AttributeError:
        return False


def _lift_constants(trace: Trace, model: nn.Module) -> dict:
    """Attributes the tracer created (tensor constants, higher-order-op subgraphs) get names of their own.

    They are not part of the model, so the converted model holds them itself, as
    non-persistent buffers or parameter-free submodules: ``state_dict`` is unaffected.
    """
    constants = {}
    for node in trace.graph_module.graph.nodes:
        if node.op == "get_attr" and not _resolves(model, node.target):
            value = trace.graph_module
            for part in str(node.target).split("."):
                value = getattr(value, part)
            name = f"_revcompile_constant_{uuid.uuid4().hex[:12]}"
            constants[name] = value
            setattr(trace.graph_module, name, value)
            node.target = name
    if constants:
        trace.graph_module.recompile()
    return constants


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


def compile_variant(
    model: nn.Module,
    call: CallSignature,
    *,
    tracer: str,
    training: bool,
    post_norm: str = "skip",
    require_blocks: bool = True,
) -> CompiledVariant:
    """Compile ``model`` for one call. ``tracer='auto'`` tries fx, then torch.export.

    With ``require_blocks`` (the first conversion) finding nothing to convert is an error;
    later variants are compared with the first one by the caller instead.
    """
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
        normalize_graph(trace.graph_module)
        plan = find_reversible_blocks(trace.graph_module, post_norm=post_norm)
        if best is None or len(plan.blocks) > len(best[1].blocks):
            best = (trace, plan)
        if plan.blocks:
            break
        notes.append(f"{name} tracing found no convertible blocks")
    if best is None:
        summary = "; ".join(str(f) for f in failures)
        raise ConversionError(
            f"could not trace {type(model).__name__} ({summary}). Try: pass example inputs exactly as the "
            "model is called in training (batch size >= 2); tracer='export' for models with data-dependent "
            "control flow; for fx, make custom modules leaves (torch.fx.wrap) where their code branches on tensors."
        ) from failures[-1].error
    trace, plan = best
    notes.extend(f"{f.tracer} tracing failed ({f}); used {trace.tracer}" for f in failures)
    notes.extend(
        f"{key}={value!r} is passed to the model: a key/value cache would keep every layer's keys and values alive"
        for key, value in call.injected.items()
    )
    plan = replace(plan, tracer=trace.tracer, notes=plan.notes + tuple(notes))
    if not plan.blocks and require_blocks:
        raise _nothing_convertible(model, plan)

    constants = _lift_constants(trace, model)
    traced_graph = fx.Graph()
    traced_graph.output(traced_graph.graph_copy(trace.graph_module.graph, {}))
    result = rewrite_reversible(trace.graph_module, plan)
    return CompiledVariant(
        tracer=trace.tracer,
        plan=plan,
        graph=result.graph_module.graph,
        traced_graph=traced_graph,
        segments=result.segments,
        input_names=trace.input_names,
        guard=trace.guard,
        constants=constants,
    )

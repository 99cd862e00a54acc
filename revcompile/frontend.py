"""Capturing a model's forward as an fx graph: torch.fx first, torch.export where that fails.

``torch.fx.symbolic_trace`` gives module-level graphs that read like the model's code, so it
is tried first. It cannot follow data-dependent Python control flow (HuggingFace models,
``nn.TransformerEncoder``, timm MViTv2), and transformers 5 ships no fx tracer at all; for
those, ``torch.export.export(strict=False)`` captures an aten-level graph.

Both tracers bake some run-time facts into the graph: the training flag (dropout is
``train=True`` or absent; ``self.training`` branches are resolved), which optional
arguments were passed, and for export the device and the dtype. The converted model
therefore keeps one traced variant per call signature (``revcompile.converted``); this
module only produces one trace for one call, with batch and sequence dimensions dynamic.
"""

from __future__ import annotations

import inspect
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.utils import _pytree as pytree

from revcompile.errors import one_line
from revcompile.passes.graph_module import graph_module
from revcompile.layer_reuse import LayerStack, find_layer_stack, same_output, stitch_layers, truncated_stack
from revcompile.quiet import quiet_torch

__all__ = ["TRACERS", "CallSignature", "Trace", "TraceFailed", "bind_call", "training_defaults", "trace_model"]

TRACERS = ("auto", "fx", "export")

# Modules fx should trace through even though they live in torch.nn: the transformer
# layers themselves (left as opaque leaves, their residuals would be invisible).
_TRACE_THROUGH = (nn.TransformerEncoder, nn.TransformerEncoderLayer, nn.TransformerDecoder, nn.TransformerDecoderLayer, nn.Transformer)


@dataclass(frozen=True)
class CallSignature:
    """One way of calling the model: which arguments were given, in which form.

    ``positional`` and ``keyword`` hold the values of the call; arguments left to their
    defaults are absent. ``injected`` names arguments revcompile set itself (the
    key/value cache switch), which every later call receives too. ``reference``: the
    model's output on this call as ``layer_reuse.training_output`` gives it, where the
    caller has run the model that way already (``convert``'s input check), so that the
    layer-reuse check need not run it again.
    """

    positional: tuple
    keyword: dict
    injected: dict = field(default_factory=dict)
    reference: list | None = field(default=None, compare=False, repr=False)

    def flat_inputs(self) -> list:
        return pytree.tree_leaves((self.positional, self.keyword))


def _forward_signature(model: nn.Module) -> inspect.Signature:
    return inspect.signature(model.forward)


def bind_call(model: nn.Module, args: tuple, kwargs: dict, injected: dict | None = None) -> CallSignature:
    """Normalise a call: positional-or-keyword arguments become keywords.

    Raises a ``TypeError`` naming the signature when the arguments do not fit it.
    """
    signature = _forward_signature(model)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as err:
        raise TypeError(f"the inputs do not match {type(model).__name__}.forward{signature}: {err}") from None
    positional, keyword = [], {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.POSITIONAL_ONLY:
            positional.append(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            positional.extend(value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            keyword.update(value)
        else:
            keyword[name] = value
    injected = dict(injected or {})
    for name, value in injected.items():
        keyword.setdefault(name, value)
    return CallSignature(tuple(positional), keyword, injected)


def training_defaults(model: nn.Module, kwargs: dict) -> dict:
    """Arguments revcompile fixes for training: no key/value cache.

    A cache returns every layer's keys and values, which keeps them alive and makes
    the attention branch's values escape it; training does not use it.
    """
    params = _forward_signature(model).parameters
    if "use_cache" in kwargs:
        return {}
    if "use_cache" in params:
        return {"use_cache": False}
    # a wrapper that passes **kwargs on (peft's PeftModel) around a model with a cache
    passes_on = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if passes_on and hasattr(getattr(model, "config", None), "use_cache"):
        return {"use_cache": False}
    return {}


@dataclass(frozen=True)
class Trace:
    graph_module: fx.GraphModule
    tracer: str
    call: CallSignature
    input_names: tuple[str, ...]  # fx: keyword names in placeholder order; export: ()
    guard: object | None  # export: callable raising AssertionError when inputs don't fit
    notes: tuple[str, ...] = ()


class _Unsupported(Exception):
    """This tracer cannot handle the call at all; another one may."""


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, _TRACE_THROUGH):
            return False
        return super().is_leaf_module(m, qualname)


def _trace_fx(model: nn.Module, call: CallSignature) -> Trace:
    signature = _forward_signature(model)
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD, inspect.Parameter.POSITIONAL_ONLY)
    if call.positional or any(p.kind in variadic for p in signature.parameters.values()):
        raise _Unsupported("forward takes *args, **kwargs or positional-only arguments")
    concrete = {}
    for name, param in signature.parameters.items():
        if name not in call.keyword:
            concrete[name] = param.default
        elif not isinstance(call.keyword[name], torch.Tensor):
            concrete[name] = call.keyword[name]  # flags and sizes are specialised
    tracer = _Tracer()
    before = set(model.__dict__)
    try:
        graph = tracer.trace(model, concrete_args=concrete or None)
        gm = graph_module(tracer.root, graph, type(model).__name__)
    finally:
        # fx stores tensor constants it meets as attributes of the traced module
        # (`_tensor_constant0`); they belong to the trace, not to the user's model.
        for name in set(model.__dict__) - before:
            delattr(model, name)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    names = list(signature.parameters)
    for node, name in zip(placeholders, names):
        node.meta["revcompile_concrete"] = name in concrete
        node.meta["revcompile_argument"] = name
    input_names = tuple(name for name in names if name not in concrete)
    fake_inputs = [call.keyword[n] for n in input_names]
    _propagate_fake(gm, fake_inputs)
    return Trace(gm, "fx", call, input_names, guard=None)


def _propagate_fake(gm: fx.GraphModule, inputs: list) -> None:
    """Record shapes and dtypes (``node.meta['val']``) without running real kernels."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakes = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in inputs]
    # Leaf modules run with the model's real buffers, and some update them in place even on
    # fake inputs (BatchNorm's `num_batches_tracked += 1`): tracing must not change the model.
    buffers = [(b, b.detach().clone()) for b in gm.buffers()]
    try:
        FakeTensorProp(gm, mode).propagate(*fakes)
    except Exception:  # noqa: BLE001 -- metadata is an aid to detection, not a requirement
        for node in gm.graph.nodes:
            node.meta.pop("val", None)
    finally:
        with torch.no_grad():
            for buffer, value in buffers:
                buffer.copy_(value)


def _dynamic_shapes(model: nn.Module, call: CallSignature):
    """Every tensor dimension free to vary where the trace allows it (batch, sequence).

    ``Dim.AUTO`` lets export keep a dimension dynamic where the code allows and
    specialise it where it does not, instead of failing.
    """
    from torch.export import Dim

    auto = getattr(Dim, "AUTO", None)
    if auto is None:  # torch < 2.5: static shapes; other shapes retrace (see converted.py)
        return None

    def spec(value):
        if isinstance(value, torch.Tensor):
            return {d: auto for d in range(value.dim())}
        return None

    arguments = _forward_signature(model).bind(*call.positional, **call.keyword).arguments
    return {name: pytree.tree_map(spec, value) for name, value in arguments.items()}


def _export(model: nn.Module, call: CallSignature):
    shapes = _dynamic_shapes(model, call)
    kwargs = dict(strict=False)
    if shapes is not None:
        kwargs["dynamic_shapes"] = shapes
    try:
        return torch.export.export(model, call.positional, call.keyword, **kwargs)
    except Exception as dynamic_error:  # noqa: BLE001
        if shapes is None:
            raise
        # Some models only export with static shapes; other shapes then retrace.
        try:
            return torch.export.export(model, call.positional, call.keyword, strict=False)
        except Exception:  # noqa: BLE001
            raise dynamic_error from None


def _trace_export(model: nn.Module, call: CallSignature) -> Trace:
    stack = find_layer_stack(model)
    if stack is not None:
        reused = _export_reusing_layers(model, call, stack)
        if reused is not None:
            return reused
    unlifted = _export(model, call).module()
    gm = graph_module(unlifted, unlifted.graph, type(model).__name__)
    return Trace(gm, "export", call, (), guard=getattr(unlifted, "_guards_fn", None))


def _export_reusing_layers(model: nn.Module, call: CallSignature, stack: LayerStack) -> Trace | None:
    """Export with the layer stack cut to two layers and copy the second (``revcompile.layer_reuse``);
    ``None`` where that does not give the model's own graph."""
    try:
        with truncated_stack(model, stack):
            unlifted = _export(model, call).module()
    except Exception:  # noqa: BLE001 -- the forward needs its full stack: export all of it
        return None
    graph = unlifted.graph
    copied = stitch_layers(graph, stack)
    if copied is None:
        return None
    owners = {**{t: unlifted for t in _targets(graph)}, **{t: model for t in copied}}
    root = {target: _attribute(owner, target) for target, owner in owners.items()}
    gm = graph_module(root, graph, type(model).__name__)
    if not same_output(model, gm, call):
        return None
    note = (f"torch.export traced 2 of the {stack.count} identical layers of {stack.path} and copied the second "
            "for the others (same graph for both traced layers, same output as the model on the example call)")
    return Trace(gm, "export", call, (), guard=getattr(unlifted, "_guards_fn", None), notes=(note,))


def _targets(graph: fx.Graph) -> list[str]:
    return [str(n.target) for n in graph.nodes if n.op in ("get_attr", "call_module")]


def _attribute(owner: nn.Module, target: str):
    value = owner
    for part in target.split("."):
        value = getattr(value, part)
    return value


@contextmanager
def _without_stack_traces():
    """Trace without recording each node's Python stack (``node.meta["stack_trace"]``).

    Nothing in revcompile reads it, and torch.export spends about a tenth of its time
    capturing and symbolizing one traceback per node (a ``torch.fx.config`` switch in
    recent torch; older versions record them).
    """
    config = getattr(fx, "config", None)
    if not hasattr(config, "do_not_emit_stack_traces"):
        yield
        return
    before = config.do_not_emit_stack_traces
    config.do_not_emit_stack_traces = True
    try:
        yield
    finally:
        config.do_not_emit_stack_traces = before


class TraceFailed(Exception):
    """One tracer could not capture the model; ``error`` is what it raised."""

    def __init__(self, tracer: str, error: BaseException):
        super().__init__(f"{tracer}: {one_line(error)}")
        self.tracer = tracer
        self.error = error


def trace_model(model: nn.Module, call: CallSignature, tracer: str, *, training: bool) -> Trace:
    """Trace ``model`` for ``call`` with one tracer (``"fx"`` or ``"export"``).

    Tracing runs with the model's top-level training flag set to ``training`` (submodules
    keep their own modes), gradients enabled (so that fast paths for inference are not
    taken), autocast off, torch's diagnostics silenced (``revcompile.quiet``), and leaves the
    global random generators as they were.
    """
    was_training = model.training
    rng = torch.get_rng_state()
    try:
        model.training = training
        with ExitStack() as stack:
            stack.enter_context(quiet_torch())
            stack.enter_context(_without_stack_traces())
            stack.enter_context(torch.enable_grad())
            # a trace runs the forward on fake tensors: keep them away from the caller's hooks
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t))
            stack.enter_context(torch.autocast("cpu", enabled=False))
            if torch.cuda.is_available():
                stack.enter_context(torch.autocast("cuda", enabled=False))
            return (_trace_fx if tracer == "fx" else _trace_export)(model, call)
    except _Unsupported as err:
        raise TraceFailed(tracer, err) from None
    except Exception as err:  # noqa: BLE001 -- any tracer failure is reported to the user
        raise TraceFailed(tracer, err) from err
    finally:
        model.training = was_training
        torch.set_rng_state(rng)

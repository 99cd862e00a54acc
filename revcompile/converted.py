"""The module ``revcompile.convert`` returns: the user's model, running its rewritten graph.

``ReversibleModel`` registers the original model's own submodules, parameters and buffers
-- the same objects, under the same names -- so ``state_dict()`` has exactly the original
keys, ``load_state_dict`` works both ways, optimizers and DDP see the original parameters,
and the original model keeps working unconverted beside it. Attributes it does not have
(a HuggingFace ``config``, say) are looked up on the original.

A traced graph is specific to how it was traced: the training flags (dropout present or
not, ``self.training`` branches taken), which optional arguments were passed, their
dtypes and devices, and for ``torch.export`` the shape ranges it was traced under. The
model keeps one compiled *variant* per such call signature and traces a new one the first
time a call does not fit any (``model.eval()``, a call without ``attention_mask``, a move
to another device). Every variant must convert the same blocks as the first one; if one
does not, the call fails rather than silently computing a different architecture.
"""

from __future__ import annotations

import copy
import dataclasses
import logging

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from revcompile.passes.checkpoint import CheckpointCall
from revcompile.passes.rewrite import SegmentCall
from revcompile.errors import ConversionError
from revcompile.frontend import CallSignature, bind_call, training_defaults
from revcompile.pipeline import ORIGINAL_ATTRIBUTES, BlockModes, CompiledVariant, TracedCall, compile_variant
from revcompile.passes.couplings import Coupling
from revcompile.runtime import ReversibleSegment, RuntimeSettings, bind_graph
from revcompile.runtime.checkpointed import CheckpointedRegion

__all__ = ["ReversibleModel"]

log = logging.getLogger("revcompile")


def _graph_with_segments(graph: fx.Graph, segments: list[ReversibleSegment], regions: list[CheckpointedRegion]) -> fx.Graph:
    """A copy of ``graph`` whose segment and checkpointed-region markers call the bound ones."""
    copy = fx.Graph()
    copy.output(copy.graph_copy(graph, {}))
    copy._codegen = graph._codegen
    for node in copy.nodes:
        if isinstance(node.target, SegmentCall):
            node.target = segments[node.target.index]
        elif isinstance(node.target, CheckpointCall):
            node.target = regions[node.target.index]
    copy.lint()
    return copy


class OriginalAttributes(nn.Module):
    """The original model's plain attributes, read when the converted graph runs.

    A tensor assigned to a model as a plain attribute (``self.pos_embedding = tensor``) is
    neither a parameter nor a buffer, so the converted model cannot share it the way it
    shares those: its graph reads it through this parameter-free submodule, which looks it
    up on the original every time. ``.to()`` and ``.double()`` therefore leave it as they
    leave the original's, and reassigning it on the original is seen by the converted model.
    """

    def __init__(self, original: nn.Module):
        super().__init__()
        self.__dict__["_original"] = original

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_original"], name)


class BoundVariant:
    """A compiled variant bound to a model: executable segments and the rewritten graph."""

    def __init__(self, compiled: CompiledVariant, root: nn.Module, settings: RuntimeSettings):
        self.compiled = compiled
        self.segments = [ReversibleSegment(program, root, settings) for program in compiled.segments]
        self.regions = [CheckpointedRegion(program, root) for program in compiled.regions]
        graph = _graph_with_segments(compiled.graph, self.segments, self.regions)
        self.module = bind_graph(graph, root, "Reversible" + type(root).__name__)

    def accepts(self, call: CallSignature) -> bool:
        if self.compiled.guard is None:
            return True
        try:
            self.compiled.guard(*call.flat_inputs())
        except Exception:  # noqa: BLE001 -- any failed guard means "trace another variant"
            return False
        return True

    def placeholder_values(self, call: CallSignature) -> list:
        """The graph's placeholder values for ``call``, in order (what ``fx.Interpreter.run`` takes)."""
        if self.compiled.tracer == "fx":
            return [call.keyword[name] for name in self.compiled.input_names]
        return list(call.flat_inputs())

    def __call__(self, call: CallSignature):
        if self.compiled.tracer == "fx":
            return self.module(*self.placeholder_values(call))
        return self.module(*call.positional, **call.keyword)  # the exported module flattens the call itself


def _leaf_key(value):
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, value.dim(), value.device)
    try:
        hash(value)
        return ("value", value)
    except TypeError:
        return ("object", type(value))


class ReversibleModel(nn.Module):
    """``original`` with its residual attention/MLP chains running as reversible segments."""

    def __init__(
        self,
        original: nn.Module,
        *,
        tracer: str,
        coupling: Coupling,
        post_norm: str = "skip",
        streams: str = "exact",
        check_reconstruction: bool = False,
        sketch_linears=None,
        block_modes: BlockModes | None = None,
    ):
        super().__init__()
        self._modules.update(original._modules)
        self._parameters.update(original._parameters)
        self._buffers.update(original._buffers)
        self._non_persistent_buffers_set = set(original._non_persistent_buffers_set)
        self.training = original.training
        state = self.__dict__
        state["_rc_original"] = original
        state["_rc_tracer"] = tracer
        state["_rc_post_norm"] = post_norm
        state["_rc_sketch"] = sketch_linears
        state["_rc_block_modes"] = block_modes or BlockModes()  # a memory plan's stored / checkpointed blocks
        state["_rc_settings"] = RuntimeSettings(
            streams=streams, coupling=coupling, check_reconstruction=check_reconstruction
        )
        state["_rc_variants"] = {}
        state["_rc_plan"] = None  # the first variant's plan: every later variant must match it
        state["_rc_tracer_used"] = None
        state["_rc_injected"] = {}
        state["_rc_excluded"] = {}  # block name -> why the conversion check left it stored

    # -- compiling variants ------------------------------------------------------------

    def _state_key(self, call: CallSignature) -> tuple:
        leaves, spec = pytree.tree_flatten((call.positional, call.keyword))
        # the model's own state, not the constants revcompile registered for its traces; one
        # walk over the modules (this runs on every call, so it stays cheap)
        modules = [m for name, m in self.named_modules() if not name.startswith("_revcompile_constant_")]
        tensors = {
            (t.dtype, t.device)
            for m in modules
            for table in (m._parameters, m._buffers)
            for name, t in table.items()
            if t is not None and not name.startswith("_revcompile_constant_")
        }
        return (tuple(m.training for m in modules), spec, tuple(_leaf_key(v) for v in leaves), frozenset(tensors))

    def _sync_original(self) -> None:
        """Top-level parameters and buffers may have been replaced (``.to()``): share them again."""
        original = self._rc_original
        original._parameters.update(self._parameters)
        original._buffers.update({k: v for k, v in self._buffers.items() if not k.startswith("_revcompile_constant_")})

    def _compile(self, call: CallSignature, traced: TracedCall | None = None) -> BoundVariant:
        self._sync_original()
        expected = self._rc_plan
        compiled = compile_variant(
            self._rc_original, call, tracer=self._rc_tracer_used or self._rc_tracer,
            training=self.training, post_norm=self._rc_post_norm, require_blocks=expected is None,
            excluded=self._rc_excluded,
            sketch_linears=self._rc_sketch,
            block_modes=self._rc_block_modes,
            traced=traced,
        )
        if expected is not None and compiled.plan.signature() != expected.signature():
            raise ConversionError(
                "tracing this call (training=%s) converted different blocks than the first trace: "
                "%d blocks in %d segments instead of %d in %d. The model's structure depends on how it "
                "is called; convert it with example inputs of the kind used here."
                % (self.training, len(compiled.plan.blocks), len(compiled.plan.segments),
                   len(expected.blocks), len(expected.segments))
            )
        if expected is None:
            self.__dict__["_rc_plan"] = compiled.plan
            self.__dict__["_rc_tracer_used"] = compiled.tracer
        for name, value in compiled.constants.items():
            if isinstance(value, nn.Module):
                self.add_module(name, value)
            else:
                self.register_buffer(name, value, persistent=False)
        if compiled.original_attributes and ORIGINAL_ATTRIBUTES not in self._modules:
            self.add_module(ORIGINAL_ATTRIBUTES, OriginalAttributes(self._rc_original))
        return self._bind(compiled)

    def _bind(self, compiled: CompiledVariant) -> BoundVariant:
        return BoundVariant(compiled, self, self._rc_settings)

    def _variant_for(self, call: CallSignature, traced: TracedCall | None = None) -> BoundVariant:
        key = self._state_key(call)
        variants = self._rc_variants.setdefault(key, [])
        for variant in variants:
            if variant.accepts(call):
                return variant
        if self._rc_plan is not None:
            log.info("revcompile: tracing a new variant of %s (training=%s)", type(self._rc_original).__name__, self.training)
        variant = self._compile(call, traced)
        variants.append(variant)
        return variant

    def compile_for(self, args: tuple, kwargs: dict, reference: list | None = None,
                    traced: TracedCall | None = None) -> BoundVariant:
        """Trace and convert for one example call (what ``convert`` does first). ``reference``:
        the original's output on it, where the caller has it (``CallSignature.reference``);
        ``traced``: the original already traced for this call (``revcompile.pipeline.trace_call``)."""
        self.__dict__["_rc_injected"] = training_defaults(self._rc_original, kwargs)
        call = bind_call(self._rc_original, args, kwargs, self._rc_injected)
        return self._variant_for(dataclasses.replace(call, reference=reference), traced)

    def exclude_blocks(self, reasons: dict[str, str], args: tuple, kwargs: dict) -> None:
        """Convert again for the example call with these blocks (name -> reason) left as
        they are; ``explain`` lists them with their reasons."""
        self.__dict__["_rc_excluded"] = {**self._rc_excluded, **reasons}
        self.__dict__["_rc_variants"] = {}
        self.__dict__["_rc_plan"] = None
        for table in (self._buffers, self._modules):
            for name in [n for n in table if n.startswith("_revcompile_constant_")]:
                del table[name]
        self.compile_for(args, kwargs)

    # -- running -------------------------------------------------------------------------

    def call_signature(self, args: tuple, kwargs: dict) -> CallSignature:
        """A call as the model runs it (with the arguments revcompile injects for training)."""
        return bind_call(self._rc_original, args, kwargs, self._rc_injected)

    def forward(self, *args, **kwargs):
        if self.__dict__.get("_rc_as_original"):  # a memory plan that stores every block: the original's own step
            return self._rc_original(*args, **kwargs)
        call = self.call_signature(args, kwargs)
        return self._variant_for(call)(call)

    # -- inspection ------------------------------------------------------------------------

    @property
    def reversible_plan(self):
        return self._rc_plan

    @property
    def reversible_settings(self) -> RuntimeSettings:
        return self._rc_settings

    @property
    def reversible_variants(self) -> list[BoundVariant]:
        return [v for vs in self._rc_variants.values() for v in vs]

    @property
    def original_model(self) -> nn.Module:
        self._sync_original()
        return self._rc_original

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            original = self.__dict__.get("_rc_original")
            if original is None or name.startswith("_rc_"):
                raise
            return getattr(original, name)

    # -- copies and pickles -------------------------------------------------------------------

    def __deepcopy__(self, memo):
        """Copy the model state; rebind the compiled variants (they hold no model state)."""
        self._sync_original()
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        state = {k: v for k, v in self.__dict__.items() if k != "_rc_variants"}
        clone.__dict__.update(copy.deepcopy(state, memo))
        clone.__dict__["_rc_variants"] = {
            key: [clone._bind(variant.compiled) for variant in variants] for key, variants in self._rc_variants.items()
        }
        return clone

    def __getstate__(self):
        """Pickle the model state and the plan; variants are traced again on first use."""
        self._sync_original()
        state = dict(self.__dict__)
        state["_rc_variants"] = {}
        for name in [n for n in state["_buffers"] if n.startswith("_revcompile_constant_")]:
            state["_buffers"] = {k: v for k, v in state["_buffers"].items() if k != name}
        state["_modules"] = {k: v for k, v in state["_modules"].items() if not k.startswith("_revcompile_constant_")}
        return state

    def extra_repr(self) -> str:
        plan = self._rc_plan
        if plan is None:
            return "not compiled"
        return (
            f"original={type(self._rc_original).__name__}, blocks={len(plan.blocks)}, segments={len(plan.segments)}, "
            f"tracer={plan.tracer}, coupling={self._rc_settings.coupling.label()!r}, backward={self._rc_settings.mode!r}"
        )

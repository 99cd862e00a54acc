"""The user's entry points: convert a model, look at what was converted, switch backward modes."""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from revcompile.passes.detect import POST_NORM
from revcompile.passes.plan import Plan, require_choice
from revcompile.passes.couplings import STREAM_PRECISIONS, Coupling, DualResidual, make_coupling
from revcompile.passes.schedule import BackwardProgram
from revcompile.collector import spares_collector
from revcompile.conversion_check import check_conversion as check_converted_model
from revcompile.converted import ReversibleModel
from revcompile.distance import function_distance
from revcompile.errors import ConversionError
from revcompile.frontend import TRACERS, bind_call, training_defaults
from revcompile.inputs import check_example_inputs
from revcompile.layer_reuse import find_layer_stack
from revcompile.planner import MemoryPlan, plan_memory, trace_for_planning
from revcompile.sketch import SketchConfig
from revcompile.runtime import BACKWARD_MODES, ReconstructionDrift
from revcompile.runtime.sharding import fsdp_modules

__all__ = [
    "convert",
    "explain",
    "set_backward",
    "set_coefficients",
    "beta_schedule",
    "backward_program",
    "reconstruction_report",
    "unconvert",
    "find_converted",
    "memory_plan",
]


@spares_collector
def convert(
    model: nn.Module,
    example_inputs=(),
    example_kwargs: dict | None = None,
    *,
    tracer: str = "auto",
    coupling: str = "revvit",
    beta: float | None = None,
    alpha: float | None = None,
    fusion: str = "mean",
    post_norm: str = "skip",
    streams: str = "exact",
    check_reconstruction: bool = False,
    check_conversion: bool = True,
    sketch_linears=None,
    memory_budget=None,
) -> ReversibleModel:
    """Rewrite the residual attention/MLP chains of ``model`` into reversible segments.

    ``example_inputs`` (a tuple of positional arguments, or a single tensor) and
    ``example_kwargs`` are one call as the model will be called in training. The returned
    module shares ``model``'s parameters (no copies), has the same ``state_dict`` keys, is
    called like ``model`` and returns the same output structure. Its backward reconstructs
    activations instead of storing them. What its blocks compute is the ``coupling``:

    * ``"revvit"`` (default): ``Y1 = X1 + F(X2)``, ``Y2 = X2 + G(Y1)``, the two streams fused
      at the end (``fusion``: ``"mean"`` or ``"sum"``) -- a different function from the
      original with the same parameters: train it or fine-tune it as a new architecture.
    * ``"dual"``: ``x_{i+1} = alpha*x_i + F_i(x_i) + beta*x_{i-1}`` for every residual
      sublayer, ``beta = 2**-k`` (default ``2**-8``), ``alpha=None`` meaning ``1 - beta``:
      within ~``beta`` of the original function, so pretrained weights keep their meaning
      (fine-tuning); exact at every ``k`` by keeping ``k`` remainder bits per stream element
      and step. ``set_coefficients`` changes ``alpha``/``beta`` between steps.

    ``tracer``: ``"auto"`` (torch.fx, then torch.export), ``"fx"`` or ``"export"``.
    ``post_norm``: ``"skip"`` leaves post-norm blocks (BERT: ``norm(x + f(x))``) as they are;
    ``"move"`` converts them with each such norm moved into the branch after it.
    ``streams``: how the two coupled streams are kept while the branches run in the model's
    own precision: ``"exact"`` (float64 on a fixed-point grid, so that reconstruction is exact
    at any depth and precision), ``"float32"`` or ``"model"`` (see docs/numerics.md).
    ``check_reconstruction``: a debug mode that keeps every block's inputs, compares the
    reconstructed ones with them in backward (``reconstruction_report``) and raises on a
    non-finite reconstruction. It stores activations: do not train with it.
    ``check_conversion`` (default on): run the converted model once on the example call,
    forward and backward, before returning it; a block whose reconstructed inputs differ
    from the forward's is left as it is (``explain`` says why), and a model that fails to
    run raises ``ConversionError`` (``revcompile.conversion_check``). It costs about one
    training step on the example inputs; ``False`` skips it.
    ``sketch_linears``: opt-in approximate weight gradients (off by default). A fraction in
    (0, 1] keeps that fraction of a random sketch of each linear layer's input instead of
    the input; a ``revcompile.SketchConfig`` also chooses the layers (names, a predicate,
    ``"all"``; default: those outside reversible segments), the estimator and the seed.
    Input and bias gradients stay exact; see docs/sketch.md.
    ``memory_budget``: bytes or a string with units (``"6GiB"``) for the training step's
    activations and working memory above parameters and gradients: each block is then
    stored, checkpointed or reversible, whichever fits with the least recompute
    (``revcompile.plan_memory``; ``explain`` shows the plan). A budget the original step fits
    keeps every block as it is; one nothing fits raises ``ReportError`` naming the smallest.
    Raises ``ConversionError`` when the model cannot run on the example inputs (naming the
    input and what the failing op expected), when tracing fails, when nothing is
    convertible, or when the check fails.
    """
    _check_model(model)
    options = {"tracer": (tracer, TRACERS), "post_norm": (post_norm, POST_NORM), "streams": (streams, STREAM_PRECISIONS)}
    for option, (value, choices) in options.items():
        require_choice(option, value, choices)
    chosen = make_coupling(coupling, fusion=fusion, beta=beta, alpha=alpha)
    chosen.check(streams)
    sketch_linears = SketchConfig.of(sketch_linears)
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    kwargs = dict(example_kwargs or {})
    try:
        call = bind_call(model, args, kwargs, training_defaults(model, kwargs))
    except TypeError as err:
        raise ConversionError(
            f"{err}. Pass example_inputs as a tuple of positional arguments and example_kwargs as a dict."
        ) from None
    # An export of a layer stack compares its stitched graph with the model's training output:
    # the input check then runs the model that way, and its output serves both (unused when
    # tracer="auto" and fx traces the model).
    reference = check_example_inputs(model, call, training_run=tracer != "fx" and find_layer_stack(model) is not None)
    memory_plan = traced = None
    if memory_budget is not None:  # the plan's conversion reuses the planner's trace
        traced = trace_for_planning(model, args, kwargs, tracer=tracer, post_norm=post_norm)
        memory_plan = plan_memory(model, args, memory_budget, kwargs, tracer=tracer, coupling=chosen, post_norm=post_norm,
                                  streams=streams, traced=traced, check=True)
        tracer = memory_plan.tracer
    converted = ReversibleModel(
        model, tracer=tracer, coupling=chosen, post_norm=post_norm, streams=streams, check_reconstruction=check_reconstruction,
        sketch_linears=sketch_linears, block_modes=memory_plan.block_modes if memory_plan else None,
    )
    converted.__dict__["_rc_memory_plan"] = memory_plan
    converted.__dict__["_rc_as_original"] = bool(memory_plan and memory_plan.keeps_original and not sketch_linears)
    converted.compile_for(args, kwargs, reference, traced=traced)
    if check_conversion:
        check_converted_model(converted, args, kwargs)
    if isinstance(chosen, DualResidual):  # a pretrained model's user needs this before fine-tuning
        converted.__dict__["_rc_distance"] = function_distance(model, converted, args, kwargs)
    return converted


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, ReversibleModel):
        raise ConversionError("this model is already converted; call revcompile.unconvert(model) to get the original")
    sharded = fsdp_modules(model)
    if sharded:
        raise ConversionError(
            f"{len(sharded)} modules of this model are sharded by FSDP2 ({sharded[0]}, ...). Convert the "
            "unsharded model first, then shard the converted one: fully_shard each block, then the converted model."
        )


def find_converted(module: nn.Module) -> list[ReversibleModel]:
    """Converted models in ``module`` (itself, or inside DDP, torch.compile, a container)."""
    return [m for m in module.modules() if isinstance(m, ReversibleModel)]


def _the_converted(module: nn.Module) -> ReversibleModel:
    found = find_converted(module)
    if not found:
        raise ValueError(f"{type(module).__name__} contains no model converted by revcompile.convert")
    return found[0]


def explain(module: nn.Module) -> Plan:
    """What was converted: ``.segments``, ``.blocks``, ``.skipped`` (with ``.reason``), ``.tracer``.

    Its notes name the coupling (with ``alpha``, ``beta`` and the residue bytes of the dual
    coupling) and, for the dual coupling, the function distance measured at conversion.
    """
    converted = _the_converted(module)
    return replace(converted.reversible_plan, notes=converted.reversible_plan.notes + _coupling_notes(converted))


def _coupling_notes(converted: ReversibleModel) -> tuple[str, ...]:
    coupling = converted.reversible_settings.coupling
    notes = [f"coupling: {coupling.label()}"]
    if coupling.saves_per_step:
        notes.append(
            f"each step keeps {coupling.k} remainder bits per stream element, packed "
            f"({coupling.residue_bytes(8) / 8:g} bytes per element and step)"
        )
    memory_plan = converted.__dict__.get("_rc_memory_plan")
    if memory_plan is not None:
        notes.append(memory_plan.table())
    distance = converted.__dict__.get("_rc_distance")
    if distance is not None:
        notes.append(f"function distance at conversion (eval mode, example inputs): {distance}")
    return tuple(notes)


def memory_plan(module: nn.Module) -> MemoryPlan | None:
    """The memory plan ``convert(..., memory_budget=)`` applied (None without a budget)."""
    return _the_converted(module).__dict__.get("_rc_memory_plan")


def set_backward(module: nn.Module, mode: str) -> None:
    """Switch how converted segments in ``module`` run backward: one of ``BACKWARD_MODES``."""
    require_choice("backward mode", mode, BACKWARD_MODES)
    found = find_converted(module)
    if not found:
        raise ValueError(f"{type(module).__name__} contains no model converted by revcompile.convert")
    for converted in found:
        converted.reversible_settings.mode = mode


def set_coefficients(module: nn.Module, *, alpha: float | None = None, beta: float | None = None) -> Coupling:
    """Change a dual-residual model's ``alpha``/``beta`` between training steps (a Dr2Net schedule).

    ``beta`` must be a power of two ``2**-k``; ``alpha=None`` means ``1 - beta``. Omitting
    ``beta`` keeps the current one. Exactness is kept: a backward inverts with the
    coefficients its forward used. Returns the new coupling.
    """
    found = find_converted(module)
    if not found:
        raise ValueError(f"{type(module).__name__} contains no model converted by revcompile.convert")
    current = found[0].reversible_settings.coupling
    if not isinstance(current, DualResidual):
        raise ValueError(
            f"set_coefficients changes the coefficients of coupling='dual'; this model uses {current.label()}. "
            "Convert with revcompile.convert(model, inputs, coupling='dual', beta=...)."
        )
    updated = DualResidual(current.beta if beta is None else beta, alpha)
    for converted in found:
        converted.reversible_settings.coupling = updated
    return updated


def beta_schedule(step: int, total_steps: int, *, start: float = 2.0**-8, end: float = 2.0**-2) -> float:
    """A Dr2Net-style schedule: beta from ``start`` to ``end`` over training, in powers of two.

    ``k`` (``beta = 2**-k``) moves linearly from ``start``'s to ``end``'s exponent, so the
    model starts close to the pretrained function and ends more reversible-like. Use it as
    ``revcompile.set_coefficients(model, beta=revcompile.beta_schedule(step, total))``
    before each step (a call that keeps beta is cheap).
    """
    if total_steps < 1 or not 0 <= step:
        raise ValueError(f"need 0 <= step and total_steps >= 1, got step={step}, total_steps={total_steps}")
    first, last = (DualResidual(b).k for b in (start, end))
    fraction = min(step / max(total_steps - 1, 1), 1.0)
    return 2.0 ** -round(first + (last - first) * fraction)


def backward_program(module: nn.Module, segment: int = 0, *, mode: str = "parallel") -> BackwardProgram:
    """The scheduled backward of one reversible segment, as it runs in ``mode``.

    ``mode`` is ``"parallel"`` (two streams, PaReprop) or ``"reversible"`` (one stream).
    The result has ``.graph`` (a ``networkx.DiGraph`` of ``("recompute", i)`` and
    ``("grad", i)`` steps and their data dependencies), ``.order``, ``.streams``,
    ``.waits``, ``.independent`` and ``.concurrent`` (the pairs run at once, each with
    its proof of independence); ``print`` it for a listing.
    """
    converted = _the_converted(module)
    segments = converted.reversible_variants[0].segments
    if not 0 <= segment < len(segments):
        raise IndexError(f"segment must be in 0..{len(segments) - 1}, got {segment}")
    return segments[segment].backward_program(mode, converted.reversible_settings.coupling)


def unconvert(module: nn.Module) -> nn.Module:
    """The original model behind a converted one (sharing its current parameters)."""
    return _the_converted(module).original_model


def reconstruction_report(module: nn.Module) -> list[ReconstructionDrift]:
    """Per block, how far the last backward's reconstructed inputs were from the forward's.

    Needs ``convert(..., check_reconstruction=True)``; empty before the first backward.
    """
    converted = _the_converted(module)
    if not converted.reversible_settings.check_reconstruction:
        raise ValueError("convert the model with check_reconstruction=True to record reconstruction drift")
    drift = converted.reversible_settings.drift
    return [d for key in sorted(drift) for d in drift[key]]

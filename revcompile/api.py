"""The user's entry points: convert a model, look at what was converted, switch backward modes."""

from __future__ import annotations

from torch import nn

from revcompile.passes.detect import POST_NORM
from revcompile.passes.plan import Plan, require_choice
from revcompile.passes.rewrite import FUSIONS
from revcompile.passes.schedule import BackwardProgram
from revcompile.converted import ReversibleModel
from revcompile.errors import ConversionError
from revcompile.frontend import TRACERS, bind_call, training_defaults
from revcompile.inputs import check_example_inputs
from revcompile.runtime import BACKWARD_MODES, STREAM_PRECISIONS, ReconstructionDrift

__all__ = [
    "convert",
    "explain",
    "set_backward",
    "backward_program",
    "reconstruction_report",
    "unconvert",
    "find_converted",
]


def convert(
    model: nn.Module,
    example_inputs=(),
    example_kwargs: dict | None = None,
    *,
    tracer: str = "auto",
    fusion: str = "mean",
    post_norm: str = "skip",
    streams: str = "exact",
    check_reconstruction: bool = False,
) -> ReversibleModel:
    """Rewrite the residual attention/MLP chains of ``model`` into reversible segments.

    ``example_inputs`` (a tuple of positional arguments, or a single tensor) and
    ``example_kwargs`` are one call as the model will be called in training. The returned
    module shares ``model``'s parameters (no copies), has the same ``state_dict`` keys, is
    called like ``model`` and returns the same output structure. Its blocks compute the
    Rev-ViT coupling ``Y1 = X1 + F(X2)``, ``Y2 = X2 + G(Y1)`` -- a different function from
    the original with the same parameters -- and its backward reconstructs activations
    instead of storing them.

    ``tracer``: ``"auto"`` (torch.fx, then torch.export), ``"fx"`` or ``"export"``.
    ``fusion``: how a segment's two streams become one tensor: one of ``FUSIONS``.
    ``post_norm``: ``"skip"`` leaves post-norm blocks (BERT: ``norm(x + f(x))``) as they are;
    ``"move"`` converts them with each such norm moved into the branch after it.
    ``streams``: how the two coupled streams are kept while the branches run in the model's
    own precision: ``"exact"`` (float64 on a fixed-point grid, so that reconstruction is exact
    at any depth and precision), ``"float32"`` or ``"model"`` (see docs/numerics.md).
    ``check_reconstruction``: a debug mode that keeps every block's inputs, compares the
    reconstructed ones with them in backward (``reconstruction_report``) and raises on a
    non-finite reconstruction. It stores activations: do not train with it.
    Raises ``ConversionError`` when the model cannot run on the example inputs (naming the
    input and what the failing op expected), when tracing fails, or when nothing is convertible.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, ReversibleModel):
        raise ConversionError("this model is already converted; call revcompile.unconvert(model) to get the original")
    options = {"tracer": (tracer, TRACERS), "fusion": (fusion, FUSIONS), "post_norm": (post_norm, POST_NORM),
               "streams": (streams, STREAM_PRECISIONS)}
    for option, (value, choices) in options.items():
        require_choice(option, value, choices)
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    kwargs = dict(example_kwargs or {})
    try:
        check_example_inputs(model, bind_call(model, args, kwargs, training_defaults(model, kwargs)))
    except TypeError as err:
        raise ConversionError(
            f"{err}. Pass example_inputs as a tuple of positional arguments and example_kwargs as a dict."
        ) from None
    converted = ReversibleModel(
        model, tracer=tracer, fusion=fusion, post_norm=post_norm, streams=streams, check_reconstruction=check_reconstruction
    )
    converted.compile_for(args, kwargs)
    return converted


def find_converted(module: nn.Module) -> list[ReversibleModel]:
    """Converted models in ``module`` (itself, or inside DDP, torch.compile, a container)."""
    return [m for m in module.modules() if isinstance(m, ReversibleModel)]


def _the_converted(module: nn.Module) -> ReversibleModel:
    found = find_converted(module)
    if not found:
        raise ValueError(f"{type(module).__name__} contains no model converted by revcompile.convert")
    return found[0]


def explain(module: nn.Module) -> Plan:
    """What was converted: ``.segments``, ``.blocks``, ``.skipped`` (with ``.reason``), ``.tracer``."""
    return _the_converted(module).reversible_plan


def set_backward(module: nn.Module, mode: str) -> None:
    """Switch how converted segments in ``module`` run backward: one of ``BACKWARD_MODES``."""
    require_choice("backward mode", mode, BACKWARD_MODES)
    found = find_converted(module)
    if not found:
        raise ValueError(f"{type(module).__name__} contains no model converted by revcompile.convert")
    for converted in found:
        converted.reversible_settings.mode = mode


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
    return segments[segment].backward_program(mode)


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

"""Will it fit? The memory of a training step for models this machine cannot hold.

``revcompile.report`` measures a real step, so the model must be in memory. The question
users bring is about models far larger than the machine they ask it on ("a 7B Llama at
4096 tokens on one 80 GiB GPU, with and without revcompile, at what batch?"). Everything
the prediction needs is shapes and dtypes: the tracers, the compile passes and
``revcompile.passes.memory`` (which interprets the graphs on fake tensors) never read a
value. So here the model is built on the meta device (no storage), its parameters,
buffers and example inputs are replaced by fake tensors on the CPU (no storage either,
but the CPU's kernel choices: on meta, attention falls back to the math path and keeps
its weights, which a fused kernel does not), and it is traced, converted and predicted
exactly as ``memory_report`` does for a real model. Nothing runs for real; nothing is
measured. The real and the fake path give the same numbers (tests/test_predict.py).
One difference: ``convert``'s conversion check (one real step, excluding blocks that do not
reconstruct) compares values, which fake tensors lack, so it is skipped here; a model whose
real conversion excludes blocks is predicted with them converted.

Parameters, gradients and optimizer state are counted from the dtype (``revcompile.budget``);
``autocast`` runs the interpretation under CPU autocast, so the casts it makes (and the
low-precision copies of the weights it saves) are counted as they will run.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils import _pytree as pytree

from revcompile.budget import (
    DEFAULT_RESERVE,
    BatchCapacity,
    ReportError,
    TrainingState,
    largest_batches,
    nothing_fits,
    parse_bytes,
    training_state,
)
from revcompile.errors import ConversionError
from revcompile.passes.memory import MemoryPrediction, PredictionFailed
from revcompile.passes.plan import Plan
from revcompile.report import searched_capacity, _batch_size, predict

__all__ = ["FitPrediction", "predict_memory", "fake_model", "NO_STORAGE"]

NO_STORAGE = ("built on the meta device and run on fake tensors (shapes and dtypes only): "
              "no storage is allocated for parameters or activations; nothing is measured")
AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class FitPrediction:
    """The predicted memory of one training step, original and converted, and what fits a cap."""

    model: str
    dtype: str  # of the parameters
    autocast: str | None  # the CPU autocast dtype the step was interpreted under
    example_batch: int  # the batch the model was traced with
    parameter_count: int
    plan: Plan
    prediction: MemoryPrediction
    training: TrainingState
    capacity: BatchCapacity | None
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        p = self.prediction
        lines = ("original_saved", "converted_saved", "original_peak", "converted_peak")
        return {
            "model": self.model,
            "method": NO_STORAGE,
            "dtype": self.dtype,
            "autocast": self.autocast,
            "example_batch": self.example_batch,
            "parameter_count": self.parameter_count,
            "tracer": self.plan.tracer,
            "blocks": len(self.plan.blocks),
            "segments": len(self.plan.segments),
            "prediction": {
                "batches": list(p.batches),
                **{name: asdict(getattr(p, name)) for name in lines},
                "notes": list(p.notes),
            },
            "training_state": {**asdict(self.training), "total": self.training.total},
            "capacity": None if self.capacity is None else {**asdict(self.capacity), "gain": self.capacity.gain},
            "notes": list(self.notes),
        }


def _fake_like(mode, tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """A fake CPU tensor of ``tensor``'s shape (floating point: in ``dtype`` if given)."""
    target = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
    with mode:
        return torch.empty_strided(tuple(tensor.shape), tuple(tensor.stride()), dtype=target, device="cpu")


def fake_model(model: nn.Module, mode, dtype: torch.dtype | None = None) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are fake tensors of ``mode``.

    The originals are never read (a meta or a real model both work) and never copied:
    the deep copy finds each parameter and buffer already "copied" to its fake stand-in.
    Shared parameters stay shared.
    """
    memo: dict[int, object] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(_fake_like(mode, p, dtype), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = _fake_like(mode, b, dtype)
    return copy.deepcopy(model, memo)


def _fake_inputs(mode, value, dtype: torch.dtype | None):
    return pytree.tree_map(lambda t: _fake_like(mode, t, dtype) if isinstance(t, torch.Tensor) else t, value)


def _build_on_meta(factory) -> nn.Module:
    with torch.device("meta"):
        honoured = torch.empty(0).device.type == "meta"
    if not honoured:
        raise ReportError(
            "torch function modes are disabled in this process (a library left them off), so "
            "`with torch.device('meta')` would build the model for real; predict in a fresh process, "
            "or build the model under `with torch.device('meta'):` yourself and pass the module"
        )
    try:
        with torch.device("meta"):
            model = factory()
    except Exception as err:  # noqa: BLE001 -- a constructor that needs real storage
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise ReportError(
            f"building the model on the meta device failed ({type(err).__name__}: {first}); its constructor "
            "reads tensor values. Build it yourself under `with torch.device('meta'):` after working around "
            "that, and pass the module"
        ) from None
    if not isinstance(model, nn.Module):
        raise ReportError(f"the model factory returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _conversion_error(err: ConversionError) -> ConversionError:
    if err.__cause__ is None:  # traced, but nothing to convert: the same as with real weights
        return err
    return ConversionError(
        f"{err} (traced without storage, on fake tensors: if this model converts with real weights, its forward "
        "reads tensor values; measure a smaller real config with `revcompile report` instead)"
    )


def _fake_call(model: nn.Module, args: tuple, kwargs: dict, dtype: torch.dtype | None):
    """The model and one call, as fake CPU tensors of one fake mode; the call's batch size."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake = fake_model(model, mode, dtype).train()
    args, kwargs = _fake_inputs(mode, args, dtype), _fake_inputs(mode, kwargs, dtype)
    batch = _batch_size(args, kwargs)
    if not batch or batch < 2:
        raise ReportError(f"the example call needs a batch dimension of at least 2 to trace, got {batch}")
    return fake, args, kwargs, batch


def _capacity(cap: int | None, state: TrainingState, prediction: MemoryPrediction) -> tuple[BatchCapacity | None, tuple]:
    """The largest batches under ``cap`` (None without one), and a note when not even one sample fits."""
    if cap is None:
        return None, ()
    basis = "predicted peak activation memory (saved for backward + backward working memory)"
    capacity = largest_batches(cap, state, prediction.original_peak, prediction.converted_peak, basis)
    return capacity, (() if capacity.converted else (nothing_fits(cap, state, prediction.converted_peak),))


def _predict_and_fit(converted, args, kwargs, batch: int, amp, cap: int | None, state: TrainingState, say):
    """The prediction under ``amp``'s autocast, and the largest batches under ``cap`` (searched)."""
    say("predicting memory from the graphs (fake tensors)")
    try:
        with torch.autocast("cpu", dtype=amp) if amp is not None else nullcontext():
            prediction = predict(converted, args, kwargs, batch)
    except PredictionFailed as err:
        raise ReportError(f"the graphs could not be interpreted on fake tensors: {err}") from None
    capacity, shortfall = _capacity(cap, state, prediction)
    if capacity is not None and capacity.converted:
        say("searching the largest batches with simulated steps")
        with torch.autocast("cpu", dtype=amp) if amp is not None else nullcontext():
            capacity = searched_capacity(capacity, state, converted, args, kwargs, batch, tolerance=0.05)
    return prediction, capacity, shortfall


def predict_memory(
    model,
    example_inputs=(),
    example_kwargs: dict | None = None,
    *,
    dtype: torch.dtype | None = None,
    autocast: torch.dtype | str | None = None,
    memory_cap: int | str | None = None,
    optimizer: str = "adamw",
    reserve: int | str = DEFAULT_RESERVE,
    tracer: str = "auto",
    name: str | None = None,
    notes: tuple[str, ...] = (),
    progress=None,
) -> FitPrediction:
    """Predict a training step's memory for ``model`` without allocating its parameters or activations.

    ``model``: a module (best built under ``with torch.device("meta"):``; a real one works
    too and is left untouched) or a function of no arguments that builds one (it is called
    on the meta device). ``example_inputs``/``example_kwargs``: one training call; only
    their shapes and dtypes are used (meta tensors are fine), its batch must be >= 2.
    ``dtype``: the parameters' (and floating inputs') dtype in training; ``autocast``: the
    autocast dtype (``torch.bfloat16``, ``"float16"``) the step runs under, or None.
    ``memory_cap``, ``optimizer``, ``reserve``: as for ``memory_report``.
    Raises ``ReportError`` (a model that cannot be built or predicted without storage, a cap
    nothing fits) or ``ConversionError``.
    """
    from revcompile.api import convert, explain

    say = progress or (lambda text: None)
    amp = AUTOCAST_DTYPES.get(autocast, autocast) if isinstance(autocast, str) else autocast
    if amp not in (None, torch.bfloat16, torch.float16):
        raise ReportError(f"autocast must be bfloat16 or float16 (or None), got {autocast!r}")
    cap = parse_bytes(memory_cap) if memory_cap is not None else None
    if not isinstance(model, nn.Module):
        say("building the model on the meta device")
        model = _build_on_meta(model)
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    fake, args, kwargs, batch = _fake_call(model, args, dict(example_kwargs or {}), dtype)
    state = training_state(fake, optimizer, parse_bytes(reserve))
    say("tracing and converting on fake tensors")
    try:
        converted = convert(fake, args, kwargs, tracer=tracer, check_conversion=False)  # it compares values; fakes have none
    except ConversionError as err:
        raise _conversion_error(err) from None
    prediction, capacity, shortfall = _predict_and_fit(converted, args, kwargs, batch, amp, cap, state, say)
    first = next(fake.parameters(), None)
    return FitPrediction(
        model=name or type(model).__name__,
        dtype=str(first.dtype if first is not None else torch.float32).replace("torch.", ""),
        autocast=None if amp is None else str(amp).replace("torch.", ""),
        example_batch=batch,
        parameter_count=sum(p.numel() for p in fake.parameters()),
        plan=explain(converted),
        prediction=prediction,
        training=state,
        capacity=capacity,
        notes=(*notes, *shortfall),
    )

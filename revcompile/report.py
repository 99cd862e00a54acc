"""How much memory a conversion saves: measured on a real training step, predicted for any batch.

``memory_report`` converts a model (unless given the conversion) and answers three
questions:

* **Measured**: one forward + backward of the original and of the converted model on the
  same inputs (after one warm-up step each): the activations saved for backward (distinct
  storages, parameters excluded; exact on every device), the peak memory of the step above
  its start (CUDA: ``max_memory_allocated`` after resetting the peak; CPU: the bytes of the
  tensors alive at once, counted op by op on a real step (``revcompile.simulate``), with
  the sampled live heap beside it -- never the resident-set size, see
  ``revcompile.measure``), and the step time.
* **Predicted**: ``revcompile.passes.memory`` interprets the traced and the rewritten graph on fake
  tensors at two batch sizes *other than the measured one* and fits per-sample saved bytes
  for each part of the model; ``revcompile.simulate`` runs each whole training step on
  fake tensors at those batch sizes for its peak. The report states how far that prediction is from the
  measurement, so the prediction is checked every time it is made.
* **What it buys**: the largest batch whose step fits a memory cap, for the original, the
  converted model and the best memory plan (``revcompile.plan_memory``: per block stored,
  checkpointed or reversible, parts between blocks recomputed), counting parameters, their gradients, the optimizer's state
  (AdamW: two tensors per parameter) and a reserve for what is not a tensor (the CUDA
  context, allocator fragmentation).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn
from torch.utils import _pytree as pytree

from revcompile.passes.memory import (
    LinearBytes,
    MemoryPrediction,
    PredictionFailed,
    predict_activation_memory,
)
from revcompile.passes.plan import Plan
from revcompile.budget import (
    DEFAULT_RESERVE,
    BatchCapacity,
    ReportError,
    TrainingState,
    batch_capacity,
    parse_bytes,
    training_state,
)
from revcompile.measure import HeapPeak, saved_for_backward
from revcompile.simulate import LiveTensorBytes, largest_fitting_batch, resident_tensors, simulate_step_peak, training_loss, training_step

__all__ = ["StepMeasurement", "MemoryReport", "measure_step", "predict", "memory_report", "ReportError"]


@dataclass(frozen=True)
class StepMeasurement:
    saved_bytes: int  # activations saved for backward
    peak_bytes: int | None  # peak allocation of the step above its start (None if unknown)
    seconds: float  # one forward + backward
    heap_peak_bytes: int | None = None  # CPU: the live heap, sampled (a lower bound: it misses short peaks)


@dataclass(frozen=True)
class MemoryReport:
    model: str
    batch_size: int | None
    device: str
    dtype: str
    plan: Plan
    original: StepMeasurement
    converted: StepMeasurement
    prediction: MemoryPrediction | None
    prediction_failure: str | None
    training: TrainingState
    capacity: BatchCapacity | None
    sketch: object | None = None  # revcompile.sketch_variance.SketchReport when layers are sketched

    @property
    def saved_reduction(self) -> float:
        return self.original.saved_bytes / max(self.converted.saved_bytes, 1)

    @property
    def peak_reduction(self) -> float | None:
        if self.original.peak_bytes is None or self.converted.peak_bytes is None:
            return None
        return self.original.peak_bytes / max(self.converted.peak_bytes, 1)

    @property
    def peak_kind(self) -> str:
        return "max_memory_allocated" if self.device.startswith("cuda") else "tensor bytes alive, counted op by op"

    def _measured(self) -> dict[str, int | None]:
        o, c = self.original, self.converted
        return {"original_saved": o.saved_bytes, "converted_saved": c.saved_bytes,
                "original_peak": o.peak_bytes, "converted_peak": c.peak_bytes}

    def predicted(self) -> dict[str, int] | None:
        """The prediction at the measured batch size."""
        if self.prediction is None or not self.batch_size:
            return None
        p = self.prediction
        lines = {"original_saved": p.original_saved, "converted_saved": p.converted_saved,
                 "original_peak": p.original_peak, "converted_peak": p.converted_peak}
        return {name: line.at(self.batch_size) for name, line in lines.items()}

    def prediction_errors(self) -> dict[str, float] | None:
        """(predicted - measured) / measured at the measured batch size, per quantity."""
        predicted = self.predicted()
        if predicted is None:
            return None
        return {k: (predicted[k] - v) / v for k, v in self._measured().items() if v}

    def to_dict(self) -> dict:
        """Everything in the report as plain JSON values (bytes as integers)."""
        data = {
            "model": self.model,
            "batch_size": self.batch_size,
            "device": self.device,
            "dtype": self.dtype,
            "plan": plan_dict(self.plan),
            "measured": {
                "original": asdict(self.original),
                "converted": asdict(self.converted),
                "saved_reduction": self.saved_reduction,
                "peak_reduction": self.peak_reduction,
                "peak_kind": self.peak_kind,
            },
            "prediction": None,
            "prediction_failure": self.prediction_failure,
            "training_state": {**asdict(self.training), "total": self.training.total},
            "capacity": None,
        }
        if self.prediction is not None:
            data["prediction"] = {**prediction_dict(self.prediction), "at_measured_batch": self.predicted(),
                                  "relative_error": self.prediction_errors()}
        if self.capacity is not None:
            data["capacity"] = {**asdict(self.capacity), "gain": self.capacity.gain}
        data["sketch"] = self.sketch.to_dict() if self.sketch is not None else None
        return data


def plan_dict(plan: Plan) -> dict:
    """What was converted, as plain JSON values."""
    return {
        "tracer": plan.tracer,
        "residuals_found": plan.residuals_found,
        "blocks": len(plan.blocks),
        "segments": [
            {"index": s.index, "name": s.name, "blocks": [b.name for b in s.blocks],
             "side_inputs": list(s.side_inputs), "ends_because": s.ends_because}
            for s in plan.segments
        ],
        "skipped": [asdict(s) for s in plan.skipped],
        "notes": list(plan.notes),
    }


def prediction_dict(p: MemoryPrediction) -> dict:
    """A memory prediction as plain JSON values (bytes as lines in the batch size)."""
    return {
        "method": "saved tensors of the traced and rewritten graphs, and each training step run whole, "
                  "on fake tensors; linear in the batch",
        "batches": list(p.batches),
        "original_saved": asdict(p.original_saved),
        "converted_saved": asdict(p.converted_saved),
        "original_peak": asdict(p.original_peak),
        "converted_peak": asdict(p.converted_peak),
        "parts": [{"name": part.name, "kind": part.kind, "original": asdict(part.original),
                   "converted": asdict(part.converted)} for part in p.parts],
        "notes": list(p.notes),
    }


# --- measuring --------------------------------------------------------------------------------


def _loss(output) -> torch.Tensor:
    """The loss the simulation backpropagates too (``training_loss``): an HF model given labels
    trains on its ``loss``; adding its logits' sum would give the measured step a backward
    (and a logits-sized gradient) that no training step has."""
    try:
        return training_loss(output)
    except ValueError as err:
        raise ReportError(str(err)) from None


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def measure_step(model: nn.Module, args: tuple, kwargs: dict | None = None) -> StepMeasurement:
    """Measure one forward + backward of ``model`` (after one warm-up step)."""
    kwargs = kwargs or {}
    device = _device_of(model)
    cuda = device.type == "cuda"

    def step():
        output, saved = saved_for_backward(lambda: model(*args, **kwargs), model)
        _loss(output).backward()
        return saved

    step()  # warm-up: kernels, allocator, gradient buffers, traced variants
    model.zero_grad(set_to_none=False)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start_bytes = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    if cuda:
        saved = step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - start_bytes
        heap_peak = None
    else:
        with HeapPeak() as heap:
            saved = step()
        heap_peak = heap.growth
    seconds = time.perf_counter() - start
    if not cuda:  # exact at op granularity, where sampling the heap misses short peaks
        counter = LiveTensorBytes([p.grad for p in model.parameters() if p.grad is not None], resident_tensors(model, args, kwargs))
        with counter:  # without saved-tensor hooks: they hold saved tensors a little longer than a plain step
            training_step(model, args, kwargs)
        peak = counter.growth
    model.zero_grad(set_to_none=True)
    return StepMeasurement(saved_bytes=saved.bytes, peak_bytes=peak, seconds=seconds, heap_peak_bytes=heap_peak)


# --- predicting -------------------------------------------------------------------------------


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    first = next((t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim()), None)
    return int(first.shape[0]) if first is not None else None


def _at_batch(values: list, batch: int, new_batch: int) -> list:
    """The same inputs with ``new_batch`` rows (repeating the given ones); nested structures too."""
    def resize(value):
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == batch:
            return value.index_select(0, torch.arange(new_batch, device=value.device) % batch)
        return value

    return [pytree.tree_map(resize, v) for v in values]


def predict(converted: nn.Module, args: tuple, kwargs: dict, avoid_batch: int) -> MemoryPrediction:
    """``revcompile.passes.memory`` on the first compiled variant, fitted at batches other than ``avoid_batch``."""
    variant = converted.reversible_variants[0]
    compiled = variant.compiled
    inputs = variant.placeholder_values(converted.call_signature(args, kwargs))

    def run(batches):
        return predict_activation_memory(
            converted, compiled.traced_graph, compiled.graph, compiled.plan, compiled.segments,
            lambda b: _at_batch(inputs, avoid_batch, b), batches,
            coupling=converted.reversible_settings.coupling,
            streams=converted.reversible_settings.streams,
            regions=compiled.regions,
        )

    try:
        prediction = run((avoid_batch + 1, 2 * avoid_batch + 1))
    except PredictionFailed:
        prediction = run((avoid_batch,))  # a trace specialised to its batch size
    return _with_simulated_peaks(prediction, converted, args, kwargs, avoid_batch)


def _with_simulated_peaks(prediction: MemoryPrediction, converted: nn.Module, args: tuple, kwargs: dict, batch: int) -> MemoryPrediction:
    """Each training step's peak, from running it on fake tensors at the prediction's batch sizes."""
    original = converted.original_model

    def peak(model: nn.Module) -> LinearBytes:
        points = []
        for b in prediction.batches:
            at_b = _at_batch([args, kwargs], batch, b) if b != batch else [args, kwargs]
            points.append((b, simulate_step_peak(model, *at_b).peak_bytes))
        return LinearBytes.fit(points)

    try:
        return replace(prediction, original_peak=peak(original), converted_peak=peak(converted))
    except Exception as err:  # noqa: BLE001 -- reported with the prediction, not raised
        raise PredictionFailed(f"simulating the training step on fake tensors failed: {type(err).__name__}: {err}") from err


def searched_capacity(capacity: BatchCapacity, state: TrainingState, converted: nn.Module, args: tuple, kwargs: dict,
                      batch: int, *, tolerance: float = 0.02, planned: bool = True) -> BatchCapacity:
    """Each largest batch found by simulating the training step at candidate batches.

    The fitted lines' answers are where the search starts (``largest_fitting_batch``): a
    line through two batch sizes can overshoot the largest batch by a factor where fixed
    costs dominate, and a batch that is too large runs out of memory. With ``planned``, also
    the largest batch at which the memory planner finds a plan (``_planned_batch``).
    """
    room = capacity.memory_cap - state.total

    def search(model: nn.Module, guess: int) -> int:
        peak = lambda b: simulate_step_peak(model, *_at_batch([args, kwargs], batch, b)).peak_bytes  # noqa: E731
        return largest_fitting_batch(peak, room, guess, tolerance=tolerance)

    basis = (f"simulated peak of the training step (forward and backward on fake tensors) at the batches searched, "
             f"to within {tolerance:.0%}")
    found = replace(capacity, original=search(converted.original_model, max(capacity.original, 1)),
                    converted=search(converted, max(capacity.converted, 1)), basis=basis)
    if not planned:
        return found
    guess = max(found.original, found.converted, 1)
    return replace(found, planned=_planned_batch(converted, args, kwargs, batch, room, guess, tolerance))


def _planned_batch(converted: nn.Module, args: tuple, kwargs: dict, batch: int, room: int, guess: int, tolerance: float) -> int:
    """The largest batch at which a memory plan fits ``room`` (``revcompile.planner.planned_peak``
    runs the whole planner at each batch probed); the search starts at ``guess``, a batch
    the original or the all-reversible conversion fits (both are plans)."""
    from revcompile.planner import planned_peak

    def peak(b: int) -> int:
        found = planned_peak(converted, *_at_batch([args, kwargs], batch, b), room)
        return room + 1 if found is None else found

    return largest_fitting_batch(peak, room, guess, tolerance=tolerance)


def _capacity(cap: int, state: TrainingState, prediction: MemoryPrediction | None,
              measured: tuple[StepMeasurement, StepMeasurement] | None, batch: int | None) -> BatchCapacity:
    if prediction is not None:
        basis = "predicted peak of the training step (its forward and backward simulated on fake tensors)"
        return batch_capacity(cap, state, prediction.original_peak, prediction.converted_peak, basis)
    if measured is None or not batch:
        raise ReportError("no prediction and no measurement to size a batch from")
    lines = [LinearBytes(0.0, (m.peak_bytes or m.saved_bytes) / batch) for m in measured]
    basis = f"measured peak at batch {batch}, assumed proportional to the batch (the prediction failed)"
    return batch_capacity(cap, state, *lines, basis)


def _measured_capacity(cap: int, state: TrainingState, prediction, measured, converted, args, kwargs, batch,
                       planned: bool) -> BatchCapacity:
    """The largest batches: searched with simulated steps, or from the measurement if prediction failed."""
    capacity = _capacity(cap, state, prediction, measured, batch)
    if prediction is None:
        return capacity
    return searched_capacity(capacity, state, converted, args, kwargs, batch or 1, planned=planned)


def _prediction_or_failure(converted: nn.Module, args: tuple, kwargs: dict, batch: int | None):
    """``(prediction, None)``, or ``(None, why)`` when the graphs cannot be run on fake tensors."""
    try:
        return predict(converted, args, kwargs, batch or 1), None
    except PredictionFailed as err:
        return None, str(err)


def memory_report(
    model: nn.Module,
    example_inputs=(),
    example_kwargs: dict | None = None,
    *,
    converted: nn.Module | None = None,
    name: str | None = None,
    memory_cap: int | str | None = None,
    optimizer: str = "adamw",
    reserve: int | str = DEFAULT_RESERVE,
    progress=None,
    planned_batch: bool = False,
) -> MemoryReport:
    """Measure and predict the memory of one training step of ``model`` and of its conversion.

    ``example_inputs``/``example_kwargs``: one training call (its batch is the measured one).
    ``converted``: an existing conversion of ``model`` (else it is converted here).
    ``memory_cap`` (bytes or ``"16GiB"``): also find the largest batch that fits, with
    ``optimizer``'s state (one of ``OPTIMIZER_STATE``) and ``reserve`` bytes set aside.
    ``progress``: called with a short description as each stage starts. ``planned_batch``:
    with a cap, also the largest batch some memory plan fits (``BatchCapacity.planned``; it
    runs the whole planner at each batch probed: minutes, hence opt-in).
    Raises ``ReportError`` for a cap not even one sample fits, ``ConversionError`` if the
    model cannot be converted.
    """
    from revcompile.api import convert, explain

    say = progress or (lambda text: None)
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    kwargs = dict(example_kwargs or {})
    cap = parse_bytes(memory_cap) if memory_cap is not None else None
    state = training_state(model, optimizer, parse_bytes(reserve))
    model.train()
    if converted is None:
        say("tracing and converting")
        converted = convert(model, args, kwargs)
    converted.train()
    batch = _batch_size(args, kwargs)
    say("predicting memory from the graphs (fake tensors)")
    prediction, failure = _prediction_or_failure(converted, args, kwargs, batch)
    if cap is not None and prediction is not None:
        _capacity(cap, state, prediction, None, batch)  # fail before measuring
    say("measuring one training step of the original")
    original = measure_step(model, args, kwargs)
    say("measuring one training step of the converted model")
    reversible = measure_step(converted, args, kwargs)
    capacity = None
    if cap is not None:
        say("searching the largest batches with simulated steps")
        capacity = _measured_capacity(cap, state, prediction, (original, reversible), converted, args, kwargs, batch,
                                      planned_batch)
    param = next(model.parameters())
    return MemoryReport(
        model=name or type(model).__name__,
        batch_size=batch,
        device=str(param.device),
        dtype=str(param.dtype).replace("torch.", ""),
        plan=explain(converted),
        original=original,
        converted=reversible,
        prediction=prediction,
        prediction_failure=failure,
        training=state,
        capacity=capacity,
        sketch=_sketched_linears(converted, args, kwargs, say),
    )


def _sketched_linears(converted: nn.Module, args: tuple, kwargs: dict, say):
    """Which layers ``convert(..., sketch_linears=)`` sketched, what they save, their gradient variance."""
    from revcompile.sketch_variance import sketched_layers
    from revcompile.sketch_variance import sketch_report

    if not sketched_layers(converted):
        return None
    say("measuring the sketched layers' memory and gradient variance")
    return sketch_report(converted, args, kwargs, _loss)

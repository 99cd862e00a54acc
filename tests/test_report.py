"""Memory: the prediction from the graphs against independent measurements, and the report built on it."""

from __future__ import annotations

import pytest
import torch

import revcompile
from revcompile.passes.memory import LinearBytes
from revcompile.measure import saved_for_backward
from revcompile.reference import example_inputs, reference_vit
from revcompile.simulate import simulate_step_peak, tensor_peak
from revcompile.report import (
    ReportError,
    TrainingState,
    batch_capacity,
    parse_bytes,
    predict,
    training_state,
)


def _measured_saved(module, args) -> int:
    output, saved = saved_for_backward(lambda: module(*args), module)
    del output
    return saved.bytes


def _close(predicted: float, measured: float, tolerance: float = 0.15) -> bool:
    return abs(predicted - measured) <= tolerance * measured


def _gpt2(layers=3):
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    config = AutoConfig.for_model("gpt2", n_layer=layers, n_embd=32, n_head=2, vocab_size=100, n_positions=32)
    return AutoModel.from_config(config).train()


@pytest.mark.parametrize("family", ["reference-vit (fx)", "gpt2 (export)"])
def test_prediction_matches_a_measurement_at_a_batch_it_never_saw(family):
    """Fit at batches 5 and 9 on fake tensors; measure for real at batch 12."""
    torch.manual_seed(0)
    if family.startswith("reference"):
        model = reference_vit(depth=12, dim=64, heads=2)
        inputs = lambda b: example_inputs(model, b)  # noqa: E731
    else:
        model = _gpt2()
        inputs = lambda b: (torch.randint(0, 100, (b, 16)),)  # noqa: E731
    converted = revcompile.convert(model, inputs(4))
    prediction = predict(converted, inputs(4), {}, 4)
    assert prediction.batches == (5, 9)
    original = _measured_saved(model, inputs(12))
    reversible = _measured_saved(converted, inputs(12))
    assert _close(prediction.original_saved.at(12), original), (prediction.original_saved.at(12), original)
    assert _close(prediction.converted_saved.at(12), reversible), (prediction.converted_saved.at(12), reversible)
    assert original > 3 * reversible


def test_parts_add_up_and_only_segments_shrink():
    torch.manual_seed(0)
    model = reference_vit(depth=4, dim=32, heads=2)
    converted = revcompile.convert(model, example_inputs(model, 2))
    p = predict(converted, example_inputs(model, 2), {}, 2)
    assert [part.kind for part in p.parts] == ["untouched", "segment", "untouched"]
    assert sum(part.original.per_sample for part in p.parts) == pytest.approx(p.original_saved.per_sample)
    assert sum(part.converted.per_sample for part in p.parts) == pytest.approx(p.converted_saved.per_sample)
    for part in p.parts:
        if part.kind == "untouched":
            assert part.converted == part.original
        else:
            assert part.converted.per_sample * 5 < part.original.per_sample
    # the simulated step's peak holds what was saved plus the backward's working memory
    assert p.converted_peak.at(8) > p.converted_saved.at(8) and p.original_peak.at(8) > p.original_saved.at(8)
    assert p.original_peak.per_sample > 3 * p.converted_peak.per_sample


def test_report_on_a_depth_12_model():
    """Measured: at least 4x less saved activation memory; predicted: within 15% of measured."""
    torch.manual_seed(0)
    model = reference_vit(depth=12, dim=64, heads=2)
    (x,) = example_inputs(model, 8)
    report = revcompile.memory_report(model, x, memory_cap="2GiB", reserve=0)
    assert report.batch_size == 8 and len(report.plan.blocks) == 12
    assert report.saved_reduction >= 4
    assert 8 not in report.prediction.batches
    errors = report.prediction_errors()
    assert abs(errors["original_saved"]) <= 0.15 and abs(errors["converted_saved"]) <= 0.15, errors
    # The peak is simulated step by step on fake tensors: within 10% of the measured one.
    assert abs(errors["original_peak"]) <= 0.1 and abs(errors["converted_peak"]) <= 0.1, errors
    capacity = report.capacity
    assert capacity.converted > 4 * capacity.original > 0
    data = report.to_dict()
    assert data["capacity"]["converted"] == capacity.converted
    assert data["prediction"]["relative_error"] == errors


def test_largest_batch_is_the_last_that_fits():
    state = TrainingState(parameters=100, gradients=100, optimizer="adamw", optimizer_state=200, reserve=50)
    original, converted = LinearBytes(10.0, 97.0), LinearBytes(30.0, 7.0)
    for cap in (487, 1000, 5000, 123457):
        capacity = batch_capacity(cap, state, original, converted, "test")
        for peak, batch in ((original, capacity.original), (converted, capacity.converted)):
            assert state.total + peak.at(batch) <= cap or batch == 0
            assert state.total + peak.at(batch + 1) > cap


def test_an_impossible_cap_is_an_error():
    state = TrainingState(parameters=1000, gradients=1000, optimizer="adamw", optimizer_state=2000, reserve=0)
    with pytest.raises(ReportError, match="too small"):
        batch_capacity(3000, state, LinearBytes(0, 10), LinearBytes(0, 1), "test")


@pytest.mark.parametrize("text, expected", [("16GiB", 16 * 2**30), ("512 MiB", 512 * 2**20), ("8GB", 8 * 10**9),
                                            ("1.5KiB", 1536), ("1e6", 10**6), (4096, 4096)])
def test_sizes_parse(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["lots", "16 GiBs", "-1GB", ""])
def test_unreadable_sizes_are_errors(text):
    with pytest.raises(ReportError, match="cannot read"):
        parse_bytes(text)


@pytest.mark.slow  # minutes on a loaded 2-core CPU: the whole planner runs at every batch probed
def test_the_largest_batch_with_a_memory_plan_is_planned_and_fits():
    """The planner's largest batch: at least the original's and the all-reversible one's, and at
    that batch ``convert(memory_budget=room)`` plans a step whose measured peak is within the room."""
    torch.manual_seed(0)
    model = reference_vit(depth=4, dim=32, heads=2, num_classes=4)
    (x,) = example_inputs(model, 4)
    state = training_state(model, "adamw", 0)
    cap = state.total + simulate_step_peak(model, example_inputs(model, 8)).peak_bytes  # the original fits ~8 samples
    report = revcompile.memory_report(model, x, memory_cap=cap, reserve=0, planned_batch=True)
    capacity = report.capacity
    assert capacity.planned >= max(capacity.original, capacity.converted) > capacity.original >= 8
    assert report.to_dict()["capacity"]["planned"] == capacity.planned
    room = capacity.memory_cap - state.total
    (at_planned,) = example_inputs(model, capacity.planned)
    converted = revcompile.convert(model, at_planned, memory_budget=room, check_conversion=False)
    assert tensor_peak(converted, (at_planned,)) <= room

"""The simulated training step: its peak equals the real step's tensor peak, and batch search fits."""

from __future__ import annotations

import pytest
import torch

import revcompile
from revcompile.reference import example_inputs, reference_vit
from revcompile.simulate import largest_fitting_batch, simulate_step_peak, tensor_peak


@pytest.mark.parametrize("coupling", ["revvit", "dual"])
def test_the_simulated_peak_is_the_real_steps_tensor_peak(coupling):
    torch.manual_seed(0)
    model = reference_vit(depth=3, dim=32, heads=2)
    (x,) = example_inputs(model, batch_size=4)
    converted = revcompile.convert(model, x, coupling=coupling)
    for module in (model, converted):
        simulated = simulate_step_peak(module, (x,))
        assert simulated.peak_bytes == tensor_peak(module, (x,))
        assert all(p.grad is None for p in module.parameters())  # the simulation touched no real gradient
    assert simulate_step_peak(converted, (x,)).peak_bytes < simulate_step_peak(model, (x,)).peak_bytes


def test_largest_fitting_batch_finds_the_boundary_of_a_nonlinear_peak():
    peak = lambda b: 1000 + 37 * b + (b * b) // 10  # noqa: E731 -- a line through two small batches underestimates it
    room = 50_000
    exact = max(b for b in range(1, 2000) if peak(b) <= room)
    for guess in (1, 10, exact, 3 * exact, 5000):
        found = largest_fitting_batch(peak, room, guess, tolerance=0.0)
        assert found == exact, (guess, found)
        approximate = largest_fitting_batch(peak, room, guess)
        assert peak(approximate) <= room and approximate >= 0.98 * exact
    assert largest_fitting_batch(peak, 500, 10) == 0

"""CUDA variants of the core checks. Each is skipped without a GPU; the CPU variant of the
same property (tests/test_runtime.py, tests/test_memory.py) always runs."""

from __future__ import annotations

import contextlib

import pytest
import torch

import revcompile
import revcompile.runtime as runtime
from revcompile.reference import example_inputs, reference_vit
from tests.conftest import (
    assert_gradients_match,
    gradients,
    perturb_parameters,
    relative_error,
    requires_cuda,
)

pytestmark = [requires_cuda, pytest.mark.cuda]


def _cuda_vit(depth, dtype=torch.float32, dim=64):
    torch.manual_seed(depth)
    model = perturb_parameters(reference_vit(depth=depth, dim=dim, heads=2)).to("cuda", dtype)
    (x,) = example_inputs(model, batch_size=4, dtype=dtype, device="cuda")
    return model, x


@pytest.mark.parametrize("depth", [3, 4])
def test_cuda_float32_gradients(depth):
    model, x = _cuda_vit(depth)
    converted = revcompile.convert(model, x)
    assert_gradients_match(converted, (x,), tol=1e-4)


def test_cuda_float64_gradients():
    model, x = _cuda_vit(3, torch.float64)
    converted = revcompile.convert(model, x)
    assert_gradients_match(converted, (x,), tol=1e-10)


def test_cuda_dropout_replay_is_needed(monkeypatch):
    model, x = _cuda_vit(3, torch.float64)
    converted = revcompile.convert(model, x)
    reference, _ = gradients(converted, (x,), mode="autograd")
    monkeypatch.setattr(runtime, "_replayed_rng", lambda state, devices: contextlib.nullcontext())
    broken, _ = gradients(converted, (x,), mode="reversible")
    assert max(relative_error(broken[n], reference[n]) for n in reference if reference[n] is not None) > 1e-3


@pytest.mark.parametrize("depth", [3, 4])
def test_cuda_bf16_autocast_gradients(depth):
    model, x = _cuda_vit(depth)
    converted = revcompile.convert(model, x)

    def grads(mode):
        revcompile.set_backward(converted, mode)
        torch.manual_seed(3)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = converted(x.clone().requires_grad_())
        return torch.autograd.grad(out.float().square().sum(), list(converted.parameters()))

    reference, got = grads("autograd"), grads("reversible")
    assert max(relative_error(a, b) for a, b in zip(got, reference)) < 2e-2


def test_cuda_peak_memory_drops():
    torch.manual_seed(0)
    model = reference_vit(depth=12, dim=256, heads=4).cuda()
    (x,) = example_inputs(model, batch_size=64, device="cuda")

    def peak(m):
        m(x).sum().backward()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        m(x).sum().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start

    original = peak(model)
    converted = revcompile.convert(model, x[:2])
    assert peak(converted) * 3 < original

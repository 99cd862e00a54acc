"""Shared helpers: gradient comparison between backward modes, parameter perturbation.

The gradient comparison here is written independently of ``revcompile.verify`` so that the
tests do not take the library's own checker on trust.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils import _pytree as pytree

import revcompile

SLOW_TESTS_FILE = Path(__file__).with_name("slow_tests.txt")


def _slow_tests() -> set[str]:
    lines = (line.split("#", 1)[0].strip() for line in SLOW_TESTS_FILE.read_text().splitlines())
    return {line for line in lines if line}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Mark the tests listed in slow_tests.txt slow (before ``-m`` selects), and refuse a
    list that names a test no longer collected when the whole suite is (a stale list would
    quietly move a slow test into the default run)."""
    slow = _slow_tests()
    for item in items:
        if item.nodeid in slow:
            item.add_marker(pytest.mark.slow)
    files = {item.nodeid.split("::", 1)[0] for item in items}
    every_file = {f"tests/{path.name}" for path in SLOW_TESTS_FILE.parent.glob("test_*.py")}
    stale = slow - {item.nodeid for item in items}
    if files >= every_file and stale:
        raise pytest.UsageError(f"{SLOW_TESTS_FILE.name} names tests that do not exist: {sorted(stale)}")


CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device; the CPU variant of this test always runs")


def perturb_parameters(model: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Add noise to every parameter: zero-initialised heads and scales (torchvision's ViT
    head, LayerScale, zero biases) would otherwise hide gradients from the comparison."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float64)
            p.add_(noise.to(p.device, p.dtype) * scale)
    return model


def float_outputs(output) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def gradients(model, args, kwargs=None, *, mode: str, seed: int = 1234):
    """Gradients of a fixed random projection of the outputs, w.r.t. float inputs and parameters."""
    kwargs = kwargs or {}
    revcompile.set_backward(model, mode)
    args = [a.detach().clone().requires_grad_(True) if a.is_floating_point() else a for a in args]
    torch.manual_seed(seed)
    outputs = float_outputs(model(*args, **kwargs))
    generator = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=generator, dtype=torch.float64).to(o)).sum() for o in outputs)
    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, inputs + [p for _, p in named], allow_unused=True)
    names = [f"input {i}" for i in range(len(inputs))] + [n for n, _ in named]
    return dict(zip(names, grads)), [o.detach() for o in outputs]


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    ref, got = ref.double(), got.double()
    return float((got - ref).norm() / ref.norm())


def zero_level(gradients, dtype) -> float:
    """Below this norm a gradient is rounding noise: 1000 ulps of the largest gradient.

    Some gradients are zero in exact arithmetic (a key-projection bias: softmax ignores a
    per-query shift), so both modes return noise and a relative error means nothing.
    """
    scale = max((float(g.double().norm()) for g in gradients if g is not None), default=0.0)
    return 1e3 * torch.finfo(dtype).eps * scale


def assert_gradients_match(model, args, kwargs=None, *, tol: float, mode: str = "reversible"):
    """Every gradient in ``mode`` equals ``"autograd"`` within ``tol`` (relative).

    Gradients that are zero to working precision are compared absolutely. Every branch of
    every converted block must have a parameter with a real (non-zero) gradient, so that
    the comparison cannot pass vacuously.
    """
    reference, ref_out = gradients(model, args, kwargs, mode="autograd")
    candidate, out = gradients(model, args, kwargs, mode=mode)
    for a, b in zip(ref_out, out):
        assert torch.equal(a, b), "forward outputs differ between backward modes"
    dtype = next(g.dtype for g in reference.values() if g is not None)
    floor = zero_level(reference.values(), dtype)
    plan = revcompile.explain(model)
    assert plan.blocks, "nothing was converted"
    nonzero = set()
    for name, ref in reference.items():
        got = candidate[name]
        if ref is None:
            assert got is None or float(got.norm()) <= floor, name
            continue
        difference = float((got.double() - ref.double()).norm())
        if float(ref.double().norm()) <= floor:
            assert difference <= floor, f"{name}: zero gradient in autograd, {difference:.2e} here"
            continue
        error = relative_error(got, ref)
        assert error <= tol, f"{name}: relative error {error:.3e} > {tol:.0e}"
        nonzero.add(name)
    for block in plan.blocks:
        for branch in (block.f, block.g):
            assert set(branch.parameters) & nonzero, f"{block.name}: no parameter with a real gradient, check is vacuous"
    return len(nonzero)

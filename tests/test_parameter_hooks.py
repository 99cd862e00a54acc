"""Tensor hooks on parameters (``p.register_hook``) run once per backward, as on the original model.

A reversible segment rebuilds each block in backward and differentiates it on detached
aliases of its parameters (``ReversibleSegment.detached_parameters``); the parameters get
their gradients once, through their block's autograd node, where their hooks run. Compared
with the stored-activation backward (``"autograd"``) in float64, dropout on.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import revcompile
from revcompile.reference import reference_vit
from tests.conftest import perturb_parameters, relative_error

MODES = ("reversible", "parallel", "autograd")


def _converted(extra=None):
    torch.manual_seed(0)
    model = perturb_parameters(reference_vit(depth=3, dim=32, heads=2, num_classes=4).double())  # dropout on
    if extra is not None:
        extra(model)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    return revcompile.convert(model, x), x


def _block_parameters(converted) -> dict[str, nn.Parameter]:
    blocks = [b.name for b in revcompile.explain(converted).blocks]
    return {n: p for n, p in converted.named_parameters() if any(n.startswith(b + ".") for b in blocks)}


def _step(converted, x, mode: str) -> dict[str, torch.Tensor]:
    """One backward of a fixed loss in ``mode``; the parameters' ``.grad`` afterwards."""
    revcompile.set_backward(converted, mode)
    converted.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    converted(x).square().sum().backward()
    return {n: p.grad.clone() for n, p in converted.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", MODES)
def test_a_reading_hook_runs_once_per_backward(mode):
    converted, x = _converted()
    params = _block_parameters(converted)
    calls = {name: 0 for name in params}
    for name, p in params.items():
        p.register_hook(lambda grad, name=name: calls.__setitem__(name, calls[name] + 1))
    assert len(params) > 10
    for step in (1, 2):
        _step(converted, x, mode)
        assert calls == {name: step for name in params}


@pytest.mark.parametrize("mode", ("reversible", "parallel"))
def test_a_doubling_hook_doubles_the_gradient_once(mode):
    converted, x = _converted()
    reference = _step(converted, x, "autograd")
    params = _block_parameters(converted)
    doubled = [name for name in params if name.endswith("weight")]
    for name in doubled:
        params[name].register_hook(lambda grad: 2 * grad)
    got = _step(converted, x, mode)
    assert doubled
    for name, want in reference.items():
        factor = 2 if name in doubled else 1
        error = relative_error(got[name], factor * want)
        assert error <= 1e-10, f"{name}: relative error {error:.1e} against {factor}x the autograd gradient"


def test_hooks_beside_a_frozen_and_an_unused_parameter():
    def add_unused(model):
        model.blocks[1].unused = nn.Parameter(torch.ones(3, dtype=torch.float64))

    converted, x = _converted(add_unused)
    params = _block_parameters(converted)
    frozen = next(name for name in params if name.startswith("blocks.1.") and name.endswith("weight"))
    params[frozen].requires_grad_(False)
    calls = []
    converted.blocks[1].unused.register_hook(lambda grad: calls.append("unused"))
    hooked = next(name for name in params if name.startswith("blocks.1.") and name != frozen and name.endswith("weight"))
    params[hooked].register_hook(lambda grad: calls.append("hooked"))
    reference = _step(converted, x, "autograd")
    got = _step(converted, x, "reversible")
    assert calls == ["hooked", "hooked"]
    assert frozen not in got and "blocks.1.unused" not in got
    assert got.keys() == reference.keys()
    for name, want in reference.items():
        assert relative_error(got[name], want) <= 1e-10, name

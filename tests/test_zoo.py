"""Conformance: every mainstream transformer family converts without edits, fully and exactly.

For each family (small configs, random weights, dropout on): every layer of the config
becomes a reversible block, in the expected segments; gradients in float64 equal ordinary
backprop on the converted architecture to 1e-10; the state_dict keys are the original's;
the activations saved for backward drop; and none of this needs a second trace.
"""

from __future__ import annotations

import pytest
import torch

import revcompile
from revcompile.measure import saved_for_backward
from tests.conftest import assert_gradients_match, perturb_parameters
from tests.models import ZOO


@pytest.mark.parametrize("name", list(ZOO))
def test_family_converts_fully_and_exactly(name):
    build, options, segments = ZOO[name]
    torch.manual_seed(0)
    model, args, kwargs, layers = build()
    model = perturb_parameters(model.double())
    args = tuple(a.double() if a.is_floating_point() else a for a in args)
    converted = revcompile.convert(model, args, kwargs, **options)
    plan = revcompile.explain(converted)
    assert len(plan.blocks) == layers, str(plan)
    assert len(plan.segments) == segments, str(plan)
    assert all(skip.reason for skip in plan.skipped)
    assert list(converted.state_dict()) == list(model.state_dict())

    assert_gradients_match(converted, args, kwargs, tol=1e-10)

    _, original = saved_for_backward(lambda: model(*args, **kwargs), model)
    _, reversible = saved_for_backward(lambda: converted(*args, **kwargs), converted)
    assert reversible.bytes * 1.5 < original.bytes
    assert len(converted.reversible_variants) == 1

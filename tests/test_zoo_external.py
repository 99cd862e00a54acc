"""Conformance beyond timm/torchvision/HF: vit-pytorch, x-transformers, open_clip, peft
(LoRA), and hand-written models with the constructs such code uses.

Each family (tests/zoo_external.py) has one expected outcome, asserted exactly: it converts
fully, converts partly with a reason for every residual left alone, or is refused with a
ConversionError saying why. Whatever converts has float64 gradients, with dropout on, equal
to ordinary backprop on the converted architecture (every trainable parameter and the
input, 1e-10 relative). A family skips only when its library is not installed
(``pip install -e ".[zoo]"`` installs them; CI does).
"""

from __future__ import annotations

import re

import pytest
import torch

import revcompile
from revcompile import ConversionError
from tests.conftest import assert_gradients_match, perturb_parameters
from tests.zoo_external import EXTERNAL, Converts, Partial, Refused


def _marks(family):
    return [pytest.mark.slow] if family.slow else []


def build_float64(family):
    torch.manual_seed(0)
    model, args, kwargs, layers = family.build()
    model = perturb_parameters(model.double())
    args = tuple(a.double() if a.is_floating_point() else a for a in args)
    return model, args, kwargs, layers


@pytest.mark.parametrize("name", [pytest.param(n, marks=_marks(f)) for n, f in EXTERNAL.items()])
def test_external_family(name):
    family = EXTERNAL[name]
    pytest.importorskip(family.library)
    model, args, kwargs, layers = build_float64(family)
    expect = family.expect
    if isinstance(expect, Refused):
        with pytest.raises(ConversionError) as refused:
            revcompile.convert(model, args, kwargs, **family.options)
        assert re.search(expect.reason, str(refused.value), re.S), str(refused.value)
        return

    converted = revcompile.convert(model, args, kwargs, **family.options)
    plan = revcompile.explain(converted)
    if isinstance(expect, Converts):
        assert (len(plan.blocks), len(plan.segments)) == (layers, expect.segments), str(plan)
    else:
        assert isinstance(expect, Partial)
        assert (len(plan.blocks), len(plan.segments)) == (expect.blocks, expect.segments), str(plan)
        assert any(expect.reason in skip.reason for skip in plan.skipped), str(plan)
    assert all(skip.reason for skip in plan.skipped)
    assert list(converted.state_dict()) == list(model.state_dict())
    compared = assert_gradients_match(converted, args, kwargs, tol=1e-10)
    if family.check:
        family.check(model, plan, compared)

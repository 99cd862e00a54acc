"""Real models convert without edits, every layer becomes reversible, gradients are exact."""

from __future__ import annotations

import pytest
import torch

import revcompile
from tests.conftest import assert_gradients_match, perturb_parameters
from tests.models import CORE_MODELS


def _float64(model, args):
    model = perturb_parameters(model.double())
    return model, tuple(a.double() if a.is_floating_point() else a for a in args)


@pytest.mark.parametrize("name", sorted(CORE_MODELS))
def test_every_layer_converts_and_gradients_are_exact(name):
    torch.manual_seed(0)
    model, args, kwargs, layers = CORE_MODELS[name]()
    model, args = _float64(model, args)
    converted = revcompile.convert(model, args, kwargs)
    plan = revcompile.explain(converted)
    assert len(plan.blocks) == layers, str(plan)
    assert len(plan.segments) == 1, str(plan)
    assert plan.skipped == (), str(plan)
    assert_gradients_match(converted, args, kwargs, tol=1e-10)


@pytest.mark.parametrize("name", sorted(CORE_MODELS))
def test_state_dict_keys_and_round_trip(name):
    torch.manual_seed(0)
    model, args, kwargs, _ = CORE_MODELS[name]()
    converted = revcompile.convert(model, args, kwargs)
    assert list(converted.state_dict()) == list(model.state_dict())
    # the converted model runs on the original parameter objects, not copies
    assert {id(p) for p in converted.parameters()} == {id(p) for p in model.parameters()}

    other, _, _, _ = CORE_MODELS[name]()
    perturb_parameters(other, seed=1)
    converted.load_state_dict(other.state_dict(), strict=True)
    for key, value in other.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    fresh, _, _, _ = CORE_MODELS[name]()
    fresh.load_state_dict(converted.state_dict(), strict=True)


def test_huggingface_output_structure_is_kept():
    from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

    model, args, kwargs, _ = CORE_MODELS["hf-gpt2"]()
    converted = revcompile.convert(model, args, kwargs)
    out = converted(*args)
    assert isinstance(out, BaseModelOutputWithPastAndCrossAttentions)
    assert out.last_hidden_state.shape == (*args[0].shape, model.config.n_embd)
    assert converted.config is model.config  # attributes fall through to the original
    plan = revcompile.explain(converted)
    assert plan.tracer == "export"
    assert any("use_cache=False" in note for note in plan.notes)

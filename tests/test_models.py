"""Checkpoints and output structures of real models (conversion itself: tests/test_zoo.py)."""

from __future__ import annotations

import pytest
import torch

import revcompile
from tests.conftest import perturb_parameters
from tests.models import CORE_MODELS


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

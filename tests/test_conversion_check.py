"""A conversion that returns must run: state the graph reads is carried over, and convert
runs the converted model once (forward, and every block's reconstruction) before returning."""

from __future__ import annotations

import pytest
import torch
import torch.fx

import revcompile
from revcompile import ConversionError
from tests import blocks as B
from tests.conftest import assert_gradients_match, perturb_parameters

_SCALE_CALLS = {"left": 0}


def _scale_with_budget(x):
    """An opaque op that can run a limited number of times (fx does not run it while tracing)."""
    if _SCALE_CALLS["left"] <= 0:
        raise RuntimeError("scale budget exhausted")
    _SCALE_CALLS["left"] -= 1
    return x * 2


def _drifting_scale(x):
    """An opaque op that returns something else every call: its block cannot be recomputed."""
    _SCALE_CALLS["left"] += 1
    return x * (1 + 1e-3 * _SCALE_CALLS["left"])


torch.fx.wrap("_scale_with_budget")
torch.fx.wrap("_drifting_scale")


class BudgetBlock(B.PreNormBlock):
    def forward(self, x):
        x = x + _scale_with_budget(self.attn(self.norm1(x)))
        return x + self.mlp(self.norm2(x))


class DriftingBlock(B.PreNormBlock):
    """Its MLP branch goes through an op that is not a function of its input."""

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + _drifting_scale(self.mlp(self.norm2(x)))


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_plain_tensor_attributes_are_read_live_from_the_original(tracer):
    torch.manual_seed(0)
    model, x = B.PlainPositionStack(depth=2), B.tokens()
    converted = revcompile.convert(model, x, tracer=tracer)
    assert len(revcompile.explain(converted).blocks) == 2
    assert converted(x).shape == model(x).shape
    assert list(converted.state_dict()) == list(model.state_dict())  # nothing added to the state

    perturb_parameters(converted.double())
    x = x.double()
    assert converted(x).dtype == torch.float64
    assert model.pos_embedding.dtype == torch.float32  # .double() leaves it, as for the original
    assert_gradients_match(converted, (x,), tol=1e-10)

    model.pos_embedding = model.pos_embedding + 1  # reassigned on the original: seen at once
    model.blocks[1].attn.scale = torch.tensor(3.0)
    fresh = revcompile.convert(model, x, tracer=tracer)
    assert torch.equal(converted(x), fresh(x))


def test_a_block_that_does_not_reconstruct_is_left_stored_and_explained():
    torch.manual_seed(0)
    model, x = B.sequential(B.PreNormBlock(), DriftingBlock(), B.PreNormBlock()), B.tokens()
    converted = revcompile.convert(model, x)
    plan = revcompile.explain(converted)
    assert [b.name for b in plan.blocks] == ["blocks.0", "blocks.2"]
    assert len(plan.segments) == 2
    (reason,) = {s.reason for s in plan.skipped}
    assert "reconstructed in backward differs" in reason and "relative error" in reason
    assert {s.module for s in plan.skipped} == {"blocks.1"}
    converted(x).sum().backward()  # trains: the drifting block keeps its activations

    unchecked = revcompile.explain(revcompile.convert(model, x, check_conversion=False))
    assert len(unchecked.blocks) == 3  # without the check the broken block is converted


def test_a_converted_model_that_fails_to_run_is_not_returned():
    model, x = B.sequential(BudgetBlock(), BudgetBlock()), B.tokens()
    _SCALE_CALLS["left"] = 2  # convert's check of the example inputs runs the original once (and uses it up)
    with pytest.raises(ConversionError, match=r"fails in forward on the example inputs in reversible_segment_0 \(blocks blocks.0 .. blocks.1\): RuntimeError: scale budget exhausted"):
        revcompile.convert(model, x)
    _SCALE_CALLS["left"] = 2
    assert revcompile.explain(revcompile.convert(model, x, check_conversion=False)).blocks


def test_the_check_leaves_gradients_buffers_and_random_state_alone():
    torch.manual_seed(0)
    model = B.sequential(B.PreNormBlock(), B.BatchNormMlpBlock(), B.PreNormBlock())
    x = B.tokens()
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    state = torch.get_rng_state()
    revcompile.convert(model, x)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())

"""The reversible backward reproduces ordinary backprop on the coupled architecture."""

from __future__ import annotations

import contextlib

import pytest
import torch

import revcompile
import revcompile.runtime.tape as runtime_tape
import revcompile.runtime.steps as runtime_steps
from revcompile.reference import example_inputs, reference_vit
from tests.conftest import (
    assert_gradients_match,
    gradients,
    perturb_parameters,
    relative_error,
)


def _vit(depth: int, dtype=torch.float64, **overrides):
    torch.manual_seed(depth)
    model = reference_vit(depth=depth, dim=32, heads=2, drop=0.1, attn_drop=0.1, drop_path=0.2, **overrides)
    model = perturb_parameters(model.to(dtype))
    (x,) = example_inputs(model, batch_size=4, dtype=dtype)
    return model, x


# "exact" (the default) reconstructs bit for bit; "model" is plain floating-point
# reconstruction, whose rounding the same tolerances must absorb.
@pytest.mark.parametrize("streams", ["exact", "model"])
@pytest.mark.parametrize("depth", [1, 2, 3, 7])
def test_float64_gradients_equal_autograd(depth, streams):
    model, x = _vit(depth)
    converted = revcompile.convert(model, x, streams=streams)
    assert len(revcompile.explain(converted).blocks) == depth
    assert_gradients_match(converted, (x,), tol=1e-10)


@pytest.mark.parametrize("streams", ["exact", "float32"])
def test_float32_gradients_at_depth_12(streams):
    model, x = _vit(12, torch.float32)
    converted = revcompile.convert(model, x, streams=streams)
    assert_gradients_match(converted, (x,), tol=1e-4)


@pytest.mark.parametrize("fusion", ["mean", "sum"])
def test_every_fusion_is_exact(fusion):
    model, x = _vit(3)
    converted = revcompile.convert(model, x, fusion=fusion)
    assert_gradients_match(converted, (x,), tol=1e-10)


@pytest.mark.parametrize("mode", ["reversible", "parallel"])
def test_dropout_masks_are_replayed_not_reseeded(monkeypatch, mode):
    """Without replaying the forward's generator state the gradients are wrong: the check
    above would catch a broken replay."""
    model, x = _vit(3)
    converted = revcompile.convert(model, x)
    reference, _ = gradients(converted, (x,), mode="autograd")
    monkeypatch.setattr(runtime_steps, "replayed_rng", lambda state, devices: contextlib.nullcontext())
    broken, _ = gradients(converted, (x,), mode=mode)
    worst = max(relative_error(broken[n], reference[n]) for n in reference if reference[n] is not None)
    assert worst > 1e-3


@pytest.mark.parametrize("mode", ["reversible", "parallel"])
def test_user_random_stream_is_untouched(mode):
    model, x = _vit(3)
    converted = revcompile.convert(model, x)

    def state_after(mode):
        revcompile.set_backward(converted, mode)
        torch.manual_seed(7)
        converted(x.clone().requires_grad_()).sum().backward()
        return torch.get_rng_state()

    assert torch.equal(state_after("autograd"), state_after(mode))
    torch.manual_seed(7)
    before = torch.get_rng_state()
    revcompile.convert(model, x)  # conversion itself draws no random numbers
    assert torch.equal(before, torch.get_rng_state())


def test_eval_outputs_equal_between_modes():
    model, x = _vit(3)
    converted = revcompile.convert(model, x).eval()
    revcompile.set_backward(converted, "autograd")
    a = converted(x)
    revcompile.set_backward(converted, "reversible")
    b = converted(x)
    assert torch.equal(a, b)
    assert torch.equal(a, converted(x))  # eval is deterministic: dropout is off


def test_parameter_gradients_reach_autograd_once_per_backward():
    """One accumulation event per parameter per backward: DDP hooks and accumulation rely on it."""
    model, x = _vit(3)
    converted = revcompile.convert(model, x)
    events: dict[str, int] = {}
    for name, p in converted.named_parameters():
        p.register_post_accumulate_grad_hook(lambda p, name=name: events.__setitem__(name, events.get(name, 0) + 1))
    converted(x).sum().backward()
    assert set(events.values()) == {1}
    single = {n: p.grad.clone() for n, p in converted.named_parameters()}
    converted(x).sum().backward()  # gradient accumulation adds a second, different batch's grads
    assert set(events.values()) == {2}
    for name, p in converted.named_parameters():
        assert not torch.equal(p.grad, single[name]) or float(single[name].norm()) == 0


class _BiasedAttentionBlocks(torch.nn.Module):
    """Blocks reading a learned attention bias computed once outside them: a side input."""

    def __init__(self, dim=16, tokens=6, depth=3):
        super().__init__()
        self.bias_table = torch.nn.Parameter(torch.randn(tokens, tokens))
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(dim) for _ in range(2 * depth))
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(dim, 3 * dim) for _ in range(depth))
        self.mlp = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(dim, 2 * dim), torch.nn.GELU(), torch.nn.Linear(2 * dim, dim)) for _ in range(depth))
        self.drop = torch.nn.Dropout(0.2)

    def forward(self, x):
        bias = self.bias_table * 2.0
        for i, (qkv, mlp) in enumerate(zip(self.qkv, self.mlp)):
            q, k, v = qkv(self.norms[2 * i](x)).chunk(3, dim=-1)
            attn = torch.softmax(q @ k.transpose(-2, -1) + bias, dim=-1)
            x = x + self.drop(attn @ v)
            x = x + self.drop(mlp(self.norms[2 * i + 1](x)))
        return x


def test_gradients_reach_side_inputs():
    torch.manual_seed(0)
    model = _BiasedAttentionBlocks().double()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    converted = revcompile.convert(model, x)
    plan = revcompile.explain(converted)
    assert len(plan.blocks) == 3 and len(plan.segments) == 1
    assert plan.segments[0].side_inputs, "the attention bias should be a side input"
    checked = assert_gradients_match(converted, (x,), tol=1e-10)
    assert checked >= 1 + len(list(model.parameters()))


def test_side_inputs_are_saved_once_per_segment():
    """The whole model saves Y1, Y2 and the bias once: nothing per block."""
    from revcompile.measure import saved_for_backward

    torch.manual_seed(0)
    model = _BiasedAttentionBlocks(depth=6).double()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    converted = revcompile.convert(model, x)
    _, saved = saved_for_backward(lambda: converted(x), converted)
    assert saved.tensors == 3
    assert saved.bytes == 2 * x.numel() * 8 + 6 * 6 * 8
    revcompile.set_backward(converted, "autograd")
    _, stored = saved_for_backward(lambda: converted(x), converted)
    assert stored.tensors > 6 * 10


def test_no_graph_is_built_without_gradients():
    model, x = _vit(2)
    converted = revcompile.convert(model, x)
    with torch.no_grad():
        out = converted(x)
    assert out.grad_fn is None


def test_set_backward_rejects_unknown_modes():
    model, x = _vit(1)
    converted = revcompile.convert(model, x)
    with pytest.raises(ValueError, match="reversible"):
        revcompile.set_backward(converted, "fast")
    with pytest.raises(ValueError, match="no model converted"):
        revcompile.set_backward(model, "autograd")


def _autocast_gradients(converted, x, mode):
    revcompile.set_backward(converted, mode)
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = converted(x.clone().requires_grad_())
    # backward outside the autocast context, as training loops write it
    return torch.autograd.grad(out.float().square().sum(), list(converted.parameters()))


def test_recompute_replays_the_forward_autocast_state(monkeypatch):
    torch.manual_seed(0)
    model = perturb_parameters(reference_vit(depth=4, dim=64, heads=2))
    (x,) = example_inputs(model, batch_size=4)
    converted = revcompile.convert(model, x)
    reference = _autocast_gradients(converted, x, "autograd")
    replayed = _autocast_gradients(converted, x, "reversible")
    error = max(relative_error(a, b) for a, b in zip(replayed, reference))
    assert error < 2e-2
    monkeypatch.setattr(runtime_tape, "autocast_as", lambda state: contextlib.nullcontext())
    not_replayed = _autocast_gradients(converted, x, "reversible")
    assert max(relative_error(a, b) for a, b in zip(not_replayed, reference)) > 3 * error

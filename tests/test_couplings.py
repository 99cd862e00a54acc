"""Couplings as one definition: the dual-residual coupling is exact at every beta = 2**-k,
keeps the pretrained function within ~beta, and its coefficients are checked and changeable."""

from __future__ import annotations

import math

import pytest
import torch

import revcompile
from revcompile.measure import saved_for_backward
from revcompile.passes.couplings import DualResidual, RevViT, StreamArithmetic, make_coupling, pack_bits, unpack_bits
from revcompile.reference import example_inputs, reference_vit
from tests.conftest import assert_gradients_match, perturb_parameters
from tests.models import hf_gpt2, hf_llama, timm_vit


@pytest.mark.parametrize("k", [1, 2, 3, 7, 8, 9, 13, 16, 17, 24])
def test_remainder_bits_pack_into_k_bits_and_back(k):
    generator = torch.Generator().manual_seed(k)
    values = torch.randint(0, 2**k, (3, 5, 7), generator=generator)  # 105 elements: not a multiple of 8
    packed = pack_bits(values, k)
    assert packed.dtype == torch.uint8
    assert packed.numel() == DualResidual(2.0**-k).residue_bytes(values.numel())
    assert packed.numel() == (k // 8) * 105 + (k % 8) * math.ceil(105 / 8)
    assert torch.equal(unpack_bits(packed, k, values), values)


@pytest.mark.parametrize("alpha", [None, 1.0, 0.3])
@pytest.mark.parametrize("k", [0, 1, 8, 16])
def test_a_dual_step_inverts_exactly(k, alpha):
    coupling = DualResidual(2.0**-k, alpha)
    arith = StreamArithmetic("exact", torch.float32)
    generator = torch.Generator().manual_seed(k)
    prev, cur = (arith.enter(torch.randn(4, 9, 6, generator=generator) * 50) for _ in range(2))
    h = torch.randn(4, 9, 6, generator=generator)
    nxt, residue = coupling.step(arith, prev, cur, h)
    assert torch.equal(coupling.invert(arith, cur, nxt, h, residue), prev)
    # the step is the dual residual, up to rounding onto the 2**-36 grid
    expected = coupling.alpha * cur + h.double() + coupling.beta * prev
    assert float((nxt - expected).abs().max()) < 4 * 2.0**-36 * (1 + 50 * abs(coupling.alpha))


@pytest.mark.parametrize(
    "beta, message",
    [
        (0, "power of two"),
        (0.0, "power of two"),
        (-0.25, "power of two"),
        (float("nan"), "power of two"),
        (0.3, r"nearest are 2\*\*-2 = 0.25 or 2\*\*-1 = 0.5"),
        (2.0, r"nearest are 2\*\*0 = 1"),
        (2.0**-40, r"nearest are 2\*\*-30"),
    ],
)
def test_bad_beta_is_refused_with_the_nearest_powers(beta, message):
    with pytest.raises(ValueError, match=message):
        make_coupling("dual", beta=beta)


def test_bad_coupling_arguments_are_refused():
    with pytest.raises(ValueError, match="alpha must be a number in"):
        make_coupling("dual", alpha=1.5)
    with pytest.raises(ValueError, match="coupling must be one of"):
        make_coupling("additive")
    with pytest.raises(ValueError, match="coefficients of coupling='dual'"):
        make_coupling("revvit", beta=0.5)
    model = reference_vit(depth=1, dim=16, heads=2)
    (x,) = example_inputs(model, batch_size=2)
    with pytest.raises(ValueError, match="streams='exact'"):
        revcompile.convert(model, x, coupling="dual", streams="float32")
    converted = revcompile.convert(model, x)
    with pytest.raises(ValueError, match="coupling='dual'"):
        revcompile.set_coefficients(converted, beta=0.5)


def _vit(depth=3, dim=32):
    torch.manual_seed(depth)
    model = reference_vit(depth=depth, dim=dim, heads=2, drop=0.1, attn_drop=0.1, drop_path=0.2)
    model = perturb_parameters(model.double())
    (x,) = example_inputs(model, batch_size=3, dtype=torch.float64)
    return model, x


@pytest.mark.parametrize("alpha", [None, 1.0])
def test_dual_float64_gradients_equal_autograd(alpha):
    model, x = _vit()
    converted = revcompile.convert(model, x, coupling="dual", beta=2.0**-1, alpha=alpha)
    for k in (1, 4, 8, 16):
        revcompile.set_coefficients(converted, beta=2.0**-k, alpha=alpha)
        assert_gradients_match(converted, (x,), tol=1e-12)
    assert_gradients_match(converted, (x,), tol=1e-12, mode="parallel")


@pytest.mark.parametrize("build", [timm_vit, hf_gpt2, hf_llama], ids=["timm-vit", "hf-gpt2", "hf-llama"])
def test_dual_gradients_are_exact_on_real_families(build):
    torch.manual_seed(0)
    model, args, kwargs, layers = build()
    model = perturb_parameters(model.double())
    args = tuple(a.double() if a.is_floating_point() else a for a in args)
    converted = revcompile.convert(model, args, kwargs, coupling="dual", beta=2.0**-1)
    assert len(revcompile.explain(converted).blocks) == layers
    for k in (1, 4, 8, 16):
        revcompile.set_coefficients(converted, beta=2.0**-k)
        assert_gradients_match(converted, args, kwargs, tol=1e-12)


def test_set_coefficients_between_steps_keeps_gradients_exact():
    model, x = _vit(depth=4)
    converted = revcompile.convert(model, x, coupling="dual", beta=2.0**-8)
    optimizer = torch.optim.SGD(converted.parameters(), lr=1e-2)
    for beta in (2.0**-8, 2.0**-4, 2.0**-1):
        coupling = revcompile.set_coefficients(converted, beta=beta)
        assert coupling.beta == beta and coupling.alpha == 1 - beta
        assert_gradients_match(converted, (x,), tol=1e-12)
        optimizer.zero_grad()
        converted(x).square().mean().backward()
        optimizer.step()
    assert revcompile.set_coefficients(converted, alpha=1.0).alpha == 1.0
    assert_gradients_match(converted, (x,), tol=1e-12)


def test_a_backward_inverts_with_the_coefficients_its_forward_used():
    model, x = _vit(depth=3)
    converted = revcompile.convert(model, x, coupling="dual", beta=2.0**-8)
    revcompile.set_backward(converted, "autograd")
    torch.manual_seed(5)
    converted(x).sum().backward()
    reference = [p.grad.clone() for p in converted.parameters()]
    converted.zero_grad()
    revcompile.set_backward(converted, "reversible")
    torch.manual_seed(5)
    out = converted(x)
    revcompile.set_coefficients(converted, beta=0.5)  # changed between forward and backward
    out.sum().backward()
    for got, want in zip((p.grad for p in converted.parameters()), reference):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("k, bound", [(30, 1e-7), (16, 1e-3), (8, 0.15)])
def test_dual_keeps_the_original_function_within_about_beta(k, bound):
    model, x = _vit(depth=6, dim=48)
    model.eval()
    with torch.no_grad():
        original = model(x)
        converted = revcompile.convert(model, x, coupling="dual", beta=2.0**-k)
        got = converted(x)
        revvit = revcompile.convert(model, x)(x)
    distance = float((got - original).abs().max() / original.abs().max())
    assert distance < bound
    # the Rev-ViT coupling is a different function altogether
    assert float((revvit - original).abs().max() / original.abs().max()) > 10 * distance


def test_dual_saves_at_most_a_tenth_of_the_original_at_depth_12_with_k_8():
    torch.manual_seed(0)
    model = reference_vit(depth=12, dim=128, heads=4)
    (x,) = example_inputs(model, batch_size=4)
    converted = revcompile.convert(model, x, coupling="dual", beta=2.0**-8)
    _, original = saved_for_backward(lambda: model(x), model)
    _, dual = saved_for_backward(lambda: converted(x), converted)
    assert dual.bytes * 10 <= original.bytes, (dual.bytes, original.bytes)
    # 24 steps of one byte per stream element are part of what it keeps
    stream_elements = 4 * (x.shape[-1] // 16) ** 2 * 128 + 4 * 128  # tokens incl. class token
    assert dual.bytes >= 24 * stream_elements


def test_the_coupling_is_one_definition_that_every_consumer_reads():
    model, x = _vit(depth=2)
    converted = revcompile.convert(model, x, coupling="dual", beta=2.0**-4)
    program = revcompile.backward_program(converted, mode="reversible")
    assert any("residue" in str(v) for v in program.inputs)
    assert "dual residual, beta = 2^-4" in repr(converted)
    assert isinstance(converted.reversible_settings.coupling, DualResidual)
    assert isinstance(revcompile.convert(model, x).reversible_settings.coupling, RevViT)


def test_beta_schedule_moves_k_linearly_in_powers_of_two():
    betas = [revcompile.beta_schedule(step, 7, start=2.0**-8, end=2.0**-2) for step in range(7)]
    assert betas == [2.0**-k for k in (8, 7, 6, 5, 4, 3, 2)]
    assert revcompile.beta_schedule(100, 7) == 2.0**-2
    with pytest.raises(ValueError, match="power of two"):
        revcompile.beta_schedule(0, 10, start=0.3)


def test_explain_names_the_coupling_and_the_function_distance():
    model, x = _vit(depth=2)
    converted = revcompile.convert(model, x, coupling="dual", beta=2.0**-3)
    text = str(revcompile.explain(converted))
    assert "coupling: dual residual, beta = 2^-3, alpha = 1 - beta" in text
    assert "3 remainder bits per stream element, packed (0.375 bytes per element and step)" in text
    assert "function distance at conversion" in text and "relative" in text
    assert model.training and converted.training  # the eval-mode comparison put the flags back
    assert "coupling: Rev-ViT coupling, fusion mean" in str(revcompile.explain(revcompile.convert(model, x)))


def test_the_picture_names_the_dual_coupling_streams_and_steps(tmp_path):
    model, x = _vit(depth=2)
    converted = revcompile.convert(model, x, coupling="dual", beta=2.0**-4)
    svg = revcompile.draw(converted, tmp_path / "dual.svg", expand=True)
    assert "two streams x_i-1, x_i" in svg
    assert "x_i+1 = a·x_i + F(x_i) + b·x_i-1" in svg
    assert "keeps the last x_i-1, x_i + per-step residues" in svg
    revvit = revcompile.draw(revcompile.convert(model, x), expand=True)
    assert "two streams X1, X2" in revvit and "Y1 = X1 + F(X2)" in revvit


def test_a_lora_wrapped_hf_model_converts_with_dual_and_only_adapters_get_exact_gradients():
    peft = pytest.importorskip("peft")  # the [zoo] extra, which CI installs
    torch.manual_seed(0)
    model, args, kwargs, layers = hf_gpt2(depth=2)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], lora_dropout=0.1, fan_in_fan_out=True)
    lora = peft.get_peft_model(model.double(), config)
    perturb_parameters(lora)  # LoRA's B starts at zero, which would hide A's gradient
    converted = revcompile.convert(lora, args, kwargs, coupling="dual", beta=2.0**-8)
    assert len(revcompile.explain(converted).blocks) == layers
    trainable = [n for n, p in converted.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert assert_gradients_match(converted, args, kwargs, tol=1e-12) == len(trainable)

"""A converted model in a real training loop: AMP, GradScaler, torch.compile, numerics, misuse."""

from __future__ import annotations

import pytest
import torch

import revcompile
from revcompile.reference import example_inputs, reference_vit
from tests.conftest import perturb_parameters, relative_error


def _vit(depth=3, dtype=torch.float32, **options):
    torch.manual_seed(0)
    model = perturb_parameters(reference_vit(depth=depth, dim=64, heads=2)).to(dtype)
    (images,) = example_inputs(model, batch_size=4, dtype=dtype)
    return revcompile.convert(model, images, **options), images


def _step_gradients(model, images, mode, autocast=None, scaler=None):
    revcompile.set_backward(model, mode)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        loss = model(images).float().square().mean()
    (scaler.scale(loss) if scaler else loss).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


# -- numerics: exact streams make reconstruction exact at any depth and precision ---------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_exact_streams_give_autograd_gradients_in_16_bit_models(dtype):
    converted, images = _vit(depth=12, dtype=dtype)
    reference = _step_gradients(converted, images, "autograd")
    got = _step_gradients(converted, images, "reversible")
    for name in reference:
        assert torch.equal(got[name], reference[name]), name


def test_model_precision_streams_drift_in_bf16_which_exact_streams_avoid():
    """The negative control: bf16 streams reconstruct with visible error."""
    converted, images = _vit(depth=12, dtype=torch.bfloat16, streams="model")
    reference = _step_gradients(converted, images, "autograd")
    got = _step_gradients(converted, images, "reversible")
    assert max(relative_error(got[n], reference[n]) for n in reference) > 1e-2


def test_exact_streams_under_autocast_match_autograd():
    converted, images = _vit(depth=12)
    reference = _step_gradients(converted, images, "autograd", autocast=torch.bfloat16)
    got = _step_gradients(converted, images, "reversible", autocast=torch.bfloat16)
    for name in reference:
        assert torch.equal(got[name], reference[name]), name


def test_reconstruction_check_reports_drift_per_block():
    converted, images = _vit(depth=4, dtype=torch.bfloat16, streams="model", check_reconstruction=True)
    _step_gradients(converted, images, "reversible")
    drift = revcompile.reconstruction_report(converted)
    assert len(drift) == 2 * 4  # X1 and X2 of every block
    assert max(d.relative_error for d in drift) > 0
    exact, images = _vit(depth=4, dtype=torch.bfloat16, check_reconstruction=True)
    _step_gradients(exact, images, "reversible")
    assert max(d.relative_error for d in revcompile.reconstruction_report(exact)) == 0.0


def test_exact_streams_beyond_their_range_show_up_in_the_reconstruction_check():
    """Exactness holds while |x| < 2**17 (float64 sums of grid values); beyond, drift appears."""
    converted, images = _vit(depth=3, dtype=torch.float64, check_reconstruction=True)
    revcompile.set_backward(converted, "reversible")
    converted(images).sum().backward()
    assert max(d.max_abs_error for d in revcompile.reconstruction_report(converted)) == 0.0
    with torch.no_grad():
        converted.pos_embed.add_(2.0**22)  # the stream now lives far outside the exact range
    converted(images).sum().backward()
    assert max(d.max_abs_error for d in revcompile.reconstruction_report(converted)) > 0.0


def test_non_finite_reconstruction_is_a_clear_error():
    converted, images = _vit(depth=2, dtype=torch.float16, streams="model", check_reconstruction=True)
    with torch.no_grad():
        converted.blocks[1].mlp.fc2.weight.fill_(3e4)  # the forward overflows float16
    revcompile.set_backward(converted, "reversible")
    out = converted(images)
    assert not torch.isfinite(out).all()
    with pytest.raises(RuntimeError, match="non-finite reconstruction"):
        out.float().sum().backward()


# -- mixed precision ----------------------------------------------------------------------------


def test_grad_scaler_steps_a_converted_model_under_fp16_autocast():
    converted, images = _vit(depth=3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    reference = _step_gradients(converted, images, "autograd", torch.float16, scaler)
    got = _step_gradients(converted, images, "reversible", torch.float16, scaler)
    for name in reference:
        assert torch.equal(got[name], reference[name]), name
    optimizer = torch.optim.SGD(converted.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in converted.parameters()]
    scaler.step(optimizer)  # unscales, finds no inf, steps
    scaler.update()
    assert scaler.get_scale() == 2.0**10
    assert any(not torch.equal(a, p) for a, p in zip(before, converted.parameters()))


# -- torch.compile --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_trains_with_eager_gradients(backend):
    import torch._inductor.config

    converted, images = _vit(depth=2, dtype=torch.float64)
    reference = _step_gradients(converted, images, "autograd")
    compiled = torch.compile(converted, backend=backend)
    revcompile.set_backward(converted, "reversible")
    # inductor draws dropout masks outside the segments with its own generator unless told
    # to use eager's; with it, compiled and eager draw the same masks (docs/limitations.md)
    with torch._inductor.config.patch(fallback_random=True):
        for _ in range(2):  # and again, from the compiled cache
            converted.zero_grad(set_to_none=True)
            torch.manual_seed(3)
            compiled(images).float().square().mean().backward()
            for name, p in converted.named_parameters():
                assert relative_error(p.grad, reference[name]) < 1e-12, name
    assert revcompile.find_converted(compiled) == [converted]


# -- what must not break silently ------------------------------------------------------------------


def test_backward_twice_with_retain_graph_accumulates_exactly():
    converted, images = _vit(depth=2, dtype=torch.float64)
    loss = converted(images).square().sum()
    loss.backward(retain_graph=True)
    once = {n: p.grad.clone() for n, p in converted.named_parameters()}
    loss.backward()
    for name, p in converted.named_parameters():
        assert torch.equal(p.grad, 2 * once[name]), name


def test_backward_twice_without_retain_graph_is_refused_by_autograd():
    converted, images = _vit(depth=2)
    loss = converted(images).sum()
    loss.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


def test_first_order_autograd_grad_works_and_double_backward_names_the_way_out():
    converted, images = _vit(depth=2, dtype=torch.float64)
    x = images.clone().requires_grad_()
    (g,) = torch.autograd.grad(converted(x).square().sum(), x)
    assert g.shape == x.shape and float(g.norm()) > 0
    with pytest.raises(RuntimeError, match="set_backward\\(model, 'autograd'\\)"):
        torch.autograd.grad(converted(x).square().sum(), x, create_graph=True)
    revcompile.set_backward(converted, "autograd")  # ... which supports it
    (g,) = torch.autograd.grad(converted(x).square().sum(), x, create_graph=True)
    g.sum().backward()


def test_verify_prints_a_readable_report():
    from rich.console import Console

    converted, images = _vit(depth=2, dtype=torch.float64)
    report = revcompile.verify(converted, images)
    assert report.passed
    console = Console(record=True, width=120)
    console.print(report)
    text = console.export_text()
    assert "PASSED" in text and "blocks.0" in text

"""Sketched linear layers (docs/sketch.md): unbiased, with the variance the formula says,
smaller saved tensors, exact everything else, replay-safe, off by default.

The statistics are checked on a small float64 layer with 2,000 draws per estimator; the
per-element variance formulas below are written out here independently of
``revcompile.sketch_variance`` (which has the Frobenius-total form), and the two are
compared with each other as well as with the measured variance.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import revcompile
from revcompile.measure import saved_for_backward
from revcompile.passes.sketch import find_linear_sites, sketch_linears
from revcompile.sketch import ESTIMATORS, SketchConfig, SketchedLinear, row_probabilities
from revcompile.sketch_variance import sketched_layers
from revcompile.sketch_variance import expected_sketch_error, sketch_report, sketch_variance
from tests import models
from tests.blocks import Stack, tokens

DRAWS = 2000
N, D_IN, D_OUT, KEEP = 24, 6, 4, 0.25  # k = 6 of 24 rows


def _operands():
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(2, N // 2, D_IN, generator=generator, dtype=torch.float64)
    x = x * torch.linspace(0.2, 3.0, N // 2, dtype=torch.float64)[None, :, None]  # uneven row norms
    dy = torch.randn(2, N // 2, D_OUT, generator=generator, dtype=torch.float64)
    weight = nn.Parameter(torch.randn(D_OUT, D_IN, generator=generator, dtype=torch.float64))
    bias = nn.Parameter(torch.randn(D_OUT, generator=generator, dtype=torch.float64))
    return x, dy, weight, bias


def _per_element_variance(x2d, dy2d, estimator: str, k: int) -> torch.Tensor:
    """Var(Ĝ_ij) for Ĝ = (S dy)ᵀ(S x), derived per element (Isserlis for Gaussian S)."""
    exact = dy2d.t() @ x2d  # (out, in)
    cross = (dy2d.t() ** 2) @ (x2d**2)  # Σ_a dy_ai² x_aj²
    norms = torch.outer((dy2d**2).sum(0), (x2d**2).sum(0))  # |dy_:i|² |x_:j|²
    if estimator == "gaussian":
        return (norms + exact**2) / k
    if estimator == "rademacher":
        return (norms + exact**2 - 2 * cross) / k
    p = row_probabilities(x2d)
    return ((dy2d.t() ** 2 / p) @ (x2d**2) - exact**2) / k


@contextlib.contextmanager
def _one_thread():
    """Thousands of tiny ops: on a shared machine a second thread only waits for a busy core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def one_thread():
    with _one_thread():
        yield


@pytest.fixture(scope="module", params=sorted(ESTIMATORS))
def draws(request):
    """2,000 sketched weight gradients through the real autograd path, and the exact one."""
    estimator = request.param
    x, dy, weight, bias = _operands()
    op = SketchedLinear("layer", KEEP, estimator, seed=3)
    with _one_thread():
        grads = torch.stack([torch.autograd.grad(op(x, weight, bias), weight, dy)[0] for _ in range(DRAWS)])
    exact = torch.autograd.grad(F.linear(x, weight, bias), weight, dy)[0]
    return estimator, grads, exact, x.reshape(N, D_IN), dy.reshape(N, D_OUT)


def _unbiased(grads, exact) -> torch.Tensor:
    standard_error = grads.std(0) / math.sqrt(len(grads))
    return (grads.mean(0) - exact).abs() <= 3 * standard_error


def test_sketched_weight_gradient_is_unbiased(draws):
    estimator, grads, exact, _, _ = draws
    assert _unbiased(grads, exact).all(), f"{estimator}: mean of {DRAWS} sketches off by more than 3 standard errors"
    assert not _unbiased(grads * 1.1, exact).all(), "the check cannot see a 10% bias: too few draws"
    assert not torch.equal(grads[0], grads[1]), "every step must draw a fresh sketch"


def test_variance_formula_matches_the_measured_variance(draws):
    estimator, grads, exact, x2d, dy2d = draws
    k = math.ceil(KEEP * N)
    formula = _per_element_variance(x2d, dy2d, estimator, k)
    measured = grads.var(0)
    # the variance of 2,000 draws is itself uncertain: ~sqrt((kurtosis - 1) / 2000), a few percent
    assert abs(float(measured.sum() / formula.sum()) - 1) < 0.1, (float(measured.sum()), float(formula.sum()))
    ratio = measured / formula
    assert float(ratio.min()) > 0.7 and float(ratio.max()) < 1.4, ratio
    total = expected_sketch_error(x2d, dy2d, estimator, KEEP, float((exact**2).sum()))
    assert total == pytest.approx(float(formula.sum()), rel=1e-10)


@pytest.mark.parametrize("estimator", sorted(ESTIMATORS))
def test_forward_input_and_bias_gradients_are_exact(estimator):
    x, dy, weight, bias = _operands()
    x = x.requires_grad_(True)
    op = SketchedLinear("layer", KEEP, estimator, seed=0)
    y = op(x, weight, bias)
    dx, dw, db = torch.autograd.grad(y, (x, weight, bias), dy)
    y_ref = F.linear(x, weight, bias)
    dx_ref, dw_ref, db_ref = torch.autograd.grad(y_ref, (x, weight, bias), dy)
    assert torch.equal(y, y_ref)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(db, db_ref, rtol=1e-12, atol=0)
    assert float((dw - dw_ref).norm() / dw_ref.norm()) > 1e-3  # the weight gradient is the sketched one


@pytest.mark.parametrize("estimator", sorted(ESTIMATORS))
def test_saved_bytes_scale_with_the_kept_fraction(estimator):
    x = torch.randn(4, 50, 32, requires_grad=True)  # N = 200 rows of 32 float32
    weight, bias = nn.Parameter(torch.randn(16, 32)), nn.Parameter(torch.randn(16))
    _, exact = saved_for_backward(lambda: F.linear(x, weight, bias), [weight, bias])
    assert exact.bytes == 200 * 32 * 4
    for keep in (1.0, 0.5, 0.25, 0.1):
        op = SketchedLinear("layer", keep, estimator, seed=0)
        _, saved = saved_for_backward(lambda: op(x, weight, bias), [weight, bias])
        rows = math.ceil(keep * 200)
        indices_and_scales = rows * (8 + 4) if estimator == "rows" else 0  # int64 index + float32 scale
        assert saved.bytes == rows * 32 * 4 + indices_and_scales, (keep, saved)


class _Wide(nn.Module):
    """A short reversible trunk with a wide head outside it (its input is stored all step)."""

    def __init__(self):
        super().__init__()
        self.stack = Stack(depth=2)
        self.head = nn.Linear(4, 64)

    def forward(self, x):
        return self.head(self.stack(x))


def test_model_saved_bytes_shrink_by_what_the_sketched_layers_keep():
    x = tokens(batch=4, length=25)  # N = 100 rows
    saved = {}
    for keep in (None, 0.5, 0.1):
        torch.manual_seed(0)
        converted = revcompile.convert(_Wide(), x, sketch_linears=SketchConfig(keep, layers=["head", "stack.head"]) if keep else None)
        _, saved[keep] = saved_for_backward(lambda: converted(x), converted)
    for keep in (0.5, 0.1):
        rows = math.ceil(keep * 100)
        expected = (100 - rows) * (16 + 4) * 4  # stack.head reads 16 features, head reads 4
        assert saved[None].bytes - saved[keep].bytes == expected, (keep, saved)


# --- the graph pass -------------------------------------------------------------------------------


class _Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3, bias=False)

    def forward(self, x):
        return F.linear(torch.relu(self.proj(x)), self.out.weight)


def _make_op(site):
    return SketchedLinear(site.layer, 0.5, "gaussian", 0, site.weight_in_out)


def test_pass_finds_fx_forms_and_leaves_its_input_alone():
    gm = fx.symbolic_trace(_Functional())
    before = gm.code
    sites = find_linear_sites(gm)
    assert [(s.layer, s.form, s.bias) for s in sites] == [("proj", "module", "proj.bias"), ("out", "functional", None)]
    result = sketch_linears(gm, lambda site: True, _make_op)
    assert gm.code == before, "the pass mutated its input"
    assert [s.layer for s in result.sketched] == ["proj", "out"]
    calls = [n for n in result.graph_module.graph.nodes if isinstance(n.target, SketchedLinear)]
    assert len(calls) == 2 and not any(n.op == "call_module" for n in result.graph_module.graph.nodes)
    x = torch.randn(3, 5, 8)
    assert torch.equal(result.graph_module(x), gm(x))


def test_pass_finds_aten_forms():
    model, x = _Functional(), torch.randn(6, 8)
    exported = torch.export.export(model, (x,)).run_decompositions()
    gm = exported.module()
    forms = {(s.layer, s.form, s.weight_in_out) for s in find_linear_sites(gm)}
    assert forms == {("proj", "matmul", False), ("out", "matmul", False)}, forms  # addmm/mm of a transposed weight
    result = sketch_linears(gm, lambda site: site.layer == "proj", _make_op)
    assert [s.layer for s in result.sketched] == ["proj"]
    torch.testing.assert_close(result.graph_module(x), model(x), rtol=1e-6, atol=1e-6)


@pytest.mark.slow  # ~12 s: torch.export tracing of GPT-2
def test_gpt2_conv1d_and_lm_head_are_sketched_and_verified_exact_elsewhere():
    """HF GPT-2 traces through torch.export: aten.linear (lm_head) and addmm with (in, out) Conv1D weights."""
    model, args, kwargs, _ = models.hf_gpt2(depth=2)
    converted = revcompile.convert(model.double(), args, kwargs, sketch_linears=SketchConfig(0.5, layers="all"))
    layers = sketched_layers(converted)
    assert {"h.0.attn.c_attn", "h.1.mlp.c_proj"} <= set(layers) and layers["h.0.mlp.c_fc"].weight_in_out
    report = revcompile.verify(converted, args, kwargs)
    assert report.passed, report
    assert {c.name for c in report.approximate} >= {"h.0.attn.c_attn.weight", "h.1.mlp.c_fc.weight"}
    assert all(c.relative_error > 1e-3 for c in report.approximate)


# --- conversion, verify, replay --------------------------------------------------------------------


def test_off_by_default():
    model, args, kwargs, _ = models.timm_vit(depth=2)
    converted = revcompile.convert(model.double(), tuple(a.double() for a in args))
    assert sketched_layers(converted) == {}
    graphs = [converted.reversible_variants[0].compiled.graph]
    graphs += [br.graph for seg in converted.reversible_variants[0].compiled.segments for b in seg.blocks for br in (b.f, b.g)]
    assert not any(isinstance(n.target, SketchedLinear) for g in graphs for n in g.nodes)
    assert revcompile.verify(converted, tuple(a.double() for a in args)).approximate == ()


def test_verify_says_approximate_and_checks_the_rest_exactly():
    """timm ViT with dropout on: the head (outside the segment) is sketched; all else equals autograd."""
    model, args, kwargs, _ = models.timm_vit(depth=2)
    args = tuple(a.double() for a in args)
    converted = revcompile.convert(model.double(), args, sketch_linears=0.5)
    assert list(sketched_layers(converted)) == ["head"]
    report = revcompile.verify(converted, args)
    assert report.passed and report.outputs_equal, report  # same dropout masks with sketching on
    assert [c.name for c in report.approximate] == ["head.weight"]
    assert "head.weight" not in {c.name for c in report.checks}
    assert "input 0" in {c.name for c in report.checks} and "head.bias" in {c.name for c in report.checks}
    assert "APPROXIMATE" in str(report)


def test_reversible_recompute_replays_the_same_sketch():
    """Linears inside segments, sketched: the reversible backward draws the sketch an autograd-mode run draws."""
    x = tokens(dtype=torch.float64)
    grads = {}
    for mode in ("autograd", "reversible"):
        torch.manual_seed(0)
        model = Stack().double()
        converted = revcompile.convert(model, x, sketch_linears=SketchConfig(0.5, layers="all", estimator="rademacher"))
        revcompile.set_backward(converted, mode)
        state = torch.get_rng_state()
        before = {name: op.draws for name, op in sketched_layers(converted).items()}  # convert's check drew once
        converted(x).pow(2).sum().backward()
        assert torch.equal(torch.get_rng_state(), state), "sketching must not touch the global generator"
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters()}
        after = {name: op.draws for name, op in sketched_layers(converted).items()}
        assert all(after[name] == before[name] + 1 for name in after), "one draw per layer per step"
    for name, ref in grads["autograd"].items():
        torch.testing.assert_close(grads["reversible"][name], ref, rtol=1e-10, atol=1e-12, msg=name)


def test_predicate_and_per_layer_fractions():
    x = tokens()
    converted = revcompile.convert(Stack(), x, sketch_linears=SketchConfig(layers=lambda name: name.endswith("mlp.2")))
    assert set(sketched_layers(converted)) == {f"blocks.{i}.mlp.2" for i in range(3)}
    converted = revcompile.convert(Stack(), x, sketch_linears=SketchConfig(layers={"head": 0.1, "blocks.1.mlp.0": 0.5}))
    assert {n: op.keep for n, op in sketched_layers(converted).items()} == {"head": 0.1, "blocks.1.mlp.0": 0.5}


@pytest.mark.parametrize(
    "value, error, words",
    [
        (0.0, ValueError, "(0, 1]"),
        (1.5, ValueError, "(0, 1]"),
        ("0.5", TypeError, "sketch_linears must be"),
        (SketchConfig(estimator="sparse"), ValueError, "gaussian"),
        (SketchConfig(layers=["head", "blocks.9.mlp"]), ValueError, "blocks.9.mlp"),
        (SketchConfig(layers="head"), ValueError, "pass a list"),
        (SketchConfig(layers={"head": 2.0}), ValueError, "(0, 1]"),
    ],
)
def test_bad_sketch_options_are_clear_errors(value, error, words):
    with pytest.raises(error, match=None) as caught:
        revcompile.convert(Stack(), tokens(), sketch_linears=value)
    assert words in str(caught.value)


def test_nothing_outside_the_segments_is_a_clear_error():
    from tests.blocks import PreNormBlock, sequential

    with pytest.raises(ValueError, match="no linear layer is outside the reversible segments"):
        revcompile.convert(sequential(PreNormBlock(), PreNormBlock()), tokens(), sketch_linears=0.5)


# --- report -------------------------------------------------------------------------------------------


def test_report_lists_sketched_layers_memory_and_variance_ratio():
    x = tokens(batch=4, length=25)
    converted = revcompile.convert(_Wide(), x, sketch_linears=SketchConfig(0.25, layers=["head", "stack.head"]))
    report = sketch_report(converted, (x,), {}, lambda out: out.pow(2).sum(), draws=400)
    assert {v.layer for v in report.layers} == {"head", "stack.head"}
    assert report.saved_bytes_exact - report.saved_bytes_sketched == (100 - 25) * (16 + 4) * 4
    for v in report.layers:
        assert v.saved_bytes_sketched == 25 * v.saved_bytes_exact // 100
        assert v.sketch_measured == pytest.approx(v.sketch_formula, rel=0.25)  # 400 draws
        assert v.batch is not None and v.batch > 0 and v.ratio == v.sketch_measured / v.batch


def test_batch_variance_is_that_of_per_sample_gradients():
    """The batch-sampling variance from Gram matrices equals the one from explicit per-sample gradients."""
    generator = torch.Generator().manual_seed(0)
    x, dy = torch.randn(12, 5, generator=generator, dtype=torch.float64), torch.randn(12, 3, generator=generator, dtype=torch.float64)
    per_sample = torch.stack([x[3 * b : 3 * b + 3].t() @ dy[3 * b : 3 * b + 3] for b in range(4)])  # 4 samples of 3 rows
    exact = per_sample.sum(0)
    expected = 4 * per_sample.var(0).sum() / (exact**2).sum()  # Var(sum of 4 iid) = 4 Var(one)
    got = sketch_variance("layer", x, dy, "gaussian", 0.5, samples=4, draws=2).batch
    assert got == pytest.approx(float(expected), rel=1e-10)


@pytest.mark.parametrize("estimator", sorted(ESTIMATORS))
def test_under_autocast_the_sketch_runs_in_the_compute_dtype(estimator):
    """bf16 autocast: the forward is autocast's, S x is kept in bf16, gradients come back in the parameters' dtype."""
    from revcompile.sketch import exact_linears

    x = torch.randn(4, 50, 32, requires_grad=True)
    weight, bias = nn.Parameter(torch.randn(16, 32)), nn.Parameter(torch.randn(16))
    op = SketchedLinear("layer", 0.5, estimator, seed=0)
    results = []
    for exact in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16), (exact_linears() if exact else contextlib.nullcontext()):
            y, saved = saved_for_backward(lambda: op(x, weight, bias), [weight, bias])
        results.append((y, saved, torch.autograd.grad(y.float().pow(2).sum(), (x, weight, bias))))
    (y_ref, _, (dx_ref, _, db_ref)), (y, saved, (dx, dw, db)) = results
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_ref)
    assert (dx.dtype, dw.dtype, db.dtype) == (torch.float32,) * 3 and torch.isfinite(dw).all()
    assert relative_error(dx, dx_ref) < 1e-2 and relative_error(db, db_ref) < 1e-2
    assert saved.bytes == 100 * 32 * 2 + (100 * 12 if estimator == "rows" else 0)  # S x in bf16


def relative_error(got, ref) -> float:
    return float((got.double() - ref.double()).norm() / ref.double().norm())


def test_cli_report_shows_the_sketched_layers(capsys):
    from revcompile.cli import main

    argv = ["report", "--config", "depth=2", "--config", "dim=32", "--config", "heads=2", "--batch-size", "2"]
    assert main([*argv, "--sketch-linears", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "Sketched linear layers: weight gradients are APPROXIMATE (1 layers)" in out
    assert "head" in out and "measured saved for backward" in out
    assert main(argv) == 0
    assert "Sketched linear layers" not in capsys.readouterr().out

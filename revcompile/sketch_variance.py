"""How noisy sketched weight gradients are, against the noise SGD already has.

Bershatsky et al. judge a randomized weight gradient by comparing its variance with the
variance that comes from sampling the batch: if sketching adds less noise than drawing
another minibatch would, training barely notices. For one sketched layer on one batch,
with ``G = dyᵀ x`` the exact weight gradient (``x``, ``dy`` flattened to ``N`` rows):

* sketch variance: ``E ||Ĝ - G||² / ||G||²`` over sketches, measured by drawing sketches
  of the recorded ``x`` and ``dy`` (and in closed form, ``expected_sketch_error``);
* batch-sampling variance: ``tr Cov(G_batch) / ||G||²`` where ``G_batch`` is the gradient
  of a batch of ``B`` samples drawn from the data, estimated from this batch's per-sample
  gradients ``g_b``: ``B/(B-1) Σ_b ||g_b - ḡ||²`` (the rows of ``x`` and ``dy`` split into
  ``B`` equal consecutive groups, one per sample, as a row-major flatten lays them out).

Every quantity is formed from Gram matrices (``<x_aᵀ y_a, x_bᵀ y_b> = (x_a·x_b)(y_a·y_b)``)
so that no ``d_out x d_in`` matrix per sample is ever built.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from revcompile.measure import saved_for_backward
from revcompile.api import find_converted
from revcompile.sketch import SketchedLinear, draw_sketch, exact_linears, row_probabilities, seed_for

__all__ = ["LayerVariance", "SketchReport", "expected_sketch_error", "sketch_variance", "sketch_report", "sketched_layers", "sketched_parameters"]


def sketched_layers(module: nn.Module) -> dict[str, SketchedLinear]:
    """The sketched layers of a converted model (over all its traced variants), by name."""
    found: dict[str, SketchedLinear] = {}
    for converted in find_converted(module):
        for variant in converted.reversible_variants:
            for op in variant.compiled.sketched:
                found.setdefault(op.layer, op)
    return found


def sketched_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The weights whose gradients are sketched (approximate) in ``module``."""
    params = []
    for converted in find_converted(module):
        for op in sketched_layers(converted).values():
            param = converted.get_parameter(op.weight)
            if all(param is not p for p in params):
                params.append(param)
    return params


def _inner(xa, ya, xb, yb) -> torch.Tensor:
    """``<xaᵀ ya, xbᵀ yb>_F`` without forming the ``d_in x d_out`` products."""
    return ((xa @ xb.t()) * (ya @ yb.t())).sum()


def _sample_gram(x2d: torch.Tensor, dy2d: torch.Tensor, samples: int, chunk: int = 1024) -> torch.Tensor:
    """``M[b, c] = <g_b, g_c>`` for the per-sample gradients ``g_b`` (rows in ``samples`` equal groups)."""
    n = x2d.shape[0]
    onehot = F.one_hot(torch.arange(n, device=x2d.device) // (n // samples), samples).double()
    gram = torch.zeros(samples, samples, dtype=torch.float64, device=x2d.device)
    for start in range(0, n, chunk):
        block = (x2d[start : start + chunk] @ x2d.t()) * (dy2d[start : start + chunk] @ dy2d.t())
        gram += onehot[start : start + chunk].t() @ block @ onehot
    return gram


def expected_sketch_error(x2d, dy2d, estimator: str, keep: float, exact_norm2: float) -> float:
    """``E ||Ĝ - G||_F²`` in closed form for one draw keeping ``ceil(keep * N)`` rows.

    gaussian ``(||x||²||dy||² + ||G||²)/k``; rademacher the same less ``2 Σ_a |x_a|²|dy_a|²``
    (``s⁴ = 1``); rows ``(Σ_a |x_a|²|dy_a|²/p_a - ||G||²)/k``.
    """
    k = max(1, math.ceil(keep * x2d.shape[0]))
    xr, yr = x2d.pow(2).sum(1), dy2d.pow(2).sum(1)  # squared row norms
    if estimator == "gaussian":
        return float(xr.sum() * yr.sum() + exact_norm2) / k
    if estimator == "rademacher":
        return float(xr.sum() * yr.sum() + exact_norm2 - 2 * (xr * yr).sum()) / k
    p = row_probabilities(x2d)
    kept = p > 0
    return float((xr[kept] * yr[kept] / p[kept]).sum() - exact_norm2) / k


@dataclass(frozen=True)
class LayerVariance:
    """One sketched layer's weight-gradient noise on one batch, relative to ``||G||²``."""

    layer: str
    keep: float
    estimator: str
    sketch_formula: float  # E||Ĝ - G||² / ||G||², closed form
    sketch_measured: float  # the same, averaged over `draws` sketches
    batch: float | None  # batch-sampling variance / ||G||² (None: fewer than 2 samples)
    draws: int
    saved_bytes_exact: int  # x, as the plain linear keeps it
    saved_bytes_sketched: int  # S x (+ indices and scales for "rows")

    @property
    def ratio(self) -> float | None:
        """Sketch variance over batch-sampling variance (below 1: less noise than SGD's own)."""
        return self.sketch_measured / self.batch if self.batch else None


def sketch_variance(layer: str, x2d, dy2d, estimator: str, keep: float, samples: int, *, draws: int = 32,
                    seed: int = 0, element_size: int = 4) -> LayerVariance:
    """Measure one layer's sketch variance against its batch-sampling variance (in float64)."""
    x2d, dy2d = x2d.double(), dy2d.double()
    exact2 = float(_inner(x2d, dy2d, x2d, dy2d))
    errors = []
    for draw in range(draws):
        sketch = draw_sketch(estimator, x2d, keep, seed_for(seed, layer, draw))
        sx, sy = sketch.apply(x2d), sketch.apply(dy2d)
        errors.append(float(_inner(sx, sy, sx, sy) - 2 * _inner(sx, sy, x2d, dy2d)) + exact2)
    batch = None
    if samples >= 2 and x2d.shape[0] % samples == 0:
        gram = _sample_gram(x2d, dy2d, samples)
        batch = float(samples / (samples - 1) * (gram.trace() - gram.sum() / samples)) / exact2
    n, width = x2d.shape
    rows = max(1, math.ceil(keep * n))
    return LayerVariance(
        layer, keep, estimator,
        sketch_formula=expected_sketch_error(x2d, dy2d, estimator, keep, exact2) / exact2,
        sketch_measured=sum(errors) / len(errors) / exact2,
        batch=batch, draws=draws,
        saved_bytes_exact=n * width * element_size,
        saved_bytes_sketched=rows * width * element_size + (rows * (8 + element_size) if estimator == "rows" else 0),
    )


@dataclass(frozen=True)
class SketchReport:
    """What ``convert(..., sketch_linears=)`` did to one training step on the example inputs."""

    layers: tuple[LayerVariance, ...]
    saved_bytes_exact: int  # the whole step's saved-for-backward bytes with every layer exact
    saved_bytes_sketched: int  # ... with the sketched layers sketching (measured)

    def to_dict(self) -> dict:
        return {"saved_bytes_exact": self.saved_bytes_exact, "saved_bytes_sketched": self.saved_bytes_sketched,
                "layers": [{**asdict(v), "ratio": v.ratio} for v in self.layers]}

    def __rich__(self):
        from rich.table import Table

        saved = self.saved_bytes_exact - self.saved_bytes_sketched
        table = Table(
            title=f"Sketched linear layers: weight gradients are APPROXIMATE ({len(self.layers)} layers)",
            caption=f"measured saved for backward: {self.saved_bytes_exact / 2**20:,.2f} MiB exact -> "
            f"{self.saved_bytes_sketched / 2**20:,.2f} MiB sketched ({saved / 2**20:,.2f} MiB saved). Variances are "
            "E||Ĝ-G||²/||G||²; batch = the minibatch-sampling variance of the same gradient; ratio < 1: less noise than SGD's own",
        )
        for column in ("layer", "estimator", "keep", "input kept", "sketch var (formula)", "batch var", "ratio"):
            table.add_column(column, justify="left" if column in ("layer", "estimator") else "right")
        for v in self.layers:
            table.add_row(
                v.layer, v.estimator, f"{v.keep:g}",
                f"{v.saved_bytes_exact / 2**10:,.1f} -> {v.saved_bytes_sketched / 2**10:,.1f} KiB",
                f"{v.sketch_measured:.3g} ({v.sketch_formula:.3g})",
                "n/a" if v.batch is None else f"{v.batch:.3g}",
                "n/a" if v.ratio is None else f"{v.ratio:.2f}",
            )
        return table


def _samples(args: tuple, kwargs: dict) -> int:
    leaves = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() > 0]
    return leaves[0].shape[0] if leaves else 1


def sketch_report(model: nn.Module, args: tuple, kwargs: dict, loss, *, draws: int = 32) -> SketchReport | None:
    """Sketched layers of ``model``, the memory they save and their gradient variance; None if none.

    ``loss(output)`` turns the model's output into the scalar that is differentiated.
    Runs two forwards and one backward; parameter ``.grad`` fields are not touched.
    """
    ops = sketched_layers(model)
    if not ops:
        return None
    operands: dict = {}
    with exact_linears(operands):
        output, exact = saved_for_backward(lambda: model(*args, **kwargs), model)
        torch.autograd.grad(loss(output), sketched_parameters(model), allow_unused=True)
    del output
    _, sketched = saved_for_backward(lambda: model(*args, **kwargs), model)
    samples = _samples(args, kwargs)
    layers = tuple(
        sketch_variance(name, x2d, dy2d, op.estimator, op.keep, samples, draws=draws, element_size=x2d.element_size())
        for name, op in ops.items() if name in operands for x2d, dy2d in [operands[name]]
    )
    return SketchReport(layers, exact.bytes, sketched.bytes)

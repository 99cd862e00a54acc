"""Check a converted model's gradients against ordinary backprop on the same architecture.

``verify`` runs the same forward and backward twice with the same seed: once in
``"autograd"`` mode (stored activations: plain autograd on the coupled architecture) and
once in the mode under test (``"reversible"`` by default). It compares the gradient of
every parameter and of every floating-point input, and reports the worst relative errors.
Dropout stays on (train mode), so random-mask replay is part of what is checked.

The loss is a fixed random projection of every floating-point output, so that every
output element carries a distinct, non-zero gradient.

With ``convert(..., sketch_linears=...)`` the weight gradients of the sketched layers are
approximate by design: the reference runs with every layer exact (``exact_linears``), the
sketched weights are listed in ``approximate`` with their relative error and left out of
``passed``, and every other gradient is compared as usual -- sketching leaves the input and
bias gradients, hence everything upstream of a sketched layer, exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils import _pytree as pytree

__all__ = ["GradientCheck", "VerifyReport", "verify", "TOLERANCES"]

# Relative error (||a - b|| / ||b||) accepted per dtype of the gradients compared.
TOLERANCES = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 5e-2}


@dataclass(frozen=True)
class GradientCheck:
    name: str
    relative_error: float
    reference_norm: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.relative_error <= self.tolerance


@dataclass(frozen=True)
class VerifyReport:
    mode: str
    checks: tuple[GradientCheck, ...]  # sorted worst first
    unchecked: tuple[str, ...]  # tensors whose reference gradient is zero or missing
    outputs_equal: bool
    approximate: tuple[GradientCheck, ...] = ()  # sketched weights (approximate by design), vs exact

    @property
    def passed(self) -> bool:
        return bool(self.checks) and self.outputs_equal and all(c.passed for c in self.checks)

    @property
    def worst(self) -> GradientCheck | None:
        return self.checks[0] if self.checks else None

    def __rich__(self):
        from rich.table import Table

        verdict = "[bold green]PASSED[/bold green]" if self.passed else "[bold red]FAILED[/bold red]"
        table = Table(
            title=f"revcompile.verify: {verdict}: {len(self.checks)} gradients, '{self.mode}' vs 'autograd'",
            caption="forward outputs identical" if self.outputs_equal else "[red]forward outputs differ[/red]",
        )
        for column, justify in (("", "left"), ("gradient (worst first)", "left"), ("relative error", "right"), ("tolerance", "right")):
            table.add_column(column, justify=justify)
        for check in self.checks[:10]:
            mark = "[green]ok[/green]" if check.passed else "[red]BAD[/red]"
            table.add_row(mark, check.name, f"{check.relative_error:.2e}", f"{check.tolerance:.0e}")
        if len(self.checks) > 10:
            table.add_row("", f"... {len(self.checks) - 10} more", "", "")
        for check in self.approximate:
            table.add_row("[yellow]approx[/yellow]", f"{check.name} (sketched)", f"{check.relative_error:.2e}", "by design")
        return table

    def __str__(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        lines = [
            f"revcompile.verify: {verdict}: {len(self.checks)} gradients, '{self.mode}' vs 'autograd', "
            f"forward outputs {'identical' if self.outputs_equal else 'DIFFERENT'}"
        ]
        for check in self.checks[:5]:
            mark = "ok " if check.passed else "BAD"
            lines.append(f"  {mark} {check.name}: relative error {check.relative_error:.2e} (tolerance {check.tolerance:.0e})")
        if self.approximate:
            worst = max(self.approximate, key=lambda c: c.relative_error)
            lines.append(
                f"  gradients are APPROXIMATE: {len(self.approximate)} weights of sketched linear layers "
                f"(sketch_linears) differ from exact backprop by design (worst {worst.name}: relative error "
                f"{worst.relative_error:.2e}); the other gradients are compared exactly"
            )
        if self.unchecked:
            lines.append(f"  {len(self.unchecked)} tensors without a gradient to compare: {', '.join(self.unchecked[:5])}")
        return "\n".join(lines)


def _float_leaves(value):
    return [t for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _run(model, args, kwargs, mode, seed, projections):
    from revcompile.api import set_backward

    set_backward(model, mode)
    args = pytree.tree_map(lambda t: t.detach().clone().requires_grad_(True) if isinstance(t, torch.Tensor) and t.is_floating_point() else t, args)
    kwargs = pytree.tree_map(lambda t: t.detach().clone().requires_grad_(True) if isinstance(t, torch.Tensor) and t.is_floating_point() else t, kwargs)
    inputs = _float_leaves((args, kwargs))
    torch.manual_seed(seed)
    outputs = _float_leaves(model(*args, **kwargs))
    if not projections:
        generator = torch.Generator().manual_seed(seed)
        projections.extend(torch.randn(o.shape, generator=generator, dtype=torch.float64) for o in outputs)
    loss = sum((o * w.to(o.device, o.dtype)).sum() for o, w in zip(outputs, projections))
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, inputs + params, allow_unused=True)
    return [o.detach() for o in outputs], grads


def _compare(names, reference, candidate, tolerance: float | None, approximate_names: set) -> tuple[list, list, list]:
    """One ``GradientCheck`` per gradient: exact ones, ones with no gradient, sketched (approximate) ones."""
    dtype = next((g.dtype for g in reference if g is not None), torch.float32)
    # Gradients zero in exact arithmetic (a key-projection bias: softmax ignores a
    # per-query shift) are rounding noise in both modes; compare them absolutely.
    scale = max((float(g.double().norm()) for g in reference if g is not None), default=0.0)
    floor = 1e3 * torch.finfo(dtype).eps * scale
    checks, unchecked, approximate = [], [], []
    for name, ref, got in zip(names, reference, candidate):
        if ref is None or got is None:
            unchecked.append(name)
            continue
        ref64, got64 = ref.double(), got.double()
        tol = tolerance if tolerance is not None else TOLERANCES.get(ref.dtype, 1e-4)
        difference = float((got64 - ref64).norm())
        if float(ref64.norm()) <= floor:
            # relative to the noise floor: passes when the difference is noise too
            error = difference / floor * tol if floor > 0 else (0.0 if difference == 0 else math.inf)
        else:
            error = difference / float(ref64.norm())
        check = GradientCheck(name, error if math.isfinite(error) else math.inf, float(ref64.norm()), tol)
        (approximate if name in approximate_names else checks).append(check)
    return checks, unchecked, approximate


def verify(model: nn.Module, example_inputs=(), example_kwargs: dict | None = None, *, mode: str = "reversible", seed: int = 0, tolerance: float | None = None) -> VerifyReport:
    """Compare ``mode``'s gradients with ``"autograd"`` on one call of a converted model.

    The model is run in train mode (dropout on); its backward mode, training flag and the
    global random generators are restored afterwards.
    """
    from revcompile.api import find_converted
    from revcompile.sketch import exact_linears
    from revcompile.sketch_variance import sketched_parameters

    converted = find_converted(model)
    if not converted:
        raise ValueError("verify needs a model returned by revcompile.convert")
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    kwargs = dict(example_kwargs or {})
    previous_mode = converted[0].reversible_settings.mode
    was_training = model.training
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
    with torch.random.fork_rng(devices=devices):
        try:
            model.train()
            projections: list = []
            with exact_linears():
                ref_out, reference = _run(model, args, kwargs, "autograd", seed, projections)
            out, candidate = _run(model, args, kwargs, mode, seed, projections)
        finally:
            from revcompile.api import set_backward

            set_backward(model, previous_mode)
            model.train(was_training)
    names = [f"input {i}" for i in range(len(_float_leaves((args, kwargs))))]
    names += [name for name, p in model.named_parameters() if p.requires_grad]
    sketched = {id(p) for p in sketched_parameters(model)}
    approximate_names = {name for name, p in model.named_parameters() if id(p) in sketched}
    checks, unchecked, approximate = _compare(names, reference, candidate, tolerance, approximate_names)
    checks.sort(key=lambda c: -c.relative_error / c.tolerance)
    outputs_equal = all(torch.equal(a, b) for a, b in zip(ref_out, out))
    return VerifyReport(mode, tuple(checks), tuple(unchecked), outputs_equal, tuple(approximate))

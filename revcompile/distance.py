"""How far a converted model's function is from the original's, on the example inputs.

A user converting a pretrained model needs to know, before fine-tuning, whether the
weights still mean what they meant: the dual-residual coupling keeps the function within
about ``beta``, the Rev-ViT coupling computes a different function. Both models are run in
eval mode (dropout off) on the same inputs, and their floating-point outputs compared.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils import _pytree as pytree

__all__ = ["FunctionDistance", "function_distance"]


@dataclass(frozen=True)
class FunctionDistance:
    max_abs: float  # max |converted - original| over the floating-point outputs
    relative: float  # max_abs / max |original|
    loss_original: float | None = None  # the outputs' ``loss`` (HF models given labels), when there is one
    loss_converted: float | None = None

    def __str__(self) -> str:
        text = f"max |converted - original| = {self.max_abs:.3g} (relative {self.relative:.3g})"
        if self.loss_original is not None and self.loss_converted is not None:
            change = (self.loss_converted - self.loss_original) / abs(self.loss_original) if self.loss_original else 0.0
            text += f"; loss {self.loss_original:.5g} -> {self.loss_converted:.5g} ({change:+.3%})"
        return text


def _floats(output) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def function_distance(original: nn.Module, converted: nn.Module, args: tuple, kwargs: dict) -> FunctionDistance:
    """Compare both models' outputs in eval mode; every module's training flag is put back."""
    flags = {m: m.training for m in (*original.modules(), *converted.modules())}
    try:
        original.eval()
        converted.eval()
        with torch.no_grad():
            want, got = original(*args, **kwargs), converted(*args, **kwargs)
    finally:
        for module, flag in flags.items():
            module.training = flag
    pairs = list(zip(_floats(want), _floats(got)))
    max_abs = max((float((g.double() - w.double()).abs().max()) for w, g in pairs if w.numel()), default=0.0)
    scale = max((float(w.double().abs().max()) for w, _ in pairs if w.numel()), default=0.0)
    losses = [getattr(out, "loss", None) for out in (want, got)]
    loss_original, loss_converted = (float(x) if isinstance(x, torch.Tensor) else None for x in losses)
    return FunctionDistance(max_abs, max_abs / scale if scale else max_abs, loss_original, loss_converted)

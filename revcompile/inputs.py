"""Checking the example inputs before anything is traced: the original model must run on them.

Tracers do not check the inputs for us: torch.fx traces symbolically and never runs an op,
and a shape mismatch under fake tensors is logged and swallowed. A conversion made from
inputs the model cannot take would only fail later, far from its cause. So ``convert``
runs the original model once on the example call, without gradients (with them when the
layer-reuse check of an export will compare its graph with that output), and when it fails
says in one line which input the failing module received and what the failing op
expected (its own message: sizes, channels, dtypes).

The check leaves no trace on the model: random generators and buffers (BatchNorm's running
statistics) are restored, and torch's diagnostics are silenced (``revcompile.quiet``).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils import _pytree as pytree

from revcompile.errors import ConversionError, one_line
from revcompile.frontend import CallSignature
from revcompile.layer_reuse import training_output
from revcompile.quiet import quiet_torch

__all__ = ["check_example_inputs"]


def _describe_tensor(value: torch.Tensor) -> str:
    dtype = str(value.dtype).removeprefix("torch.")
    return f"{dtype}[{', '.join(map(str, value.shape))}]"


def _named_inputs(call: CallSignature) -> list[tuple[str, torch.Tensor]]:
    """The call's tensors with the names a user knows them by (``x``, ``input_ids``, ``input 0``)."""
    named = []
    for index, value in enumerate(call.positional):
        named += [(f"input {index}", t) for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]
    for name, value in call.keyword.items():
        named += [(name, t) for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]
    return named


class _ModuleStack:
    """Which modules are running, innermost last: after an exception, where it was raised."""

    def __init__(self):
        self.running: list[tuple[nn.Module, tuple]] = []

    def enter(self, module, args):
        self.running.append((module, args))

    def leave(self, module, args, output):
        if self.running and self.running[-1][0] is module:
            self.running.pop()

    @contextlib.contextmanager
    def recording(self):
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        handles = (register_module_forward_pre_hook(self.enter), register_module_forward_hook(self.leave))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()


@contextlib.contextmanager
def _state_restored(model: nn.Module):
    """Random generators and buffers as they were before the block."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted({t.device.index or 0 for t in (*model.parameters(), *model.buffers()) if t.is_cuda})
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            with torch.no_grad():
                for buffer, saved in buffers:
                    if buffer.shape == saved.shape:
                        buffer.copy_(saved)


def _culprit(model: nn.Module, stack: _ModuleStack, named: list[tuple[str, torch.Tensor]]) -> tuple[list, str]:
    """(the inputs to name, where the model failed): the inputs the failing module received
    directly, when it received any, else all of them."""
    names = {id(m): n for n, m in model.named_modules()}
    if stack.running:
        module, args = stack.running[-1]
        path = names.get(id(module)) or type(module).__name__
        where = f"{path} ({type(module).__name__})" if path != type(module).__name__ else path
        received = {id(t) for t in pytree.tree_leaves(args) if isinstance(t, torch.Tensor)}
        direct = [(n, t) for n, t in named if id(t) in received]
    else:
        where, direct = f"{type(model).__name__}.forward", []
    return direct or named, where


def _dtype_hint(model: nn.Module, named: list[tuple[str, torch.Tensor]]) -> str:
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(dtypes) != 1:
        return ""
    (dtype,) = dtypes
    if any(t.is_floating_point() and t.dtype != dtype for _, t in named):
        return f"; the model's parameters are {str(dtype).removeprefix('torch.')}"
    return ""


def check_example_inputs(model: nn.Module, call: CallSignature, *, training_run: bool = False) -> list | None:
    """Run ``model`` once on ``call``; raise ``ConversionError`` naming the input it cannot take.

    ``training_run``: run it as ``layer_reuse.training_output`` does (gradients on, seeded)
    and return that output, for the layer-reuse check to compare its graph with; else the
    run is without gradients and returns None.
    """
    stack = _ModuleStack()
    try:
        with quiet_torch(), stack.recording():
            if training_run:
                return training_output(model, call)
            with _state_restored(model), torch.no_grad():
                model(*call.positional, **call.keyword)
            return None
    except Exception as err:  # noqa: BLE001 -- whatever the model raises, the inputs do not fit it
        named = _named_inputs(call)
        culprits, where = _culprit(model, stack, named)
        inputs = ", ".join(f"{n} ({_describe_tensor(t)})" for n, t in culprits)
        raise ConversionError(
            f"the model cannot run on example input{'s' if len(culprits) > 1 else ''} {inputs}: {where} raises {one_line(err).rstrip('.')}"
            f"{_dtype_hint(model, named)}. Pass example inputs exactly as the model is called in training."
        ) from err

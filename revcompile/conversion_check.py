"""Running a converted model once before ``convert`` returns it.

A conversion can look right -- blocks found, segments formed -- and still not work: the
generated graph may read something the converted model does not have, or a branch may not
compute the same thing when it is recomputed in backward (hidden state, a random source the
runtime does not replay, an op that is not deterministic), in which case the reversible
backward reconstructs the wrong activations and nothing downstream notices.
``check_conversion`` runs the converted model on the example call, forward and backward,
with the runtime's reconstruction check on, and compares every block's reconstructed
inputs with the ones the forward computed:

* the forward (or backward) raises: ``ConversionError`` naming the module and block where
  it failed and what was raised;
* a block's reconstruction is off by more than ``reconstruction_tolerance``: the block is
  left as it is (stored activations), listed in ``explain()`` with the reason, and the
  rest is converted again and checked again.

The check leaves no trace: parameters' ``.grad``, buffers (running statistics) and the
random generators are as they were before it. It costs about one training step of the
example batch with activations stored (docs/usage.md has the measured figure).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils import _pytree as pytree

from revcompile.errors import ConversionError
from revcompile.runtime import stream_dtype

__all__ = ["check_conversion", "reconstruction_tolerance"]


def reconstruction_tolerance(dtype: torch.dtype) -> float:
    """Largest relative reconstruction error (max |rebuilt - stored| / max |stored|) a
    block may show for streams kept in ``dtype``. Exact streams reconstruct with error 0;
    rounded streams drift by a few ulps per block."""
    return max(1e-5, 64 * torch.finfo(dtype).eps)


def check_conversion(converted: nn.Module, args: tuple, kwargs: dict) -> None:
    """Run ``converted`` once on the example call; exclude blocks that do not reconstruct.

    Raises ``ConversionError`` when the converted model fails to run, or when excluding
    the blocks that fail leaves nothing to convert.
    """
    for _ in range(len(converted.reversible_plan.blocks) + 1):
        failures = _blocks_that_do_not_reconstruct(converted, args, kwargs)
        if not failures:
            return
        converted.exclude_blocks(failures, args, kwargs)


def _blocks_that_do_not_reconstruct(converted: nn.Module, args: tuple, kwargs: dict) -> dict[str, str]:
    settings = converted.reversible_settings
    saved = (settings.mode, settings.check_reconstruction, settings.drift)
    buffers = [(b, b.detach().clone()) for b in converted.buffers()]
    tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    devices = sorted({t.device.index or 0 for t in [*tensors, *converted.parameters()] if t.is_cuda})
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            settings.mode, settings.check_reconstruction, settings.drift = "reversible", True, {}
            outputs = _run(converted, lambda: converted(*args, **kwargs), "forward")
            _run(converted, lambda: _backward(converted, outputs, tensors), "backward")
            drift = [d for key in sorted(settings.drift) for d in settings.drift[key]]
    finally:
        settings.mode, settings.check_reconstruction, settings.drift = saved
        with torch.no_grad():
            for buffer, value in buffers:
                buffer.copy_(value)
    dtype = _stream_dtype(converted, settings.streams)
    tolerance = reconstruction_tolerance(dtype)
    # Backward reconstructs a segment's blocks last to first, and an error carries on to the
    # blocks before: the culprit is the last block of a segment that is off.
    culprits = {}
    for d in drift:
        if d.relative_error > tolerance:
            culprits[d.segment] = d
    failures: dict[str, str] = {}
    for d in culprits.values():
        failures[d.block] = (
            f"its {d.stream} reconstructed in backward differs from the forward's on the example inputs "
            f"(relative error {d.relative_error:.1e} > {tolerance:.0e}): the block does not compute the same "
            "values when recomputed (hidden state, a random source revcompile does not replay, or a "
            "non-deterministic op), so it keeps stored activations"
        )
    return failures


def _backward(converted: nn.Module, outputs, inputs: list[torch.Tensor]) -> None:
    """Pull ones through every differentiable output (no ``.grad`` is touched)."""
    floats = [o for o in pytree.tree_leaves(outputs) if isinstance(o, torch.Tensor) and o.requires_grad]
    wrt = [p for p in converted.parameters() if p.requires_grad] + [t for t in inputs if t.requires_grad and t.is_leaf]
    if floats and wrt:
        torch.autograd.grad(floats, wrt, [torch.ones_like(o) for o in floats], allow_unused=True)


def _stream_dtype(converted: nn.Module, streams: str) -> torch.dtype:
    model_dtype = next((p.dtype for p in converted.parameters() if p.is_floating_point()), torch.float32)
    return stream_dtype(streams, model_dtype) or model_dtype


def _run(converted: nn.Module, step, what: str):
    try:
        return step()
    except Exception as err:  # noqa: BLE001 -- any failure of the converted model is reported
        name = type(converted.original_model).__name__
        message = str(err).strip().splitlines()[0][:400] if str(err).strip() else ""
        raise ConversionError(
            f"the converted {name} fails in {what} on the example inputs{_where(converted, err)}: "
            f"{type(err).__name__}: {message}. The original model is unchanged. If it runs on these inputs, "
            "the conversion did not carry over some state or operation: please report it with the model."
        ) from err


def _where(converted: nn.Module, err: BaseException) -> str:
    """`` in module M (block B)``: the innermost module of the model on the failing stack."""
    names = {id(m): n for n, m in converted.named_modules() if n}
    frames, tb = [], err.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        module = frame.f_locals.get("self")
        if id(module) in names:
            path = names[id(module)]
            blocks = [b.name for b in converted.reversible_plan.blocks if path == b.name or path.startswith(b.name + ".")]
            return f" in module {path}" + (f" (reversible block {blocks[0]})" if blocks else "")
    prefix = "reversible_segment_"
    segments = [str(getattr(f.f_locals.get("self"), "__name__", "")) for f in frames]
    segments = [name for name in segments if name.startswith(prefix) and name[len(prefix):].isdigit()]
    if not segments:
        return ""
    index = int(segments[-1][len(prefix):])
    plan = converted.reversible_plan.segments
    return f" in {segments[-1]}" + (f" (blocks {plan[index].name})" if index < len(plan) else "")

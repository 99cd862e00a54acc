"""FSDP2 modules inside a reversible segment, gathered one block at a time by their own hooks.

A segment reads its blocks' parameters by name instead of calling the block modules, so
FSDP2's forward hooks on a ``fully_shard``-ed block would never run and its parameters
would stay sharded. ``BlockSharding.call_block`` runs a block's part of the segment --
its gate (``runtime.tape``), or its two coupling steps with ordinary autograd -- as a
forward method of the block's FSDP2 modules (FSDP's public
``register_fsdp_forward_method``), so FSDP's own hooks do what they do for any module:
all-gather before the block's forward steps and reshard after them; in backward, gather
again when the gradient of the block's output arrives (prefetching as configured) and,
once the gradients of its inputs are computed, reduce-scatter the block's parameter
gradients and reshard. While a module is gathered its registered parameters are FSDP's
unsharded parameters, so the gate takes those, and the gradients it returns for them --
accumulated by autograd as soon as the block's backward step is done -- are the ones FSDP
reduce-scatters.
"""

from __future__ import annotations

import functools
import types

import torch
from torch import nn

__all__ = ["BlockSharding", "fsdp_modules"]


def _fsdp_module_class():
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6
        try:
            from torch.distributed._composable.fsdp import FSDPModule
        except ImportError:
            return None
    return FSDPModule


def fsdp_modules(model: nn.Module) -> list[str]:
    """Names of the FSDP2 (``fully_shard``) modules in ``model``."""
    fsdp_module = _fsdp_module_class()
    if fsdp_module is None:
        return []
    return [name or "<the model>" for name, m in model.named_modules() if isinstance(m, fsdp_module)]


def _is_sharded(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__ == "DTensor" or type(getattr(tensor, "data", None)).__name__ == "DTensor"


class BlockSharding:
    """Which FSDP2 modules hold each block's sharded parameters, and gathering them."""

    def __init__(self, segment, owners: list[tuple[nn.Module, ...]]):
        self.segment, self.owners = segment, owners

    @classmethod
    def find(cls, segment, params: list) -> BlockSharding | None:
        """The sharding of ``segment``'s blocks, or None when none of its parameters is sharded now."""
        if not any(_is_sharded(p) for p in params):
            return None
        fsdp_module = _fsdp_module_class()
        owners = []
        for positions in segment.block_parameters:
            found: dict[int, nn.Module] = {}
            for k in positions:
                if _is_sharded(params[k]):
                    owner = _owner(segment.root, segment.parameter_names[k], fsdp_module)
                    found[id(owner)] = owner
            owners.append(tuple(found.values()))
        return cls(segment, owners)

    def call_block(self, i: int, fn, *args):
        """``fn(*args)`` as a forward of block ``i``'s FSDP2 modules, so that their own hooks run:
        gather before it, reshard after it, gather again in backward when the gradient of its
        output arrives, reduce-scatter once the gradients of its inputs are computed."""
        call = fn
        for module in self.owners[i]:
            call = functools.partial(_fsdp_forward(module), call)
        return call(*args)

    def gather(self, i: int) -> None:
        """Unshard block ``i``'s modules (for a step the program runs before FSDP's hooks would)."""
        for module in self.owners[i]:
            module.unshard()


_FORWARD_METHOD = "_revcompile_forward"


def _fsdp_forward(module: nn.Module):
    """``module``'s method ``(fn, *args) -> fn(*args)``, registered with FSDP2 as a forward method."""
    if _FORWARD_METHOD not in module.__dict__:
        try:
            from torch.distributed.fsdp import register_fsdp_forward_method
        except ImportError:  # torch < 2.6
            from torch.distributed._composable.fsdp import register_fsdp_forward_method
        module.__dict__[_FORWARD_METHOD] = types.MethodType(_call, module)
        register_fsdp_forward_method(module, _FORWARD_METHOD)
    return getattr(module, _FORWARD_METHOD)


def _call(module: nn.Module, fn, *args):
    return fn(*args)


def _owner(root: nn.Module, name: str, fsdp_module) -> nn.Module:
    """The innermost FSDP2 module on the path to parameter ``name``."""
    module, owner = root, root if fsdp_module and isinstance(root, fsdp_module) else None
    for part in name.split(".")[:-1]:
        module = module.get_submodule(part)
        if fsdp_module is not None and isinstance(module, fsdp_module):
            owner = module
    if owner is None:
        raise RuntimeError(
            f"revcompile: parameter {name} is a DTensor but no module on its path is an FSDP2 module "
            "(fully_shard). Reversible segments gather sharded parameters only through the hooks of "
            "FSDP2 modules; shard with torch.distributed.fsdp.fully_shard."
        )
    return owner

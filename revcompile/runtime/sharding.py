"""FSDP2 modules inside a reversible segment, gathered one block at a time.

A segment reads its blocks' parameters by name instead of calling the block modules, so
FSDP2's forward hooks on a ``fully_shard``-ed block never run and its parameters would
arrive sharded. ``BlockSharding`` does what those hooks would, through FSDP2's public
``FSDPModule.unshard()`` / ``reshard()``: the forward gathers block ``i``'s modules for
block ``i``'s two steps only, and the backward gathers them again for block ``i``'s
recompute and gradient step and reshards after it. While a module is gathered, its
registered parameters are FSDP's unsharded parameters -- the same tensor objects every
time -- so the segment's gates take those as inputs, autograd accumulates each block's
gradients into their ``.grad``, and FSDP's post-backward (run by the root module's
end-of-backward callback) reduce-scatters them into the sharded parameters' gradients.
That callback is queued by the root's own hooks, so the converted model itself must be
``fully_shard``-ed as well (the usual recipe: each block, then the root).
"""

from __future__ import annotations

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

    def require_root(self) -> None:
        """Refuse a backward FSDP would not finish: only a root FSDP module reduce-scatters
        gradients that no module's own hooks produced."""
        fsdp_module = _fsdp_module_class()
        if not isinstance(self.segment.root, fsdp_module):
            raise RuntimeError(
                f"revcompile: blocks of {self.segment.__name__} are sharded by FSDP2 but the converted model "
                "is not. Shard it too, after its blocks -- for block in ...: fully_shard(block); then "
                "fully_shard(converted) -- so that FSDP reduce-scatters the blocks' gradients at the end of "
                "backward (reversible segments read block parameters directly, so the blocks' own FSDP "
                "hooks do not run)."
            )

    def gather(self, i: int, params: list | None = None) -> None:
        """Unshard block ``i``'s modules; with ``params``, put their unsharded parameters there."""
        for module in self.owners[i]:
            module.unshard()
        if params is not None:
            live = self.segment.parameters()
            for k in self.segment.block_parameters[i]:
                params[k] = live[k]

    def release(self, i: int, keep: int | None = None) -> None:
        """Reshard block ``i``'s modules, except those block ``keep`` also needs."""
        kept = {id(m) for m in self.owners[keep]} if keep is not None else set()
        for module in self.owners[i]:
            if id(module) not in kept:
                module.reshard()

    def forward_steps(self, params: list | None, reshard: bool):
        """A ``before_step(j, prev, cur)`` callback gathering each block for its two steps."""

        def before_step(j: int, prev, cur) -> None:
            if j % 2:
                return
            i = j // 2
            self.gather(i, params)
            if reshard and i > 0:
                self.release(i - 1, keep=i)

        return before_step


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
            "(fully_shard). Reversible segments gather sharded parameters only through FSDP2's "
            "unshard()/reshard(); shard with torch.distributed.fsdp.fully_shard."
        )
    return owner

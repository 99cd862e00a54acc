"""A checkpointed region bound to a model: the blocks as the original computes them, recomputed in backward.

What a ``checkpointed_region_<i>`` call in a converted graph executes when the memory plan
(``revcompile.planner``) checkpoints a run of blocks instead of storing or coupling them.
It is ``torch.utils.checkpoint`` (non-reentrant) around the region's graph: the forward
keeps the region's inputs only, the backward runs the region again with the random state
and autocast of the forward, so gradients are exactly those of the stored region.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from revcompile.passes.checkpoint import RegionProgram
from revcompile.runtime.segment import bind_graph

__all__ = ["CheckpointedRegion"]


class CheckpointedRegion:
    """Calls the region's graph under ``torch.utils.checkpoint`` when gradients are recorded."""

    def __init__(self, program: RegionProgram, root: nn.Module):
        self.name = f"checkpointed_region_{program.index}"
        self.blocks = program.blocks
        self.module = bind_graph(program.graph, root, self.name)

    @property
    def __name__(self) -> str:  # fx prints calls by their target's name
        return self.name

    def __call__(self, *inputs):
        if not torch.is_grad_enabled():
            return self.module(*inputs)
        return checkpoint(self.module, *inputs, use_reentrant=False)

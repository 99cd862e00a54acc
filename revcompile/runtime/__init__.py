"""Running converted models: reversible segments, their backward steps, replay and auto-selection.

    segment   ReversibleSegment: one segment bound to a model, the backward modes
    tape      the autograd nodes of a reversible call: one per block, releasing its gradients
    steps     the math of a backward step: rebuild a branch, invert its coupling step, pull
    replay    generator states and autocast, so a recompute sees what the forward saw
    auto      "auto": time the one- and two-stream backward and keep the faster

The coupling a segment computes (its forward, inverse and gradient steps) is defined once,
in ``revcompile.passes.couplings``; the executor of backward programs is
``revcompile.executor``.
"""

from revcompile.passes.couplings import STREAM_PRECISIONS, StreamArithmetic, stream_dtype
from revcompile.runtime.segment import BACKWARD_MODES, ReversibleSegment, RuntimeSettings, bind_graph
from revcompile.runtime.steps import ReconstructionDrift

__all__ = [
    "BACKWARD_MODES",
    "STREAM_PRECISIONS",
    "StreamArithmetic",
    "stream_dtype",
    "ReconstructionDrift",
    "RuntimeSettings",
    "ReversibleSegment",
    "bind_graph",
]

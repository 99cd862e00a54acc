"""Passes are pure: each returns its result and leaves the caller's GraphModule as it was."""

from __future__ import annotations

import torch
import torch.fx as fx

import tests.blocks as B
from revcompile.passes.couplings import DualResidual, RevViT
from revcompile.passes.detect import find_reversible_blocks
from revcompile.passes.memory import predict_activation_memory
from revcompile.passes.normalize import normalize_graph
from revcompile.passes.residuals import find_residuals
from revcompile.passes.rewrite import rewrite_reversible
from revcompile.passes.schedule import schedule_backward


def _pipeline_graphs():
    model = B.TappedStack(depth=4)
    traced = fx.symbolic_trace(model)
    normalized = normalize_graph(traced).graph_module
    return model, normalized


def test_detection_rewrite_schedule_and_memory_leave_their_input_graph_unchanged():
    model, gm = _pipeline_graphs()
    code = gm.code
    find_residuals(gm)
    assert gm.code == code
    plan = find_reversible_blocks(gm)
    assert gm.code == code
    result = rewrite_reversible(gm, plan)
    assert gm.code == code and result.graph_module.code != code
    rewritten = result.graph_module.code
    for coupling in (RevViT(), DualResidual(2.0**-4)):
        for program in result.segments:
            schedule_backward(program, streams=2, coupling=coupling)
        predict_activation_memory(
            model, gm.graph, result.graph_module.graph, plan, result.segments,
            lambda batch: (B.tokens(batch=batch),), (2, 4), coupling=coupling, streams="exact",
        )
    assert gm.code == code and result.graph_module.code == rewritten

"""Detection: which residuals are found, paired, chained -- and why others are left alone."""

from __future__ import annotations

import torch
import torch.fx as fx

from passes.detect import find_reversible_blocks
from passes.normalize import normalize_graph
from revcompile.frontend import _propagate_fake
from tests import blocks as B


def plan_of(model, *inputs):
    gm = fx.symbolic_trace(model)
    _propagate_fake(gm, list(inputs))
    normalize_graph(gm)
    return find_reversible_blocks(gm)


def test_pre_norm_blocks_chain_into_one_segment():
    plan = plan_of(B.Stack(depth=4), B.tokens())
    assert len(plan.segments) == 1
    assert [b.name for b in plan.blocks] == [f"blocks.{i}" for i in range(4)]
    assert plan.skipped == ()
    block = plan.blocks[0]
    assert block.f.kind == "attention" and block.g.kind == "mlp"
    assert "blocks.0.attn.qkv.weight" in block.f.parameters
    assert "blocks.0.mlp.0.weight" in block.g.parameters
    assert not set(block.f.parameters) & set(block.g.parameters)
    assert "head" in plan.segments[0].ends_because


def test_hidden_state_tap_ends_the_segment():
    plan = plan_of(B.TappedStack(depth=4), B.tokens())
    assert [len(s.blocks) for s in plan.segments] == [2, 2]
    assert "model output" in plan.segments[0].ends_because


def test_parallel_residual_is_reported_not_converted():
    plan = plan_of(B.sequential(B.ParallelBlock(), B.ParallelBlock()), B.tokens())
    assert plan.blocks == ()
    reasons = " ".join(s.reason for s in plan.skipped)
    assert "parallel-residual" in reasons


def test_post_norm_residuals_are_reported():
    plan = plan_of(B.sequential(B.PostNormBlock(), B.PostNormBlock()), B.tokens())
    assert plan.blocks == ()
    kinds = {s.kind for s in plan.skipped}
    assert {"attention", "mlp"} <= kinds
    assert all(s.reason for s in plan.skipped)


def test_cross_attention_block_keeps_self_attention_unpaired():
    class Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([B.DecoderBlock(), B.DecoderBlock()])

        def forward(self, x, memory):
            for layer in self.layers:
                x = layer(x, memory)
            return x

    plan = plan_of(Decoder(), B.tokens(), B.tokens(length=7))
    # cross-attention + MLP pair up; the self-attention before each is left with a reason
    assert len(plan.blocks) == 2
    assert all("cross-attention" in s.reason for s in plan.skipped if s.kind == "attention")
    # what the cross-attention reads from the memory is computed outside, once: side inputs
    assert all(len(b.f.side_inputs) == 2 for b in plan.blocks)


def test_in_place_write_to_the_stream_is_refused():
    plan = plan_of(B.sequential(B.InplaceStreamBlock()), B.tokens())
    assert plan.blocks == ()
    assert any("in-place" in s.reason and "stream" in s.reason for s in plan.skipped)


def test_batchnorm_in_a_branch_is_refused():
    plan = plan_of(B.sequential(B.BatchNormMlpBlock()), B.tokens())
    assert plan.blocks == ()
    assert any("running statistics" in s.reason for s in plan.skipped)


def test_casts_on_the_stream_move_into_the_next_branch():
    plan = plan_of(B.sequential(B.CastingBlock(), B.CastingBlock(), B.CastingBlock()), B.tokens())
    assert len(plan.blocks) == 3 and len(plan.segments) == 1
    second = plan.blocks[1]
    first_f_node = second.f.nodes[0]
    assert first_f_node.startswith("to")  # the cast before block 1's attention is inside F


def test_residuals_inside_branches_are_not_reported():
    class TanhGelu(torch.nn.Module):  # x + 0.044715 x^3 inside the MLP is residual-shaped
        def forward(self, x):
            return 0.5 * x * (1 + torch.tanh(0.797 * (x + 0.044715 * x**3)))

    block = B.PreNormBlock()
    block.mlp[1] = TanhGelu()
    plan = plan_of(B.sequential(block), B.tokens())
    assert len(plan.blocks) == 1
    assert plan.residuals_found == 2 and plan.skipped == ()

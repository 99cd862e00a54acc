"""Detection: which residuals are found, paired, chained -- and why others are left alone."""

from __future__ import annotations

import torch
import torch.fx as fx

from revcompile.passes.detect import find_reversible_blocks
from revcompile.passes.normalize import normalize_graph
from revcompile.frontend import _propagate_fake
from tests import blocks as B


def plan_of(model, *inputs, post_norm="skip"):
    gm = fx.symbolic_trace(model)
    _propagate_fake(gm, list(inputs))
    return find_reversible_blocks(normalize_graph(gm).graph_module, post_norm=post_norm)


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


def test_parallel_residual_becomes_one_block_with_two_parts():
    plan = plan_of(B.sequential(B.ParallelBlock(), B.ParallelBlock()), B.tokens())
    assert [b.form for b in plan.blocks] == ["parallel", "parallel"]
    assert len(plan.segments) == 1 and plan.skipped == ()
    block = plan.blocks[0]
    assert block.f.kind == "attention" and block.g.kind == "mlp"
    # the shared norm reads the stream in both parts: each branch computes it for itself
    norm = "blocks.0.norm.weight"
    assert norm in block.f.parameters and norm in block.g.parameters
    assert not {p for p in block.f.parameters if "attn" in p} & set(block.g.parameters)


def test_two_mlp_branches_on_one_stream_are_not_a_parallel_block():
    class TwoMlps(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = B.Mlp(), B.Mlp()

        def forward(self, x):
            return x + self.a(x) + self.b(x)

    plan = plan_of(B.sequential(TwoMlps()), B.tokens())
    assert plan.blocks == () and plan.skipped


def test_post_norm_is_skipped_with_how_to_opt_in():
    plan = plan_of(B.sequential(B.PostNormBlock(), B.PostNormBlock()), B.tokens())
    assert plan.blocks == ()
    assert plan.skipped and all("post_norm='move'" in s.reason for s in plan.skipped)


def test_post_norm_converts_when_the_norms_may_move():
    plan = plan_of(B.sequential(B.PostNormBlock(), B.PostNormBlock()), B.tokens(), post_norm="move")
    assert len(plan.blocks) == 2 and len(plan.segments) == 1
    first, second = plan.blocks
    assert first.post_norm_moved and second.post_norm_moved
    # norm1 (after the attention add) now starts the MLP branch, norm2 of block 0 the next attention
    assert "blocks.0.norm1.weight" in first.g.parameters
    assert "blocks.0.norm2.weight" in second.f.parameters
    # the last block's norm2 stays after the segment, applied to its output
    assert "norm2" in plan.segments[0].ends_because


def test_self_and_cross_attention_form_one_decoder_block():
    class Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([B.DecoderBlock(), B.DecoderBlock()])

        def forward(self, x, memory):
            for layer in self.layers:
                x = layer(x, memory)
            return x

    plan = plan_of(Decoder(), B.tokens(), B.tokens(length=7))
    assert [b.form for b in plan.blocks] == ["decoder", "decoder"]
    assert len(plan.segments) == 1 and plan.skipped == ()
    block = plan.blocks[0]
    assert len(block.f.outputs) == 2  # F = self-attention + cross-attention
    # what the cross-attention reads from the memory is computed outside, once: side inputs
    assert len(block.f.side_inputs) == 2


class _FlattenForMlp(B.PreNormBlock):
    """timm Swin: the stream is (B, H, W, C); the MLP residual runs on (B, H*W, C)."""

    def forward(self, x):
        b, h, w, c = x.shape
        x = x + self.attn(self.norm1(x).reshape(b, h * w, c)).reshape(b, h, w, c)
        x = x.reshape(b, -1, c)
        x = x + self.mlp(self.norm2(x))
        return x.reshape(b, h, w, c)


def test_layout_reshapes_on_the_stream_keep_blocks_together():
    grid = torch.randn(2, 3, 4, B.DIM)
    plan = plan_of(B.sequential(_FlattenForMlp(), _FlattenForMlp(), _FlattenForMlp()), grid)
    assert len(plan.blocks) == 3 and len(plan.segments) == 1


def test_a_transformed_skip_path_is_a_stage_transition():
    class Transition(B.PreNormBlock):
        def __init__(self):
            super().__init__()
            self.pool = torch.nn.Linear(B.DIM, B.DIM)

        def forward(self, x):
            x = self.pool(x) + self.attn(self.norm1(x))  # the skip is projected
            return x + self.mlp(self.norm2(x))

    plan = plan_of(B.sequential(B.PreNormBlock(), Transition(), B.PreNormBlock(), B.PreNormBlock()), B.tokens())
    assert [len(s.blocks) for s in plan.segments] == [1, 2]
    (reason,) = [s.reason for s in plan.skipped]
    assert "stage transition" in reason


def test_fx_constants_do_not_leak_into_the_user_model():
    import revcompile

    class WithConstant(B.Stack):
        def forward(self, x):
            return super().forward(x) * torch.tensor([2.0])

    model = WithConstant()
    before = set(model.__dict__)
    converted = revcompile.convert(model, B.tokens())
    assert set(model.__dict__) == before
    converted(B.tokens())


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


def test_writes_into_module_state_are_found_from_op_schemas_on_fx():
    # F.batch_norm (running stats in its 2nd/3rd arguments, no schema of its own), the aten
    # op whose schema marks its 4th and 5th arguments written, and a method writing a buffer
    for block in (B.FunctionalBatchNormBlock(), B.AtenBatchNormBlock(), B.BufferCountingBlock()):
        plan = plan_of(B.sequential(block), B.tokens())
        assert plan.blocks == (), type(block).__name__
        reasons = " ".join(s.reason for s in plan.skipped)
        assert "module state" in reasons and "blocks.0." in reasons, reasons


def test_batchnorm_branch_on_the_export_path_is_refused_and_buffers_match_stored_backward():
    import copy

    import revcompile

    torch.manual_seed(0)
    model = B.sequential(B.PreNormBlock(), B.BatchNormMlpBlock(), B.PreNormBlock()).double()
    x = B.tokens(dtype=torch.float64)
    steps = {}
    for mode in ("reversible", "autograd"):
        copy_of = copy.deepcopy(model)
        converted = revcompile.convert(copy_of, x, tracer="export")
        plan = revcompile.explain(converted)
        assert [b.name for b in plan.blocks] == ["blocks.0", "blocks.2"], str(plan)
        assert any("blocks.1.bn.running_mean" in s.reason and "twice" in s.reason for s in plan.skipped), str(plan)
        revcompile.set_backward(converted, mode)
        optimizer = torch.optim.SGD(converted.parameters(), lr=0.1)
        converted(x).square().mean().backward()
        optimizer.step()
        steps[mode] = dict(copy_of.named_buffers())
    assert steps["reversible"].keys() == steps["autograd"].keys() and steps["autograd"]
    for name, value in steps["autograd"].items():
        assert torch.equal(steps["reversible"][name], value), name
    assert int(steps["reversible"]["blocks.1.bn.num_batches_tracked"]) == 1

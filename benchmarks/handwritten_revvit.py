"""A hand-written Rev-ViT of the reference ViT: the yardstick for the converted step's overhead.

It computes what ``revcompile.convert(reference_vit, coupling="revvit", fusion="mean")``
computes -- both streams start as the blocks' input, ``Y1 = X1 + F(X2)``, ``Y2 = X2 +
G(Y1)`` per block (F = norm1, attention, drop-path; G = norm2, MLP, drop-path), the output
is ``(Y1 + Y2) / 2`` -- written the way the Rev-ViT paper's code is: one autograd Function
over all blocks whose forward keeps only the last two streams, and whose backward walks the
blocks backwards, recomputes each branch with a graph, subtracts it to reconstruct the
block's inputs and lets autograd accumulate the parameters' gradients into ``.grad``. The
streams stay in the model's precision and nothing replays random masks, so it is only the
same function with dropout and drop-path off (the benchmark builds it so). It shares the
original model's parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from revcompile.reference import ReferenceViT

__all__ = ["HandwrittenRevViT", "unpack_qkv"]


def _attention_branch(block, x):
    return block.drop_path1(block.attn(block.norm1(x)))


def _mlp_branch(block, x):
    return block.drop_path2(block.mlp(block.norm2(x)))


class _ReversibleBlocks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, blocks):
        x1 = x2 = x.detach()
        for block in blocks:
            y1 = x1 + _attention_branch(block, x2)
            y2 = x2 + _mlp_branch(block, y1)
            x1, x2 = y1, y2
        ctx.blocks = blocks
        ctx.save_for_backward(x1, x2)
        return (x1 + x2) / 2

    @staticmethod
    def backward(ctx, grad):
        y1, y2 = ctx.saved_tensors
        d_y1 = d_y2 = grad / 2
        for block in reversed(ctx.blocks):
            with torch.enable_grad():
                leaf = y1.detach().requires_grad_(True)
                g = _mlp_branch(block, leaf)
                torch.autograd.backward(g, d_y2)
            x2 = y2 - g.detach()
            d_y1 = d_y1 + leaf.grad
            with torch.enable_grad():
                leaf = x2.detach().requires_grad_(True)
                f = _attention_branch(block, leaf)
                torch.autograd.backward(f, d_y1)
            x1 = y1 - f.detach()
            d_y2 = d_y2 + leaf.grad
            y1, y2 = x1, x2
        return d_y1 + d_y2, None


class HandwrittenRevViT(nn.Module):
    """``original``'s layers (shared, not copied) around a hand-written reversible block stack."""

    def __init__(self, original: ReferenceViT):
        super().__init__()
        self.original = original

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        m = self.original
        x = m.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([m.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = m.pos_drop(x + m.pos_embed)
        x = _ReversibleBlocks.apply(x, list(m.blocks))
        return m.head(m.norm(x)[:, 0])


class _UnpackingAttention(nn.Module):
    """The reference attention written ``q, k, v = qkv.reshape(...).permute(...)``: one unbind
    in eager code, one index op per element in an fx trace (until normalisation)."""

    def __init__(self, attention):
        super().__init__()
        self.qkv, self.proj, self.attn_drop, self.proj_drop = attention.qkv, attention.proj, attention.attn_drop, attention.proj_drop
        self.heads, self.scale = attention.heads, attention.scale

    def forward(self, x):
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        attn = self.attn_drop(((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1))
        return self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(batch, tokens, dim)))


def unpack_qkv(model: ReferenceViT) -> ReferenceViT:
    """``model`` with every attention unpacking its q, k, v (same parameters, same function)."""
    for block in model.blocks:
        block.attn = _UnpackingAttention(block.attn)
    return model

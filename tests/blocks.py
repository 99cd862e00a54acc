"""Tiny transformer-shaped modules for pass-level tests, each one structural situation."""

from __future__ import annotations

import torch
from torch import nn

DIM = 16


class Attention(nn.Module):
    def __init__(self, dim=DIM):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, bias=None):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = q @ k.transpose(-2, -1)
        if bias is not None:
            scores = scores + bias
        return self.proj(torch.softmax(scores, dim=-1) @ v)


class Mlp(nn.Sequential):
    def __init__(self, dim=DIM):
        super().__init__(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))


class PreNormBlock(nn.Module):
    def __init__(self, dim=DIM):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = nn.LayerNorm(dim), Attention(dim), nn.LayerNorm(dim), Mlp(dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Stack(nn.Module):
    """``depth`` pre-norm blocks between an input projection and a head."""

    def __init__(self, depth=3, dim=DIM):
        super().__init__()
        self.embed = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList(PreNormBlock(dim) for _ in range(depth))
        self.head = nn.Linear(dim, 4)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class TappedStack(Stack):
    """Returns the hidden state after block 1 as well (a hidden-state tap)."""

    def forward(self, x):
        x = self.embed(x)
        taps = []
        for block in self.blocks:
            x = block(x)
            taps.append(x)
        return self.head(x), taps[1]


class ParallelBlock(nn.Module):
    """GPT-NeoX style: ``x + attn(ln(x)) + mlp(ln(x))`` with one shared norm."""

    def __init__(self, dim=DIM):
        super().__init__()
        self.norm, self.attn, self.mlp = nn.LayerNorm(dim), Attention(dim), Mlp(dim)

    def forward(self, x):
        h = self.norm(x)
        return x + self.attn(h) + self.mlp(h)


class PostNormBlock(nn.Module):
    """BERT style: ``norm(x + f(x))``."""

    def __init__(self, dim=DIM):
        super().__init__()
        self.attn, self.norm1, self.mlp, self.norm2 = Attention(dim), nn.LayerNorm(dim), Mlp(dim), nn.LayerNorm(dim)

    def forward(self, x):
        x = self.norm1(x + self.attn(x))
        return self.norm2(x + self.mlp(x))


class DecoderBlock(nn.Module):
    """Self-attention, cross-attention on a memory, MLP: three residuals."""

    def __init__(self, dim=DIM):
        super().__init__()
        self.n1, self.self_attn, self.n2, self.cross, self.n3, self.mlp = (
            nn.LayerNorm(dim), Attention(dim), nn.LayerNorm(dim), nn.Linear(dim, dim), nn.LayerNorm(dim), Mlp(dim),
        )

    def forward(self, x, memory):
        x = x + self.self_attn(self.n1(x))
        q = self.n2(x)
        x = x + torch.softmax(q @ memory.transpose(-2, -1), dim=-1) @ self.cross(memory)
        return x + self.mlp(self.n3(x))


class InplaceStreamBlock(PreNormBlock):
    """An MLP branch that scales the stream in place: must be refused."""

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        h = self.mlp(self.norm2(x))
        x.mul_(0.5)
        return x + h


class BatchNormMlpBlock(PreNormBlock):
    def __init__(self, dim=DIM):
        super().__init__(dim)
        self.bn = nn.BatchNorm1d(dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.bn(self.mlp(self.norm2(x)).transpose(1, 2)).transpose(1, 2)


class CastingBlock(PreNormBlock):
    """Llama style: the norm casts the stream to float32 first (a no-op in float32)."""

    def forward(self, x):
        x = x.to(torch.float32)
        x = x + self.attn(self.norm1(x))
        x = x.to(torch.float32)
        return x + self.mlp(self.norm2(x))


class PlainPositionStack(Stack):
    """A position table kept as a plain tensor attribute (neither parameter nor buffer),
    as vit-pytorch's SimpleViT does, and a per-block plain tensor attribute too."""

    def __init__(self, depth=2, dim=DIM, length=5):
        super().__init__(depth, dim)
        self.pos_embedding = torch.randn(1, length, dim)
        for block in self.blocks:
            block.attn.scale = torch.tensor(0.5)

    def forward(self, x):
        x = self.embed(x) + self.pos_embedding
        for block in self.blocks:
            x = x + block.attn(block.norm1(x)) * block.attn.scale
            x = x + block.mlp(block.norm2(x))
        return self.head(x)


class InplaceParallelBlock(nn.Module):
    """GPT-J / CodeGen style parallel block written with an in-place sum:
    ``mlp_out += attn_out; x + mlp_out``."""

    def __init__(self, dim=DIM):
        super().__init__()
        self.norm, self.attn = nn.LayerNorm(dim), Attention(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim), nn.Dropout(0.1))

    def forward(self, x):
        h = self.norm(x)
        attn_out = self.attn(h)
        mlp_out = self.mlp(h)
        mlp_out += attn_out  # fx records `+` (a Proxy has no `+=`); torch.export records aten.add_
        return x + mlp_out


class InplaceMethodParallelBlock(InplaceParallelBlock):
    """The same with the method spelling, which fx records as an in-place ``add_``."""

    def forward(self, x):
        h = self.norm(x)
        attn_out = self.attn(h)
        mlp_out = self.mlp(h)
        mlp_out.add_(attn_out)
        return x + mlp_out


class FunctionalBatchNormBlock(PreNormBlock):
    """BatchNorm written functionally on buffers (fx records a call_function)."""

    def __init__(self, dim=DIM):
        super().__init__(dim)
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        h = self.mlp(self.norm2(x)).transpose(1, 2)
        h = nn.functional.batch_norm(h, self.running_mean, self.running_var, training=True)
        return x + h.transpose(1, 2)


class AtenBatchNormBlock(FunctionalBatchNormBlock):
    """Calls the aten op whose schema marks its 4th and 5th arguments as written."""

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        h = self.mlp(self.norm2(x)).transpose(1, 2)
        h = torch.ops.aten._native_batch_norm_legit.default(h, None, None, self.running_mean, self.running_var, True, 0.1, 1e-5)[0]
        return x + h.transpose(1, 2)


class BufferCountingBlock(PreNormBlock):
    """Accumulates a statistic of its branch in a buffer, in place (fx: a call_method ``add_``)."""

    def __init__(self, dim=DIM):
        super().__init__(dim)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        h = self.mlp(self.norm2(x))
        self.calls.add_(h.detach().mean())
        return x + h


def sequential(*blocks) -> nn.Module:
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(blocks)

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    return Model()


def tokens(batch=2, length=5, dim=DIM, dtype=torch.float32):
    return torch.randn(batch, length, dim, dtype=dtype)

"""Hand-written transformers using constructs that library code uses and the zoo's
library builders do not: plain tensor attributes, one block's weights shared across
layers, layers applied in a Python loop, conditioning side inputs (a diffusion timestep).

Each builder returns ``(model, args, kwargs, layers)`` like tests/models.py: train mode,
dropout on, one example call, and the number of residual layers a full conversion finds.
"""

from __future__ import annotations

import math

import torch
from torch import nn

BATCH, TOKENS, WIDTH, HEADS = 2, 10, 32, 2


class Attention(nn.Module):
    def __init__(self, dim=WIDTH, heads=HEADS, dropout=0.1):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        weights = self.dropout((q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)).softmax(-1))
        return self.out((weights @ v).transpose(1, 2).reshape(b, n, d))


def feed_forward(dim=WIDTH, dropout=0.1):
    return nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim), nn.Dropout(dropout))


class PreNormBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(WIDTH), Attention()
        self.norm2, self.mlp = nn.LayerNorm(WIDTH), feed_forward()

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PlainTensorPositions(nn.Module):
    """Positions kept as a plain tensor attribute (neither parameter nor buffer), as
    vit-pytorch's SimpleViT keeps its sine-cosine table: ``self.pos_embedding = table``."""

    def __init__(self, depth=3):
        super().__init__()
        self.embed = nn.Linear(WIDTH, WIDTH)
        position = torch.arange(TOKENS, dtype=torch.float32)[:, None]
        frequency = torch.exp(torch.arange(0, WIDTH, 2, dtype=torch.float32) * (-math.log(1e4) / WIDTH))
        table = torch.zeros(TOKENS, WIDTH)
        table[:, 0::2], table[:, 1::2] = torch.sin(position * frequency), torch.cos(position * frequency)
        self.pos_embedding = table
        self.blocks = nn.Sequential(*[PreNormBlock() for _ in range(depth)])
        self.head = nn.Linear(WIDTH, 5)

    def forward(self, x):
        x = self.embed(x) + self.pos_embedding.to(x)  # SimpleViT's spelling
        return self.head(self.blocks(x).mean(1))


class SharedBlockLoop(nn.Module):
    """ALBERT-style: one block's weights applied ``depth`` times in a Python loop."""

    def __init__(self, depth=4):
        super().__init__()
        self.depth = depth
        self.embed = nn.Linear(WIDTH, WIDTH)
        self.block = PreNormBlock()
        self.head = nn.Linear(WIDTH, 5)

    def forward(self, x):
        x = self.embed(x)
        for _ in range(self.depth):
            x = self.block(x)
        return self.head(x)


class SharedGroupsLoop(nn.Module):
    """Two blocks, each shared across ``repeats`` layers (ALBERT's layer groups) and
    interleaved: A B A B ..."""

    def __init__(self, repeats=2):
        super().__init__()
        self.repeats = repeats
        self.groups = nn.ModuleList([PreNormBlock(), PreNormBlock()])

    def forward(self, x):
        for _ in range(self.repeats):
            for block in self.groups:
                x = block(x)
        return x


class LoopOverPairs(nn.Module):
    """Branches kept as (attention, feed-forward) pairs in a ModuleList of ModuleLists and
    applied in a Python loop with in-place residual adds, as vit-pytorch and x-transformers do."""

    def __init__(self, depth=3):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([nn.Sequential(nn.LayerNorm(WIDTH), Attention()), nn.Sequential(nn.LayerNorm(WIDTH), feed_forward())])
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(WIDTH)

    def forward(self, x):
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return self.norm(x)


def timestep_embedding(t, dim=WIDTH):
    half = dim // 2
    frequency = torch.exp(-math.log(1e4) * torch.arange(half, dtype=t.dtype, device=t.device) / half)
    angles = t[:, None] * frequency[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class AdaLNBlock(nn.Module):
    """DiT block: shift, scale and gate of both branches come from the conditioning vector."""

    def __init__(self):
        super().__init__()
        self.norm1 = nn.LayerNorm(WIDTH, elementwise_affine=False)
        self.attn = Attention()
        self.norm2 = nn.LayerNorm(WIDTH, elementwise_affine=False)
        self.mlp = feed_forward()
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(WIDTH, 6 * WIDTH))

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c)[:, None].chunk(6, dim=-1)
        x = x + gate1 * self.attn(self.norm1(x) * (1 + scale1) + shift1)
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class DiT(nn.Module):
    """Diffusion transformer: tokens plus a timestep and a class label as side inputs."""

    def __init__(self, depth=3, classes=4):
        super().__init__()
        self.embed = nn.Linear(WIDTH, WIDTH)
        self.time = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.SiLU(), nn.Linear(WIDTH, WIDTH))
        self.label = nn.Embedding(classes, WIDTH)
        self.blocks = nn.ModuleList(AdaLNBlock() for _ in range(depth))
        self.out = nn.Linear(WIDTH, WIDTH)

    def forward(self, x, t, y):
        c = self.time(timestep_embedding(t)) + self.label(y)
        x = self.embed(x)
        for block in self.blocks:
            x = block(x, c)
        return self.out(x)


def _tokens():
    return torch.randn(BATCH, TOKENS, WIDTH)


def plain_tensor_positions(depth=3):
    return PlainTensorPositions(depth).train(), (_tokens(),), {}, depth


def shared_block_loop(depth=4):
    return SharedBlockLoop(depth).train(), (_tokens(),), {}, depth


def shared_groups_loop(repeats=2):
    return SharedGroupsLoop(repeats).train(), (_tokens(),), {}, 2 * repeats


def loop_over_pairs(depth=3):
    return LoopOverPairs(depth).train(), (_tokens(),), {}, depth


def dit(depth=3):
    t = torch.rand(BATCH) * 1000
    return DiT(depth).train(), (_tokens(), t, torch.randint(0, 4, (BATCH,))), {}, depth

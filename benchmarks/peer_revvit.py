"""The hand-written Rev-ViT's function built with two reversible-network libraries: revlib and memcnn.

Both compute what ``handwritten_revvit.HandwrittenRevViT`` computes -- both streams start as
the blocks' input, ``Y1 = X1 + F(X2)``, ``Y2 = X2 + G(Y1)`` per block (F = norm1, attention,
drop-path; G = norm2, MLP, drop-path), the output is ``(Y1 + Y2) / 2`` -- with each
library's own reversible wrapper doing the forward without a graph and the backward by
reconstruction:

* revlib (``pip install revlib``): ``ReversibleSequential(F0, G0, F1, G1, ...)``, the
  additive coupling ``y0 = x0 + f(x1)`` then a swap of the streams, which is the same
  recurrence; ``split_dim=None`` would replicate the input into both streams but its output
  concatenates along ``dim=None``, so the input goes in as ``[x, x]`` split along the
  feature dimension instead.
* memcnn (``pip install memcnn``): one ``InvertibleModuleWrapper(AdditiveCoupling(F, G))``
  per block on ``[X1, X2]`` concatenated along the features, with ``keep_input=False`` (the
  wrapper frees each block's input and reconstructs it in backward).

They share the original model's parameters, replay no random masks of their own beyond the
CPU generator's state, and are compared with dropout and drop-path off, as the hand-written
one is. ``peer_models`` builds those whose library imports; the others come back with the
reason. pyproject's ``peers`` extra installs both.
"""

from __future__ import annotations

import torch
from torch import nn

from revcompile.reference import ReferenceViT

__all__ = ["PEERS", "peer_models"]

PEERS = ("revlib", "memcnn")


class _Branch(nn.Module):
    """One residual branch of a reference block as a module of its own (parameters shared)."""

    def __init__(self, norm: nn.Module, body: nn.Module, drop_path: nn.Module):
        super().__init__()
        self.norm, self.body, self.drop_path = norm, body, drop_path

    def forward(self, x: torch.Tensor, *unused) -> torch.Tensor:
        return self.drop_path(self.body(self.norm(x)))


def _branches(original: ReferenceViT) -> list[tuple[_Branch, _Branch]]:
    return [(_Branch(b.norm1, b.attn, b.drop_path1), _Branch(b.norm2, b.mlp, b.drop_path2)) for b in original.blocks]


class _LibraryRevViT(nn.Module):
    """``original``'s embedding, norm and head around a library's reversible block stack on ``[x, x]``."""

    def __init__(self, original: ReferenceViT, stack: nn.Module):
        super().__init__()
        self.original, self.stack = original, stack

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        m = self.original
        x = m.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([m.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = m.pos_drop(x + m.pos_embed)
        y1, y2 = self.stack(torch.cat([x, x], dim=-1)).chunk(2, dim=-1)
        return m.head(m.norm((y1 + y2) / 2)[:, 0])


def revlib_revvit(original: ReferenceViT) -> nn.Module:
    import revlib

    modules = [branch for pair in _branches(original) for branch in pair]
    return _LibraryRevViT(original, revlib.ReversibleSequential(*modules, split_dim=-1))


def memcnn_revvit(original: ReferenceViT) -> nn.Module:
    import memcnn

    stack = nn.Sequential(*(
        memcnn.InvertibleModuleWrapper(memcnn.AdditiveCoupling(f, g, split_dim=-1), keep_input=False, keep_input_inverse=False)
        for f, g in _branches(original)
    ))
    return _LibraryRevViT(original, stack)


_BUILDERS = {"revlib": revlib_revvit, "memcnn": memcnn_revvit}


def peer_models(original: ReferenceViT, images: torch.Tensor) -> dict[str, nn.Module | str]:
    """Each peer's Rev-ViT of ``original``, or why it is missing: not installed, or the error one
    training step on ``images`` raises (the step's gradients are cleared again)."""
    built: dict[str, nn.Module | str] = {}
    for name in PEERS:
        try:
            model = _BUILDERS[name](original)
        except ImportError as err:
            built[name] = f"not installed ({err}; pip install -e '.[peers]')"
            continue
        try:
            model(images).float().sum().backward()
        except Exception as err:  # noqa: BLE001 -- the row says what failed, whatever it is
            first_line = str(err).splitlines()[0] if str(err) else ""
            built[name] = f"fails with torch {torch.__version__}: {type(err).__name__}: {first_line}"
        else:
            built[name] = model
        original.zero_grad(set_to_none=True)
    return built

"""A converted model trains: the loss goes down under an ordinary optimizer loop."""

from __future__ import annotations

import torch

import revcompile
from revcompile.reference import reference_vit
from tests.models import hf_gpt2


def test_vision_model_learns_a_synthetic_task():
    torch.manual_seed(0)
    model = reference_vit(depth=4, dim=32, heads=2, num_classes=4, drop=0.0, attn_drop=0.0, drop_path=0.0)
    images = torch.randn(32, 3, 32, 32)
    labels = (images.mean(dim=(1, 2, 3)) > 0).long() + 2 * (images[:, 0].mean(dim=(1, 2)) > 0).long()
    converted = revcompile.convert(model, images[:2])
    optimizer = torch.optim.AdamW(converted.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = torch.nn.functional.cross_entropy(converted(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_language_model_learns_a_repeating_sequence():
    torch.manual_seed(0)
    model, (ids,), _, _ = hf_gpt2(depth=2)
    head = torch.nn.Linear(model.config.n_embd, 100)
    pattern = torch.arange(16).repeat(4, 2) % 10  # (4, 32) sequences of a cycle
    converted = revcompile.convert(model, pattern)
    optimizer = torch.optim.AdamW(list(converted.parameters()) + list(head.parameters()), lr=3e-3)
    losses = []
    for _ in range(30):
        hidden = converted(pattern[:, :-1]).last_hidden_state
        loss = torch.nn.functional.cross_entropy(head(hidden).flatten(0, 1), pattern[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses

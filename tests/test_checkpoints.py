"""Checkpoints: converted models save, load and resume like the originals."""

from __future__ import annotations

import torch

import revcompile
from revcompile.reference import example_inputs, reference_vit


def _setup():
    torch.manual_seed(0)
    model = reference_vit(depth=3, dim=32, heads=2, num_classes=4)
    (images,) = example_inputs(model, batch_size=6)
    labels = torch.randint(0, 4, (6,))
    converted = revcompile.convert(model, images)
    optimizer = torch.optim.AdamW(converted.parameters(), lr=1e-3)
    return converted, optimizer, images, labels


def _step(model, optimizer, images, labels, seed):
    torch.manual_seed(seed)
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(images), labels).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    optimizer.step()
    return grads


def test_resuming_from_a_checkpoint_gives_identical_next_steps(tmp_path):
    converted, optimizer, images, labels = _setup()
    for seed in range(2):
        _step(converted, optimizer, images, labels, seed)
    torch.save({"model": converted.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "ckpt.pt")
    expected = [_step(converted, optimizer, images, labels, seed) for seed in (10, 11)]

    resumed, resumed_optimizer, _, _ = _setup()  # a new process would build it the same way
    state = torch.load(tmp_path / "ckpt.pt")
    resumed.load_state_dict(state["model"], strict=True)
    resumed_optimizer.load_state_dict(state["optimizer"])
    got = [_step(resumed, resumed_optimizer, images, labels, seed) for seed in (10, 11)]
    for want, have in zip(expected, got):
        for name in want:
            assert torch.equal(want[name], have[name]), name


def test_checkpoints_move_between_original_and_converted_models(tmp_path):
    converted, optimizer, images, labels = _setup()
    _step(converted, optimizer, images, labels, 0)
    torch.save(converted.state_dict(), tmp_path / "converted.pt")

    plain = reference_vit(depth=3, dim=32, heads=2, num_classes=4)  # an unconverted model
    plain.load_state_dict(torch.load(tmp_path / "converted.pt"), strict=True)
    for name, value in converted.state_dict().items():
        assert torch.equal(plain.state_dict()[name], value)

    torch.save(plain.state_dict(), tmp_path / "plain.pt")
    again = revcompile.convert(reference_vit(depth=3, dim=32, heads=2, num_classes=4), images)
    again.load_state_dict(torch.load(tmp_path / "plain.pt"), strict=True)
    converted.eval(), again.eval()
    assert torch.equal(converted(images), again(images))


def test_unconvert_returns_the_original_with_the_trained_parameters():
    converted, optimizer, images, labels = _setup()
    _step(converted, optimizer, images, labels, 0)
    original = revcompile.unconvert(converted)
    assert not isinstance(original, revcompile.ReversibleModel)
    assert {id(p) for p in original.parameters()} == {id(p) for p in converted.parameters()}
    original.eval()
    original(images)  # runs the original (non-reversible) architecture with those weights

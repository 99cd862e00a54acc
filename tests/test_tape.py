"""Each block's parameter gradients are released as soon as that block's backward step is done.

A reversible segment's graph is a chain of one autograd node per block
(``revcompile.runtime.tape``): autograd accumulates a block's gradients -- ``.grad``,
post-accumulate-grad hooks, DDP's reducer (tests/test_distributed.py) -- before the next
block is rebuilt and before the segment's backward ends. Order is observed with hooks,
never with clocks; values are compared with the stored-activation backward in float64.
"""

from __future__ import annotations

import torch

import revcompile
from revcompile.reference import reference_vit
from revcompile.simulate import LiveTensorBytes
from tests.conftest import perturb_parameters, relative_error, zero_level

DEPTH = 4


def _converted():
    torch.manual_seed(0)
    model = perturb_parameters(reference_vit(depth=DEPTH, dim=32, heads=2, num_classes=4).double())  # dropout on
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    return revcompile.convert(model, x[:2]), x


def segment_entries(output: torch.Tensor) -> list:
    """The autograd nodes where reversible segments' backwards end (found by walking the graph)."""
    found, seen, stack = [], set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node.name() == "_SegmentEntryBackward":
            found.append(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def _block_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "blocks" else None


def test_each_block_is_released_before_the_next_is_rebuilt_and_before_the_segment_ends():
    converted, x = _converted()
    events: list[tuple[str, int | None]] = []
    for name, p in converted.named_parameters():
        p.register_post_accumulate_grad_hook(lambda _, name=name: events.append(("released", _block_of(name))))
    for i in range(DEPTH):  # a leaf module of each block: runs in the forward and in the backward's recompute
        converted.get_submodule(f"blocks.{i}.mlp.fc1").register_forward_hook(lambda *_, i=i: events.append(("ran", i)))
    output = converted(x)
    (entry,) = segment_entries(output)
    entry.register_hook(lambda *_: events.append(("segment done", None)))
    events.clear()  # keep the backward's events only
    output.square().sum().backward()

    end = events.index(("segment done", None))
    released = {i: [k for k, e in enumerate(events) if e == ("released", i)] for i in range(DEPTH)}
    rebuilt = {i: events.index(("ran", i)) for i in range(DEPTH)}
    per_block = [sum(_block_of(n) == i for n, _ in converted.named_parameters()) for i in range(DEPTH)]
    assert [len(released[i]) for i in range(DEPTH)] == per_block, "every parameter of every block released once"
    for i in range(DEPTH):
        assert max(released[i]) < end, f"block {i}'s gradients wait for the segment's end"
    for i in range(1, DEPTH):
        assert max(released[i]) < rebuilt[i - 1], f"block {i}'s gradients are held while block {i - 1} is rebuilt"


def _compare(got, reference, names) -> None:
    floor = zero_level(reference, torch.float64)
    for name, a, b in zip(names, got, reference):
        if b is None or float(b.norm()) <= floor:
            assert a is None or float((a - (0 if b is None else b)).norm()) <= floor, name
        else:
            assert relative_error(a, b) <= 1e-10, name


def _grads_in(mode: str, run):
    converted, x = _converted()
    revcompile.set_backward(converted, mode)
    torch.manual_seed(1)
    return run(converted, x)


def test_grad_of_a_late_block_alone_then_of_everything_from_the_same_graph():
    """autograd.grad stops after the requested block: the unfinished run is dropped, and the
    next backward through the same graph starts a fresh one."""

    def run(converted, x):
        late = [p for n, p in converted.named_parameters() if _block_of(n) == DEPTH - 1]
        loss = converted(x.requires_grad_(True)).square().sum()
        partial = torch.autograd.grad(loss, late, retain_graph=True)
        return list(partial) + list(torch.autograd.grad(loss, [x, *converted.parameters()]))

    converted, _ = _converted()
    names = [f"late {n}" for n, _ in converted.named_parameters() if _block_of(n) == DEPTH - 1]
    names += ["x"] + [n for n, _ in converted.named_parameters()]
    reference = _grads_in("autograd", run)
    _compare(_grads_in("reversible", run), reference, names)


def test_accumulation_and_frozen_blocks_match_stored_activations():
    """Two backwards accumulate into .grad; a frozen block's parameters keep no gradient."""

    def run(converted, x):
        for p in converted.get_submodule("blocks.1").parameters():
            p.requires_grad_(False)
        for scale in (1.0, -0.5):
            (scale * converted(x).square().sum()).backward()
        return [p.grad for p in converted.parameters()]

    converted, _ = _converted()
    names = [n for n, _ in converted.named_parameters()]
    reference = _grads_in("autograd", run)
    got = _grads_in("reversible", run)
    assert [n for n, g in zip(names, got) if g is None] == [n for n in names if _block_of(n) == 1]
    _compare(got, reference, names)


class _Float64Bytes(LiveTensorBytes):
    """Live bytes of float64 storages only: with exact streams on a float32 model, the streams and their cotangents."""

    def _track(self, tensor: torch.Tensor) -> None:
        if tensor.dtype == torch.float64:
            super()._track(tensor)


def test_exact_backward_holds_no_dead_streams_or_cotangents():
    """A block's output streams are freed once its inputs are rebuilt and its output cotangents once
    they are pulled back, not when the block's step ends; the last block's X2 overwrites the exit's
    saved Y2 when the backward frees the graph; a pulled cotangent is summed in place. So at most six
    stream-sized float64 tensors are alive at once (the last block: its saved Y1, X2 over Y2, X1, two
    cotangents, a pulled one); holding the dead ones made it nine."""
    torch.manual_seed(0)
    model = reference_vit(depth=DEPTH, dim=32, heads=2, num_classes=4)
    x = torch.randn(3, 3, 32, 32)
    converted = revcompile.convert(model, x[:2], streams="exact")
    stream_bytes = 3 * (model.pos_embed.shape[1]) * 32 * 8
    converted(x).square().sum().backward()  # warm-up
    counter = _Float64Bytes()
    with counter:
        converted(x).square().sum().backward()
    assert counter.peak > 4 * stream_bytes  # the count sees the streams at all
    assert counter.peak <= 6 * stream_bytes, counter.peak / stream_bytes


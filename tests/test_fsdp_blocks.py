"""FSDP2 per block inside reversible segments trains exactly like a single process would.

Real gloo processes on CPU. Each block of a converted reference ViT is ``fully_shard``-ed,
then the converted model itself (the usual FSDP2 recipe); a reversible segment gathers one
block at a time through FSDP2's ``unshard()``/``reshard()`` (``revcompile.runtime.sharding``)
and FSDP reduce-scatters the gradients its gates produce. After one step every parameter's
gathered gradient equals the single-process average of the ranks' gradients (float64,
dropout on, each rank with its own masks).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import revcompile
from tests.test_distributed import _free_port, _fully_shard, _gradients, _loss, _model, _shard


def _per_block_worker(rank: int, world: int, port: int, out_dir: str, mode: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    fully_shard = _fully_shard()
    try:
        images, labels = _shard(rank)
        converted = revcompile.convert(_model(), images[:2])
        revcompile.set_backward(converted, mode)
        for block in converted.blocks:
            fully_shard(block)
        fully_shard(converted)
        gathered: list[int] = []  # at each block's MLP call (forward, and recompute in backward): blocks gathered
        for block in converted.blocks:
            block.mlp.fc1.register_forward_hook(lambda *_: gathered.append(_gathered_blocks(converted)))
        torch.manual_seed(rank)
        _loss(converted, images, labels).backward()
        grads = {name: p.grad.full_tensor() for name, p in converted.named_parameters()}
        result = {"grads": grads, "gathered": gathered, "after": _gathered_blocks(converted)}
        torch.save(result, os.path.join(out_dir, f"blocks_{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _gathered_blocks(model) -> int:
    """How many blocks' parameters are unsharded (plain tensors, not FSDP's DTensor shards) now."""
    return sum(all(type(p).__name__ != "DTensor" for p in block.parameters()) for block in model.blocks)


def _reference(world: int) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for rank in range(world):
        images, labels = _shard(rank)
        converted = revcompile.convert(_model(), images[:2])
        torch.manual_seed(rank)
        _loss(converted, images, labels).backward()
        for name, grad in _gradients(converted).items():
            total[name] = total.get(name, 0) + grad / world
    return total


@pytest.mark.parametrize("world, mode", [(2, "reversible"), (2, "autograd"), (4, "reversible")])
def test_fsdp_per_block_gradients_equal_single_process(tmp_path, world, mode):
    mp.spawn(_per_block_worker, args=(world, _free_port(), str(tmp_path), mode), nprocs=world, join=True)
    expected = _reference(world)
    for rank in range(world):
        result = torch.load(tmp_path / f"blocks_{rank}.pt")
        depth = len(_model().blocks)
        if mode == "reversible":  # one block gathered at a time, in the forward and in each recompute
            assert result["gathered"] == [1] * (2 * depth), result["gathered"]
        else:  # stored activations keep every block gathered until FSDP's post-backward
            assert result["gathered"] == list(range(1, depth + 1)), result["gathered"]
        assert result["after"] == 0
        assert result["grads"].keys() == expected.keys()
        for name, grad in expected.items():
            torch.testing.assert_close(result["grads"][name], grad, rtol=1e-10, atol=1e-12, msg=name)


def _refusals_worker(rank: int, port: int, out_dir: str) -> None:
    """What FSDP2 arrangements a segment refuses, and the errors' words (one process)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=1)
    fully_shard = _fully_shard()
    messages = {}
    try:
        images, labels = _shard(rank)
        converted = revcompile.convert(_model(), images[:2])
        for block in converted.blocks:
            fully_shard(block)  # but not the converted model: nothing would reduce-scatter
        with torch.no_grad():
            messages["no_root_eval"] = str(converted(images).shape)  # no backward: nothing to reduce
        try:
            _loss(converted, images, labels)
            messages["no_root"] = "no error"
        except RuntimeError as err:
            messages["no_root"] = str(err)
        original = _model()
        fully_shard(original.blocks[0])
        try:
            revcompile.convert(original, images[:2])
            messages["sharded_original"] = "no error"
        except revcompile.ConversionError as err:
            messages["sharded_original"] = str(err)
        torch.save(messages, os.path.join(out_dir, "refusals.pt"))
    finally:
        dist.destroy_process_group()


def test_fsdp_arrangements_that_cannot_work_are_refused_with_the_recipe(tmp_path):
    mp.spawn(_refusals_worker, args=(_free_port(), str(tmp_path)), nprocs=1, join=True)
    messages = torch.load(tmp_path / "refusals.pt")
    assert messages["no_root_eval"] == "torch.Size([4, 4])"
    assert "converted model is not" in messages["no_root"] and "fully_shard(converted)" in messages["no_root"]
    assert "blocks.0" in messages["sharded_original"] and "Convert the unsharded model first" in messages["sharded_original"]

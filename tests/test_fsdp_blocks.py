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


def _per_block_worker(rank: int, world: int, port: int, out_dir: str, mode: str, root: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    fully_shard = _fully_shard()
    try:
        images, labels = _shard(rank)
        converted = revcompile.convert(_model(), images[:2])
        revcompile.set_backward(converted, mode)
        for block in converted.blocks:
            fully_shard(block)
        if root:
            fully_shard(converted)
        gathered: list = []  # at each block's MLP call (forward, and recompute in backward): _gathered_blocks
        for block in converted.blocks:
            block.mlp.fc1.register_forward_hook(lambda *_: gathered.append(_gathered_blocks(converted)))
        torch.manual_seed(rank)
        _loss(converted, images, labels).backward()
        grads = {name: _full(p.grad) for name, p in converted.named_parameters()}
        result = {"grads": grads, "gathered": gathered, "after": _gathered_blocks(converted)}
        torch.save(result, os.path.join(out_dir, f"blocks_{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _full(grad: torch.Tensor) -> torch.Tensor:
    return grad.full_tensor() if hasattr(grad, "full_tensor") else grad


def _gathered_blocks(model) -> tuple[int, int]:
    """How many blocks' parameters are unsharded (plain tensors, not FSDP's DTensor shards) now,
    and how many blocks' sharded parameters hold their reduce-scattered gradients already."""
    gathered = sum(all(type(p).__name__ != "DTensor" for p in block.parameters()) for block in model.blocks)
    reduced = sum(all(type(p).__name__ == "DTensor" and p.grad is not None for p in block.parameters()) for block in model.blocks)
    return gathered, reduced


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


@pytest.mark.parametrize("world, mode, root", [
    (2, "reversible", True), (2, "autograd", True), (4, "reversible", True), (2, "reversible", False), (2, "parallel", True)])
def test_fsdp_per_block_gradients_equal_single_process(tmp_path, world, mode, root):
    """``root=False``: only the blocks sharded, as FSDP allows for any model; the parameters
    outside them are then not synchronised (each rank keeps its own gradient), so only the
    blocks' are compared."""
    mp.spawn(_per_block_worker, args=(world, _free_port(), str(tmp_path), mode, root), nprocs=world, join=True)
    expected = _reference(world)
    if not root:
        expected = {name: grad for name, grad in expected.items() if name.startswith("blocks.")}
    for rank in range(world):
        result = torch.load(tmp_path / f"blocks_{rank}.pt")
        depth = len(_model().blocks)
        if mode != "autograd":
            # one block gathered at a time, in the forward and in each recompute; a block's
            # gradients reduce-scattered as soon as its step is done, before the block below is rebuilt
            expected_calls = [(1, 0)] * depth + [(1, done) for done in range(depth)]
        else:  # stored activations: FSDP's hooks on each block, as for any module; no recompute
            expected_calls = [(1, 0)] * depth
        if mode == "parallel":  # block i-1 is rebuilt while block i's gradients are pulled: two gathered
            assert max(gathered for gathered, _ in result["gathered"]) == 2, result["gathered"]
        elif root:  # (each block its own FSDP root keeps itself gathered after forward, FSDP's rule for roots)
            assert result["gathered"] == expected_calls, result["gathered"]
        assert result["after"] == (0, depth)
        assert expected.keys() <= result["grads"].keys()
        for name, grad in expected.items():
            torch.testing.assert_close(result["grads"][name], grad, rtol=1e-10, atol=1e-12, msg=name)


def _refusals_worker(rank: int, port: int, out_dir: str) -> None:
    """Converting a model already sharded by FSDP2: refused (one process)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=1)
    fully_shard = _fully_shard()
    messages = {}
    try:
        images, labels = _shard(rank)
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


def test_converting_a_sharded_model_is_refused_with_the_recipe(tmp_path):
    mp.spawn(_refusals_worker, args=(_free_port(), str(tmp_path)), nprocs=1, join=True)
    messages = torch.load(tmp_path / "refusals.pt")
    assert "blocks.0" in messages["sharded_original"] and "Convert the unsharded model first" in messages["sharded_original"]


def _mixed_precision_worker(rank: int, port: int, out_dir: str) -> None:
    """Per-block FSDP2 computing in float32 (reduce in float64), the reversible backward and its
    ``"autograd"`` reference under the same policy, with exact and with float32 streams."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    fully_shard = _fully_shard()
    # the blocks must not cast their inputs: their hooks also run when a variant is traced
    block_policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float64, cast_forward_inputs=False)
    root_policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float64)
    results = {}
    try:
        images, labels = _shard(rank)
        for streams in ("exact", "float32"):
            for mode in ("reversible", "autograd"):
                converted = revcompile.convert(_model(), images[:2], streams=streams)
                revcompile.set_backward(converted, mode)
                for block in converted.blocks:
                    fully_shard(block, mp_policy=block_policy)
                fully_shard(converted, mp_policy=root_policy)
                torch.manual_seed(rank)
                _loss(converted, images, labels).backward()
                results[streams, mode] = {name: p.grad.full_tensor() for name, p in converted.named_parameters()}
        torch.save(results, os.path.join(out_dir, f"mixed_{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_fsdp_mixed_precision_per_block_is_exact_with_exact_streams(tmp_path):
    mp.spawn(_mixed_precision_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    expected = _reference(2)  # float64 throughout: what float32 compute approximates
    for rank in range(2):
        results = torch.load(tmp_path / f"mixed_{rank}.pt")
        for name, grad in results["exact", "autograd"].items():
            assert torch.equal(results["exact", "reversible"][name], grad), name  # bit for bit
            torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)  # float32 compute
            torch.testing.assert_close(results["float32", "reversible"][name], results["float32", "autograd"][name],
                                       rtol=1e-4, atol=1e-6, msg=name)  # float32 streams: close, not exact
        assert any(not torch.equal(results["float32", "reversible"][n], g) for n, g in results["float32", "autograd"].items())

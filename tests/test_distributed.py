"""DistributedDataParallel trains a converted model exactly like a single process would.

Two real processes with the gloo backend (CPU). Each rank runs its own shard with its own
dropout seed; the reference computes the same shards in one process and averages the
gradients, which is what DDP's all-reduce must produce. A reversible segment's graph has
one autograd node per block (``revcompile.runtime.tape``), so each parameter's gradient is
ready exactly once per backward -- the condition DDP's reducer needs ("mark a variable
ready only once" is the error other reversible libraries hit) -- and a block's buckets
are all-reduced while the blocks before it are still being reconstructed.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import revcompile
from revcompile.reference import reference_vit
from tests.test_tape import segment_entries

WORLD = 2


def _model():
    torch.manual_seed(0)
    model = reference_vit(depth=3, dim=32, heads=2, num_classes=4).double()
    return model


def _shard(rank: int, micro: int = 0):
    generator = torch.Generator().manual_seed(100 + 10 * rank + micro)
    images = torch.randn(4, 3, 32, 32, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 4, (4,), generator=generator)
    return images, labels


def _loss(model, images, labels):
    return torch.nn.functional.cross_entropy(model(images), labels)


def _gradients(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = _model()
        images, labels = _shard(rank)
        converted = revcompile.convert(model, images[:2])
        ddp = torch.nn.parallel.DistributedDataParallel(converted)
        torch.manual_seed(rank)  # each rank draws its own dropout masks
        _loss(ddp, images, labels).backward()
        torch.save(_gradients(converted), os.path.join(out_dir, f"step_{rank}.pt"))

        ddp.zero_grad(set_to_none=True)
        with ddp.no_sync():  # gradient accumulation: first micro-batch stays local
            torch.manual_seed(rank)
            _loss(ddp, *_shard(rank, 1)).backward()
        torch.manual_seed(rank + 50)
        _loss(ddp, *_shard(rank, 2)).backward()
        torch.save(_gradients(converted), os.path.join(out_dir, f"accumulated_{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _reference(seeded_shards) -> dict[str, torch.Tensor]:
    """Single process: the average over ranks of each rank's summed micro-batch gradients."""
    total: dict[str, torch.Tensor] = {}
    for rank, micro_batches in enumerate(seeded_shards):
        model = _model()
        converted = revcompile.convert(model, _shard(rank)[0][:2])
        for seed, (images, labels) in micro_batches:
            torch.manual_seed(seed)
            _loss(converted, images, labels).backward()
        for name, grad in _gradients(converted).items():
            total[name] = total.get(name, 0) + grad / WORLD
    return total


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_gradients_equal_single_process(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    step = _reference([[(rank, _shard(rank))] for rank in range(WORLD)])
    accumulated = _reference([[(rank, _shard(rank, 1)), (rank + 50, _shard(rank, 2))] for rank in range(WORLD)])
    for rank in range(WORLD):
        for expected, kind in ((step, "step"), (accumulated, "accumulated")):
            got = torch.load(tmp_path / f"{kind}_{rank}.pt")
            assert got.keys() == expected.keys()
            for name in expected:
                torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=1e-12, msg=f"{kind} {name}")


def _bucket_order_worker(rank: int, port: int, out_dir: str) -> None:
    """DDP with one bucket per parameter: the order in which buckets are all-reduced, and
    where the segment's backward ends among them. DDP puts every parameter in one bucket
    for the first step and rebuilds its buckets in the order gradients became ready, so the
    second step is the one recorded."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        images, labels = _shard(rank)
        converted = revcompile.convert(_model(), images[:2])
        ddp = torch.nn.parallel.DistributedDataParallel(converted, bucket_cap_mb=1e-6)
        names = {p: name for name, p in converted.named_parameters()}
        events: list[str] = []

        def record(state, bucket):
            events.extend(f"all-reduce {names[p]}" for p in bucket.parameters())
            return allreduce_hook(state, bucket)

        ddp.register_comm_hook(None, record)
        _loss(ddp, *_shard(rank, 1)).backward()  # DDP rebuilds its buckets after this step
        ddp.zero_grad(set_to_none=True)
        events.clear()
        torch.manual_seed(rank)
        loss = _loss(ddp, images, labels)
        (entry,) = segment_entries(loss)
        entry.register_hook(lambda *_: events.append("segment done"))
        for i in range(3):  # registered after the forward: fires when the backward rebuilds block i
            converted.get_submodule(f"blocks.{i}.mlp.fc1").register_forward_hook(lambda *_, i=i: events.append(f"rebuild {i}"))
        loss.backward()
        torch.save({"events": events, "grads": _gradients(converted)}, os.path.join(out_dir, f"order_{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_all_reduces_a_block_before_the_segment_backward_ends(tmp_path):
    mp.spawn(_bucket_order_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    expected = _reference([[(rank, _shard(rank))] for rank in range(WORLD)])
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"order_{rank}.pt")
        events = result["events"]
        end = events.index("segment done")
        for block in range(3):
            launched = [k for k, e in enumerate(events) if e.startswith(f"all-reduce blocks.{block}.")]
            assert len(launched) == 12 and max(launched) < end, (block, events)
            if block > 0:
                assert max(launched) < events.index(f"rebuild {block - 1}"), (block, events)
        assert any(e.startswith("all-reduce patch_embed") for e in events[end:]), events
        for name, grad in expected.items():
            torch.testing.assert_close(result["grads"][name], grad, rtol=1e-10, atol=1e-12, msg=name)


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


def _fsdp_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    fully_shard = _fully_shard()
    try:
        images, labels = _shard(rank)
        converted = revcompile.convert(_model(), images[:2])
        fully_shard(converted)  # the whole converted model (per block: tests/test_fsdp_blocks.py)
        torch.manual_seed(rank)
        _loss(converted, images, labels).backward()
        grads = {name: p.grad.full_tensor() for name, p in converted.named_parameters()}
        torch.save(grads, os.path.join(out_dir, f"fsdp_{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_fsdp_of_the_whole_converted_model_equals_single_process(tmp_path):
    mp.spawn(_fsdp_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    expected = _reference([[(rank, _shard(rank))] for rank in range(WORLD)])
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"fsdp_{rank}.pt")
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=1e-12, msg=name)

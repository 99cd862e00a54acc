"""FSDP2 per block inside reversible segments trains exactly like a single process would.

Real gloo processes on CPU. Each block of a converted model -- the reference ViT, and an HF
``LlamaForCausalLM`` from a tiny config (random weights, converted via torch.export) -- is
``fully_shard``-ed, then the converted model itself (the usual FSDP2 recipe); a reversible
segment gathers one block at a time through FSDP2's ``unshard()``/``reshard()``
(``revcompile.runtime.sharding``) and FSDP reduce-scatters the gradients its gates produce.
After one step every parameter's gathered gradient equals the single-process average of
the ranks' gradients (float64, dropout on, each rank with its own masks), and the buffers
equal a single process's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import revcompile
from tests.test_distributed import _free_port, _fully_shard, _loss, _model, _shard


@dataclass(frozen=True)
class Workload:
    """A model the per-block tests shard, and one rank's training step on it."""

    build: Callable[[], nn.Module]  # the original model: seeded, float64, dropout on
    batch: Callable[[int], tuple]  # rank -> that rank's batch
    example: Callable[[tuple], tuple[tuple, dict]]  # batch -> (args, kwargs) to convert with
    loss: Callable[[nn.Module, tuple], torch.Tensor]


def _llama() -> nn.Module:
    from transformers import AutoConfig, LlamaForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "llama", num_hidden_layers=3, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, max_position_embeddings=32, attention_dropout=0.1)
    return LlamaForCausalLM(config).double().train()


def _tokens(rank: int) -> tuple[torch.Tensor]:
    return (torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(100 + rank)),)


WORKLOADS = {
    "vit": Workload(_model, _shard, lambda batch: ((batch[0][:2],), {}), lambda m, b: _loss(m, *b)),
    "llama": Workload(_llama, _tokens, lambda batch: (batch, {"labels": batch[0]}),
                      lambda m, b: m(b[0], labels=b[0]).loss),
}


def _converted(workload: Workload, rank: int, **options):
    """The converted model and ``rank``'s batch."""
    batch = workload.batch(rank)
    args, kwargs = workload.example(batch)
    return revcompile.convert(workload.build(), args, kwargs, **options), batch


def _blocks(converted) -> tuple[tuple[str, ...], list[nn.Module]]:
    """The names of the converted model's blocks, and the blocks."""
    names = tuple(block.name for block in revcompile.explain(converted).blocks)
    return names, [converted.get_submodule(name) for name in names]


def _per_block_worker(rank: int, world: int, port: int, out_dir: str, name: str, mode: str, root: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    fully_shard = _fully_shard()
    workload = WORKLOADS[name]
    try:
        converted, batch = _converted(workload, rank)
        revcompile.set_backward(converted, mode)
        names, blocks = _blocks(converted)
        for block in blocks:
            fully_shard(block)
        if root:
            fully_shard(converted)
        torch.manual_seed(rank)
        with _GatheredAtEachOp(blocks) as observed:
            workload.loss(converted, batch).backward()
        grads = {name: _full(p.grad) for name, p in converted.named_parameters()}
        buffers = {name: b.detach().clone() for name, b in converted.named_buffers()}
        result = {"blocks": names, "grads": grads, "buffers": buffers, "gathered": observed.states, "after": _gathered_blocks(blocks)}
        torch.save(result, os.path.join(out_dir, f"blocks_{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _full(grad: torch.Tensor) -> torch.Tensor:
    return grad.full_tensor() if hasattr(grad, "full_tensor") else grad


def _gathered_blocks(blocks: list[nn.Module]) -> tuple[tuple[int, ...], int]:
    """Which blocks' parameters are unsharded (plain tensors, not FSDP's DTensor shards) now,
    and how many blocks' sharded parameters hold their reduce-scattered gradients already."""
    gathered = tuple(i for i, block in enumerate(blocks) if all(type(p).__name__ != "DTensor" for p in block.parameters()))
    reduced = sum(all(type(p).__name__ == "DTensor" and p.grad is not None for p in block.parameters()) for block in blocks)
    return gathered, reduced


class _GatheredAtEachOp(TorchDispatchMode):
    """``_gathered_blocks`` at every operation of a step (forward, recompute, gradient steps,
    FSDP's own copies and collectives): its distinct successive values, in order. A converted
    model runs aten operations, not its modules, so no module hook would see the recompute."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.blocks, self.states = blocks, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        state = _gathered_blocks(self.blocks)
        if not self.states or self.states[-1] != state:
            self.states.append(state)
        return func(*args, **(kwargs or {}))


def _reference(world: int, name: str = "vit") -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One process: the average of the ranks' gradients (each rank's batch and dropout seed),
    and the buffers after those steps."""
    workload = WORKLOADS[name]
    converted, _ = _converted(workload, 0)
    total: dict[str, torch.Tensor] = {}
    for rank in range(world):
        converted.zero_grad(set_to_none=True)
        torch.manual_seed(rank)
        workload.loss(converted, workload.batch(rank)).backward()
        for param_name, p in converted.named_parameters():
            total[param_name] = total.get(param_name, 0) + p.grad / world
    return total, {buffer_name: b.detach().clone() for buffer_name, b in converted.named_buffers()}


@pytest.mark.parametrize("name, world, mode, root", [
    ("vit", 2, "reversible", True), ("vit", 2, "autograd", True), ("vit", 4, "reversible", True),
    ("vit", 2, "reversible", False), ("vit", 2, "parallel", True),
    ("llama", 2, "reversible", True),  # ~60-80 s on a loaded 2-core CPU: a torch.export conversion per process
    pytest.param("llama", 2, "parallel", True, marks=pytest.mark.slow),
    pytest.param("llama", 4, "reversible", True, marks=pytest.mark.slow),  # ~120 s: four conversions on two cores
])
def test_fsdp_per_block_gradients_equal_single_process(tmp_path, name, world, mode, root):
    """``root=False``: only the blocks sharded, as FSDP allows for any model; the parameters
    outside them are then not synchronised (each rank keeps its own gradient), so only the
    blocks' are compared."""
    if name == "llama":
        pytest.importorskip("transformers")  # the integrations extra
    mp.spawn(_per_block_worker, args=(world, _free_port(), str(tmp_path), name, mode, root), nprocs=world, join=True)
    expected, buffers = _reference(world, name)
    for rank in range(world):
        result = torch.load(tmp_path / f"blocks_{rank}.pt")
        depth = len(result["blocks"])
        assert depth == 3  # every layer of the model became a block
        if not root:
            expected = {p: grad for p, grad in expected.items() if p.startswith(tuple(f"{b}." for b in result["blocks"]))}
        gathered = [(blocks, done) for blocks, done in result["gathered"] if blocks]
        if mode == "parallel":  # block i-1 is rebuilt while block i's gradients are pulled: two gathered
            assert max(len(blocks) for blocks, _ in gathered) == 2, gathered
        elif root:  # (each block its own FSDP root keeps itself gathered after forward, FSDP's rule for roots)
            # one block gathered at a time, in the forward and again in backward (for its recompute
            # and gradient step; "autograd": FSDP's pre-backward hook); a block's gradients
            # reduce-scattered as soon as its step is done, before the block below is gathered
            expected_states = [((i,), 0) for i in range(depth)] + [((depth - 1 - done,), done) for done in range(depth)]
            assert gathered == expected_states, result["gathered"]
        assert result["after"] == ((), depth)
        assert expected.keys() <= result["grads"].keys()
        for p, grad in expected.items():
            torch.testing.assert_close(result["grads"][p], grad, rtol=1e-10, atol=1e-12, msg=p)
        assert result["buffers"].keys() == buffers.keys()
        for b, value in buffers.items():
            assert torch.equal(result["buffers"][b], value), b


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
    expected, _ = _reference(2)  # float64 throughout: what float32 compute approximates
    for rank in range(2):
        results = torch.load(tmp_path / f"mixed_{rank}.pt")
        for name, grad in results["exact", "autograd"].items():
            assert torch.equal(results["exact", "reversible"][name], grad), name  # bit for bit
            torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)  # float32 compute
            torch.testing.assert_close(results["float32", "reversible"][name], results["float32", "autograd"][name],
                                       rtol=1e-4, atol=1e-6, msg=name)  # float32 streams: close, not exact
        assert any(not torch.equal(results["float32", "reversible"][n], g) for n, g in results["float32", "autograd"].items())

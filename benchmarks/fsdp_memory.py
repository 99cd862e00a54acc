"""Per-rank parameter memory of a training step under FSDP2: per block against the whole model
(a benchmark, never a test).

    OMP_NUM_THREADS=1 python benchmarks/fsdp_memory.py [--worlds 2 4] [--layers 8] [--hidden 256]

FSDP2 saves memory only if it gathers a little at a time. A converted HF ``LlamaForCausalLM``
(tiny vocabulary, random weights, float32) trains one step on ``world`` gloo processes (CPU),
sharded two ways: ``fully_shard`` of each decoder block then of the converted model ("per
block"), or of the converted model only ("whole model"). Per rank it reports

- the parameter bytes FSDP holds unsharded at once (counted at every aten operation of the
  step: parameters registered as plain tensors, not DTensor shards), and how many blocks;
- what to expect: ``R + k*B`` per block (``R`` the parameters outside the blocks, which the
  root keeps gathered through the step; ``B`` one block; ``k`` = 1 for the ``reversible``
  backward, 2 for ``parallel``, which rebuilds block i-1 while block i's gradients are
  pulled), ``M`` (every parameter) for the whole model;
- the live heap (``HeapPeak``, malloc's live bytes) a step adds above the resident shards of
  the parameters and their gradients (``2*M/world``; gradients kept, zeroed in place, as an
  optimizer loop does), the largest of ``--repeats`` steps after a warm-up: the gathered
  parameters plus FSDP's all-gather and reduce-scatter buffers, the unsharded gradients
  before their reduce-scatter, and the (small, at this batch) activations;
- the per-rank peak: resident shards + that growth.

The same step without FSDP in one process gives the growth that is not parameters
(activations, temporaries). Writes ``benchmarks/results/fsdp_memory.json`` and the table as
Markdown (``benchmarks/results/fsdp_memory.md``).
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import socket
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from results_io import run_meta, write_results
from torch.utils._python_dispatch import TorchDispatchMode

import revcompile
from revcompile.measure import HeapPeak

VOCAB, BATCH, TOKENS = 512, 2, 32
VARIANTS = (("whole model", "reversible"), ("per block", "reversible"), ("per block", "parallel"))


def llama(layers: int, hidden: int) -> torch.nn.Module:
    from transformers import AutoConfig, LlamaForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "llama", num_hidden_layers=layers, hidden_size=hidden, intermediate_size=4 * hidden, num_attention_heads=8,
        num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=TOKENS)
    return LlamaForCausalLM(config).train()


def converted_llama(layers: int, hidden: int):
    """The converted model, its blocks, and the batch every step uses."""
    tokens = torch.randint(0, VOCAB, (BATCH, TOKENS), generator=torch.Generator().manual_seed(1))
    converted = revcompile.convert(llama(layers, hidden), (tokens,), {"labels": tokens})
    blocks = [converted.get_submodule(block.name) for block in revcompile.explain(converted).blocks]
    return converted, blocks, tokens


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def parameter_bytes(model, blocks) -> dict:
    """M (every parameter), R (outside the blocks) and B (the largest block), unsharded."""
    every, in_blocks = _nbytes(model.parameters()), [_nbytes(b.parameters()) for b in blocks]
    return {"all": every, "outside_blocks": every - sum(in_blocks), "block": max(in_blocks), "blocks": len(blocks)}


def _sharded(p) -> bool:
    return type(p).__name__ == "DTensor"


class GatheredAtEachOp(TorchDispatchMode):
    """The most parameter bytes, and blocks, registered unsharded at any aten operation."""

    def __init__(self, model, blocks):
        super().__init__()
        self.model, self.blocks, self.peak_bytes, self.peak_blocks = model, blocks, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        gathered = _nbytes(p for p in self.model.parameters() if not _sharded(p))
        self.peak_bytes = max(self.peak_bytes, gathered)
        blocks = sum(all(not _sharded(p) for p in b.parameters()) for b in self.blocks)
        self.peak_blocks = max(self.peak_blocks, blocks)
        return func(*args, **(kwargs or {}))


def _step(model, tokens) -> None:
    model(tokens, labels=tokens).loss.backward()


def measure(model, blocks, tokens, repeats: int) -> dict:
    """One sharded (or plain) model's counted gathering and measured live-heap growth per step."""
    _step(model, tokens)  # warm-up: FSDP's lazy initialisation, the gradients (sharded) allocated
    model.zero_grad(set_to_none=False)
    with GatheredAtEachOp(model, blocks) as seen:
        _step(model, tokens)
    growths = []
    for _ in range(repeats):
        model.zero_grad(set_to_none=False)
        gc.collect()
        with HeapPeak() as peak:
            _step(model, tokens)
        growths.append(peak.growth)
    local = [p.to_local() if _sharded(p) else p for p in model.parameters()]
    shards = _nbytes(local) + _nbytes(p.grad.to_local() if _sharded(p.grad) else p.grad for p in model.parameters())
    return {"gathered_peak_bytes": seen.peak_bytes, "gathered_blocks": seen.peak_blocks, "heap_growth_bytes": max(growths),
            "resident_shard_bytes": shards, "peak_bytes": shards + max(growths)}


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


def _worker(rank: int, world: int, port: int, args, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    fully_shard = _fully_shard()
    try:
        converted, _, tokens = converted_llama(args.layers, args.hidden)
        rows = []
        for sharding, backward in VARIANTS:
            model = copy.deepcopy(converted)
            revcompile.set_backward(model, backward)
            blocks = [model.get_submodule(block.name) for block in revcompile.explain(model).blocks]
            if sharding == "per block":
                for block in blocks:
                    fully_shard(block)
            fully_shard(model)
            rows.append({"sharding": sharding, "backward": backward, "world": world, "rank": rank,
                         **measure(model, blocks, tokens, args.repeats)})
            del model
        every: list = [None] * world
        dist.all_gather_object(every, rows)
        if rank == 0:
            torch.save([row for rank_rows in every for row in rank_rows], out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def per_rank_rows(args, sizes: dict) -> list[dict]:
    """Each (world, sharding, backward): the largest figure over the ranks, and the expectation."""
    rows = []
    for world in args.worlds:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "rows.pt")
            mp.spawn(_worker, args=(world, _free_port(), args, out), nprocs=world, join=True)
            measured = torch.load(out)
        for sharding, backward in VARIANTS:
            ranks = [r for r in measured if (r["sharding"], r["backward"]) == (sharding, backward)]
            row = {key: max(r[key] for r in ranks) for key in ranks[0] if key.endswith(("_bytes", "_blocks"))}
            k = 2 if backward == "parallel" else 1
            expected = sizes["outside_blocks"] + k * sizes["block"] if sharding == "per block" else sizes["all"]
            rows.append({"world": world, "sharding": sharding, "backward": backward, **row,
                         "expected_gathered_bytes": expected, "to_whole_model": None})
            print(f"world {world} {sharding:11s} {backward:10s} gathered {row['gathered_peak_bytes'] / 2**20:6.2f} MiB "
                  f"(expected {expected / 2**20:6.2f}), growth {row['heap_growth_bytes'] / 2**20:6.2f} MiB", flush=True)
        whole = next(r for r in rows if r["world"] == world and r["sharding"] == "whole model")
        for row in rows:
            if row["world"] == world:
                row["to_whole_model"] = row["peak_bytes"] / whole["peak_bytes"]
    return rows


def unsharded_row(args) -> tuple[dict, dict]:
    """The parameter sizes, and the same step in one process without FSDP: the growth that is
    not parameter gathering."""
    torch.set_num_threads(1)
    model, blocks, tokens = converted_llama(args.layers, args.hidden)
    sizes = parameter_bytes(model, blocks)
    row = measure(model, blocks, tokens, args.repeats)
    return sizes, {"world": 1, "sharding": "none (one process)", "backward": "reversible", **row,
                   "expected_gathered_bytes": sizes["all"], "to_whole_model": None}


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def markdown(rows: list[dict], sizes: dict, meta: dict) -> str:
    lines = [
        f"Per-rank parameter memory of one training step under FSDP2 ({meta['date']}, {meta['machine']} CPU, gloo, "
        f"1 thread per process, torch {meta['torch']}): converted HF LlamaForCausalLM, {sizes['blocks']} blocks, "
        f"hidden {meta['hidden']}, float32, batch {BATCH}x{TOKENS} tokens. M = {_mib(sizes['all'])} MiB (every "
        f"parameter), R = {_mib(sizes['outside_blocks'])} MiB (outside the blocks), B = {_mib(sizes['block'])} MiB "
        "(one block). Largest figure over the ranks.",
        "",
        "| world | sharding | backward | gathered at once (MiB) | expected (MiB) | blocks at once | resident shards (MiB) "
        "| step growth (MiB) | per-rank peak (MiB) | / whole model |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = f"{r['to_whole_model']:.2f}" if r["to_whole_model"] is not None else "-"
        lines.append(
            f"| {r['world']} | {r['sharding']} | {r['backward']} | {_mib(r['gathered_peak_bytes'])} | "
            f"{_mib(r['expected_gathered_bytes'])} | {r['gathered_blocks']} | {_mib(r['resident_shard_bytes'])} | "
            f"{_mib(r['heap_growth_bytes'])} | {_mib(r['peak_bytes'])} | {ratio} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/fsdp_memory.json"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fsdp_memory.md"))
    args = parser.parse_args()
    sizes, unsharded = unsharded_row(args)
    rows = [unsharded, *per_rank_rows(args, sizes)]
    meta = run_meta(repeats=args.repeats, layers=args.layers, hidden=args.hidden, batch=BATCH, tokens=TOKENS)
    write_results({"meta": meta, "sizes": sizes, "rows": rows}, args.json, args.out, markdown(rows, sizes, meta))


if __name__ == "__main__":
    main()

"""Working memory of one training step, gradients already allocated (a benchmark, never a test).

    OMP_NUM_THREADS=1 python benchmarks/working_memory.py [--depths 12 24] [--batch 32] [--repeats 3]

The setting of issue 13: a timm ViT (the vit_base_patch16_224 layout) of width 192 on 64x64
images in 8x8 patches (65 tokens), batch 32. Variants: ``original``; ``checkpoint``
(``torch.utils.checkpoint`` around every block, non-reentrant); the converted model with
the reversible backward and ``exact`` streams; the same with ``float32`` streams. Every
parameter's ``.grad`` is allocated before the step and zeroed in place after it (an
optimizer loop with ``zero_grad(set_to_none=False)``), so what a step adds to the live heap
(``HeapPeak``: malloc's live bytes sampled every 0.5 ms; the largest of ``--repeats`` steps
after one warm-up) is its working memory: saved activations, recomputation, gradient
transients -- not the gradients themselves. Also reported: the bytes of the blocks'
parameter gradients and of the block inputs checkpointing keeps.

Writes ``<json>`` (default ``benchmarks/results/working_memory.json``) and the table as
Markdown (``benchmarks/results/working_memory.md``). ``--label`` names the revision measured
(the same script run against an older checkout, ``PYTHONPATH=<checkout>``, gives the
before figures).
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

import torch
from results_io import run_meta, write_results
from train_models import vit_b
from train_step import checkpointed

import revcompile
from revcompile.measure import HeapPeak

WIDTH = 192
VARIANTS = ("original", "checkpoint", "converted exact", "converted float32")


def models(depth: int):
    """Each variant's module, built from one seeded original."""
    torch.manual_seed(0)
    workload = vit_b("small", depth, WIDTH)
    workload.model.train()
    example, _ = workload.example("cpu")
    built = {"original": workload.model, "checkpoint": checkpointed(workload)}
    for streams in ("exact", "float32"):
        converted = revcompile.convert(workload.model, example, streams=streams)
        revcompile.set_backward(converted, "reversible")
        built[f"converted {streams}"] = converted
    return workload, built


def step_growth(model, workload, batch: int, repeats: int) -> int:
    """The largest live-heap growth over forward, loss and backward, of ``repeats`` steps."""
    args, kwargs, target = workload.make_batch(batch, "cpu")
    for p in model.parameters():
        p.grad = torch.zeros_like(p)

    def step():
        workload.loss(model(*args, **kwargs), target).backward()

    step()  # warm-up: lazy allocations, allocator pools
    growths = []
    for _ in range(repeats):
        for p in model.parameters():
            p.grad.zero_()
        gc.collect()
        with HeapPeak() as peak:
            step()
        growths.append(peak.growth)
    for p in model.parameters():
        p.grad = None
    return max(growths)


def measure(depth: int, batch: int, repeats: int) -> list[dict]:
    workload, built = models(depth)
    blocks = list(workload.model.blocks)
    block_grad_bytes = sum(p.numel() * p.element_size() for b in blocks for p in b.parameters())
    tokens = (64 // 8) ** 2 + 1
    stored_inputs = depth * batch * tokens * WIDTH * 4  # what per-block checkpointing keeps (float32)
    rows = []
    for variant in VARIANTS:
        growth = step_growth(built[variant], workload, batch, repeats)
        rows.append({"depth": depth, "batch": batch, "variant": variant, "growth_bytes": growth,
                     "block_gradient_bytes": block_grad_bytes, "checkpoint_stored_input_bytes": stored_inputs})
        print(f"depth {depth:3d} {variant:18s} growth {growth / 2**20:8.1f} MiB", flush=True)
    by_variant = {r["variant"]: r["growth_bytes"] for r in rows}
    for row in rows:
        row["to_checkpoint"] = row["growth_bytes"] / by_variant["checkpoint"]
        row["to_float32_streams"] = row["growth_bytes"] / by_variant["converted float32"]
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"Working memory of one training step ({meta['date']}, {meta['machine']} CPU, {meta['threads']} thread(s), "
        f"torch {meta['torch']}, revcompile {meta['revcompile']}): timm ViT width {WIDTH}, 64x64 images, batch {rows[0]['batch']}, gradients allocated "
        "before the step; live-heap growth over forward + loss + backward.",
        "",
        "| depth | variant | growth (MiB) | / checkpoint | / float32 streams |",
        "|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['depth']} | {r['variant']} | {r['growth_bytes'] / 2**20:.1f} | {r['to_checkpoint']:.2f} | "
                     f"{r['to_float32_streams']:.2f} |")
    lines.append("")
    for depth in sorted({r["depth"] for r in rows}):
        r = next(r for r in rows if r["depth"] == depth)
        lines.append(f"Depth {depth}: blocks' parameter gradients {r['block_gradient_bytes'] / 2**20:.1f} MiB; "
                     f"block inputs kept by checkpointing {r['checkpoint_stored_input_bytes'] / 2**20:.1f} MiB.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[12, 24])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/working_memory.json"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/working_memory.md"))
    parser.add_argument("--label", default="this checkout", help="which revision of revcompile ran")
    args = parser.parse_args()
    rows = [row for depth in args.depths for row in measure(depth, args.batch, args.repeats)]
    meta = run_meta(repeats=args.repeats, revcompile=f"{args.label} ({Path(revcompile.__file__).parent.parent})")
    write_results({"meta": meta, "rows": rows}, args.json, args.out, markdown(rows, meta))


if __name__ == "__main__":
    main()

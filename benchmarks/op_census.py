"""What a training step computes, op by op: the converted model against a hand-written Rev-ViT.

Timing ratios on a shared CPU carry +-2-3% of noise, which is the size of the speed targets
(float32 streams within 2% of a hand-written Rev-ViT). This census is the noise-free half
of that comparison: it runs one forward and backward of each model under a dispatch mode
and counts every aten op and the elements it writes. Where the converted step issues the
hand-written one's arithmetic and nothing more (views and empty allocations aside), what
is left between their times is Python per call, measured separately by ``train_step.py``.

    OMP_NUM_THREADS=1 python benchmarks/op_census.py     # writes benchmarks/results/op_census.{json,md}

Both models are the reference ViT of ``train_step.py``'s hand-written comparison (width 384,
depth 12, 65 tokens, batch 8, dropout off); the counts do not depend on the machine.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import revcompile
from revcompile.reference import example_inputs, reference_vit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from handwritten_revvit import HandwrittenRevViT  # noqa: E402
from results_io import run_meta, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Ops that write no arithmetic: views and aliases of existing storage, and empty allocations.
NO_ARITHMETIC = frozenset({"detach", "view", "_unsafe_view", "alias", "t", "transpose", "permute", "expand",
                           "select", "slice", "unbind", "split", "unsqueeze", "squeeze", "as_strided",
                           "new_empty", "empty", "empty_like"})


def op_name(func) -> str:
    """``aten.sub_.Tensor`` and ``aten.sub.out`` -> ``sub``: the arithmetic, whatever the overload or placement."""
    name = func.overloadpacket.__name__
    return name[:-1] if name.endswith("_") and not name.startswith("_") else name


class OpCensus(TorchDispatchMode):
    """Counts, per op name, the calls and the elements of the first tensor each one returns."""

    def __init__(self):
        super().__init__()
        self.calls: collections.Counter = collections.Counter()
        self.elements: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        first = out[0] if isinstance(out, (tuple, list)) and out else out
        name = op_name(func)
        self.calls[name] += 1
        if isinstance(first, torch.Tensor):
            self.elements[name] += first.numel()
        return out


def step_census(model: torch.nn.Module, args: tuple) -> OpCensus:
    """The ops of one training step (forward, ``sum()`` loss, backward), after a warm-up step."""
    model(*args).sum().backward()
    model.zero_grad(set_to_none=False)
    with OpCensus() as census:
        model(*args).sum().backward()
    model.zero_grad(set_to_none=True)
    return census


def arithmetic_difference(converted: OpCensus, handwritten: OpCensus) -> dict[str, tuple[int, int]]:
    """Per op that writes values: (extra calls, extra elements) of the converted step; zero entries left out."""
    names = (set(converted.calls) | set(handwritten.calls)) - NO_ARITHMETIC
    extra = {n: (converted.calls[n] - handwritten.calls[n], converted.elements[n] - handwritten.elements[n]) for n in names}
    return {n: d for n, d in sorted(extra.items()) if d != (0, 0)}


def census_rows(depth: int, dim: int, heads: int, batch: int) -> list[dict]:
    torch.manual_seed(0)
    model = reference_vit(depth=depth, dim=dim, heads=heads, img_size=32, patch_size=4, num_classes=10,
                          drop=0.0, attn_drop=0.0, drop_path=0.0)
    args = example_inputs(model, batch)
    handwritten = step_census(HandwrittenRevViT(model), args)
    rows = []
    for streams in ("float32", "exact"):
        converted = step_census(revcompile.convert(model, args, streams=streams), args)
        extra = arithmetic_difference(converted, handwritten)
        rows.append({
            "streams": streams,
            "ops": sum(converted.calls.values()), "handwritten_ops": sum(handwritten.calls.values()),
            "arithmetic_elements": sum(v for k, v in converted.elements.items() if k not in NO_ARITHMETIC),
            "handwritten_arithmetic_elements": sum(v for k, v in handwritten.elements.items() if k not in NO_ARITHMETIC),
            "extra": {name: {"calls": c, "elements": e} for name, (c, e) in extra.items()},
        })
    return rows


def _markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"Op census of one training step ({meta['config']}), converted vs hand-written Rev-ViT:", "",
             "| streams | aten ops (converted / hand-written) | elements written by arithmetic | extra arithmetic ops (calls, elements) |",
             "|---|---|---|---|"]
    for r in rows:
        extra = ", ".join(f"`{n}` {d['calls']:+d}, {d['elements'] / 1e6:+.2f}M" for n, d in r["extra"].items()) or "none"
        ratio = r["arithmetic_elements"] / r["handwritten_arithmetic_elements"]
        lines.append(f"| {r['streams']} | {r['ops']} / {r['handwritten_ops']} | {ratio:.4f}x | {extra} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    options = parser.parse_args()
    rows = census_rows(options.depth, options.dim, heads=max(1, options.dim // 64), batch=8)
    meta = run_meta(config=f"reference ViT width {options.dim}, depth {options.depth}, 65 tokens, batch 8, float32, dropout off")
    markdown = _markdown(meta, rows)
    write_results({"meta": meta, "rows": rows}, options.out / "op_census.json", options.out / "op_census.md", markdown)
    print(markdown)


if __name__ == "__main__":
    main()

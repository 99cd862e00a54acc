"""How long `revcompile.convert` takes, by depth and frontend (a benchmark, never a test).

    python benchmarks/convert_time.py [--depths 6 12 24] [--out benchmarks/results]

Builds full-width models with random weights (timm ViT-B/16 through torch.fx, HuggingFace
GPT-2 through torch.export), converts each once and prints a markdown table; the same
numbers go to ``<out>/convert_time.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import torch

import revcompile


def timm_vit_base(depth: int):
    import timm

    model = timm.create_model("vit_base_patch16_224", pretrained=False, depth=depth)
    return model, (torch.randn(2, 3, 224, 224),)


def hf_gpt2(depth: int):
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    model = AutoModel.from_config(AutoConfig.for_model("gpt2", n_layer=depth))
    return model, (torch.randint(0, 50257, (2, 128)),)


MODELS = {"timm vit_base_patch16_224 (fx)": timm_vit_base, "HF gpt2 (export)": hf_gpt2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[6, 12, 24])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    rows = []
    for name, build in MODELS.items():
        for depth in args.depths:
            torch.manual_seed(0)
            model, inputs = build(depth)
            start = time.perf_counter()
            converted = revcompile.convert(model, inputs)
            seconds = time.perf_counter() - start
            plan = revcompile.explain(converted)
            rows.append({"model": name, "depth": depth, "blocks": len(plan.blocks), "seconds": round(seconds, 2)})
            print(f"{name:32s} depth {depth:3d}: {len(plan.blocks):3d} blocks in {seconds:6.2f} s", flush=True)
    meta = {"date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "convert_time.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\n{meta['date']}, CPU ({meta['threads']} threads), torch {meta['torch']}\n")
    print("| model | depth | blocks converted | convert time (s) |\n|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['model']} | {row['depth']} | {row['blocks']} | {row['seconds']} |")


if __name__ == "__main__":
    main()

"""How long `revcompile.convert` takes, by depth and frontend (a benchmark, never a test).

    OMP_NUM_THREADS=1 python benchmarks/convert_time.py [--depths 6 12 24] [--llama-depths 4 8 16 32]
                                                        [--repeats 3] [--models llama] [--out benchmarks/results]

Builds models with random weights (full-width timm ViT-B/16 through torch.fx, full-width
HuggingFace GPT-2 and a small HuggingFace Llama config through torch.export), converts each
``--repeats`` times and prints a markdown table of the median wall-clock time (and the
median CPU time of the process, which a machine shared with other jobs inflates less); the
same numbers go to ``<out>/convert_time.json``. ``--models`` (substrings of the names) reruns
some models only; the other rows are kept from the existing file, each row with its date.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
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


# A small Llama: hidden 256, MLP 688 (~2.7x), 4 heads, vocabulary 1000, batch 2 x 64 tokens.
LLAMA = dict(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=4, vocab_size=1000)


def hf_llama(depth: int):
    from transformers import LlamaConfig, LlamaModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    model = LlamaModel(LlamaConfig(num_hidden_layers=depth, max_position_embeddings=256, **LLAMA))
    return model, (torch.randint(0, LLAMA["vocab_size"], (2, 64)),)


MODELS = {"timm vit_base_patch16_224 (fx)": timm_vit_base, "HF gpt2 (export)": hf_gpt2,
          "HF Llama h256 i688 4 heads v1000 (export)": hf_llama}


def time_conversion(build, depth: int, repeats: int) -> dict:
    """Median wall-clock and CPU seconds of ``revcompile.convert`` over ``repeats`` fresh models."""
    walls, cpus, blocks = [], [], 0
    for _ in range(repeats):
        torch.manual_seed(0)
        model, inputs = build(depth)
        wall, cpu = time.perf_counter(), time.process_time()
        converted = revcompile.convert(model, inputs)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
        blocks = len(revcompile.explain(converted).blocks)
    return {"depth": depth, "blocks": blocks, "seconds": round(statistics.median(walls), 2),
            "cpu_seconds": round(statistics.median(cpus), 2), "runs": [round(w, 2) for w in walls]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[6, 12, 24])
    parser.add_argument("--llama-depths", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=None, help="substrings of the model names to run (default: all)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    chosen = [name for name in MODELS if args.models is None or any(m.lower() in name.lower() for m in args.models)]
    rows = []
    for name, build in MODELS.items():
        if name not in chosen:
            continue
        for depth in args.llama_depths if build is hf_llama else args.depths:
            rows.append({"model": name, "date": date.today().isoformat(), **time_conversion(build, depth, args.repeats)})
            row = rows[-1]
            print(f"{name:42s} depth {depth:3d}: {row['blocks']:3d} blocks in {row['seconds']:6.2f} s "
                  f"(cpu {row['cpu_seconds']:.2f} s; runs {row['runs']})", flush=True)
    meta = {"date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "repeats": args.repeats,
            "statistic": "median"}
    rows = _kept_rows(args.out / "convert_time.json", chosen) + rows
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "convert_time.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\n{meta['date']}, CPU ({meta['threads']} threads), torch {meta['torch']}, median of {args.repeats}\n")
    print("| model | depth | blocks converted | convert time (s) | CPU time (s) |\n|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['model']} | {row['depth']} | {row['blocks']} | {row['seconds']} | {row.get('cpu_seconds', '')} |")


def _kept_rows(path: Path, rerun: list[str]) -> list[dict]:
    """Rows of the models not rerun, from an earlier result file (dated with that run)."""
    if not path.exists():
        return []
    earlier = json.loads(path.read_text())
    return [{**row, "date": row.get("date", earlier["meta"]["date"])} for row in earlier["rows"] if row["model"] not in rerun]


if __name__ == "__main__":
    main()

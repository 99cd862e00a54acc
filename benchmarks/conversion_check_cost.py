"""What the conversion check costs: `revcompile.convert` time with and without it (a benchmark, never a test).

    OMP_NUM_THREADS=1 python benchmarks/conversion_check_cost.py [--repeats 3] [--out benchmarks/results]

``convert`` runs the converted model once on the example call (forward, backward, every
block's reconstruction compared) unless ``check_conversion=False``. This converts the
built-in reference ViT (12 blocks, width 192, batch 8 of 32x32 images, torch.fx) and a
HuggingFace GPT-2 config (12 layers, width 768, batch 2 of 128 tokens, torch.export) both
ways, interleaved, and reports the median of ``--repeats`` runs each; the same numbers go
to ``<out>/conversion_check_cost.json``.
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


def reference_vit():
    from revcompile.reference import example_inputs, reference_vit

    model = reference_vit()
    return model, example_inputs(model, 8)


def hf_gpt2():
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    model = AutoModel.from_config(AutoConfig.for_model("gpt2")).train()
    return model, (torch.randint(0, 50257, (2, 128)),)


MODELS = {"reference ViT (fx)": reference_vit, "HF gpt2, 12 layers (export)": hf_gpt2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    rows = []
    for name, build in MODELS.items():
        torch.manual_seed(0)
        model, inputs = build()
        times = {True: [], False: []}
        for _ in range(args.repeats):
            for check in (False, True):
                start = time.perf_counter()
                revcompile.convert(model, inputs, check_conversion=check)
                times[check].append(time.perf_counter() - start)
        without, with_check = statistics.median(times[False]), statistics.median(times[True])
        rows.append({"model": name, "without_check_s": round(without, 2), "with_check_s": round(with_check, 2),
                     "check_s": round(with_check - without, 2)})
        print(f"{name:30s} without {without:6.2f} s  with {with_check:6.2f} s  check {with_check - without:5.2f} s", flush=True)
    meta = {"date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "repeats": args.repeats}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "conversion_check_cost.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

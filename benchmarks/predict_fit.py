"""Will it fit? Predicted largest training batches for models this machine cannot hold.

    python benchmarks/predict_fit.py [--skip fit validate] [--out benchmarks/results]

``fit``: Llama-2-7B and -13B shapes at 4096 tokens, ViT-L/16 and Swin-B at 224, all in
bfloat16, built on the meta device and predicted on fake tensors (``revcompile.predict_memory``:
nothing allocated, nothing measured); the largest batch under 24, 48 and 80 GiB for the
original and the converted model, with AdamW (two float32 moments per parameter) and with
no optimizer state (SGD: what the activations alone allow). 512 MiB reserve.

``validate``: configs small enough to train here, predicted on the meta device and measured
for real by ``revcompile.memory_report`` (one step; the live-heap peak on CPU), at two batches.

Writes ``benchmarks/results/predict_fit.json`` (a part left out with ``--skip`` keeps its
last results there) and prints the markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import torch

import revcompile
from revcompile.budget import largest_batches
from revcompile.models_spec import build_model, parse_spec

GIB = 2**30
CAPS = (24, 48, 80)
FIT_MODELS = {
    "Llama-2-7B shape (hf:llama, 4096 tokens)": ("hf:llama", dict(hidden_size=4096, intermediate_size=11008,
                                                 num_hidden_layers=32, num_attention_heads=32), 4096),
    "Llama-2-13B shape (hf:llama, 4096 tokens)": ("hf:llama", dict(hidden_size=5120, intermediate_size=13824,
                                                  num_hidden_layers=40, num_attention_heads=40), 4096),
    "ViT-L/16 (timm, 224)": ("timm:vit_large_patch16_224", {}, None),
    "Swin-B (timm, 224)": ("timm:swin_base_patch4_window7_224", {}, None),
}
VALIDATE_MODELS = {
    "ViT (timm, dim 192, depth 6, 64 px)": ("timm:vit_small_patch16_224",
                                            dict(img_size=64, patch_size=8, embed_dim=192, depth=6, num_heads=3), None),
    "GPT-2 (hf, dim 256, 6 layers, 256 tokens)": ("hf:gpt2", dict(n_embd=256, n_layer=6, n_head=4, vocab_size=1000), 256),
    "Llama (hf, dim 256, 4 layers, 256 tokens)": ("hf:llama", dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                                  num_attention_heads=4, vocab_size=1000), 256),
}


def _fit_rows() -> list[dict]:
    rows = []
    for name, (spec, config, seq_len) in FIT_MODELS.items():
        built = build_model(parse_spec(spec), config, batch_size=2, seq_len=seq_len, device="meta")
        start = time.perf_counter()
        fit = revcompile.predict_memory(built.model, built.args, dtype=torch.bfloat16, name=name)
        seconds = time.perf_counter() - start
        p, adamw = fit.prediction, fit.training
        sgd = replace(adamw, optimizer="sgd", optimizer_state=0)
        row = {"model": name, "parameters": fit.parameter_count, "blocks": len(fit.plan.blocks), "tracer": fit.plan.tracer,
               "seconds": round(seconds, 1), "fit": fit.to_dict(), "largest_batch": {}}
        for state in (adamw, sgd):
            for cap in CAPS:
                c = largest_batches(cap * GIB, state, p.original_peak, p.converted_peak, "predicted peak")
                row["largest_batch"][f"{state.optimizer} {cap}GiB"] = {"original": c.original, "converted": c.converted}
        rows.append(row)
        print(f"{name}: {seconds:.1f} s, {row['largest_batch']}", flush=True)
    return rows


def _validate_rows(batches=(8, 32)) -> list[dict]:
    rows = []
    for name, (spec, config, seq_len) in VALIDATE_MODELS.items():
        for batch in batches:
            torch.manual_seed(0)
            real = build_model(parse_spec(spec), config, batch_size=batch, seq_len=seq_len)
            report = revcompile.memory_report(real.model, real.args, name=name)
            meta = build_model(parse_spec(spec), config, batch_size=batch, seq_len=seq_len, device="meta")
            fit = revcompile.predict_memory(meta.model, meta.args)
            p = fit.prediction
            predicted = {"original_saved": p.original_saved.at(batch), "converted_saved": p.converted_saved.at(batch),
                         "original_peak": p.original_peak.at(batch), "converted_peak": p.converted_peak.at(batch)}
            measured = report._measured()
            errors = {k: (predicted[k] - v) / v for k, v in measured.items() if v}
            rows.append({"model": name, "batch": batch, "predicted": predicted, "measured": measured,
                         "relative_error": errors, "meta_equals_real_prediction": report.predicted() == predicted})
            print(f"{name} batch {batch}: " + ", ".join(f"{k} {v * 100:+.1f}%" for k, v in errors.items()), flush=True)
    return rows


def _fit_markdown(part: dict) -> list[str]:
    head = " | ".join(f"{o} {c} GiB" for o in ("AdamW", "SGD") for c in CAPS)
    lines = [f"| model | params | blocks | {head} | predict time (s) |", "|---|---:|---:|" + "---:|" * (2 * len(CAPS)) + "---:|"]
    for row in part["rows"]:
        cells = [f"{b['original']:,} → {b['converted']:,}" for b in row["largest_batch"].values()]
        lines.append(f"| {row['model']} | {row['parameters'] / 1e9:.2f}B | {row['blocks']} | {' | '.join(cells)} | {row['seconds']} |")
    return lines


def _validate_markdown(part: dict) -> list[str]:
    lines = ["| model | batch | saved: original / converted | peak: original / converted |", "|---|---:|---:|---:|"]
    for row in part["rows"]:
        e = row["relative_error"]
        lines.append(f"| {row['model']} | {row['batch']} | {e['original_saved'] * 100:+.1f}% / {e['converted_saved'] * 100:+.1f}% "
                     f"| {e['original_peak'] * 100:+.1f}% / {e['converted_peak'] * 100:+.1f}% |")
    return lines


def _markdown(results: dict) -> str:
    lines = []
    for name, table in (("fit", _fit_markdown), ("validate", _validate_markdown)):
        if name in results:
            meta = results[name]["meta"]
            lines += [f"{name}: {meta['date']}, CPU {meta['machine']} ({meta['threads']} threads), torch {meta['torch']}, "
                      f"load average {meta['load_average']}", "", *table(results[name]), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip", nargs="*", default=[], choices=("fit", "validate"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    path = args.out / "predict_fit.json"
    results = json.loads(path.read_text()) if path.exists() else {}  # a skipped part keeps its last results
    for name, run in (("fit", _fit_rows), ("validate", _validate_rows)):
        if name not in args.skip:
            rows = run()
            meta = {"date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "load_average": os.getloadavg()[0], "command": f"python benchmarks/predict_fit.py --skip {' '.join(set(('fit', 'validate')) - {name})}"}
            results[name] = {"meta": meta, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    print("\n" + _markdown(results))


if __name__ == "__main__":
    main()

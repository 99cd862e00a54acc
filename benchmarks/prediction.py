"""Predicted vs measured peak memory of a training step, and whether "largest batch" fits.

    python benchmarks/prediction.py [--batches 2 8 32 64] [--models vit gpt2 swin] [--out benchmarks/results]

For each model and batch size, the report's prediction (``revcompile.report.predict``:
saved bytes from the graphs, and each whole training step simulated on fake tensors at
two *other* batch sizes, fitted linearly) is compared with one real training step at
that batch, for the original and the converted model:

* measured peak: the bytes of the tensors alive at once, counted op by op on the real
  step (``revcompile.simulate.tensor_peak``; what ``max_memory_allocated`` is on CUDA);
* the live heap, sampled every 0.5 ms (``revcompile.measure.HeapPeak``): a lower bound,
  it misses peaks shorter than its interval, shown as a cross-check.

Then "largest batch": under a small memory cap, the batch the report predicts for the
converted model (``searched_capacity``: simulated steps at candidate batches, starting from
the fitted line's answer, which is kept in the results for comparison) is run for real, and its parameters + gradients + AdamW state + measured
peak must fit the cap. Results go to ``<out>/prediction.json`` and ``prediction.md``;
docs/benchmarks.md quotes them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import revcompile
from revcompile.budget import batch_capacity, training_state
from revcompile.report import _at_batch, measure_step, predict, searched_capacity
from results_io import run_meta, write_results


EXAMPLE_BATCH = 2  # torch.export specialises a batch dimension of 1


def reference_vit():
    from revcompile.reference import example_inputs, reference_vit

    model = reference_vit(depth=12, dim=192, heads=3)
    return model, example_inputs(model, EXAMPLE_BATCH), {}


def gpt2():
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_layer=6, n_embd=256, n_head=4, vocab_size=2048))
    tokens = torch.randint(0, 2048, (EXAMPLE_BATCH, 128))
    return model, (tokens,), {"labels": tokens}


def swin_t():
    import timm

    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=10), (torch.randn(EXAMPLE_BATCH, 3, 224, 224),), {}


MODELS = {"vit": ("reference ViT (depth 12, width 192)", reference_vit), "gpt2": ("GPT-2 (HF, 6 layers, width 256, 128 tokens)", gpt2),
          "swin": ("Swin-T (timm, 224x224)", swin_t)}


def _error(predicted: int, measured: int | None) -> float | None:
    return None if not measured else (predicted - measured) / measured


def compare(model, converted, args, kwargs, batch: int) -> dict:
    """Prediction (fitted away from ``batch``) against one real step at ``batch``, both models."""
    at_args, at_kwargs = _at_batch([args, kwargs], EXAMPLE_BATCH, batch)
    prediction = predict(converted, at_args, at_kwargs, batch)
    row = {"batch": batch, "fitted_at": list(prediction.batches)}
    for name, module, line in (("original", model, prediction.original_peak), ("converted", converted, prediction.converted_peak)):
        measured = measure_step(module, at_args, at_kwargs)
        predicted = line.at(batch)
        row[name] = {"predicted_peak": predicted, "measured_peak": measured.peak_bytes, "heap_peak": measured.heap_peak_bytes,
                     "error": _error(predicted, measured.peak_bytes), "error_vs_heap": _error(predicted, measured.heap_peak_bytes)}
    return row


def largest_batch_fits(model, converted, args, kwargs, cap: int) -> dict:
    """Run the converted model at the batch predicted to be the largest under ``cap``: does it fit?"""
    state = training_state(model, "adamw", reserve=0)
    prediction = predict(converted, args, kwargs, EXAMPLE_BATCH)
    capacity = batch_capacity(cap, state, prediction.original_peak, prediction.converted_peak, "simulated peak")
    line = capacity
    capacity = searched_capacity(capacity, state, converted, args, kwargs, EXAMPLE_BATCH)
    at_args, at_kwargs = _at_batch([args, kwargs], EXAMPLE_BATCH, capacity.converted)
    measured = measure_step(converted, at_args, at_kwargs)
    used = state.total + measured.peak_bytes
    return {"cap": cap, "predicted_largest_batch": capacity.converted, "original_largest_batch": capacity.original,
            "line_estimate": {"original": line.original, "converted": line.converted},
            "measured_at_that_batch": used, "fits": used <= cap}


def markdown(rows: list[dict], fits: list[dict], meta: dict) -> str:
    lines = [f"Measured {meta['date']} on {meta['machine']} CPU ({meta['threads']} threads), torch {meta['torch']}.", "",
             "| model | batch | original: predicted / measured | error (vs heap) | converted: predicted / measured | error (vs heap) |",
             "|---|---|---|---|---|---|"]
    mib = lambda b: f"{b / 2**20:.1f}" if b is not None else "n/a"  # noqa: E731
    pct = lambda e: f"{e:+.1%}" if e is not None else "n/a"  # noqa: E731
    for r in rows:
        o, c = r["original"], r["converted"]
        lines.append(f"| {r['model']} | {r['batch']} | {mib(o['predicted_peak'])} / {mib(o['measured_peak'])} MiB | "
                     f"{pct(o['error'])} ({pct(o['error_vs_heap'])}) | {mib(c['predicted_peak'])} / {mib(c['measured_peak'])} MiB | "
                     f"{pct(c['error'])} ({pct(c['error_vs_heap'])}) |")
    lines += ["", "| model | cap | predicted largest batch (original / converted) | measured at the converted one | fits |", "|---|---|---|---|---|"]
    for f in fits:
        lines.append(f"| {f['model']} | {mib(f['cap'])} MiB | {f['original_largest_batch']} / {f['predicted_largest_batch']} | "
                     f"{mib(f['measured_at_that_batch'])} MiB | {'yes' if f['fits'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 8, 32, 64])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--cap", default="1GiB", help="memory cap for the largest-batch check")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    rows, fits = [], []
    for key in args.models:
        label, build = MODELS[key]
        torch.manual_seed(0)
        model, inputs, kwargs = build()
        model.train()
        converted = revcompile.convert(model, inputs, kwargs)
        for batch in args.batches:
            rows.append({"model": label, **compare(model, converted, inputs, kwargs, batch)})
            r = rows[-1]
            print(f"{label} batch {batch}: original {r['original']['error']:+.1%}, converted {r['converted']['error']:+.1%}", flush=True)
        fits.append({"model": label, **largest_batch_fits(model, converted, inputs, kwargs, revcompile.budget.parse_bytes(args.cap))})
        print(f"{label}: largest batch {fits[-1]}", flush=True)
        _write(args.out, rows, fits)


def _write(out: Path, rows: list, fits: list) -> None:
    meta = run_meta()
    write_results({"meta": meta, "rows": rows, "largest_batch": fits}, out / "prediction.json", out / "prediction.md",
                  markdown(rows, fits, meta))


if __name__ == "__main__":
    main()

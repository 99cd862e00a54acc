"""Reconstruction and gradient error of reversible backprop versus depth and precision.

    python benchmarks/numerics.py [--depths 6 12 24 48] [--out docs/numerics.md]

For the built-in reference ViT (width 64, dropout on) at each depth and precision it runs
one training step in ``"autograd"`` (stored activations) and one in ``"reversible"`` from
the same state and seed, and records:

* reconstruction drift: over all blocks, the largest ``max|X_rec - X| / max|X|`` of the
  block inputs rebuilt in backward against those the forward computed
  (``convert(..., check_reconstruction=True)``);
* gradient error: over all parameters, the worst and the median relative error
  ``||g_rev - g_ref|| / ||g_ref||`` against ``"autograd"``;
* as a yardstick, the same error of ``"autograd"`` itself in this precision against a
  float32 ``"autograd"`` step with the same weights: the noise low precision adds anyway.

Precisions: float32; bf16/fp16 autocast (parameters stay float32, branches run in 16 bits,
the residual stream is float32 by type promotion); and pure bf16/fp16 models
(``model.to(dtype)``). Each with the coupled streams kept as ``convert(..., streams=)``:
``"exact"`` (float64 on a fixed-point grid, the default), ``"float32"``, or the model's own
precision (``"model"``). The numbers go to docs/numerics.md and a JSON file.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
from pathlib import Path

import torch

import revcompile
from revcompile.reference import example_inputs, reference_vit
from results_io import run_meta, write_results

CASES = {
    # name: (parameter dtype, autocast dtype or None, streams option)
    "float32, exact streams": (torch.float32, None, "exact"),
    "float32, float32 streams": (torch.float32, None, "model"),
    "bf16 autocast, exact streams": (torch.float32, torch.bfloat16, "exact"),
    "bf16 autocast, float32 streams": (torch.float32, torch.bfloat16, "model"),
    "fp16 autocast, exact streams": (torch.float32, torch.float16, "exact"),
    "fp16 autocast, float32 streams": (torch.float32, torch.float16, "model"),
    "bf16 model, exact streams": (torch.bfloat16, None, "exact"),
    "bf16 model, float32 streams": (torch.bfloat16, None, "float32"),
    "bf16 model, bf16 streams": (torch.bfloat16, None, "model"),
    "fp16 model, exact streams": (torch.float16, None, "exact"),
    "fp16 model, float32 streams": (torch.float16, None, "float32"),
    "fp16 model, fp16 streams": (torch.float16, None, "model"),
}


def _gradients(model, images, mode: str, autocast_dtype):
    revcompile.set_backward(model, mode)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    context = torch.autocast(images.device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with context:
        out = model(images)
    out.float().square().mean().backward()  # backward outside autocast, as training loops do
    return {n: p.grad.detach().double() for n, p in model.named_parameters()}


def _relative_errors(candidate: dict, reference: dict) -> list[float]:
    largest = max(float(r.norm()) for r in reference.values())
    return [float((candidate[n] - r).norm() / r.norm()) for n, r in reference.items() if float(r.norm()) > 1e-6 * largest]


def measure(depth: int, case: str, device: str = "cpu") -> dict:
    dtype, autocast_dtype, streams = CASES[case]
    torch.manual_seed(0)
    model = reference_vit(depth=depth, dim=64, heads=2).to(device, dtype)
    (images,) = example_inputs(model, batch_size=4, dtype=dtype, device=device)
    converted = revcompile.convert(model, images, streams=streams, check_reconstruction=True)
    reference = _gradients(converted, images, "autograd", autocast_dtype)
    candidate = _gradients(converted, images, "reversible", autocast_dtype)
    drift = revcompile.reconstruction_report(converted)
    errors = _relative_errors(candidate, reference)
    noise = None
    if dtype != torch.float32 or autocast_dtype is not None:
        exact = revcompile.convert(reference_vit(depth=depth, dim=64, heads=2).to(device), images[:2].float())
        exact.load_state_dict({k: v.float() for k, v in converted.state_dict().items()})
        float32 = _gradients(exact, images.float(), "autograd", None)
        noise = _relative_errors(reference, float32)
    return {
        "case": case,
        "depth": depth,
        "reconstruction_drift": max(d.relative_error for d in drift),
        "gradient_error_worst": max(errors),
        "gradient_error_median": statistics.median(errors),
        "finite": all(torch.isfinite(g).all() for g in candidate.values()),
        "precision_noise_worst": max(noise) if noise else None,
        "precision_noise_median": statistics.median(noise) if noise else None,
    }


def markdown(rows: list[dict], meta: dict) -> str:
    depths = sorted({r["depth"] for r in rows})
    lines = [
        "# Numerics: reconstruction and gradient error versus depth",
        "",
        f"Generated by `python benchmarks/numerics.py` on {meta['date']} ({meta['machine']} CPU, torch {meta['torch']}). "
        "Reference ViT, width 64, batch 4, dropout on; one training step in `\"reversible\"` against the same step "
        "in `\"autograd\"` (stored activations) on the converted architecture. Do not edit by hand.",
        "",
        "*drift*: largest relative error of a reconstructed block input (`check_reconstruction=True`); "
        "*grad*: worst / median relative gradient error over the parameters, reversible against autograd "
        "in the same precision; *noise*: the same measure for autograd in that precision against a float32 "
        "autograd step with the same weights -- the error low precision brings with stored activations too.",
        "",
        "| precision | " + " | ".join(f"depth {d}: drift | grad worst / median | noise worst / median" for d in depths) + " |",
        "|---|" + "---:|---:|---:|" * len(depths),
    ]
    for case in CASES:
        cells = []
        for depth in depths:
            r = next((r for r in rows if r["case"] == case and r["depth"] == depth), None)
            if r is None:
                cells += ["", "", ""]
                continue
            flag = "" if r["finite"] else " (non-finite)"
            noise = "-" if r["precision_noise_worst"] is None else f"{r['precision_noise_worst']:.1e} / {r['precision_noise_median']:.1e}"
            cells += [f"{r['reconstruction_drift']:.1e}", f"{r['gradient_error_worst']:.1e} / {r['gradient_error_median']:.1e}{flag}", noise]
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[6, 12, 24, 48])
    parser.add_argument("--cases", nargs="+", default=list(CASES))
    parser.add_argument("--out", type=Path, default=Path("docs/numerics.md"))
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/numerics.json"))
    args = parser.parse_args()
    rows = []
    for case in args.cases:
        for depth in args.depths:
            rows.append(measure(depth, case))
            r = rows[-1]
            print(f"{case:26s} depth {depth:3d}: drift {r['reconstruction_drift']:.1e}, grad worst {r['gradient_error_worst']:.1e}, "
                  f"median {r['gradient_error_median']:.1e}", flush=True)
    meta = run_meta()
    write_results({"meta": meta, "rows": rows}, args.json, args.out, markdown(rows, meta))


if __name__ == "__main__":
    main()

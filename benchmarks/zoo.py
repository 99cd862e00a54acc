"""Regenerate docs/zoo.md: every model family of the conformance suite, measured.

    python benchmarks/zoo.py [--out docs/zoo.md] [--only hf-t5 xt-rotary ...]   # --only re-measures those rows
    python benchmarks/zoo.py --render    # rewrite docs/zoo.md from the results file alone

The families are the small configs of tests/models.py (timm, torchvision, HF) and of
tests/zoo_external.py (vit-pytorch, x-transformers, open_clip, peft, hand-written
constructs; install them with ``pip install -e ".[zoo]"``), random weights, dropout on.
For each it converts the model and records: tracer, blocks converted versus layers in the
config, segments and couplings, residuals left alone and why, the number of gradients
compared and the worst float64 relative error of "reversible" against "autograd"
(revcompile.verify), the bytes saved for backward before and after (float32, the
builder's batch), and the conversion time. A family that is refused records the
ConversionError; one that fails otherwise records the error. Nothing in the tables is
written by hand.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the builders live in tests/

import revcompile  # noqa: E402
from revcompile import ConversionError  # noqa: E402
from revcompile.measure import saved_for_backward  # noqa: E402
from tests.conftest import perturb_parameters  # noqa: E402
from tests.models import ZOO  # noqa: E402
from tests.zoo_external import EXTERNAL  # noqa: E402
from results_io import run_meta, write_results  # noqa: E402

ZOO_LIBRARIES = {"vit_pytorch": "vit-pytorch", "x_transformers": "x-transformers", "open_clip": "open_clip_torch", "peft": "peft"}


def family(name: str):
    """(library import name, builder, options, note) of a family in either registry."""
    if name in ZOO:
        build, options, _ = ZOO[name]
        return None, build, options, ""
    entry = EXTERNAL[name]
    return entry.library, entry.build, entry.options, entry.note


def one_line(error: BaseException, limit: int = 400) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def measure(name: str) -> dict:
    library, build, options, note = family(name)
    row = {"family": name, "library": library or name.split("-")[0], "options": options, "note": note}
    torch.manual_seed(0)
    model, args, kwargs, layers = build()
    row["layers"] = layers
    start = time.perf_counter()
    try:
        converted = revcompile.convert(model, args, kwargs, **options)
    except ConversionError as err:
        return {**row, "outcome": "refused", "error": one_line(err)}
    seconds = time.perf_counter() - start
    plan = revcompile.explain(converted)
    row.update(
        tracer=plan.tracer,
        blocks=len(plan.blocks),
        segments=len(plan.segments),
        couplings=sorted({b.form for b in plan.blocks} | ({"post-norm moved"} if any(b.post_norm_moved for b in plan.blocks) else set())),
        skipped=[f"{s.node} ({s.module}): {s.reason}" for s in plan.skipped],
        convert_seconds=round(seconds, 2),
    )
    try:
        _, original = saved_for_backward(lambda: model(*args, **kwargs), model)
        _, reversible = saved_for_backward(lambda: converted(*args, **kwargs), converted)
        torch.manual_seed(0)
        model64, args64, kwargs64, _ = build()
        model64 = perturb_parameters(model64.double())
        args64 = tuple(a.double() if a.is_floating_point() else a for a in args64)
        report = revcompile.verify(revcompile.convert(model64, args64, kwargs64, **options), args64, kwargs64)
    except Exception as err:  # noqa: BLE001 -- a known failure is recorded, not hidden
        return {**row, "outcome": "fails", "error": one_line(err)}
    return {
        **row,
        "outcome": "converts" if len(plan.blocks) == layers else "partial",
        "worst_relative_error_float64": report.worst.relative_error if report.worst else None,
        "gradients_checked": len(report.checks),
        "gradients_zero": len(report.unchecked),
        "verify_passed": report.passed,
        "saved_bytes_original": original.bytes,
        "saved_bytes_converted": reversible.bytes,
    }


def _table(rows: list[dict]) -> list[str]:
    lines = [
        "| family | tracer | blocks | segments | coupling | gradients compared | worst grad error | saved for backward (KiB) | reduction | convert (s) |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        option = " ".join(f"`{k}={v!r}`" for k, v in r["options"].items())
        coupling = ", ".join(r["couplings"]) + (f" ({option})" if option else "")
        error = "n/a" if r["worst_relative_error_float64"] is None else f"{r['worst_relative_error_float64']:.1e}"
        lines.append(
            f"| {r['family']} | {r['tracer']} | {r['blocks']}/{r['layers']} | {r['segments']} | {coupling} | "
            f"{r['gradients_checked']} (+{r['gradients_zero']} zero) | {error} | "
            f"{r['saved_bytes_original'] / 1024:,.0f} -> {r['saved_bytes_converted'] / 1024:,.0f} | "
            f"{r['saved_bytes_original'] / max(r['saved_bytes_converted'], 1):.1f}x | {r['convert_seconds']} |"
        )
    return lines


def _not_converted(rows: list[dict]) -> list[str]:
    lines = []
    for r in rows:
        option = " ".join(f"`{k}={v!r}`" for k, v in r["options"].items())
        why = f" {r['note'].rstrip('.')}." if r["note"] else ""
        lines.append(f"- **{r['family']}** ({r['outcome']}{', ' + option if option else ''}):{why} `{r['error']}`")
    return lines


def markdown(rows: list[dict], meta: dict) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in meta["libraries"].items())
    lines = [
        "# Model zoo",
        "",
        "Generated by `python benchmarks/zoo.py` on "
        f"{meta['date']} ({meta['machine']}, {meta['threads']} CPU threads, torch {meta['torch']}, {versions}, no GPU). "
        "Small configs of each family with random weights and dropout on (tests/models.py, tests/zoo_external.py); "
        "the same families are the conformance tests (tests/test_zoo.py, tests/test_zoo_external.py). "
        "Do not edit by hand.",
        "",
        "- *blocks*: converted blocks / transformer layers in the config.",
        "- *gradients compared*: trainable parameters and float inputs whose float64 gradient is compared, "
        "and (+ zero) those whose true gradient is zero, compared on the model's gradient scale instead.",
        "- *worst grad error*: largest relative error, over every compared gradient, of the "
        "float64 gradients in `\"reversible\"` against `\"autograd\"` on the same converted architecture "
        "(`revcompile.verify`, tolerance 1e-10).",
        "- *saved for backward*: activation bytes autograd keeps after one forward (float32, batch 2, "
        "parameters excluded), original model -> converted model. These configs have 1-5 layers; the "
        "converted model's number does not grow with depth while the original's does (see "
        "docs/benchmarks.md), so real depths save far more.",
        "- Reconstruction is exact (the default `streams=\"exact\"`), so what remains is float64 "
        "summation order: the runtime and the autograd engine add the two streams' cotangents in a "
        "different order where they leave a segment (in the reference ViT, only the input's and the "
        "parameters before the segment differ, by ~1e-16; every block parameter is bit-identical).",
        "",
        "## timm, torchvision, HuggingFace",
        "",
    ]
    core = [r for r in rows if r["family"] in ZOO and r["outcome"] in ("converts", "partial")]
    lines += _table(core)
    external = [r for r in rows if r["family"] not in ZOO]
    if external:
        lines += [
            "",
            "## Beyond timm, torchvision and HF",
            "",
            "vit-pytorch (`vitp-`), x-transformers (`xt-`), open_clip (`openclip-`), LoRA adapters from peft on HF "
            "models (`peft-`; only the adapters train, so only their gradients are compared), HF ALBERT (one "
            "layer's weights shared by all), and hand-written models with constructs such code uses: plain "
            "tensor attributes, one block applied in a Python loop (shared weights), (attention, MLP) pairs "
            "looped over, DiT adaLN modulation from a timestep and label (side inputs of every branch). "
            "A block applied several times (shared weights) becomes one reversible block per application, "
            "all in one segment; its parameters' gradients are the sum over the applications, compared "
            "exactly like any other.",
            "",
        ]
        lines += _table([r for r in external if r["outcome"] in ("converts", "partial")])
        refused = [r for r in external if r["outcome"] in ("refused", "fails")]
        if refused:
            lines += ["", "### Not converted", "", "*refused*: `convert` raises this `ConversionError`; *fails*: any other "
                      "error on the way (a converter bug).", ""]
            lines += _not_converted(refused)
    partial = [r for r in external if r["outcome"] == "partial" and r["note"]]
    if partial:
        lines += ["", "### Converted in part", ""]
        lines += [f"- **{r['family']}** ({r['blocks']}/{r['layers']} blocks): {r['note'].rstrip('.')}." for r in partial]
    skipped = [(r["family"], s) for r in rows for s in r.get("skipped", [])]
    if skipped:
        lines += ["", "## Residuals left as ordinary autograd", ""]
        lines += [f"- {family}: {s}" for family, s in skipped]
    return "\n".join(lines) + "\n"


def installed(name: str) -> bool:
    library, _, _, _ = family(name)
    if library is None:
        return True
    try:
        importlib.import_module(library)
    except ImportError:
        print(f"{name:26s} skipped: {library} is not installed (pip install -e \".[zoo]\")", flush=True)
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/zoo.md"))
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/zoo.json"))
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--render", action="store_true", help="only rewrite --out from the --json results")
    args = parser.parse_args()
    if args.render:
        results = json.loads(args.json.read_text())
        args.out.write_text(markdown(results["rows"], results["meta"]))
        print(f"wrote {args.out} from {args.json}")
        return
    rows = []
    for name in args.only or [*ZOO, *EXTERNAL]:
        if not installed(name):
            continue
        rows.append(measure(name))
        r = rows[-1]
        detail = r.get("error", "")[:80] if "error" in r else f"{r['blocks']}/{r['layers']} blocks, worst {r['worst_relative_error_float64']:.1e}"
        print(f"{name:26s} {r['outcome']}: {detail}", flush=True)
    libraries = {}
    for pip_name in ("timm", "torchvision", "transformers", *ZOO_LIBRARIES.values()):
        try:
            libraries[pip_name] = importlib.metadata.version(pip_name)
        except importlib.metadata.PackageNotFoundError:
            continue
    meta = run_meta(libraries=libraries)
    if args.only and args.json.exists():  # keep the other families' rows, in registry order
        measured = {r["family"]: r for r in json.loads(args.json.read_text())["rows"]} | {r["family"]: r for r in rows}
        rows = [measured[name] for name in [*ZOO, *EXTERNAL] if name in measured]
    write_results({"meta": meta, "rows": rows}, args.json, args.out, markdown(rows, meta))


if __name__ == "__main__":
    main()

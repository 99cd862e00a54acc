"""The measuring parts of ``gpu_check.py``; each runs in a process of its own.

A part appends rows to a JSON file as it goes (``PartRecord``), so a part killed at its
time limit still leaves what it measured. The measurements themselves are those of
``train_step.py`` (``Bench``: median step time, ``max_memory_allocated`` after
``reset_peak_memory_stats`` on CUDA, the live heap on CPU) and ``numerics.py``; this file
only chooses sizes and what to compare.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from gpu_report import THROUGHPUT_MODELS
from numerics import CASES
from numerics import measure as numerics_measure
from train_models import MODELS, PEAK_MODEL
from train_step import Bench, build, model_for, variants_of

import revcompile
from revcompile.budget import ReportError, batch_capacity, training_state
from revcompile.measure import saved_for_backward
from revcompile.passes.memory import LinearBytes

assert set(THROUGHPUT_MODELS.values()) == set(MODELS), "gpu_check must cover every training-step model"
# The converted model in "auto" needs two CUDA streams to choose between; train_step runs it on CUDA only.
TIMED_VARIANTS = ("original", "reversible", "parallel", "auto")
CAPPED_VARIANTS = ("original", "reversible", "parallel")
BF16_CASES = tuple(case for case in CASES if case.startswith("bf16"))


@dataclass(frozen=True)
class Sizes:
    """What one run measures: ``full`` on the GPU, ``tiny`` for the CPU dry run."""

    device: str
    size: str  # the train_models preset
    equal_batch: dict  # model -> the batch every variant is timed at
    warmup: int
    steps: int
    memory_cap: int  # bytes, for the largest batch
    batch_limit: int  # the largest batch a capacity check will try
    peak_batches: tuple[int, int]  # ViT-L per-sample memory: the slope between these two batches
    drift_depth: int
    drift_cases: tuple[str, ...]  # of numerics.CASES


FULL = Sizes("cuda", "full", {**{name: 64 for name in MODELS}, "GPT-2 (HF)": 8}, warmup=3, steps=10,
             memory_cap=16 * 2**30, batch_limit=2048, peak_batches=(8, 32), drift_depth=48, drift_cases=BF16_CASES)
# Two drift cases (autocast, and a bf16 model with bf16 streams): each costs two conversions on a CPU.
DRY = Sizes("cpu", "tiny", {name: 2 for name in MODELS}, warmup=0, steps=1, memory_cap=64 * 2**20, batch_limit=4,
            peak_batches=(2, 4), drift_depth=2, drift_cases=(BF16_CASES[0], BF16_CASES[-1]))


def machine_meta(device: str) -> dict:
    name = torch.cuda.get_device_name() if device == "cuda" else \
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {"device": device, "device_name": name, "torch": torch.__version__,
            "cuda": torch.version.cuda, "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


class PartRecord:
    """The JSON file of one part, rewritten whole after every row (never half-written)."""

    def __init__(self, path: Path, part: str, sizes: Sizes):
        self.path = path
        self.data = {"part": part, "complete": False, "meta": machine_meta(sizes.device),
                     "sizes": {k: v for k, v in vars(sizes).items()}, "notes": [], "rows": {}}
        self.save()

    def add(self, table: str, row: dict) -> None:
        self.data["rows"].setdefault(table, []).append(row)
        self.save()
        print(f"{table}: {row}", flush=True)  # into the part's log

    def note(self, text: str) -> None:
        self.data["notes"].append(text)
        self.save()
        print(text, flush=True)

    def finish(self) -> None:
        self.data["complete"] = True
        self.save()

    def save(self) -> None:
        temporary = self.path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(temporary, self.path)


def train_step(model_name: str, sizes: Sizes, record: PartRecord) -> None:
    """Every variant timed at one batch, then the largest batch under the memory cap."""
    workload, converted, reason = build(model_name, sizes.size, sizes.device)
    if reason:
        record.note(f"{model_name}: not converted ({reason})")
        return
    plan = revcompile.explain(converted)
    record.note(f"{model_name}: {len(plan.blocks)} blocks converted, segments of {[len(s.blocks) for s in plan.segments]} blocks")
    bench = Bench(sizes.device, sizes.warmup, sizes.steps)
    variants = [v for v in TIMED_VARIANTS if v in variants_of(sizes.device, converted)]
    if "auto" not in variants:
        record.note("'auto' is not run without CUDA (it chooses between two CUDA streams and one)")
    models = {variant: model_for(variant, workload, converted) for variant in variants}
    batch = sizes.equal_batch[model_name]
    equal = bench.compare(models, workload, batch)
    for variant, result in equal.items():
        record.add("equal_batch", {"model": model_name, "batch": batch, "variant": variant, **result})
    for variant in CAPPED_VARIANTS:
        record.add("largest_batch", largest_batch(bench, model_name, workload, models[variant], equal[variant], batch, sizes)
                   | {"variant": variant})


def largest_batch(bench: Bench, model_name: str, workload, model_and_mode, at_batch: dict, batch: int, sizes: Sizes) -> dict:
    """The peak as a line in the batch (measured at ``batch`` and half of it), the largest batch
    under the cap by ``revcompile.budget``, and one measured step at that batch to confirm it."""
    model, mode = model_and_mode
    row = {"model": model_name, "cap_bytes": sizes.memory_cap}
    half = max(batch // 2, 1)
    points = [(half, bench.memory(bench.step_fn(model, workload, half, mode), model)), (batch, at_batch)]
    if any(result.get("oom") for _, result in points):
        return {**row, "oom": True}
    line = LinearBytes.fit([(b, result["peak_bytes"]) for b, result in points])
    # budget's line is activation memory only: take the parameters and their gradients out of the measured peak
    state = training_state(model, "sgd", reserve=0)
    activations = LinearBytes(line.fixed - state.total, line.per_sample)
    try:
        predicted = batch_capacity(sizes.memory_cap, state, activations, activations, "measured peaks").converted
    except ReportError:
        predicted = 0
    row.update(per_sample_bytes=line.per_sample, fixed_bytes=line.fixed, predicted_batch=predicted)
    tried = min(predicted, sizes.batch_limit)
    if tried >= 1:
        check = bench.memory(bench.step_fn(model, workload, tried, mode), model)
        row.update(checked_batch=tried, checked_peak_bytes=check.get("peak_bytes"), at_batch_limit=tried < predicted,
                   fits=not check.get("oom") and check["peak_bytes"] <= sizes.memory_cap)
    return row


def peak_memory(sizes: Sizes, record: PartRecord) -> None:
    """ViT-L/16: peak of one training step at two batches per variant; the slope is the memory per sample."""
    workload, converted, reason = build(PEAK_MODEL, sizes.size, sizes.device)
    if reason:
        record.note(f"{PEAK_MODEL}: not converted ({reason})")
        return
    bench = Bench(sizes.device, sizes.warmup, sizes.steps)
    for variant in CAPPED_VARIANTS:
        model, mode = model_for(variant, workload, converted)
        for batch in sizes.peak_batches:
            result = bench.memory(bench.step_fn(model, workload, batch, mode), model)
            if batch == sizes.peak_batches[-1] and not result.get("oom"):
                args, kwargs, _ = workload.make_batch(batch, sizes.device)
                if mode:
                    revcompile.set_backward(model, mode)
                _, saved = saved_for_backward(lambda: model(*args, **kwargs), model)
                result["saved_bytes"] = saved.bytes
            record.add("peaks", {"model": PEAK_MODEL, "variant": variant, "batch": batch, **result})


def bf16_drift(sizes: Sizes, record: PartRecord) -> None:
    """``numerics.measure`` at the check's depth for the bf16 cases, on the check's device."""
    for case in sizes.drift_cases:
        record.add("drift", numerics_measure(sizes.drift_depth, case, device=sizes.device))


def run(part: str, out: Path, dry_run: bool) -> None:
    """Run one part (``train_step_<model>``, ``peak_memory`` or ``bf16_drift``) into ``out/<part>.json``."""
    sizes = DRY if dry_run else FULL
    record = PartRecord(out / f"{part}.json", part, sizes)
    if part.startswith("train_step_"):
        train_step(THROUGHPUT_MODELS[part.removeprefix("train_step_")], sizes, record)
    elif part == "peak_memory":
        peak_memory(sizes, record)
    elif part == "bf16_drift":
        bf16_drift(sizes, record)
    else:
        raise ValueError(f"unknown part {part!r}")
    record.finish()

"""Training-step throughput and memory: the original model against every alternative (never a test).

    python benchmarks/train_step.py --device cuda          # full sizes, on a GPU
    python benchmarks/train_step.py --device cpu           # small sizes, two CPU cores

Variants: ``original``; ``checkpoint`` (the original with ``torch.utils.checkpoint`` around
every block); the converted model in ``autograd``, ``reversible``, ``parallel`` and, on
CUDA, ``auto``. For each model and batch size: the median training-step time (forward,
loss, backward, SGD step) after warm-up, timed with CUDA events or the wall clock, and
the peak memory of one step: parameter bytes plus the most allocated above the state
before the step (``max_memory_allocated`` on CUDA, the live heap -- ``HeapPeak``, never the
resident set -- on CPU). For the deep model: peak memory against depth, and the largest
batch whose step stays under ``--memory-cap-gib``. The ``handwritten`` part times the converted
reference ViT (exact and float32 streams) against a hand-written Rev-ViT of the same function
(``handwritten_revvit.py``) and per-block checkpointing, in one rotation; on CPU use
``--clock cpu`` (process CPU time) with ``OMP_NUM_THREADS=1``.

Writes ``train_step_<device>[_<tag>].json``, ``.md`` and, with matplotlib installed (the
``bench`` extra), ``.png`` into ``--out``. ``--skip`` and ``--models`` split a long run
into parts (give each its own ``--tag``).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint
from train_models import ALL_MODELS, DEEP_MODEL, MODELS, Workload
from train_report import markdown, plot

import revcompile
from revcompile.measure import HeapPeak, live_heap_bytes, saved_for_backward

CONVERTED = ("autograd", "reversible", "parallel", "auto")
# The hand-written comparison: the reference ViT at width 384, depth 12, 65 tokens, batch 8,
# dropout and drop-path off (the hand-written Rev-ViT replays no random masks).
HANDWRITTEN = dict(model=dict(dim=384, depth=12, heads=6, img_size=32, patch_size=4, drop=0.0, attn_drop=0.0,
                              drop_path=0.0), batch=8)
SIZES = {  # size preset -> batches per model, depth sweep and its batch, the deep model's depth and width
    "full": dict(batches=[16, 32, 64, 128], gpt2_batches=[4, 8, 16], depths=[6, 12, 24, 48], depth_batch=64,
                 deep=24, deep_width=None),
    "small": dict(batches=[4, 16], gpt2_batches=[4, 16], depths=[2, 4, 8, 16], depth_batch=8, deep=24, deep_width=64),
}


def checkpointed(workload: Workload) -> torch.nn.Module:
    """A copy of the original whose blocks recompute their activations in backward."""
    model = copy.deepcopy(workload.model)
    for block in workload.blocks(model):
        inner = block.forward
        block.forward = lambda *a, _inner=inner, **k: checkpoint(_inner, *a, use_reentrant=False, **k)
    return model


class Bench:
    def __init__(self, device: str, warmup: int, steps: int, clock: str = "wall"):
        self.device, self.warmup, self.steps, self.clock = device, warmup, steps, clock
        self.samples: dict[str, list] = {}  # the last compare()'s step times per variant, round by round

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def step_fn(self, model, workload: Workload, batch: int, mode: str | None = None):
        """One training step (forward, loss, backward, SGD step) on a fixed batch."""
        args, kwargs, target = workload.make_batch(batch, self.device)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-5)  # stateless: the same memory for every variant

        def step():
            if mode is not None:  # converted variants share one module: set its backward each time
                revcompile.set_backward(model, mode)
            workload.loss(model(*args, **kwargs), target).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    def time_one(self, step) -> float:
        if self.device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000
        now = time.process_time if self.clock == "cpu" else time.perf_counter
        began = now()
        step()
        return now() - began

    def memory(self, step, model) -> dict:
        """Parameter bytes plus the most allocated above the state before one step (after a
        warm-up step); ``{"oom": True}`` when CUDA runs out of memory."""
        parameters = sum(p.numel() * p.element_size() for p in model.parameters())
        try:
            step()
            if self.device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                step()
                torch.cuda.synchronize()
                return {"peak_bytes": parameters + torch.cuda.max_memory_allocated() - before}
            with HeapPeak() as peak:
                step()
            return {"peak_bytes": parameters + (peak.growth or 0)}
        except torch.cuda.OutOfMemoryError:
            return {"oom": True}
        finally:
            if self.device == "cuda":
                torch.cuda.empty_cache()

    def compare(self, models: dict, workload, batch: int) -> dict[str, dict]:
        """Each variant's peak memory, then its median step time, timed in rotation (one step
        of each in turn, so a change in machine load hits every variant alike)."""
        steps = {variant: self.step_fn(model, workload, batch, mode) for variant, (model, mode) in models.items()}
        results = {variant: self.memory(steps[variant], models[variant][0]) for variant in models}
        timed = {variant: step for variant, step in steps.items() if not results[variant].get("oom")}
        try:
            for variant, step in timed.items():  # "auto" decides after 2 * (1 + TRIALS) + 1 backwards
                for _ in range(self.warmup + (9 if variant == "auto" else 0)):
                    step()
            times: dict[str, list] = {variant: [] for variant in timed}
            for round_ in range(self.steps):  # odd rounds in reverse: no variant always follows the same one
                for variant, step in list(timed.items())[::-1 if round_ % 2 else 1]:
                    times[variant].append(self.time_one(step))
        except torch.cuda.OutOfMemoryError:
            return {variant: {"oom": True} for variant in models}
        self.samples = times  # each variant's step times, round by round
        for variant, seconds in times.items():
            results[variant]["seconds"] = statistics.median(seconds)
        return results


def build(name: str, size: str, device: str, depth: int | None = None, **options):
    """The workload on ``device`` and its converted model (None, with the reason, if nothing converts)."""
    torch.manual_seed(0)
    workload = ALL_MODELS[name](size, depth, **options)
    workload.model.to(device).train()
    args, kwargs = workload.example(device)
    try:
        return workload, revcompile.convert(workload.model, args, kwargs), None
    except revcompile.ConversionError as err:
        return workload, None, str(err).split(":")[0]


def variants_of(device: str, converted) -> list[str]:
    names = ["original", "checkpoint"]
    if converted is not None:
        names += [v for v in CONVERTED if v != "auto" or device == "cuda"]
    return names


def model_for(variant: str, workload: Workload, converted):
    """``(module, backward mode or None)`` for a variant; converted variants share one module."""
    if variant == "original":
        return workload.model, None
    if variant == "checkpoint":
        return checkpointed(workload), None
    revcompile.set_backward(converted, variant)
    return converted, variant


def throughput_rows(bench: Bench, size: str, names: list[str], notes: list[str]) -> list[dict]:
    rows = []
    preset = SIZES[size]
    for name in names:
        workload, converted, reason = build(name, size, bench.device)
        if reason:
            notes.append(f"{name}: not converted ({reason}); only the original and checkpoint variants ran")
        else:
            plan = revcompile.explain(converted)
            notes.append(f"{name}: {len(plan.blocks)} blocks converted, segments of {[len(s.blocks) for s in plan.segments]} blocks")
        for batch in preset["gpt2_batches"] if "GPT" in name else preset["batches"]:
            models = {variant: model_for(variant, workload, converted) for variant in variants_of(bench.device, converted)}
            for variant, result in bench.compare(models, workload, batch).items():
                rows.append({"model": name, "batch": batch, "variant": variant, **result})
                shown = "OOM" if result.get("oom") else f"{result['seconds'] * 1e3:8.1f} ms, {result['peak_bytes'] / 2**20:8.1f} MiB"
                print(f"{name:32s} batch {batch:4d} {variant:10s} {shown}", flush=True)
    return rows


def depth_rows(bench: Bench, size: str) -> list[dict]:
    rows = []
    preset = SIZES[size]
    for depth in preset["depths"]:
        workload, converted, _ = build(DEEP_MODEL, size, bench.device, depth)
        args, kwargs, _ = workload.make_batch(preset["depth_batch"], bench.device)
        for variant in ["original", "checkpoint", "autograd", "reversible", "parallel"]:
            model, mode = model_for(variant, workload, converted)
            result = bench.memory(bench.step_fn(model, workload, preset["depth_batch"], mode), model)
            if variant != "checkpoint":
                _, saved = saved_for_backward(lambda: model(*args, **kwargs), model)
                result["saved_bytes"] = saved.bytes
            rows.append({"depth": depth, "batch": preset["depth_batch"], "variant": variant, **result})
            print(f"depth {depth:3d} {variant:10s} peak {result.get('peak_bytes', 0) / 2**20:8.1f} MiB", flush=True)
    return rows


def handwritten_rows(bench: Bench, notes: list[str], qkv: str = "unbind", peers: bool = False) -> list[dict]:
    """The converted reference ViT (exact and float32 streams) against a hand-written Rev-ViT of the
    same function and per-block checkpointing, timed in one rotation, with saved bytes beside.
    ``qkv="unpack"``: its attention unpacks ``q, k, v = qkv`` instead of calling unbind. ``peers``:
    the same function built with revlib and memcnn too (``peer_revvit.py``); a peer that is not
    installed or fails gets a row saying why."""
    from handwritten_revvit import HandwrittenRevViT, unpack_qkv
    from peer_revvit import peer_models

    from revcompile.reference import reference_vit

    shape = HANDWRITTEN
    torch.manual_seed(0)
    original = reference_vit(**shape["model"]).to(bench.device).train()
    if qkv == "unpack":
        original = unpack_qkv(original)
    notes.append(f"hand-written comparison: attention {'unpacks q, k, v' if qkv == 'unpack' else 'calls unbind'}")
    workload = Workload(original, _image_batches(shape["model"]["img_size"]), torch.nn.functional.cross_entropy,
                        lambda m: list(m.blocks))
    example, _ = workload.example(bench.device)
    models = {"original": (original, None), "checkpoint": (checkpointed(workload), None),
              "hand-written Rev-ViT": (HandwrittenRevViT(original), None)}
    for streams in ("exact", "float32"):
        models[f"converted, {streams} streams"] = (revcompile.convert(original, example, streams=streams), None)
    missing = {}
    if peers:
        for name, peer in peer_models(original, *example).items():
            if isinstance(peer, str):
                missing[name] = peer
            else:
                models[name] = (peer, None)
    notes.append(_same_function(models, workload, bench.device))
    args, _, _ = workload.make_batch(shape["batch"], bench.device)
    results = bench.compare(models, workload, shape["batch"])
    rows = [{"variant": name, "batch": shape["batch"], "qkv": qkv, "unavailable": reason} for name, reason in missing.items()]
    for variant, result in results.items():
        model = models[variant][0]
        result["samples"] = bench.samples[variant]
        _, saved = saved_for_backward(lambda: model(*args), model)
        held = _held_after_forward(model, args)
        # the median over rounds of this variant's time over the other's in the same round
        paired = {f"vs {other}": statistics.median(a / b for a, b in zip(result["samples"], bench.samples[other]))
                  for other in ("hand-written Rev-ViT", "checkpoint", "original")}
        rows.append({"variant": variant, "batch": shape["batch"], "qkv": qkv, **result, **paired, "saved_bytes": saved.bytes,
                     "held_bytes": held})
        print(f"{variant:28s} {result['seconds'] * 1e3:8.1f} ms  {paired['vs hand-written Rev-ViT']:.3f}x hand-written  "
              f"saved {saved.bytes / 2**20:6.1f} MiB", flush=True)
    return rows


def _held_after_forward(model, args: tuple) -> int | None:
    """Live-heap bytes a training forward leaves alive for backward (its output included).

    Saved-tensor hooks see only what a Function saves with ``save_for_backward``; revlib passes
    its streams along as node outputs and memcnn keeps them as attributes of its Function's
    context, which the hooks cannot see. What the forward leaves allocated counts them all.
    """
    gc.collect()
    before = live_heap_bytes()
    output = model(*args)
    gc.collect()
    after = live_heap_bytes()
    del output
    return None if before is None else after - before


def _image_batches(side: int):
    def make_batch(batch: int, device: str):
        generator = torch.Generator().manual_seed(batch)
        images = torch.randn(batch, 3, side, side, generator=generator).to(device)
        return (images,), {}, torch.randint(0, 10, (batch,), generator=generator).to(device)

    return make_batch


def _same_function(models: dict, workload: Workload, device: str) -> str:
    """How far the converted (float32 streams) and the peers' outputs are from the hand-written
    one's: a check that the comparison is between implementations of one function."""
    (images,), _, _ = workload.make_batch(2, device)
    others = ["converted, float32 streams"] + [name for name in models if name in ("revlib", "memcnn")]
    with torch.no_grad():
        reference = models["hand-written Rev-ViT"][0](images)
        gaps = {name: float((models[name][0](images) - reference).abs().max()) for name in others}
    shown = ", ".join(f"{name.removeprefix('converted, ')} {gap:.1e}" for name, gap in gaps.items())
    return f"logits against the hand-written Rev-ViT's, max |difference|: {shown}"


def largest_batch(fits, limit: int) -> int:
    """Doubling, then bisection to 1/16 of the answer."""
    low, batch = 0, 1
    while batch <= limit and fits(batch):
        low, batch = batch, batch * 2
    if batch > limit:
        return low
    high = batch
    while high - low > max(1, low // 16):
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def max_batch_rows(bench: Bench, size: str, cap_bytes: int, limit: int) -> list[dict]:
    depth, width = SIZES[size]["deep"], SIZES[size]["deep_width"]
    workload, converted, _ = build(DEEP_MODEL, size, bench.device, depth, width=width)
    rows = []
    for variant in ["original", "checkpoint", "reversible", "parallel"]:
        model, mode = model_for(variant, workload, converted)

        def fits(batch: int) -> bool:
            result = bench.memory(bench.step_fn(model, workload, batch, mode), model)
            return not result.get("oom") and result["peak_bytes"] <= cap_bytes

        best = largest_batch(fits, limit)
        rows.append({"depth": depth, "width": workload.model.embed_dim, "variant": variant, "cap_bytes": cap_bytes,
                     "largest_batch": best})
        print(f"depth {depth} {variant:10s} largest batch under {cap_bytes / 2**30:.2f} GiB: {best}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=sorted(SIZES), help="model sizes (default: full on cuda, small on cpu)")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--steps", type=int, help="timed steps (default: 20 on cuda, 5 on cpu)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--memory-cap-gib", type=float, help="memory cap for the largest batch (default: 16 on cuda, 0.25 on cpu)")
    parser.add_argument("--batch-limit", type=int, default=4096)
    parser.add_argument("--skip", nargs="*", default=[], choices=["throughput", "depth", "max-batch", "handwritten"])
    parser.add_argument("--qkv", choices=["unbind", "unpack"], default="unbind",
                        help="handwritten part: the attention calls unbind, or unpacks q, k, v = qkv")
    parser.add_argument("--peers", action="store_true",
                        help="handwritten part: also revlib's and memcnn's Rev-ViT (pip install -e '.[peers]')")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="time steps by the wall clock or by this process's CPU time (CPU only)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--tag", default="", help="suffix for the output files, to run the parts separately")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    size = args.size or ("full" if cuda else "small")
    bench = Bench(args.device, args.warmup, args.steps or (20 if cuda else 5), "wall" if cuda else args.clock)
    cap = int((args.memory_cap_gib or (16.0 if cuda else 0.25)) * 2**30)
    machine = torch.cuda.get_device_name() if cuda else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    meta = {"date": date.today().isoformat(), "device": args.device, "machine": machine, "torch": torch.__version__,
            "size": size, "steps": bench.steps, "warmup": bench.warmup, "clock": bench.clock}
    notes: list[str] = []
    if not cuda:
        notes.append("CPU: one execution stream, so 'parallel' runs the same steps in program order as 'reversible' "
                     "(its extra memory is real, its overlap is not); 'auto' picks 'reversible' and is not run.")
    results = {"meta": meta, "notes": notes, "throughput": [], "depth": [], "max_batch": [], "handwritten": []}
    if "throughput" not in args.skip:
        results["throughput"] = throughput_rows(bench, size, args.models, notes)
    if "depth" not in args.skip:
        results["depth"] = depth_rows(bench, size)
    if "max-batch" not in args.skip:
        results["max_batch"] = max_batch_rows(bench, size, cap, args.batch_limit)
    if "handwritten" not in args.skip:
        results["handwritten"] = handwritten_rows(bench, notes, args.qkv, args.peers)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / "_".join(filter(None, ["train_step", args.device, args.tag]))
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    stem.with_suffix(".md").write_text(table)
    print("\n" + table)
    print(plot(results, stem.with_suffix(".png")))


if __name__ == "__main__":
    main()

"""The memory planner against uniform strategies: peak and step time at budgets across the range.

A ViT (depth 24, width 192, 65 tokens, batch 32, float32) on the CPU. For budgets spread
from the smallest uniform step to above the original's peak, the planner's
plan is converted and its real step measured: peak tensor bytes counted op by op
(``revcompile.simulate.tensor_peak``) and CPU time per step. The same is measured for the
uniform strategies: every block stored (the original), checkpointed every k blocks (one
``torch.utils.checkpoint`` per run of k, for each k dividing the depth), every block
reversible. Times are process CPU time with one thread, the strategies interleaved round
by round, median of the rounds.

    OMP_NUM_THREADS=1 python benchmarks/planner.py            # writes benchmarks/results/planner.*
    python benchmarks/planner.py --depth 4 --rounds 1 --out /tmp/x   # a quick smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch

import revcompile
from revcompile.budget import ReportError
from revcompile.passes.couplings import RevViT
from revcompile.passes.recompute import plan_chain
from revcompile.pipeline import BlockModes
from revcompile.planner import _chain_costs, build_planned
from revcompile.reference import example_inputs, reference_vit
from revcompile.simulate import tensor_peak

from results_io import run_meta, write_results

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20


def _step_seconds(model, args) -> float:
    start = time.process_time()
    revcompile.simulate.training_loss(model(*args)).backward()
    model.zero_grad(set_to_none=True)
    return time.process_time() - start


def _uniform(model, args, depth: int) -> dict[str, torch.nn.Module]:
    names = [f"blocks.{i}" for i in range(depth)]
    build = lambda modes: build_planned(model, args, {}, tracer="auto", coupling=RevViT(), post_norm="skip",  # noqa: E731
                                        streams="exact", block_modes=modes)
    strategies = {"all stored (original)": model}
    for k in [k for k in range(1, depth + 1) if depth % k == 0]:
        runs = tuple(tuple(names[i:i + k]) for i in range(0, depth, k))
        strategies[f"checkpoint every {k}"] = build(BlockModes(checkpointed=runs))
    strategies["all reversible"] = build(None)
    return strategies


def _measure(models: dict[str, torch.nn.Module], args, rounds: int) -> dict[str, dict]:
    peaks = {name: tensor_peak(model, args) for name, model in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            times[name].append(_step_seconds(model, args))
    return {name: {"peak_bytes": peaks[name], "seconds": statistics.median(times[name])} for name in models}


def _swin():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, embed_dim=48, depths=(2, 2, 4, 2),
                              num_heads=(2, 2, 4, 8), img_size=112, num_classes=10)
    return model, (torch.randn(8, 3, 112, 112),)


def _smallest_plan(model, args, between_blocks: bool, feasible: int, steps: int = 7):
    """The smallest budget (to 1/2^steps of ``feasible``'s span) the planner meets, by bisection, and its plan."""
    low, high = feasible // 2, feasible
    plan = revcompile.plan_memory(model, args, high, between_blocks=between_blocks)
    for _ in range(steps):
        middle = (low + high) // 2
        try:
            plan, high = revcompile.plan_memory(model, args, middle, between_blocks=between_blocks), middle
        except ReportError:
            low = middle
    return plan


def _hierarchical(rounds: int) -> dict:
    """A small timm Swin: plans at the all-reversible step's peak, and the smallest peak planned
    with the blocks only vs with the graph between them (stem, patch merging, head) too."""
    model, args = _swin()
    reversible = revcompile.convert(model, args, check_conversion=False)
    budget = tensor_peak(reversible, args)
    planned = revcompile.convert(model, args, memory_budget=budget, check_conversion=False)
    smallest = {flag: _smallest_plan(model, args, flag, budget) for flag in (False, True)}
    build = lambda plan: build_planned(model, args, {}, tracer="auto", coupling=RevViT(), post_norm="skip",  # noqa: E731
                                       streams="exact", block_modes=plan.block_modes)
    models = {"all reversible": reversible, "plan": planned, "smallest, blocks only": build(smallest[False]),
              "smallest, with regions": build(smallest[True])}
    measured = _measure(models, args, rounds)
    return {"model": "timm Swin (embed 48, depths 2-2-4-2, 112x112, batch 8)", "budget": budget,
            "plan": revcompile.memory_plan(planned).summary(),
            "smallest": {("with regions" if flag else "blocks only"): {"budget": p.budget, "plan": p.summary(),
                                                                       "recomputed": [list(n) for n in p.recomputed]}
                         for flag, p in smallest.items()},
            "meta": run_meta(rounds=rounds),
            **{f"{k} {m}": v for k, d in measured.items() for m, v in d.items()}}


# plan_memory's parts, timed where revcompile.planner calls them (wall seconds per call, summed)
_PARTS = {"trace_for_planning": "trace a stand-in (fx, fake propagation, normalize, detect)", "build_planned": "convert a candidate from the trace",
          "_chain_costs": "block and gap costs (fake interpretation, lower-set DPs)", "simulate_step_peak": "simulate a stand-in's step",
          "plan_chain": "chain DP"}


@contextlib.contextmanager
def _timed_parts(spent: dict):
    """Time ``_PARTS`` inside ``revcompile.planner`` while the block runs: ``spent[label] = [calls, seconds]``."""
    import revcompile.planner as planner

    originals = {name: getattr(planner, name) for name in _PARTS}

    def timed(name, function):
        def call(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                entry = spent.setdefault(_PARTS[name], [0, 0.0])
                entry[0], entry[1] = entry[0] + 1, entry[1] + time.perf_counter() - started
        return call

    for name, function in originals.items():
        setattr(planner, name, timed(name, function))
    try:
        yield spent
    finally:
        for name, function in originals.items():
            setattr(planner, name, function)


def _plan_memory_parts(model, args, budget: int, repeats: int) -> tuple[list, dict]:
    """``repeats`` plans of ``model`` for ``budget``, and per part its calls and median seconds over the runs."""
    plans, runs = [], []
    for _ in range(repeats):
        with _timed_parts({}) as spent:
            plans.append(revcompile.plan_memory(model, args, budget))
        runs.append(spent)
    parts = {label: {"calls": runs[0][label][0], "seconds": statistics.median(r[label][1] for r in runs)} for label in runs[0]}
    return plans, parts


def _dp_seconds(args, depth48_budget_fraction: float = 0.3, repeats: int = 3) -> dict:
    """How long the DPs alone take on a 48-block ViT (its gaps included), and the whole planner at 60% of its peak (median of ``repeats``)."""
    deep = reference_vit(depth=48, dim=192, heads=3, num_classes=10)
    converted = build_planned(deep, args, {}, tracer="auto", coupling=RevViT(), post_norm="skip", streams="exact")
    started = time.perf_counter()
    chain, gaps, _ = _chain_costs(converted, args, {}, RevViT(), "exact")  # includes the gaps' lower-set DPs
    measured = time.perf_counter() - started
    total = sum(b.saved for b in chain)
    timings = []
    for fraction in (0.1, depth48_budget_fraction, 0.6, 0.9):
        started = time.perf_counter()
        plan_chain(chain, int(total * fraction), 0, gaps)
        timings.append(time.perf_counter() - started)
    original = revcompile.simulate.simulate_step_peak(deep, args).peak_bytes
    whole, parts = _plan_memory_parts(deep, args, int(original * 0.6), repeats)
    # the stand-in plan's peak against the whole 48-block step of that plan, simulated
    plan = whole[0]
    converted = build_planned(deep, args, {}, tracer="auto", coupling=RevViT(), post_norm="skip", streams="exact",
                              block_modes=plan.block_modes)
    simulated = revcompile.simulate.simulate_step_peak(converted, args).peak_bytes
    unstood = [revcompile.plan_memory(deep, args, int(original * 0.6), stand_in=False) for _ in range(repeats)]
    checked = revcompile.plan_memory(deep, args, int(original * 0.6), check=True)
    return {"blocks": len(chain), "gaps": len(gaps), "cost_measurement_seconds": measured, "dp_seconds_max": max(timings),
            "plan_memory_seconds": statistics.median(p.planning_seconds for p in whole),
            "plan_memory_seconds_each": [p.planning_seconds for p in whole], "plan_memory_plan": plan.summary(),
            "plan_memory_predicted_by": plan.predicted_by, "plan_memory_predicted_peak": plan.predicted_peak,
            "plan_memory_whole_step_simulated_peak": simulated,
            "whole_model_plan_seconds": statistics.median(p.planning_seconds for p in unstood),
            "whole_model_plan": unstood[0].summary(),
            "checked_plan_seconds": checked.planning_seconds, "checked_predicted_by": checked.predicted_by,
            "plan_memory_parts": [{"part": label, **part} for label, part in parts.items()]}


def _markdown(meta: dict, rows: list[dict], uniform: dict, dp: dict, h: dict) -> str:
    lines = [
        f"Measured {meta['date']} on {meta['machine']} CPU, {meta['threads']} thread(s), torch {meta['torch']}; "
        f"ViT depth {meta['depth']}, width 192, batch {meta['batch']}, float32; CPU seconds per step, median of {meta['rounds']} rounds.",
        "",
        "| budget | plan (stored / checkpointed / reversible) | measured peak | within | step | best uniform that fits | its step | planning |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        best_step = f"{r['best_uniform_seconds']:.3f} s" if r["best_uniform_seconds"] else "-"
        lines.append(
            f"| {r['budget'] / MiB:.1f} MiB | {r['stored']} / {r['checkpointed']} / {r['reversible']} | {r['peak_bytes'] / MiB:.1f} MiB | "
            f"{'yes' if r['peak_bytes'] <= r['budget'] else 'NO'} | {r['seconds']:.3f} s | {r['best_uniform'] or 'none'} | "
            f"{best_step} | {r['planning_seconds']:.1f} s |"
        )
    lines += ["", "| uniform strategy | measured peak | step |", "|---|---|---|"]
    lines += [f"| {name} | {u['peak_bytes'] / MiB:.1f} MiB | {u['seconds']:.3f} s |" for name, u in uniform.items()]
    lines += ["", f"Chain DP alone on {dp['blocks']} blocks: at most {dp['dp_seconds_max']:.2f} s per budget; "
              f"measuring the blocks' costs on fake tensors: {dp['cost_measurement_seconds']:.1f} s."]
    if "plan_memory_seconds" in dp:
        lines += [f"With its {dp['gaps']} gaps: the whole `plan_memory` at 60% of the original's peak took "
                  f"{dp['plan_memory_seconds']:.1f} s, median of {len(dp.get('plan_memory_seconds_each', [0]))} "
                  "(batch 2), in parts (median seconds of the runs):", "", "| part | calls | seconds |", "|---|---|---|"]
        lines += [f"| {p['part']} | {p['calls']} | {p['seconds']:.2f} s |" for p in dp.get("plan_memory_parts", [])]
    if "whole_model_plan_seconds" in dp:
        lines += ["", f"Planned by {dp['plan_memory_predicted_by']}: predicted peak {dp['plan_memory_predicted_peak']} B, "
                  f"the whole {dp['blocks']}-block step of that plan simulated: {dp['plan_memory_whole_step_simulated_peak']} B. "
                  f"The same budget with `check=True` ({dp['checked_predicted_by']}): {dp['checked_plan_seconds']:.1f} s; "
                  f"with `stand_in=False` (the whole model traced, the plan's whole step simulated): "
                  f"{dp['whole_model_plan_seconds']:.1f} s ({dp['whole_model_plan']})."]
    lines += ["", f"{h['model']}, budget {h['budget'] / MiB:.1f} MiB (the all-reversible step's peak): {h['plan']}.", "",
              "| | measured peak | step |", "|---|---|---|",
              *(f"| {name} | {h[name + ' peak_bytes'] / MiB:.1f} MiB | {h[name + ' seconds']:.3f} s |"
                for name in ("all reversible", "plan", "smallest, blocks only", "smallest, with regions") if name + " seconds" in h)]
    lines += [f"", f"Smallest plans ({h['meta']['date']}, {h['meta']['threads']} thread(s)):", ""]
    lines += [f"- {which}: {s['plan']}" for which, s in h.get("smallest", {}).items()]
    return "\n".join(lines) + "\n"


def _rows(plans: dict, uniform: dict, measured: dict) -> list[dict]:
    """Per budget: the plan, its measured step, and the fastest uniform strategy that fits."""
    rows = []
    for budget, (_, plan) in plans.items():
        fitting = {n: u for n, u in uniform.items() if u["peak_bytes"] <= budget}
        best = min(fitting, key=lambda n: fitting[n]["seconds"]) if fitting else None
        rows.append({"budget": budget, **plan.modes, **measured[f"plan {budget}"], "predicted_peak_bytes": plan.predicted_peak,
                     "planning_seconds": plan.planning_seconds, "best_uniform": best,
                     "best_uniform_seconds": fitting[best]["seconds"] if best else None})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=24)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--budgets", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--only", action="append", choices=["hierarchical", "dp"],
                        help="re-run this part only (repeatable), keep the rest of the results")
    options = parser.parse_args()
    out = Path(options.out)
    if options.only:
        data = json.loads((out / "planner.json").read_text())
        if "hierarchical" in options.only:
            data["hierarchical"] = _hierarchical(options.rounds)
        if "dp" in options.only:
            torch.manual_seed(0)
            data["dp"] = _dp_seconds(example_inputs(reference_vit(depth=1, dim=192, heads=3, num_classes=10), batch_size=2))
        uniform = {u.pop("strategy"): u for u in [dict(u) for u in data["uniform"]]}
        markdown = _markdown(data["meta"], data["rows"], uniform, data["dp"], data["hierarchical"])
        write_results(data, out / "planner.json", out / "planner.md", markdown)
        return

    torch.manual_seed(0)
    model = reference_vit(depth=options.depth, dim=192, heads=3, num_classes=10)
    args = example_inputs(model, batch_size=options.batch)
    strategies = _uniform(model, args, options.depth)
    peaks = {name: tensor_peak(m, args) for name, m in strategies.items()}
    low, high = min(peaks.values()), peaks["all stored (original)"]
    budgets = [int(low + (high * 1.05 - low) * i / (options.budgets - 1)) for i in range(options.budgets)]
    # where mixed plans live: between the two smallest uniform strategies
    second = sorted(peaks.values())[1]
    budgets = sorted({*budgets, *(int(low + (second - low) * f) for f in (0.35, 0.7))})
    plans = {}
    for budget in budgets:
        converted = revcompile.convert(model, args, memory_budget=budget, check_conversion=False)
        plans[budget] = (converted, revcompile.memory_plan(converted))
        print(plans[budget][1].summary(), flush=True)
    # every strategy and plan timed in the same rounds, interleaved
    measured = _measure({**strategies, **{f"plan {b}": c for b, (c, _) in plans.items()}}, args, options.rounds)
    uniform = {name: measured[name] for name in strategies}
    rows = _rows(plans, uniform, measured)
    dp = _dp_seconds(example_inputs(model, batch_size=2))
    hierarchical = _hierarchical(options.rounds)
    meta = run_meta(depth=options.depth, batch=options.batch, rounds=options.rounds)
    data = {"meta": meta, "rows": rows, "uniform": [{"strategy": n, **u} for n, u in uniform.items()], "dp": dp,
            "hierarchical": hierarchical}
    write_results(data, out / "planner.json", out / "planner.md", _markdown(meta, rows, uniform, dp, hierarchical))


if __name__ == "__main__":
    main()

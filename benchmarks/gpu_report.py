"""Tables and the goal verdicts of ``gpu_check.py`` (no torch: the parent process stays light).

Every verdict is one of ``met``, ``not met`` or ``not measured``: a goal is met only if it
was measured on every model it names and holds on each; one model that misses it makes it
``not met``; a dry run on CPU measures none of them (its numbers exercise the code).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from train_report import target_ratios, throughput_table

MIB = 2**20
# Short part names -> the models of train_models.MODELS (gpu_parts checks the two agree).
THROUGHPUT_MODELS = {
    "vit_b": "ViT-B/16 (timm)",
    "swin_t": "Swin-T (timm, hierarchical)",
    "mvitv2_t": "MViTv2-T (timm, hierarchical)",
    "gpt2": "GPT-2 (HF)",
}
HIERARCHICAL = [name for name in THROUGHPUT_MODELS.values() if "hierarchical" in name]
# Medians of a few steps move by a few percent between runs: "auto never slower" allows this much.
AUTO_NOISE = 0.03


def rows(results: dict, table: str) -> list[dict]:
    """All rows of ``table`` over the parts, whatever their status (a timed-out part keeps what it wrote)."""
    return [row for part in results["parts"].values() for row in part.get("rows", {}).get(table, [])]


def _speed_ratios(results: dict, numerator: str, denominator: str, models) -> dict[str, float]:
    """Per model: throughput of ``numerator`` over ``denominator`` at the equal batch."""
    seconds = {(r["model"], r["variant"]): r["seconds"] for r in rows(results, "equal_batch") if r.get("seconds")}
    return {m: seconds[(m, denominator)] / seconds[(m, numerator)] for m in models
            if (m, numerator) in seconds and (m, denominator) in seconds}


def _peak_ratios(results: dict, numerator: str, denominator: str, models) -> dict[str, float]:
    peak = {(r["model"], r["variant"]): r["peak_bytes"] for r in rows(results, "equal_batch") if r.get("peak_bytes")}
    return {m: peak[(m, numerator)] / peak[(m, denominator)] for m in models
            if (m, numerator) in peak and (m, denominator) in peak}


def per_sample_bytes(results: dict) -> dict[str, float]:
    """Per variant: the growth of the ViT-L step's peak per added sample, between the two measured batches."""
    points: dict[str, list] = {}
    for r in rows(results, "peaks"):
        if r.get("peak_bytes") is not None:
            points.setdefault(r["variant"], []).append((r["batch"], r["peak_bytes"]))
    slopes = {}
    for variant, pts in points.items():
        (b1, p1), (b2, p2) = min(pts), max(pts)
        if b2 > b1:
            slopes[variant] = (p2 - p1) / (b2 - b1)
    return slopes


def _vit_l_reduction(results: dict) -> dict[str, float]:
    slopes = per_sample_bytes(results)
    if "original" in slopes and slopes.get("reversible", 0) > 0:
        return {"ViT-L/16, reversible": slopes["original"] / slopes["reversible"]}
    return {}


@dataclass(frozen=True)
class Goal:
    text: str
    threshold: float
    at_least: bool  # True: every ratio >= threshold; False: every ratio <= threshold
    ratios: Callable[[dict], dict[str, float]]  # results -> {what was measured: ratio}
    required: tuple[str, ...]  # the keys ``ratios`` must return for the goal to count as measured


THROUGHPUT = tuple(THROUGHPUT_MODELS.values())
GOALS = (
    Goal("ViT-L/16 peak memory per sample >= 16x lower than the original", 16.0, True,
         _vit_l_reduction, ("ViT-L/16, reversible",)),
    Goal("reversible >= 0.75x original throughput at equal batch", 0.75, True,
         lambda r: _speed_ratios(r, "reversible", "original", THROUGHPUT), THROUGHPUT),
    Goal("parallel >= 1.2x reversible throughput on the hierarchical models", 1.2, True,
         lambda r: _speed_ratios(r, "parallel", "reversible", HIERARCHICAL), tuple(HIERARCHICAL)),
    Goal(f"auto never slower than reversible (within {AUTO_NOISE:.0%} timing noise)", 1 - AUTO_NOISE, True,
         lambda r: _speed_ratios(r, "auto", "reversible", THROUGHPUT), THROUGHPUT),
    Goal("parallel's peak memory <= 1.3x reversible's at equal batch", 1.3, False,
         lambda r: _peak_ratios(r, "parallel", "reversible", THROUGHPUT), THROUGHPUT),
)


def evaluate_goals(results: dict, on_gpu: bool) -> list[dict]:
    verdicts = []
    for goal in GOALS:
        ratios = goal.ratios(results)
        holds = {key: (ratio >= goal.threshold if goal.at_least else ratio <= goal.threshold) for key, ratio in ratios.items()}
        missing = [key for key in goal.required if key not in ratios]
        if not on_gpu:
            verdict, why = "not measured", "dry run on CPU: these numbers exercise the code, they measure no GPU goal"
        elif not all(holds.values()):
            verdict, why = "not met", "misses on " + ", ".join(k for k, ok in holds.items() if not ok)
        elif missing:
            verdict, why = "not measured", "no numbers for " + ", ".join(missing)
        else:
            verdict, why = "met", ""
        verdicts.append({"goal": goal.text, "threshold": goal.threshold, "at_least": goal.at_least,
                         "ratios": ratios, "verdict": verdict, "why": why})
    return verdicts


# --- Markdown ---------------------------------------------------------------------------------


def _mib(value) -> str:
    return "-" if value is None else f"{value / MIB:,.1f}"


def _size(value: float) -> str:
    return f"{value / 2**30:,.1f} GiB" if value >= 2**30 else f"{value / MIB:,.0f} MiB"


def _fits(row: dict) -> str:
    if "fits" not in row:
        return "-"
    answer = "yes" if row["fits"] else "no"
    return answer + (" (checked at the batch limit, below the prediction)" if row.get("at_batch_limit") else "")


def status_line(part: dict) -> str:
    line = f"Status: **{part['status']}**"
    if part.get("detail"):
        line += f" ({part['detail']})"
    meta = part.get("meta") or {}
    if meta:
        line += f". {meta['device_name']}, torch {meta['torch']}, {meta['date']}"
    return line + "."


def cuda_tests_markdown(part: dict) -> list[str]:
    tests = part.get("rows", {}).get("tests", [])
    lines = [f"- {text}" for text in part.get("counts_text", [])]
    lines += ["", "| test | outcome | message |", "|---|---|---|"]
    lines += [f"| `{t['name']}` | {t['outcome']} | {t.get('message', '').splitlines()[0][:120] if t.get('message') else ''} |"
              for t in tests]
    return lines


def train_step_markdown(part: dict) -> list[str]:
    equal = part.get("rows", {}).get("equal_batch", [])
    lines = [f"- {note}" for note in part.get("notes", [])]
    if equal:
        lines += ["", "Equal batch: median step time and peak memory of one step.", "", *throughput_table(equal), "",
                  *target_ratios(equal)]
    capped = part.get("rows", {}).get("largest_batch", [])
    if capped:
        lines += ["", f"Largest batch under {_size(capped[0]['cap_bytes'])}: the peak fitted as a line in the "
                  "batch (two measured batches), the largest batch from `revcompile.budget`, then one step at that "
                  "batch (at most the batch limit) measured to confirm it.", "",
                  "| variant | per sample (MiB) | fixed (MiB) | predicted largest batch | checked at | peak there (MiB) | fits |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for r in capped:
            if r.get("oom"):
                lines.append(f"| {r['variant']} | OOM | | | | | |")
                continue
            lines.append(f"| {r['variant']} | {_mib(r['per_sample_bytes'])} | {_mib(r['fixed_bytes'])} | "
                         f"{r['predicted_batch']} | {r.get('checked_batch', '-')} | {_mib(r.get('checked_peak_bytes'))} | "
                         f"{_fits(r)} |")
    return lines


def peak_memory_markdown(part: dict) -> list[str]:
    peaks = part.get("rows", {}).get("peaks", [])
    if not peaks:
        return part.get("notes", [])
    batches = sorted({r["batch"] for r in peaks})
    slopes = per_sample_bytes({"parts": {"peak_memory": part}})
    cell = {(r["variant"], r["batch"]): r for r in peaks}
    lines = ["Peak of one training step (parameters, gradients, activations) at each batch; *per sample*: its "
             "growth per added sample between the two batches; *saved*: activations saved for backward per sample "
             "at the larger batch.", "",
             "| variant | " + " | ".join(f"peak at batch {b} (MiB)" for b in batches)
             + " | per sample (MiB) | vs original | saved per sample (MiB) |",
             "|---|" + "---:|" * (len(batches) + 3)]
    for variant in dict.fromkeys(r["variant"] for r in peaks):
        peaks_at = ["OOM" if cell.get((variant, b), {}).get("oom") else _mib(cell.get((variant, b), {}).get("peak_bytes"))
                    for b in batches]
        slope = slopes.get(variant)
        ratio = f"{slopes['original'] / slope:.1f}x lower" if slope and variant != "original" and "original" in slopes else "-"
        saved = cell.get((variant, batches[-1]), {}).get("saved_bytes")
        lines.append(f"| {variant} | " + " | ".join(peaks_at) + f" | {_mib(slope)} | {ratio} | "
                     f"{_mib(saved / batches[-1]) if saved is not None else '-'} |")
    return lines


def drift_markdown(part: dict) -> list[str]:
    drift = part.get("rows", {}).get("drift", [])
    lines = ["Reference ViT (width 64, batch 4, dropout on), one step in `reversible` against `autograd` "
             "(`benchmarks/numerics.py`). *drift*: largest relative error of a reconstructed block input; *grad*: "
             "relative gradient error; *noise*: the same precision's autograd against float32 autograd.", "",
             "| case | depth | drift | grad worst / median | noise worst / median | finite |", "|---|---:|---:|---:|---:|---|"]
    for r in drift:
        noise = "-" if r["precision_noise_worst"] is None else f"{r['precision_noise_worst']:.1e} / {r['precision_noise_median']:.1e}"
        lines.append(f"| {r['case']} | {r['depth']} | {r['reconstruction_drift']:.1e} | "
                     f"{r['gradient_error_worst']:.1e} / {r['gradient_error_median']:.1e} | {noise} | {r['finite']} |")
    return lines


def part_markdown(name: str, title: str, part: dict) -> str:
    if name == "cuda_tests":
        body = cuda_tests_markdown(part)
    elif name.startswith("train_step_"):
        body = train_step_markdown(part)
    elif name == "peak_memory":
        body = peak_memory_markdown(part)
    else:
        body = drift_markdown(part)
    return "\n".join([f"# {title}", "", status_line(part), "", *body]) + "\n"


def summary_markdown(results: dict, titles: dict[str, str]) -> str:
    meta = results["meta"]
    lines = [f"# GPU check{' (dry run)' if meta['dry_run'] else ''}", "",
             f"{meta['date']}; device: {meta['device_name']}; torch {meta['torch']}; "
             f"wall time {meta['wall_seconds']:.0f} s, CPU time of the parts {meta['cpu_seconds']:.0f} s "
             f"(worst case by the time limits: {meta['worst_case_seconds']:.0f} s).",
             "", "## Parts", "", "| part | status | wall (s) | CPU (s) | limit (s) | table |", "|---|---|---:|---:|---:|---|"]
    for name, part in results["parts"].items():
        status = part["status"] + (f": {part['detail']}" if part.get("detail") else "")
        lines.append(f"| {titles[name]} | {status} | {part['seconds']:.1f} | {part['cpu_seconds']:.1f} | {part['limit_s']:g} | "
                     f"[{name}.md]({name}.md) |")
    lines += ["", "## Goals", "", "| goal | measured | verdict |", "|---|---|---|"]
    for goal in results["goals"]:
        measured = ", ".join(f"{key}: {ratio:.2f}x" for key, ratio in goal["ratios"].items()) or "-"
        verdict = goal["verdict"] + (f" ({goal['why']})" if goal["why"] else "")
        lines.append(f"| {goal['goal']} | {measured} | {verdict} |")
    drift = rows(results, "drift")
    if drift:
        worst = max(drift, key=lambda r: r["gradient_error_worst"])
        lines += ["", f"bf16 drift at depth {worst['depth']} (no goal; [bf16_drift.md](bf16_drift.md)): worst reconstruction "
                  f"drift {max(r['reconstruction_drift'] for r in drift):.1e}, worst gradient error "
                  f"{worst['gradient_error_worst']:.1e} ({worst['case']}), all finite: {all(r['finite'] for r in drift)}."]
    return "\n".join(lines) + "\n"

"""Tables and plots for ``train_step.py`` results (markdown always; a PNG with matplotlib)."""

from __future__ import annotations

from pathlib import Path

MIB = 2**20
ORDER = ["original", "checkpoint", "autograd", "reversible", "parallel", "auto"]


def _mib(value) -> str:
    return "-" if value is None else f"{value / MIB:,.1f}"


def _ratio(value, reference) -> str:
    return "-" if not value or not reference else f"{value / reference:.2f}x"


def throughput_table(rows: list[dict]) -> list[str]:
    lines = [
        "| model | batch | variant | step (ms) | samples/s | vs original | vs reversible | peak (MiB) |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    speed = {(r["model"], r["batch"], r["variant"]): r["batch"] / r["seconds"] for r in rows if r.get("seconds")}
    for r in rows:
        key = (r["model"], r["batch"])
        if r.get("oom"):
            lines.append(f"| {r['model']} | {r['batch']} | {r['variant']} | OOM | | | | |")
            continue
        own = speed[key + (r["variant"],)]
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['variant']} | {r['seconds'] * 1e3:,.1f} | {own:,.1f} | "
            f"{_ratio(own, speed.get(key + ('original',)))} | {_ratio(own, speed.get(key + ('reversible',)))} | "
            f"{_mib(r['peak_bytes'])} |"
        )
    return lines


def target_ratios(rows: list[dict]) -> list[str]:
    """The issue's targets, as measured ratios (min and max over batches)."""
    speed = {(r["model"], r["batch"], r["variant"]): r["batch"] / r["seconds"] for r in rows if r.get("seconds")}
    peak = {(r["model"], r["batch"], r["variant"]): r["peak_bytes"] for r in rows if r.get("peak_bytes")}
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        batches = sorted({r["batch"] for r in rows if r["model"] == model})
        for name, a, b, table in [
            ("reversible / original throughput", "reversible", "original", speed),
            ("parallel / reversible throughput", "parallel", "reversible", speed),
            ("auto / reversible throughput", "auto", "reversible", speed),
            ("parallel / reversible peak memory", "parallel", "reversible", peak),
        ]:
            ratios = [table[(model, n, a)] / table[(model, n, b)] for n in batches if (model, n, a) in table and (model, n, b) in table]
            if ratios:
                lines.append(f"- {model}: {name}: {min(ratios):.2f}x to {max(ratios):.2f}x over batches {batches}")
    return lines


def handwritten_table(rows: list[dict]) -> list[str]:
    """Step time against the hand-written Rev-ViT and per-block checkpointing, and saved bytes."""
    held = any("held_bytes" in r for r in rows)  # results from before this column have no such key
    lines = ["| variant | step (ms) | vs hand-written Rev-ViT | vs checkpoint | vs original | saved (MiB) | "
             + ("held after forward (MiB) | " if held else "") + "peak (MiB) |",
             "|---|---:|---:|---:|---:|---:|" + ("---:|" if held else "") + "---:|"]
    for r in rows:
        if "unavailable" in r:
            lines.append(f"| {r['variant']} | {r['unavailable']} | - | - | - | - |" + (" - |" if held else "") + " - |")
            continue
        ratios = [f"{r[f'vs {v}']:.3f}x" for v in ("hand-written Rev-ViT", "checkpoint", "original")]
        lines.append(f"| {r['variant']} | {r['seconds'] * 1e3:,.1f} | " + " | ".join(ratios)
                     + f" | {_mib(r.get('saved_bytes'))} |" + (f" {_mib(r.get('held_bytes'))} |" if held else "")
                     + f" {_mib(r.get('peak_bytes'))} |")
    return lines


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [f"{meta['date']}, {meta['device']}: {meta['machine']}, torch {meta['torch']}, {meta['size']} sizes, "
             f"median of {meta['steps']} steps after {meta['warmup']} warm-up", ""]
    lines += [f"- {note}" for note in results["notes"]]
    if results["throughput"]:
        lines += ["", *throughput_table(results["throughput"]), "", *target_ratios(results["throughput"])]
    if results["depth"]:
        depths = sorted({r["depth"] for r in results["depth"]})
        variants = [v for v in ORDER if any(r["variant"] == v for r in results["depth"])]
        batch = results["depth"][0]["batch"]
        lines += ["", f"Peak memory of one step (MiB) against depth, batch {batch}; saved for backward in brackets:", "",
                  "| depth | " + " | ".join(variants) + " |", "|---:|" + "---:|" * len(variants)]
        cell = {(r["depth"], r["variant"]): r for r in results["depth"]}
        for depth in depths:
            cells = []
            for v in variants:
                r = cell.get((depth, v), {})
                saved = f" ({_mib(r['saved_bytes'])})" if "saved_bytes" in r else ""
                cells.append("OOM" if r.get("oom") else _mib(r.get("peak_bytes")) + saved)
            lines.append(f"| {depth} | " + " | ".join(cells) + " |")
    if results.get("handwritten"):
        clock = "process CPU time" if results["meta"].get("clock") == "cpu" else "wall clock"
        lines += ["", f"Step time ({clock}; ratios are of times, lower is faster), reference ViT width 384, depth 12, "
                  f"65 tokens, batch {results['handwritten'][0]['batch']}, no dropout; step time is the median over rounds, "
                  "each ratio the median over rounds of the two variants' times in the same round:", "",
                  *handwritten_table(results["handwritten"])]
    if results["max_batch"]:
        first = results["max_batch"][0]
        original = next(r["largest_batch"] for r in results["max_batch"] if r["variant"] == "original")
        lines += ["", f"Largest batch under {first['cap_bytes'] / 2**30:.2f} GiB, ViT depth {first['depth']}, "
                  f"width {first['width']}:", "",
                  "| variant | largest batch | vs original |", "|---|---:|---:|"]
        lines += [f"| {r['variant']} | {r['largest_batch']} | {_ratio(r['largest_batch'], original)} |" for r in results["max_batch"]]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> str:
    """Memory against depth and throughput against batch; skipped without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]'): no plot"
    models = list(dict.fromkeys(r["model"] for r in results["throughput"]))
    panels = (1 if results["depth"] else 0) + len(models)
    if not panels:
        return "nothing to plot"
    figure, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 3.8), squeeze=False)
    axes = list(axes[0])
    if results["depth"]:
        ax = axes.pop(0)
        for variant in ORDER:
            points = sorted((r["depth"], r["peak_bytes"] / MIB) for r in results["depth"] if r["variant"] == variant and r.get("peak_bytes"))
            if points:
                ax.plot(*zip(*points), marker="o", label=variant)
        ax.set(title="peak memory vs depth", xlabel="blocks", ylabel="MiB")
        ax.legend(fontsize=7)
    for ax, model in zip(axes, models):
        for variant in ORDER:
            points = sorted((r["batch"], r["batch"] / r["seconds"]) for r in results["throughput"]
                            if r["model"] == model and r["variant"] == variant and r.get("seconds"))
            if points:
                ax.plot(*zip(*points), marker="o", label=variant)
        ax.set(title=model, xlabel="batch", ylabel="samples/s")
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=7)
    meta = results["meta"]
    figure.suptitle(f"{meta['machine']} ({meta['device']}, {meta['size']} sizes, {meta['date']})", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return f"plot: {path}"

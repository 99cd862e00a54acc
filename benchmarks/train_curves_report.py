"""Summary, tables and the figure of ``train_curves.py`` results."""

from __future__ import annotations

import json
from pathlib import Path

MODELS = ("gpt2", "bytegpt", "vit")


def arm_summary(log: dict, warmup: int) -> dict:
    """The spike of one arm: where the gradient norm peaks, which group carries it, the streams."""
    norms = log["grad_norm"]
    peak = max(range(len(norms)), key=norms.__getitem__)
    groups = {g: values[peak] for g, values in log["groups"].items()}
    after = norms[warmup:] or norms
    return {
        "max_grad_norm": norms[peak], "max_step": peak,
        "max_grad_norm_after_warmup": max(after),
        "median_grad_norm_after_warmup": sorted(after)[len(after) // 2],
        "largest_group_at_max": max(groups, key=groups.get), "groups_at_max": groups,
        "streams_first": log["streams"][0], "streams_at_max": log["streams"][peak], "streams_last": log["streams"][-1],
        "final_loss": log["loss"][-1], "final_val_loss": log["val"][-1][1],
    }


def summary(results: dict) -> dict:
    warmup = results["meta"]["warmup"]
    return {model: {arm: arm_summary(log, warmup) for arm, log in results[model]["arms"].items()}
            for model in MODELS if model in results}


def tables(results: dict) -> str:
    lines = []
    for model, arms in results["summary"].items():
        lines += [f"\n{model}: " + json.dumps(results[model]["model"]), "",
                  "| arm | max grad norm | at step | after warm-up: median | largest group there | "
                  "streams RMS at step 0 | at the max | at the end | final val loss |",
                  "|---|---:|---:|---:|---|---|---|---|---:|"]
        for arm, s in arms.items():
            streams = [" / ".join(f"{v:.2f}" for v in x[:2]) if x else "-" for x in
                       (s["streams_first"], s["streams_at_max"], s["streams_last"])]
            lines.append(f"| {arm} | {s['max_grad_norm']:.2f} | {s['max_step']} | {s['median_grad_norm_after_warmup']:.2f} | "
                         f"{s['largest_group_at_max']} | " + " | ".join(streams) + f" | {s['final_val_loss']:.3f} |")
        check = results[model]["exactness"]
        if check:
            lines.append(f"\nexactness at step {check['step']} of {check['arm']} ({check['dtype']}): worst relative error "
                         f"{check['worst_relative_error']:.1e} ({check['worst_parameter']}), grad norm {check['grad_norm']:.3f}")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> str:
    """Loss and gradient norm against step, per model; skipped without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]'): no plot"
    models = [m for m in MODELS if m in results]
    figure, axes = plt.subplots(2, len(models), figsize=(5.5 * len(models), 6.5), squeeze=False)
    for column, model in enumerate(models):
        for arm, log in results[model]["arms"].items():
            axes[0][column].plot(log["grad_norm"], label=arm, linewidth=0.9)
            axes[1][column].plot(log["loss"], label=arm, linewidth=0.9)
        axes[0][column].set(title=f"{model}: gradient norm (before clipping)", xlabel="step", yscale="log")
        axes[0][column].axvline(results["meta"]["warmup"], color="grey", linestyle=":", linewidth=0.8)
        axes[1][column].set(title=f"{model}: training loss", xlabel="step")
        axes[0][column].legend(fontsize=7)
    meta = results["meta"]
    figure.suptitle(f"{meta['device']}, {meta['date']}, seed {meta['seed']}, clip {meta['clip']}", fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return f"plot: {path}"


def write(results: dict, json_path: Path, image: Path | None) -> None:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=1))
    print(f"wrote {json_path}")
    if image is not None:
        print(plot(results, image))

"""Summary, tables and the figure of ``train_curves.py`` results."""

from __future__ import annotations

import json
from pathlib import Path

MODELS = ("gpt2", "bytegpt", "vit")


def arm_summary(log: dict, warmup: int) -> dict:
    """The spike of one arm: the largest gradient norm from half-way through warm-up on (the
    first steps' large norms are those of a random model), which groups carry it, the streams."""
    norms, start = log["grad_norm"], warmup // 2
    peak = max(range(start, len(norms)), key=norms.__getitem__)
    later = sorted(norms[start:])
    groups = {g: values[peak] for g, values in log["groups"].items()}
    return {
        "first_grad_norm": norms[0], "window_start": start, "peak_grad_norm": norms[peak], "peak_step": peak,
        "median_grad_norm": later[len(later) // 2], "peak_over_median": norms[peak] / later[len(later) // 2],
        "largest_group_at_peak": max(groups, key=groups.get), "groups_at_peak": groups,
        "streams_first": log["streams"][0], "streams_at_peak": log["streams"][peak], "streams_last": log["streams"][-1],
        "final_loss": log["loss"][-1], "final_val_loss": log["val"][-1][1],
    }


def summary(results: dict) -> dict:
    warmup = results["meta"]["warmup"]
    return {model: {arm: arm_summary(log, warmup) for arm, log in results[model]["arms"].items()}
            for model in MODELS if model in results}


def _pair(values, at: slice) -> str:
    return "-" if not values else " / ".join(f"{v:.3f}" for v in values[at])


def arm_table(results: dict, model: str) -> list[str]:
    lines = ["| arm | grad norm at step 0 | peak from step " + str(results["meta"]["warmup"] // 2) +
             " on | at step | median there | largest group at the peak | stream RMS X1 / X2 at the peak | "
             "smallest token RMS X1 / X2 at the peak | stream RMS at the end | final val loss |",
             "|---|---:|---:|---:|---:|---|---|---|---|---:|"]
    for arm, s in results["summary"][model].items():
        lines.append(f"| {arm} | {s['first_grad_norm']:.2f} | {s['peak_grad_norm']:.2f} | {s['peak_step']} | "
                     f"{s['median_grad_norm']:.2f} | {s['largest_group_at_peak']} | {_pair(s['streams_at_peak'], slice(0, 2))} | "
                     f"{_pair(s['streams_at_peak'], slice(2, 4))} | {_pair(s['streams_last'], slice(0, 2))} | "
                     f"{s['final_val_loss']:.3f} |")
    return lines


def group_table(results: dict, model: str) -> list[str]:
    """Every group's gradient norm at each arm's peak."""
    arms = results["summary"][model]
    groups = list(next(iter(arms.values()))["groups_at_peak"])
    lines = ["| group | " + " | ".join(f"{arm} (step {s['peak_step']})" for arm, s in arms.items()) + " |",
             "|---|" + "---:|" * len(arms)]
    for group in groups:
        lines.append(f"| {group} | " + " | ".join(f"{s['groups_at_peak'][group]:.2f}" for s in arms.values()) + " |")
    return lines


def tables(results: dict) -> str:
    lines = []
    for model in results["summary"]:
        lines += ["", f"{model}: " + json.dumps(results[model]["model"]), "", *arm_table(results, model), "",
                  *group_table(results, model)]
        check = results[model]["exactness"]
        if check:
            lines.append(f"\nexactness at step {check['step']} of {check['arm']} ({check['dtype']}): worst relative error "
                         f"{check['worst_relative_error']:.1e} ({check['worst_parameter']}), grad norm {check['grad_norm']:.3f}")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> str:
    """Gradient norm and loss against step, per model; skipped without matplotlib."""
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
            style = dict(linewidth=0.9, linestyle="--" if "autograd" in arm else "-")
            axes[0][column].plot(log["grad_norm"], label=arm, **style)
            axes[1][column].plot(log["loss"], label=arm, **style)
        axes[0][column].set(title=f"{model}: gradient norm before clipping", xlabel="step", yscale="log")
        axes[0][column].axvline(results["meta"]["warmup"], color="grey", linestyle=":", linewidth=0.8)
        axes[1][column].set(title=f"{model}: training loss", xlabel="step")
        axes[0][column].legend(fontsize=7)
    meta = results["meta"]
    figure.suptitle(f"{meta['device']}, {meta['date']}, seed {meta['seed']}, clip {meta['clip']}, "
                    f"warm-up {meta['warmup']} steps (dotted)", fontsize=9)
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


def main(argv=None) -> None:
    """Summarise a results file again (after a change to the summary) and redraw its figure."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("json", type=Path)
    parser.add_argument("--image", type=Path, help="the figure to redraw (none if left out)")
    args = parser.parse_args(argv)
    results = json.loads(args.json.read_text())
    results["summary"] = summary(results)
    write(results, args.json, args.image)
    print(tables(results))


if __name__ == "__main__":
    main()

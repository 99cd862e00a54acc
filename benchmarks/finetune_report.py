"""Tables and the curves picture of ``benchmarks/finetune.py``'s results (what docs/finetuning.md shows)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["plot", "tables"]


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (the 'bench' extra): no picture", flush=True)
        return
    experiments = [(k, v) for k, v in results.items() if k in ("gpt", "vit")]
    fig, axes = plt.subplots(1, len(experiments), figsize=(6.5 * len(experiments), 4.5), squeeze=False)
    for ax, (name, result) in zip(axes[0], experiments):
        for arm, data in result["arms"].items():
            steps, losses = zip(*data["curve"])
            ax.plot(steps, losses, label=arm, linestyle="-" if arm == "original" else "--" if arm == "revvit" else "-.",
                    linewidth=2.5 if arm == "original" else 1.3, marker=".")
        top = max(data["curve"][0][1] for arm, data in result["arms"].items() if arm != "revvit")
        ax.set_ylim(min(d["final_val_loss"] for d in result["arms"].values()) * 0.95, top * 1.15)
        ax.set_title(f"{name}: {result['tasks'][1]}")
        ax.set_xlabel("fine-tuning step")
        ax.set_ylabel("validation loss (cross-entropy)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}", flush=True)


def tables(results: dict) -> str:
    """The results as markdown tables (what docs/finetuning.md shows)."""
    lines = []
    for name in ("gpt", "vit"):
        result = results[name]
        base = result["arms"]["original"]
        lines += [f"\n{name}: pretrained val loss {result['pretrain']['val_loss']:.4f} after {result['pretrain']['steps']} steps "
                  f"(median step {result['pretrain']['median_step_s'] * 1e3:.0f} ms)\n",
                  "| arm | after conversion, pretrain task | vs original | after conversion, fine-tune task | final val loss "
                  "| vs original | saved for backward | step (median) |",
                  "|---|---|---|---|---|---|---|---|"]
        for arm, data in result["arms"].items():
            after, final = data["val_loss_after_conversion"], data["final_val_loss"]
            saved = data["saved_for_backward_bytes"]
            saved = " -> ".join(f"{v / 2**20:.2f} MiB" for v in saved.values()) if isinstance(saved, dict) else f"{saved / 2**20:.2f} MiB"
            pct = lambda a, b: f"{(a / b - 1) * 100:+.3f}%"  # noqa: E731
            lines.append(f"| {arm} | {after['pretrain_task']:.4f} | {pct(after['pretrain_task'], base['val_loss_after_conversion']['pretrain_task'])} "
                         f"| {after['finetune_task']:.4f} | {final:.4f} | {pct(final, base['final_val_loss'])} | {saved} "
                         f"| {data['median_step_s'] * 1e3:.0f} ms |")
    depth = results["depth12_saved_bytes"]
    lines += ["\n12-layer width-128 GPT, saved for backward: " + ", ".join(
        f"{k} {v / 2**20:.2f} MiB" for k, v in depth.items() if k not in ("model", "ratio original / dual k=8"))
        + f"; original / dual k=8 = {depth['ratio original / dual k=8']:.1f}x"]
    return "\n".join(lines)

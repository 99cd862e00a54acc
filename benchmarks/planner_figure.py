"""The time-memory picture of ``benchmarks/planner.py``'s results (what docs/benchmarks.md shows).

    python benchmarks/planner_figure.py [--results benchmarks/results/planner.json]
                                        [--image docs/images/planner_frontier.png]

Reads the results file, never measures: each planned step is a point on the planner's
frontier (measured peak, step time), joined in budget order, and each uniform strategy
(all stored, ``torch.utils.checkpoint`` every k blocks, all reversible) is a labelled point,
so a reader sees that the frontier lies below and left of every uniform strategy it beats.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["plot"]

MIB = 2**20


def _short(strategy: str) -> str:
    return strategy.replace("checkpoint every ", "ckpt/").replace(" (original)", "")


def plot(results: dict, path: Path) -> bool:
    """Draw the frontier and the uniform points; False (and a message) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (the 'bench' extra): no picture", flush=True)
        return False
    rows = sorted(results["rows"], key=lambda row: row["budget"])
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    ax.plot([r["peak_bytes"] / MIB for r in rows], [r["seconds"] for r in rows], marker="o", color="tab:blue",
            label="planner (one point per budget)")
    for row in rows:
        ax.axvline(row["budget"] / MIB, color="tab:blue", alpha=0.12, linewidth=1)
    for uniform in results["uniform"]:
        x, y = uniform["peak_bytes"] / MIB, uniform["seconds"]
        ax.scatter([x], [y], marker="s", color="tab:orange", zorder=3)
        ax.annotate(_short(uniform["strategy"]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.scatter([], [], marker="s", color="tab:orange", label="uniform strategies")
    ax.set_xscale("log")
    ax.set_xlabel("measured peak of the step above parameters and gradients (MiB, log scale)")
    ax.set_ylabel("step time (s, CPU, one thread)")
    meta = results["meta"]
    ax.set_title(f"ViT depth {meta['depth']}, batch {meta['batch']}: time against memory ({meta['date']}, CPU)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}", flush=True)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/planner.json"))
    parser.add_argument("--image", type=Path, default=Path("docs/images/planner_frontier.png"))
    args = parser.parse_args()
    plot(json.loads(args.results.read_text()), args.image)


if __name__ == "__main__":
    main()

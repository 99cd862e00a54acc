"""The ``revcompile`` command line: ``revcompile report`` converts a model and measures it.

With no model given, ``report`` uses the built-in reference ViT (12 blocks), so that a
fresh install can show what revcompile does with one command.
"""

from __future__ import annotations

import argparse
import sys

import torch
from rich.console import Console
from rich.table import Table

from revcompile.errors import ConversionError

__all__ = ["main"]


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.1f} MiB"


def _ratio(a: int | None, b: int | None) -> str:
    return "n/a" if a is None or b is None else f"{a / max(b, 1):.1f}x"


def _print_report(console: Console, report) -> None:
    plan = report.plan
    console.print(
        f"[bold]{report.model}[/bold]: batch {report.batch_size}, {report.device}, {report.dtype}, "
        f"traced with {plan.tracer}"
    )
    console.print(
        f"Converted [bold green]{len(plan.blocks)} blocks[/bold green] into {len(plan.segments)} reversible "
        f"segment{'s' if len(plan.segments) != 1 else ''}; {len(plan.skipped)} residuals left as they are."
    )
    for segment in plan.segments:
        console.print(f"  segment {segment.index}: {segment.name} ({len(segment.blocks)} blocks)")
    for skipped in plan.skipped:
        console.print(f"  [yellow]skipped[/yellow] {skipped.node} {skipped.module}: {skipped.reason}")
    table = Table(title="One training step (forward + backward)")
    table.add_column("")
    table.add_column("original", justify="right")
    table.add_column("converted", justify="right")
    table.add_column("reduction", justify="right")
    o, c = report.original, report.converted
    table.add_row("activations saved for backward", _mib(o.saved_bytes), _mib(c.saved_bytes), _ratio(o.saved_bytes, c.saved_bytes))
    peak_label = "peak allocated during the step" if report.device.startswith("cuda") else "peak live heap during the step"
    table.add_row(peak_label, _mib(o.peak_bytes), _mib(c.peak_bytes), _ratio(o.peak_bytes, c.peak_bytes))
    table.add_row("step time", f"{o.seconds * 1e3:,.0f} ms", f"{c.seconds * 1e3:,.0f} ms", f"{c.seconds / o.seconds:.2f}x time")
    console.print(table)


def _report(args: argparse.Namespace, console: Console) -> int:
    from revcompile.reference import example_inputs, reference_vit
    from revcompile.report import memory_report

    if args.model not in (None, "reference-vit"):
        console.print(f"[red]error:[/red] unknown model {args.model!r}; this version knows only the built-in 'reference-vit'")
        return 2
    torch.manual_seed(0)
    model = reference_vit(depth=args.depth)
    inputs = example_inputs(model, batch_size=args.batch_size)
    with console.status("converting and measuring ..."):
        report = memory_report(model, inputs, name=f"reference-vit (built-in, depth {args.depth})")
    _print_report(console, report)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="revcompile", description="Convert transformers into reversible networks.")
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser("report", help="convert a model and measure the memory it saves")
    report.add_argument("model", nargs="?", default=None, help="model to convert (default: the built-in reference ViT)")
    report.add_argument("--batch-size", type=int, default=16)
    report.add_argument("--depth", type=int, default=12, help="blocks of the built-in model")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console()
    try:
        return _report(args, console)
    except ConversionError as err:
        console.print(f"[red]revcompile: {err}[/red]")
        return 1


if __name__ == "__main__":
    sys.exit(main())

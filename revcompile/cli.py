"""The ``revcompile`` command line.

    revcompile report [MODEL] [--memory-cap 16GiB] [--json]   what conversion saves, measured and predicted
    revcompile report [MODEL] --budget 4GiB                   per block stored/checkpointed/reversible to fit 4GiB
    revcompile report MODEL --predict-only [--dtype bfloat16] [--autocast bfloat16] --memory-cap 80GiB
                                                           the same predicted without allocating: will it fit?
    revcompile show [MODEL] [-o FILE.svg] [--before] [--expand]   what became reversible, as a picture

MODEL is ``timm:NAME``, ``torchvision:NAME``, ``hf:MODEL_TYPE`` or ``package.module:callable``
(see ``revcompile.models_spec``); without one, the built-in reference ViT (12 blocks), so
that a fresh install shows what revcompile does with one command. Mistakes a user can make
(an unknown model, a bad ``--config``, example inputs the model cannot take, a memory cap
nothing fits) end in one line on stderr and a non-zero exit status, never in a traceback.
torch's own logging and warnings are silenced (``revcompile.quiet``); ``--verbose`` lets
them through.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch
from rich.console import Console
from rich.table import Table

from revcompile.budget import (
    OPTIMIZER_NAMES,
    OPTIMIZER_STATE,
    ReportError,
    format_bytes,
)
from revcompile.errors import ConversionError, one_line
from revcompile.frontend import TRACERS
from revcompile.models_spec import SpecError, build_model, parse_config, parse_spec
from revcompile.quiet import LOGGER, quiet_torch

__all__ = ["main", "build_parser"]

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + error
        self.exit(2, f"revcompile: error: {message} (see revcompile {self.prog.split()[-1]} --help)\n")


def _input_shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(d) for d in text.replace("x", ",").split(",") if d.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 3,224,224, got {text!r}") from None


def _model_options() -> argparse.ArgumentParser:
    """What both commands take: the model, its inputs, how to convert it."""
    model = _Parser(add_help=False)
    model.add_argument("model", nargs="?", default=None,
                       help="timm:NAME, torchvision:NAME, hf:MODEL_TYPE or package.module:callable (default: built-in ViT)")
    model.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                       help="model constructor / config override, repeatable (e.g. --config n_layer=24)")
    model.add_argument("--seq-len", type=int, default=None,
                       help="tokens per sample for language models (default 128, capped by the config's positions)")
    model.add_argument("--image-size", type=int, default=None, help="image side for vision models (default: the model's)")
    model.add_argument("--input-shape", type=_input_shape, default=None, metavar="C,H,W",
                       help="for package.module:callable models: one sample's input shape (a float tensor)")
    model.add_argument("--tracer", choices=TRACERS, default="auto")
    model.add_argument("--coupling", choices=("revvit", "dual"), default="revvit",
                       help="what the converted blocks compute: revvit (default, a new architecture) or dual "
                            "(keeps a pretrained model's function within ~beta)")
    model.add_argument("--beta", type=float, default=None, help="dual coupling: beta = 2**-k (default 2**-8)")
    model.add_argument("--alpha", type=float, default=None, help="dual coupling: alpha (default 1 - beta)")
    model.add_argument("--seed", type=int, default=0)
    model.add_argument("--verbose", action="store_true", help="let torch's tracing logs and warnings through (to stderr)")
    return model


def build_parser() -> argparse.ArgumentParser:
    model = _model_options()
    parser = _Parser(prog="revcompile", description="Convert transformers into reversible networks.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    report = commands.add_parser("report", parents=[model], help="convert a model and report the memory it saves")
    report.add_argument("--batch-size", type=int, default=8, help="the measured batch size")
    report.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    report.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    report.add_argument("--memory-cap", default=None, metavar="SIZE", help="find the largest batch under SIZE (e.g. 16GiB)")
    report.add_argument("--plan-batch", action="store_true",
                        help="with --memory-cap, also the largest batch some memory plan fits (runs the planner per batch probed: slow)")
    report.add_argument("--budget", default=None, metavar="SIZE",
                        help="plan per block stored / checkpointed / reversible so that the step's activations "
                             "and working memory fit SIZE (e.g. 4GiB), with the least recompute")
    report.add_argument("--optimizer", choices=tuple(OPTIMIZER_STATE), default="adamw", help="whose state to count (default adamw)")
    report.add_argument("--reserve", default="512MiB", metavar="SIZE",
                        help="memory that is not tensors: CUDA context, fragmentation (default 512MiB)")
    report.add_argument("--json", action="store_true", help="write the report as JSON on stdout")
    report.add_argument("--predict-only", action="store_true",
                        help="build on the meta device, predict without allocating or measuring (models too large to hold)")
    report.add_argument("--autocast", choices=("bfloat16", "float16"), default=None,
                        help="--predict-only: count the step as run under CPU autocast in this dtype")
    report.add_argument("--sketch-linears", type=float, default=None, metavar="FRACTION",
                        help="opt-in approximate weight gradients: sketch linear layers outside reversible segments, "
                        "keeping FRACTION of their input (docs/sketch.md)")
    show = commands.add_parser("show", parents=[model], help="draw what became reversible (SVG, DOT, HTML) or print it")
    show.add_argument("-o", "--output", default=None, metavar="FILE", help="FILE.svg, FILE.dot or FILE.html")
    show.add_argument("--before", action="store_true", help="draw the original graph beside the rewritten one")
    show.add_argument("--expand", action="store_true", help="draw every op instead of one box per block")
    show.add_argument("--batch-size", type=int, default=2, help="batch of the example call used for tracing")
    return parser


def _build(args, console: Console, device: str = "cpu", dtype: torch.dtype = torch.float32):
    spec = parse_spec(args.model)
    config = parse_config(args.config)
    torch.manual_seed(args.seed)
    with console.status(f"building {spec} (random weights) ..."):
        built = build_model(spec, config, batch_size=args.batch_size, seq_len=args.seq_len,
                            image_size=args.image_size, input_shape=args.input_shape)
    model = built.model.to(device=device, dtype=dtype)

    def move(value):
        if isinstance(value, torch.Tensor):
            return value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
        return value

    return built, model, tuple(move(a) for a in built.args), {k: move(v) for k, v in built.kwargs.items()}


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 100:+.1f}%"


def _print_plan(console: Console, report) -> None:
    plan = report.plan
    console.print(f"[bold]{report.model}[/bold] · batch {report.batch_size} · {report.device} · {report.dtype} · {plan.tracer} trace")
    console.print(
        f"Converted [bold green]{len(plan.blocks)} blocks[/bold green] into {len(plan.segments)} reversible "
        f"segment{'s' if len(plan.segments) != 1 else ''}; {len(plan.skipped)} of {plan.residuals_found} residuals left alone."
    )
    for segment in plan.segments:
        console.print(f"  segment {segment.index}: {segment.name} ({len(segment.blocks)} blocks); ends: {segment.ends_because}")
    for skipped in plan.skipped:
        console.print(f"  [yellow]skipped[/yellow] {skipped.node} {skipped.module}: {skipped.reason}")
    for note in plan.notes:
        console.print(f"  [dim]note: {note}[/dim]")


def _print_measured(console: Console, report) -> None:
    o, c = report.original, report.converted
    table = Table(title=f"Measured: one training step (forward + backward), batch {report.batch_size}")
    for name, justify in (("", "left"), ("original", "right"), ("converted", "right"), ("reduction", "right")):
        table.add_column(name, justify=justify)
    table.add_row("activations saved for backward", format_bytes(o.saved_bytes), format_bytes(c.saved_bytes),
                  f"[bold green]{report.saved_reduction:.1f}x[/bold green]")
    peak = f"{report.peak_reduction:.1f}x" if report.peak_reduction else "n/a"
    table.add_row(f"peak during the step ({report.peak_kind})", format_bytes(o.peak_bytes), format_bytes(c.peak_bytes), peak)
    table.add_row("step time", f"{o.seconds * 1e3:,.0f} ms", f"{c.seconds * 1e3:,.0f} ms", f"{c.seconds / o.seconds:.2f}x time")
    console.print(table)


def _print_memory_plan(console: Console, plan, report) -> None:
    table = Table(title=f"Memory plan for a budget of {format_bytes(plan.budget)} (activations + working memory)")
    for name, justify in (("blocks", "left"), ("mode", "left"), ("count", "right")):
        table.add_column(name, justify=justify)
    for line in plan.table().splitlines()[1:]:
        where, mode, count = line.rsplit(None, 2)
        table.add_row(where.strip(), mode, count.strip("()"))
    console.print(table)
    fits = "[green]within[/green]" if report.converted.peak_bytes <= plan.budget else "[red]OVER[/red]"
    console.print(f"{plan.summary()}; measured peak {format_bytes(report.converted.peak_bytes)}, {fits} the budget.")


def _print_prediction(console: Console, report) -> None:
    p = report.prediction
    if p is None:
        console.print(f"[yellow]No prediction[/yellow]: the graphs could not be interpreted on fake tensors ({report.prediction_failure}).")
        return
    table = Table(title=f"Predicted from the graphs: activation bytes per sample (fitted at batches {', '.join(map(str, p.batches))})")
    for name, justify in (("part", "left"), ("original", "right"), ("converted", "right")):
        table.add_column(name, justify=justify)
    for i, part in enumerate(p.parts):
        style = "green" if part.kind == "segment" else "grey50"
        table.add_row(f"[{style}]{part.name}[/{style}]", format_bytes(part.original.per_sample),
                      format_bytes(part.converted.per_sample), end_section=i == len(p.parts) - 1)
    table.add_row("[bold]saved for backward[/bold]", format_bytes(p.original_saved.per_sample), format_bytes(p.converted_saved.per_sample), end_section=True)
    table.add_row("+ backward working memory", format_bytes(p.original_peak.per_sample - p.original_saved.per_sample),
                  format_bytes(p.converted_peak.per_sample - p.converted_saved.per_sample))
    table.add_row("[bold]= peak per sample[/bold]", format_bytes(p.original_peak.per_sample), format_bytes(p.converted_peak.per_sample))
    table.add_row("+ fixed, any batch size", format_bytes(p.original_peak.fixed), format_bytes(p.converted_peak.fixed))
    console.print(table)
    errors = report.prediction_errors() or {}
    console.print(
        f"Prediction vs measurement (batch {report.batch_size}): saved "
        f"{_pct(errors.get('original_saved'))} / {_pct(errors.get('converted_saved'))}, peak "
        f"{_pct(errors.get('original_peak'))} / {_pct(errors.get('converted_peak'))} (original / converted)."
    )
    for note in p.notes:
        console.print(f"  [dim]note: {note}[/dim]")


def _print_capacity(console: Console, report) -> None:
    cap, state = report.capacity, report.training
    table = Table(title=f"Predicted largest training batch under {format_bytes(cap.memory_cap)} ({OPTIMIZER_NAMES[state.optimizer]})")
    for name, justify in (("", "left"), ("original", "right"), ("converted", "right")):
        table.add_column(name, justify=justify)
    table.add_row("parameters + gradients", format_bytes(state.parameters + state.gradients), "same")
    table.add_row(f"{OPTIMIZER_NAMES[state.optimizer]} state ({OPTIMIZER_STATE[state.optimizer]} per parameter)",
                  format_bytes(state.optimizer_state), "same")
    table.add_row("reserve (CUDA context, fragmentation)", format_bytes(state.reserve), "same")
    table.add_row("activations per sample (predicted peak)", format_bytes(cap.per_sample_original), format_bytes(cap.per_sample_converted))
    table.add_row("[bold]largest batch[/bold]", f"[bold]{cap.original:,}[/bold]", f"[bold green]{cap.converted:,}[/bold green]")
    if cap.planned is not None:
        table.add_row("largest batch with a memory plan (stored / checkpointed / reversible per block)", "",
                      f"[bold green]{cap.planned:,}[/bold green]")
    console.print(table)


def _headline(report) -> str:
    line = (f"[bold]Activation memory {report.saved_reduction:.1f}x smaller[/bold] "
            f"({format_bytes(report.original.saved_bytes)} -> {format_bytes(report.converted.saved_bytes)} at batch {report.batch_size})")
    cap = report.capacity
    if cap is not None:
        gain = f" ({cap.gain:.1f}x)" if cap.gain else " (the original does not fit at all)"
        line += f"; under {format_bytes(cap.memory_cap)} the predicted largest batch goes from {cap.original:,} to [bold green]{cap.converted:,}[/bold green]{gain}"
        if cap.planned is not None and cap.planned > cap.converted:
            line += f", {cap.planned:,} with a memory plan"
    return line + "."


def _report(args, console: Console) -> int:
    from revcompile.api import convert, memory_plan
    from revcompile.report import memory_report

    if args.predict_only:
        return _predict_only(args, console)
    if args.autocast is not None:
        raise ReportError("--autocast is counted by --predict-only; a measured report runs without autocast")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ReportError("--device cuda: no CUDA device is available here; use --device cpu")
    built, model, inputs, kwargs = _build(args, console, args.device, DTYPES[args.dtype])
    if args.memory_cap is None and args.device == "cuda":  # what this device has
        args.memory_cap = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    with console.status("tracing and converting ...") as status:
        if args.budget is not None:
            status.update(f"planning for a budget of {args.budget} (simulating candidate steps) ...")
        converted = convert(model.train(), inputs, kwargs, sketch_linears=args.sketch_linears, memory_budget=args.budget,
                            **_conversion(args))
        report = memory_report(model, inputs, kwargs, converted=converted, name=built.label, memory_cap=args.memory_cap,
                               optimizer=args.optimizer, reserve=args.reserve, progress=lambda text: status.update(f"{text} ..."),
                               planned_batch=args.plan_batch)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    out = Console()
    _print_plan(out, report)
    _print_measured(out, report)
    if args.budget is not None:
        _print_memory_plan(out, memory_plan(converted), report)
    if report.sketch is not None:
        out.print(report.sketch)
    _print_prediction(out, report)
    if report.capacity is not None:
        _print_capacity(out, report)
    else:
        out.print("[dim]Add --memory-cap 16GiB to see the largest batch that fits.[/dim]")
    out.print(_headline(report))
    return 0


def _print_fit(out: Console, fit) -> None:
    from revcompile.predict import NO_STORAGE

    p, state, plan = fit.prediction, fit.training, fit.plan
    amp = f" · autocast {fit.autocast} (CPU policy)" if fit.autocast else ""
    out.print(f"[bold]{fit.model}[/bold] · {fit.parameter_count / 1e9:.2f}B parameters · {fit.dtype}{amp} · {plan.tracer} trace")
    out.print(f"[bold]Predicted, not measured[/bold]: {NO_STORAGE}.")
    out.print(f"Converted [bold green]{len(plan.blocks)} blocks[/bold green] into {len(plan.segments)} reversible "
              f"segment{'s' if len(plan.segments) != 1 else ''}; {len(plan.skipped)} of {plan.residuals_found} residuals left alone.")
    for note in (*fit.notes, *plan.notes, *p.notes):
        out.print(f"  [dim]note: {note}[/dim]")
    table = Table(title="Predicted training step (activations fitted at batches "
                        f"{', '.join(map(str, p.batches))}; kernels as on CPU)")
    for name, justify in (("", "left"), ("original", "right"), ("converted", "right")):
        table.add_column(name, justify=justify)
    table.add_row("activations saved for backward, per sample", format_bytes(p.original_saved.per_sample),
                  format_bytes(p.converted_saved.per_sample))
    table.add_row("peak activations, per sample", format_bytes(p.original_peak.per_sample), format_bytes(p.converted_peak.per_sample))
    table.add_row("peak activations, fixed (any batch)", format_bytes(p.original_peak.fixed), format_bytes(p.converted_peak.fixed))
    table.add_row("parameters + gradients", format_bytes(state.parameters + state.gradients), "same")
    table.add_row(f"{OPTIMIZER_NAMES[state.optimizer]} state ({OPTIMIZER_STATE[state.optimizer]} per parameter, float32)",
                  format_bytes(state.optimizer_state), "same")
    table.add_row("reserve (CUDA context, fragmentation)", format_bytes(state.reserve), "same")
    for batch in (1, fit.example_batch):
        table.add_row(f"peak of the step at batch {batch}", format_bytes(state.total + p.original_peak.at(batch)),
                      format_bytes(state.total + p.converted_peak.at(batch)))
    cap = fit.capacity
    if cap is not None:
        table.add_row(f"[bold]largest batch under {format_bytes(cap.memory_cap)}[/bold]", f"[bold]{cap.original:,}[/bold]",
                      f"[bold green]{cap.converted:,}[/bold green]")
    out.print(table)
    if cap is None:
        out.print("[dim]Add --memory-cap 80GiB to see the largest batch that fits.[/dim]")


def _predict_only(args, console: Console) -> int:
    from revcompile.predict import predict_memory

    if args.device != "cpu":
        raise ReportError("--predict-only runs nothing on a device; leave out --device")
    if getattr(args, "sketch_linears", None) is not None:
        raise ReportError("--predict-only does not predict sketched linears yet; leave out --sketch-linears")
    spec = parse_spec(args.model)
    with console.status(f"building {spec} on the meta device ..."):
        built = build_model(spec, parse_config(args.config), batch_size=args.batch_size, seq_len=args.seq_len,
                            image_size=args.image_size, input_shape=args.input_shape, device="meta")
    with console.status("tracing and converting on fake tensors ...") as status:
        fit = predict_memory(built.model, built.args, built.kwargs, dtype=DTYPES[args.dtype],
                             autocast=args.autocast, memory_cap=args.memory_cap, optimizer=args.optimizer,
                             reserve=args.reserve, tracer=args.tracer, name=built.label, notes=built.notes,
                             progress=lambda text: status.update(f"{text} ..."))
    if args.json:
        print(json.dumps(fit.to_dict(), indent=2))
    else:
        _print_fit(Console(), fit)
    return 0


def _conversion(args) -> dict:
    """The ``convert`` options the command line chose (a bad coefficient is a one-line error)."""
    from revcompile.passes.couplings import make_coupling

    try:
        make_coupling(args.coupling, beta=args.beta, alpha=args.alpha)
    except ValueError as err:
        raise ReportError(f"--coupling {args.coupling}: {err}") from None
    return {"tracer": args.tracer, "coupling": args.coupling, "beta": args.beta, "alpha": args.alpha}


def _show(args, console: Console) -> int:
    from revcompile.api import convert
    from revcompile.show import FORMATS, draw, plan_tree

    if args.output is not None and not args.output.lower().endswith(FORMATS):
        raise ReportError(f"-o {args.output}: the file name must end in one of {', '.join(FORMATS)}")
    built, model, inputs, kwargs = _build(args, console)
    with console.status("tracing and converting ..."):
        converted = convert(model, inputs, kwargs, **_conversion(args))
    if args.output is None:
        Console().print(plan_tree(converted, built.label))
        return 0
    draw(converted, args.output, before=args.before, expand=args.expand, title=f"{built.label}: what revcompile made reversible")
    plan = converted.reversible_plan
    console.print(f"wrote {args.output}: {len(plan.blocks)} blocks in {len(plan.segments)} reversible segment{'s' if len(plan.segments) != 1 else ''}")
    return 0


def _verbose_logging() -> None:
    """``--verbose``: the ``revcompile`` logger at DEBUG, which ``quiet_torch`` reads as "let it through"."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.DEBUG)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(file=sys.stderr)  # bound now: quiet_torch swaps sys.stderr for torch's prints
    if args.verbose:
        _verbose_logging()
    try:
        with quiet_torch():
            return (_report if args.command == "report" else _show)(args, console)
    except (SpecError, ReportError) as err:
        print(f"revcompile: error: {one_line(err, with_type=False)}", file=sys.stderr)
        return 2
    except ConversionError as err:
        print(f"revcompile: cannot convert: {one_line(err, with_type=False)}", file=sys.stderr)
        return 1
    except torch.OutOfMemoryError:
        print("revcompile: error: out of memory while measuring; try a smaller --batch-size", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

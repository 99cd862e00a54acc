"""The fastest training step that fits a byte budget: per block stored, checkpointed or reversible.

``plan_memory(model, example_inputs, "6GiB")`` answers "I have this much memory for the
step": the budget is the step's activation and working memory on top of what exists before
and after it (parameters, their gradients, optimizer state: ``revcompile.budget`` counts
those for a memory cap). It works in three moves:

1. if the original step fits (simulated on fake tensors, ``revcompile.simulate``), nothing
   changes: every block is stored;
2. otherwise the blocks' costs are measured on the traced graph
   (``revcompile.passes.block_costs``), the graph between blocks -- stem, stage
   transitions, head -- is priced as cost graphs whose recompute options Kusumoto's
   lower-set DP finds (``revcompile.passes.gap_costs``, ``revcompile.passes.lower_sets``),
   and the chain DP (``revcompile.passes.recompute``) picks, per block and per gap, the
   plan with the least recompute whose modelled peak fits;
3. the chosen plan is converted and its whole step simulated. What the model leaves out --
   embeddings, head, loss, the backward's working memory -- is the difference between that
   peak and the model's; the DP runs again with the budget reduced by it until the
   simulated step fits (it is exact byte for byte on CPU, and what CUDA's allocator adds is
   ``reserve`` in ``revcompile.budget``).

What planning costs is tracing and simulating on fake tensors. A model whose blocks are one
stack of layers alike is planned on stand-ins, the stack cut to four layers
(``_plan_on_stand_ins``): 1.5 s for a 48-layer ViT, its peak the whole step's to the byte.
Otherwise each is done as rarely as the guarantee allows: the model is traced once and every candidate converted from that
trace (``revcompile.pipeline.TracedCall``); the every-block-reversible step is simulated
only when a chosen plan has reversible blocks (its peak prices a reversible backward's
working memory, which only such plans pay, so without it the DP picks the same plan); and
no plan is simulated twice.

Within a plan every block computes what it computed before, except the reversible ones,
which compute the model's coupling: with ``coupling="dual"`` that is within ``beta`` of the
original, so a budget changes the memory and the time, not the function (pretrained
weights keep their meaning); with ``"revvit"`` the reversible blocks form a different
architecture, so plan once and train that.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from torch import nn

from revcompile.budget import ReportError, format_bytes, parse_bytes
from revcompile.collector import spares_collector
from revcompile.converted import ReversibleModel
from revcompile.errors import ConversionError
from revcompile.frontend import bind_call, training_defaults
from revcompile.passes.block_costs import measure_plan_costs
from revcompile.passes.couplings import Coupling
from revcompile.layer_reuse import LayerStack, find_memory_stack, stand_in_stack
from revcompile.passes.recompute import BlockCost, ChainPlan, GapCost, Region, Working, chain_cost, plan_chain, uniform_plan
from revcompile.pipeline import BlockModes, TracedCall, trace_call
from revcompile.simulate import simulate_step_peak

__all__ = ["MemoryPlan", "plan_memory", "build_planned", "trace_for_planning", "planned_peak"]

_ATTEMPTS = 6
# A stack of at least STAND_IN_MIN layers alike is planned on stand-ins: the model with the
# stack cut to STAND_IN_LAYERS layers (its first three, its last) for the costs and
# the calibration, and cut to the chosen plan's pattern for its check.
STAND_IN_MIN = 12
STAND_IN_LAYERS = 4


@dataclass(frozen=True)
class MemoryPlan:
    """Per block what the step does with it, and what that costs (bytes above parameters and gradients)."""

    budget: int
    tracer: str
    blocks: tuple[tuple[str, str], ...]  # (block name, "stored" | "checkpointed" | "reversible") in order
    block_modes: BlockModes
    predicted_peak: int  # the planned step, simulated
    original_peak: int  # the original step, simulated
    reversible_peak: int | None  # every block reversible, simulated (None when planning did not need it)
    extra_flops: float  # recomputed forwards per step
    step_flops: float  # the blocks' share of a step: forward + backward, ~3x their forward FLOPs
    planning_seconds: float
    # how the peaks were obtained: the whole step simulated, or the chain model calibrated on stand-ins
    predicted_by: str = "simulating the planned step"

    @property
    def recomputed(self) -> tuple[tuple[str, ...], ...]:
        """Sets of graph nodes between blocks (stem, stage transitions, head) recomputed in backward."""
        return self.block_modes.recomputed

    @property
    def modes(self) -> dict[str, int]:
        counts = {"stored": 0, "checkpointed": 0, "reversible": 0}
        for _, mode in self.blocks:
            counts[mode] += 1
        return counts

    @property
    def keeps_original(self) -> bool:
        """Every block stored: the original's step, unchanged."""
        return all(mode == "stored" for _, mode in self.blocks)

    def summary(self) -> str:
        counts = ", ".join(f"{n} {mode}" for mode, n in self.modes.items() if n)
        if self.recomputed:
            counts += f"; {len(self.recomputed)} part(s) between blocks recomputed"
        extra = f"{self.extra_flops / self.step_flops:.0%}" if self.step_flops else "n/a"
        return (
            f"memory plan for {format_bytes(self.budget)}: {counts}; predicted peak {format_bytes(self.predicted_peak)} "
            f"(original {format_bytes(self.original_peak)}), about {extra} more compute per step"
        )

    def table(self) -> str:
        """The blocks as runs of one mode: ``blocks.0 .. blocks.5  reversible``."""
        lines, run = [], []
        for name, mode in (*self.blocks, ("", "")):
            if run and mode != run[0][1]:
                where = run[0][0] if len(run) == 1 else f"{run[0][0]} .. {run[-1][0]}"
                lines.append(f"  {where:<32} {run[0][1]} ({len(run)})")
                run = []
            run.append((name, mode))
        lines += [f"  {nodes[0] + ' .. ' + nodes[-1]:<32} recomputed ({len(nodes)} nodes between blocks)" for nodes in self.recomputed]
        return "\n".join([self.summary(), *lines])

    def __str__(self) -> str:
        return self.table()


def build_planned(model: nn.Module, args: tuple, kwargs: dict, *, tracer: str, coupling: Coupling, post_norm: str,
                  streams: str, block_modes: BlockModes | None = None, traced: TracedCall | None = None,
                  **options) -> ReversibleModel:
    """``model`` converted with ``block_modes`` and compiled for the example call
    (from ``traced``, ``trace_for_planning``'s trace of that call, when given)."""
    converted = ReversibleModel(model, tracer=tracer, coupling=coupling, post_norm=post_norm, streams=streams,
                                block_modes=block_modes, **options)
    converted.compile_for(args, kwargs, traced=traced)
    return converted


def trace_for_planning(model: nn.Module, args: tuple, kwargs: dict, *, tracer: str, post_norm: str) -> TracedCall:
    """``model`` traced and normalised for the example call as ``build_planned`` traces it, to build many plans from."""
    call = bind_call(model, args, kwargs, training_defaults(model, kwargs))
    return trace_call(model, call, tracer, model.training, post_norm)[0]


class _Candidates:
    """The plans one ``plan_memory`` call tries: built from one trace, each simulated once."""

    def __init__(self, args: tuple, kwargs: dict, build):
        self.args, self.kwargs, self.build = args, kwargs, build
        self.reversible = build(None)  # every block reversible: the costs are measured on it
        self.peaks: dict[BlockModes, int] = {}

    def peak(self, modes: BlockModes) -> int:
        """The simulated step peak of the plan that keeps ``modes`` (``BlockModes()``: every block reversible)."""
        if modes not in self.peaks:
            model = self.reversible if modes == BlockModes() else self.build(modes)
            self.peaks[modes] = simulate_step_peak(model, self.args, self.kwargs).peak_bytes
        return self.peaks[modes]


def _modes_of(chain: tuple[BlockCost, ...], gaps: tuple[GapCost, ...], plan: ChainPlan) -> BlockModes:
    stored = tuple(chain[i].name for r in plan.regions if r.mode == "stored" for i in r.blocks)
    runs = tuple(tuple(chain[i].name for i in r.blocks) for r in plan.regions if r.mode == "checkpointed")
    recomputed = tuple(nodes for g, j in plan.gap_options().items() for nodes in gaps[g].options[j].recomputed)
    return BlockModes(stored=stored, checkpointed=runs, recomputed=recomputed)


@spares_collector
def plan_memory(model: nn.Module, example_inputs=(), budget=None, example_kwargs: dict | None = None, *,
                tracer: str = "auto", coupling: Coupling | None = None, post_norm: str = "skip",
                streams: str = "exact", between_blocks: bool = True, traced: TracedCall | None = None,
                stand_in: bool = True, check: bool = False) -> MemoryPlan:
    """The plan with the least recompute whose simulated step peak is within ``budget``.

    ``budget``: bytes, or a string with units (``"6GiB"``), for the step's activations and
    working memory above parameters and gradients. Raises ``ReportError`` naming the
    smallest budget that can be met when none fits, ``ConversionError`` when the model
    does not convert. ``between_blocks=False`` plans the blocks only (the graph between
    them stored, as before regions were planned: for comparison). ``traced``: the model
    already traced for this call (``trace_for_planning``), for a caller that converts the
    chosen plan from the same trace (``convert``); its tracing time counts as planning.

    A model whose blocks are one stack of at least ``STAND_IN_MIN`` identical layers is
    planned on stand-ins (``_plan_on_stand_ins``): its costs and the model's three
    calibrating figures come from the model with the stack cut to ``STAND_IN_LAYERS``
    layers, and the
    peaks come from the calibrated chain model (``predicted_by`` says so): a 48-layer
    model is planned in about the time a 4-layer one is, and the tests hold the model's
    peak to the byte against the whole step simulated. ``check=True`` also simulates the
    chosen plan cut to its pattern (``convert(memory_budget=)`` does). Where a stand-in does
    not apply or its check disagrees, or with ``stand_in=False``, the whole model is traced
    and the chosen plan's whole step simulated.
    """
    from revcompile.passes.couplings import RevViT

    started = time.perf_counter()
    budget = parse_bytes(budget)
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    kwargs = dict(example_kwargs or {})
    coupling = coupling or RevViT()
    settings = dict(tracer=tracer, coupling=coupling, post_norm=post_norm, streams=streams)
    stack = find_memory_stack(model, STAND_IN_MIN) if stand_in else None
    if stack is not None:
        planned = _plan_on_stand_ins(model, args, kwargs, budget, stack, settings, between_blocks, started, check)
        if planned is not None:
            return planned
    if traced is None:
        traced = trace_for_planning(model, args, kwargs, tracer=tracer, post_norm=post_norm)
    else:
        started -= traced.seconds
    build = lambda modes: build_planned(model, args, kwargs, tracer=tracer, coupling=coupling,  # noqa: E731
                                        post_norm=post_norm, streams=streams, block_modes=modes, traced=traced)
    candidates = _Candidates(args, kwargs, build)
    chain, gaps, step_flops = _chain_costs(candidates.reversible, args, kwargs, coupling, streams)
    gaps = gaps if between_blocks else ()
    tracer = candidates.reversible.reversible_plan.tracer
    original_peak = simulate_step_peak(model, args, kwargs).peak_bytes
    everything = lambda mode: ((name.name, mode) for name in chain)  # noqa: E731
    done = lambda modes, blocks, peak, flops: MemoryPlan(  # noqa: E731
        budget, tracer, tuple(blocks), modes, peak, original_peak, candidates.peaks.get(BlockModes()), flops, step_flops,
        time.perf_counter() - started)
    if original_peak <= budget:
        return done(BlockModes(stored=tuple(b.name for b in chain)), everything("stored"), original_peak, 0.0)
    # What the chain model leaves out: the rest of the step (as in the original, simulated),
    # and a reversible backward's own working memory (every block reversible, simulated when a plan needs it).
    outside = original_peak - uniform_plan(chain, "stored", 0, gaps).peak
    working = lambda: max(0, candidates.peak(BlockModes()) - outside - uniform_plan(chain, "reversible", 0, gaps).peak)  # noqa: E731
    found = _search(chain, gaps, budget, outside, working, candidates)
    if found is not None:
        modes, chosen, peak = found
        return done(modes, zip((b.name for b in chain), chosen.modes()), peak, chosen.extra_flops)
    all_reversible = candidates.peak(BlockModes())
    if all_reversible <= budget:  # the model's estimate failed to converge: every block reversible fits
        return done(BlockModes(), everything("reversible"), all_reversible, uniform_plan(chain, "reversible").extra_flops)
    checkpointed = BlockModes(checkpointed=tuple((b.name,) for b in chain if b.checkpointable))
    least = min(all_reversible, candidates.peak(checkpointed))
    raise _nothing_fits(budget, least, original_peak)


def _deepened(chain: tuple[BlockCost, ...], gaps: tuple[GapCost, ...], stack: LayerStack, count: int):
    """The stand-in's chain and gaps for the stack at ``count`` layers: its first two blocks,
    its third repeated, its last block; the gaps after the stack move to the end. Every
    gap keeps only its first option (store everything): the uniform steps that calibrate
    the model store the gaps, so a recomputed one is priced by the lower-set model alone
    (24 KiB under the simulated step on a ViT's stem), and the names of the nodes an option
    recomputes after the stack depend on the depth the graph was traced at."""
    last = len(chain)
    middle = chain[2]  # a middle layer after a middle layer: what they save is shared at their borders
    body = [chain[0], chain[1], *(replace(middle, name=stack.layer(i)) for i in range(2, count - 1))][:count - 1]
    blocks = (*body, replace(chain[-1], name=stack.layer(count - 1)))
    stored = tuple(replace(gap, position=0 if gap.position == 0 else count, options=gap.options[:1]) for gap in gaps
                   if gap.position in (0, last))
    return blocks, stored


def _units(plan: ChainPlan) -> list[Region]:
    """The plan's regions with stored and reversible runs split into single blocks."""
    units = []
    for region in plan.regions:
        if region.mode in ("stored", "reversible"):
            units += [Region(region.mode, (i,)) for i in region.blocks]
        else:
            units.append(region)
    return units


def _pattern(plan: ChainPlan) -> list[Region]:
    """The plan cut to its pattern: of every run of equal regions (mode and length; gaps
    with their option) at most two, and the last region; renumbered from block 0. Every
    neighbourhood of the plan appears in it, so a model exact on it is exact on the plan
    if what a region costs depends on its neighbours only (what the check tests)."""
    units = _units(plan)
    shape = lambda r: (r.mode, len(r.blocks), r.gap, r.option)  # noqa: E731
    kept, repeat = [], 0
    for k, unit in enumerate(units):
        repeat = repeat + 1 if k and shape(unit) == shape(units[k - 1]) else 1
        if repeat <= 2 or k == len(units) - 1:
            kept.append(unit)
    pattern, at = [], 0
    for unit in kept:
        if unit.mode == "gap":
            pattern.append(unit)
            continue
        pattern.append(Region(unit.mode, tuple(range(at, at + len(unit.blocks)))))
        at += len(unit.blocks)
    return pattern


def _plan_on_stand_ins(model: nn.Module, args: tuple, kwargs: dict, budget: int, stack: LayerStack, settings: dict,
                       between_blocks: bool, started: float, check: bool) -> MemoryPlan | None:
    """The plan for a model whose blocks are one stack of identical layers, from stand-ins,
    or None where they do not stand in for it.

    On the stand-in (the stack cut to ``STAND_IN_LAYERS`` layers) the blocks' and gaps'
    costs are measured and three uniform steps simulated: the original, every block
    checkpointed, every block reversible. They give the chain model's three figures --
    the rest of the step (``outside``), and per mode a region's backward working memory
    (``Working``) -- after which the model gives each of those steps' peaks to the byte --
    and the original's step is simulated once more one layer deeper, where the model must
    give its peak to the byte too (small models whose weight gradients rival their
    activations peak at different points of the backward at different depths: timm's ViT
    at width 32 is planned whole).
    The chain of the full stack is the stand-in's first block, its middle block repeated
    and its last block. The DP plans it, and the model's peak for the plan is returned.
    With ``check`` the chosen plan cut to its pattern (``_pattern``) is converted and
    simulated on the model cut to that depth, and must peak exactly where the model says
    (every neighbourhood of the plan simulated), else None. None also where the stand-in's
    blocks are not the stack's layers: the caller plans the whole model.
    """
    tracer, coupling, streams = settings["tracer"], settings["coupling"], settings["streams"]
    depth = STAND_IN_LAYERS
    with stand_in_stack(model, stack, depth):
        try:
            traced = trace_for_planning(model, args, kwargs, tracer=tracer, post_norm=settings["post_norm"])
        except ConversionError:
            return None
        candidates = _Candidates(args, kwargs, lambda modes: build_planned(model, args, kwargs, block_modes=modes,
                                                                           traced=traced, **settings))
        chain, gaps, _ = _chain_costs(candidates.reversible, args, kwargs, coupling, streams)
        gaps = gaps if between_blocks else ()
        if [b.name for b in chain] != [stack.layer(i) for i in range(depth)] or any(0 < gap.position < depth for gap in gaps):
            return None
        original = simulate_step_peak(model, args, kwargs).peak_bytes
        outside = original - uniform_plan(chain, "stored", 0, gaps).peak
        working = Working(
            reversible=candidates.peak(BlockModes()) - outside - uniform_plan(chain, "reversible", 0, gaps).peak
            if chain[1].reversible else 0,
            checkpointed=candidates.peak(BlockModes(checkpointed=tuple((b.name,) for b in chain))) - outside
            - uniform_plan(chain, "checkpointed", 0, gaps).peak if chain[1].checkpointable else 0)
        used_tracer = candidates.reversible.reversible_plan.tracer
    # The extrapolation's own check: one layer deeper, the original's step peaks where the model says.
    deeper, deeper_gaps = _deepened(chain, gaps, stack, depth + 1)
    with stand_in_stack(model, stack, depth + 1):
        if simulate_step_peak(model, args, kwargs).peak_bytes != uniform_plan(deeper, "stored", working, deeper_gaps).peak + outside:
            return None
    full, full_gaps = _deepened(chain, gaps, stack, stack.count)
    peak_of = lambda plan: plan.peak + outside  # noqa: E731
    original_peak = peak_of(uniform_plan(full, "stored", working, full_gaps))
    reversible_peak = peak_of(uniform_plan(full, "reversible", working, full_gaps))
    step_flops = 3.0 * sum(b.forward for b in full)
    how = f"the chain model calibrated on a {depth}-layer stand-in of {stack.path} ({stack.count} layers)"

    def done(modes, blocks, peak, flops, checked):
        return MemoryPlan(budget, used_tracer, tuple(blocks), modes, peak, original_peak, reversible_peak, flops, step_flops,
                          time.perf_counter() - started, f"{how}{checked}")

    if original_peak <= budget:
        stored = BlockModes(stored=tuple(b.name for b in full))
        return done(stored, ((b.name, "stored") for b in full), original_peak, 0.0, "")
    chosen = plan_chain(full, budget - outside, working, full_gaps)
    if chosen is None:  # a plan that recomputes between blocks may fit: the whole model is planned
        return None
    chosen = _grouped(full, full_gaps, chosen, budget - outside, working)
    done_with = lambda checked: done(_modes_of(full, full_gaps, chosen), zip((b.name for b in full), chosen.modes()),  # noqa: E731
                                     peak_of(chosen), chosen.extra_flops, checked)
    if not check:
        return done_with("")
    pattern = _pattern(chosen)
    count = sum(len(r.blocks) for r in pattern)
    if count < 2:
        return None
    short, short_gaps = _deepened(chain, gaps, stack, count)
    expected = peak_of(chain_cost(short, tuple(pattern), working, short_gaps))
    with stand_in_stack(model, stack, count):
        traced = trace_for_planning(model, args, kwargs, tracer=tracer, post_norm=settings["post_norm"])
        modes = _modes_of(short, short_gaps, chain_cost(short, tuple(pattern), working, short_gaps))
        simulated = simulate_step_peak(build_planned(model, args, kwargs, block_modes=modes, traced=traced, **settings),
                                       args, kwargs).peak_bytes
    if simulated != expected:
        return None
    return done_with(f"; the plan's pattern ({count} layers) simulated to the byte")


def _grouped(chain, gaps, plan: ChainPlan, budget: int, working: Working) -> ChainPlan:
    """The same regions in fewer runs, where that fits as well and costs no more compute.

    The middle blocks of a stack cost alike, so the DP's plan is one of many orders of the
    same regions. Checkpointed runs first, then reversible blocks (one segment), then stored
    ones -- the order that puts the regions with the largest backward transient where the
    least is kept before them -- reads as a few runs, and cuts the plan's pattern short."""
    rank = {"checkpointed": 0, "reversible": 1, "stored": 2}
    units = [u for u in _units(plan) if u.mode != "gap"]
    ordered = sorted(units, key=lambda u: (rank[u.mode], -len(u.blocks)))
    regions, at = [], 0
    before = [r for r in plan.regions if r.mode == "gap" and gaps[r.gap].position == 0]
    after = [r for r in plan.regions if r.mode == "gap" and gaps[r.gap].position == len(chain)]
    for unit in ordered:
        regions.append(Region(unit.mode, tuple(range(at, at + len(unit.blocks)))))
        at += len(unit.blocks)
    if len(before) + len(after) != len(plan.regions) - len(units):
        return plan
    candidate = chain_cost(chain, (*before, *regions, *after), working, gaps)
    if candidate.peak <= budget and candidate.extra_flops <= plan.extra_flops * (1 + 1e-9):
        return candidate
    return plan


def _search(chain, gaps, budget: int, outside: int, working, candidates: _Candidates):
    """The DP's plan for what is left of ``budget``, simulated, re-planned with what the model
    missed until one fits: ``(modes, plan, peak)``, or None.

    ``working()`` simulates every block reversible (once) for the working memory of a
    reversible backward. A plan without reversible blocks chosen as if that were zero is
    the same plan: it does not pay it, and counting it only removes plans that do.
    """
    measured = None
    for _ in range(_ATTEMPTS):
        chosen = plan_chain(chain, budget - outside, measured or 0, gaps)
        if chosen is not None and measured is None and "reversible" in chosen.modes():
            measured = working()
            chosen = plan_chain(chain, budget - outside, measured, gaps)
        if chosen is None:
            return None
        modes = _modes_of(chain, gaps, chosen)
        peak = candidates.peak(modes)
        if peak <= budget:
            return modes, chosen, peak
        outside += peak - budget + max(1, budget // 1000)
    return None


def planned_peak(converted: ReversibleModel, args: tuple, kwargs: dict, budget: int) -> int | None:
    """The simulated peak of the plan ``plan_memory`` makes for ``budget`` with ``converted``'s
    settings (tracer, coupling, streams), or None when no plan fits: a batch's smallest
    feasible peak is the least over the plans the planner builds, so this is what "a plan
    fits at this batch" means (``revcompile.report``'s largest batch with a plan)."""
    settings = converted._rc_settings
    try:
        return plan_memory(converted.original_model, args, budget, kwargs, tracer=converted._rc_tracer,
                           coupling=settings.coupling, post_norm=converted._rc_post_norm, streams=settings.streams).predicted_peak
    except ReportError:
        return None


def _nothing_fits(budget: int, least: int, original: int) -> ReportError:
    return ReportError(
        f"no plan fits {format_bytes(budget)}: the smallest step found (every block reversible, or every block "
        f"checkpointed) peaks at {format_bytes(least)} above parameters and gradients (the original at "
        f"{format_bytes(original)}). Give a budget of at least {format_bytes(least)}, or a smaller batch."
    )


def _chain_costs(converted: ReversibleModel, args: tuple, kwargs: dict, coupling: Coupling, streams: str):
    """The blocks' costs in program order, the gaps between them, and the blocks' step FLOPs (3x their forward's)."""
    variant = converted.reversible_variants[0]
    compiled = variant.compiled
    blocks = compiled.plan.blocks
    if not blocks:
        raise ConversionError("nothing to plan: no block of this model converts (see revcompile.explain)")
    inputs = variant.placeholder_values(converted.call_signature(args, kwargs))
    chain, gaps = measure_plan_costs(converted, compiled.traced_graph, blocks, inputs, coupling, streams)
    forward = sum(b.forward for b in chain)
    return chain, gaps, 3.0 * forward

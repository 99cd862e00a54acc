"""Choose, per block, stored / checkpointed / reversible: the least recompute that fits a byte budget.

Each detected block of a model can keep its activations (*stored*: no extra compute), keep
only its input and run again in backward (*checkpointed*, possibly as one run with its
neighbours), or be coupled into a reversible segment (*reversible*: keeps nothing per
block, rebuilds its inputs from its outputs; costs one more forward plus the stream
arithmetic). This is the chain problem of Gruslys et al. (2016) and Rotor with a third
choice per stage; for chains the lower sets of Kusumoto et al. (2019) are the prefixes, so
their DP over (lower set, kept bytes) is the one here.

The cost model, per block ``b`` (``BlockCost``, measured by ``revcompile.planner`` on the
traced graph): ``saved`` bytes autograd keeps when it is stored, ``input`` bytes of the
stream entering it, ``residue`` bytes a reversible step keeps (the dual coupling's
remainder bits), ``stream_pair`` bytes a reversible segment starting at it keeps (its two
final streams), ``forward`` its forward FLOPs. Walking the chain in order, each region
adds what it keeps (``K``); backward walks it in reverse, and while a region runs its
backward everything kept before it is still alive, plus the region's transient ``T``
(a checkpointed run re-saves all its blocks' activations at once, a reversible block
rebuilds one block's). So a plan's modelled peak is::

    max( sum of all K,  max over regions r of (K before r + K_r + T_r) )

plus, per region, what its backward needs beyond the activations it rebuilds (``Working``:
the gradients flowing through it, a reversible step's reconstructed streams), one figure
per mode that the planner measures by simulating the uniform plans (a stored region's is
part of the constant the planner measures from the original's step). With those three
figures the model gives a simulated step's peak to the byte on the plans tested (mixed
plans of a ViT at depth 14 in tests/test_planner_standin.py, at depth 48 in
benchmarks/planner.py),

and its extra compute is the recomputed forwards, a reversible one weighted by
``1 + REVERSIBLE_OVERHEAD``. ``plan_chain`` minimises the extra compute subject to the
modelled peak <= budget by dynamic programming over (position, last region is an open
reversible segment), keeping per state the Pareto front of (kept bytes, compute): exact
for this model (tests compare it with brute force), O(n * F * L) for n blocks, fronts of
size F and checkpointed runs of at most L blocks. What the model leaves out (the rest of
the step: embeddings, head, loss) the planner measures as one constant by simulating the
original's step; planning a whole model, it also simulates the chosen plan and plans again
with the budget reduced by what the model missed.

The graph between blocks (stem, stage transitions, head) enters the chain as *gaps*
(``GapCost``): at its position a gap adds one of its options, the strategies
``revcompile.passes.lower_sets`` found for it (what it keeps, its backward's local peak
above that, its recomputed FLOPs; option 0 stores everything). A gap is a region of the
chain like any other -- kept ``K``, transient ``T`` -- so the peak formula and the DP are
unchanged, with one more choice per gap: O((n + g * O) * F * L) for g gaps of O options.
A gap's options trade kept bytes for compute, so they widen the fronts: on a 48-block ViT
with its stem and head as gaps the DP took at most 1.55 s per budget, 0.92 s without them
(2-core CPU, docs/benchmarks.md "Memory budgets").
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["REVERSIBLE_OVERHEAD", "MAX_CHECKPOINT_RUN", "MODES", "BlockCost", "Working", "GapOption", "GapCost", "Region", "ChainPlan",
           "chain_cost", "uniform_plan", "plan_chain"]

# A reversible block's recompute costs its forward plus the streams' arithmetic (rounding
# onto the grid, casts): ~10% over a checkpointed block's recompute on CPU (docs/benchmarks.md).
# It breaks ties: where checkpointing fits, it is chosen.
REVERSIBLE_OVERHEAD = 0.1
MAX_CHECKPOINT_RUN = 8
MODES = ("stored", "checkpointed", "reversible")


@dataclass(frozen=True)
class BlockCost:
    name: str
    saved: int
    input: int
    forward: float
    residue: int = 0
    stream_pair: int = 0
    joins_previous: bool = True  # its input is the previous block's output (one run / segment can hold both)
    checkpointable: bool = True
    reversible: bool = True


@dataclass(frozen=True)
class Working:
    """Bytes a region's backward needs beyond the activations it rebuilds, per mode (may be
    negative: a figure measured against the model corrects what the model over-counts)."""

    reversible: int = 0
    checkpointed: int = 0

    @staticmethod
    def of(working: "Working | int") -> "Working":
        """An int is a reversible backward's working memory alone (as the planner's first model had it)."""
        return working if isinstance(working, Working) else Working(reversible=working)


@dataclass(frozen=True)
class GapOption:
    kept: int
    transient: int  # its backward's peak above what it keeps
    forward: float  # recomputed FLOPs
    recomputed: tuple[tuple[str, ...], ...] = ()  # node sets, each one checkpointed region


@dataclass(frozen=True)
class GapCost:
    """The graph between blocks ``position - 1`` and ``position`` (0: before the first; n: after the last)."""

    name: str
    position: int
    options: tuple[GapOption, ...]  # options[0] stores everything


@dataclass(frozen=True)
class Region:
    mode: str  # one of MODES, or "gap"
    blocks: tuple[int, ...]  # indices into the chain, consecutive (none for a gap)
    gap: int = -1  # a gap region: index into the gaps, and which of its options
    option: int = 0


@dataclass(frozen=True)
class ChainPlan:
    regions: tuple[Region, ...]
    peak: int  # modelled, bytes
    kept: int  # modelled bytes kept at the end of the forward
    extra_flops: float

    def modes(self) -> tuple[str, ...]:
        """Per block, in order (gaps have none)."""
        return tuple(region.mode for region in self.regions for _ in region.blocks)

    def gap_options(self) -> dict[int, int]:
        """Gap index -> the option chosen for it."""
        return {region.gap: region.option for region in self.regions if region.mode == "gap"}


def _region_cost(chain: tuple[BlockCost, ...], region: Region, opens_segment: bool, working: Working) -> tuple[int, int, float]:
    """(kept K, transient T, extra FLOPs) of one region; ``working``: its backward's own working memory per mode."""
    blocks = [chain[i] for i in region.blocks]
    if region.mode == "stored":
        return sum(b.saved for b in blocks), 0, 0.0
    if region.mode == "checkpointed":
        return blocks[0].input, sum(b.saved for b in blocks) + working.checkpointed, sum(b.forward for b in blocks)
    kept = sum(b.residue for b in blocks) + (blocks[0].stream_pair if opens_segment else 0)
    return kept, max(b.saved for b in blocks) + working.reversible, sum(b.forward for b in blocks) * (1 + REVERSIBLE_OVERHEAD)


def chain_cost(chain: tuple[BlockCost, ...], regions: tuple[Region, ...], working: Working | int = 0,
               gaps: tuple[GapCost, ...] = ()) -> ChainPlan:
    """The modelled peak and extra compute of a plan given as regions (adjacent reversible
    regions whose blocks join form one segment, as the runtime builds them; a gap between
    them does not end it)."""
    working = Working.of(working)
    kept = peak = 0
    flops = 0.0
    previous: Region | None = None
    for region in regions:
        if region.mode == "gap":
            option = gaps[region.gap].options[region.option]
            k, t, f = option.kept, option.transient, option.forward
        else:
            continues = (
                previous is not None and previous.mode == region.mode == "reversible" and chain[region.blocks[0]].joins_previous
            )
            k, t, f = _region_cost(chain, region, not continues, working)
            previous = region
        peak = max(peak, kept + k + t)
        kept += k
        flops += f
    return ChainPlan(tuple(regions), max(peak, kept), kept, flops)


def uniform_plan(chain: tuple[BlockCost, ...], mode: str, working: Working | int = 0, gaps: tuple[GapCost, ...] = ()) -> ChainPlan:
    """Every block in ``mode``, every gap stored."""
    regions: list[Region] = []
    for i in range(len(chain) + 1):
        regions += [Region("gap", (), g) for g, gap in enumerate(gaps) if gap.position == i]
        if i < len(chain):
            regions.append(Region(mode, (i,)))
    return chain_cost(chain, tuple(regions), working, gaps)


@dataclass(frozen=True)
class _State:
    kept: int
    flops: float
    peak: int
    back: "_State | None"
    region: Region | None


def _pareto(states: list[_State]) -> list[_State]:
    """Keep the states no other state beats on both kept bytes and compute."""
    front: list[_State] = []
    for state in sorted(states, key=lambda s: (s.kept, s.flops)):
        if not front or state.flops < front[-1].flops:
            front.append(state)
    return front


def _transitions(chain, i: int, in_segment: bool):
    """Regions that can start at block ``i``: (region, opens a segment, ends in an open segment)."""
    block = chain[i]
    yield Region("stored", (i,)), False, False
    if block.reversible:
        continues = in_segment and block.joins_previous
        yield Region("reversible", (i,)), not continues, True
    if block.checkpointable:
        end = i
        while end < len(chain) and end - i < MAX_CHECKPOINT_RUN and chain[end].checkpointable:
            if end > i and not chain[end].joins_previous:
                break
            yield Region("checkpointed", tuple(range(i, end + 1))), False, False
            end += 1


def _through_gaps(states: list[_State], gaps: tuple[GapCost, ...], at: list[int], budget: int) -> list[_State]:
    """The states after the gaps at one position, each with every option that fits."""
    for g in at:
        grown = []
        for state in states:
            for j, option in enumerate(gaps[g].options):
                peak = max(state.peak, state.kept + option.kept + option.transient)
                if peak <= budget:
                    grown.append(_State(state.kept + option.kept, state.flops + option.forward, peak, state, Region("gap", (), g, j)))
        states = _pareto(grown)
    return states


def plan_chain(chain: tuple[BlockCost, ...], budget: int, working: Working | int = 0,
               gaps: tuple[GapCost, ...] = ()) -> ChainPlan | None:
    """The plan with the least extra compute whose modelled peak is within ``budget``, or None.

    ``working``: bytes a region's backward needs beyond its rebuilt activations, per mode
    (an int: a reversible block's alone; the planner measures them).
    ``gaps``: the graph between blocks, each with its options.
    """
    working = Working.of(working)
    at = [[g for g, gap in enumerate(gaps) if gap.position == i] for i in range(len(chain) + 1)]
    fronts: dict[tuple[int, bool], list[_State]] = {(0, False): [_State(0, 0.0, 0, None, None)]}
    finals: list[_State] = []
    for i in range(len(chain) + 1):
        for in_segment in (False, True):
            states = _through_gaps(_pareto(fronts.pop((i, in_segment), [])), gaps, at[i], budget)
            if i == len(chain):
                finals += states
                continue
            # a region's cost does not depend on the state it follows: priced once per position
            steps = [(region, (region.blocks[-1] + 1, open_after), *_region_cost(chain, region, opens, working))
                     for region, opens, open_after in _transitions(chain, i, in_segment)]
            for state in states:
                for region, key, k, t, f in steps:
                    peak = max(state.peak, state.kept + k + t)
                    if peak > budget:
                        continue
                    fronts.setdefault(key, []).append(_State(state.kept + k, state.flops + f, peak, state, region))
    finals = [s for s in finals if s.kept <= budget]
    if not finals:
        return None
    best = min(finals, key=lambda s: (s.flops, s.peak))
    regions: list[Region] = []
    while best.region is not None:
        regions.append(best.region)
        best = best.back
    return chain_cost(chain, tuple(reversed(regions)), working, gaps)

"""The memory planner: the chain DP is optimal, mixed plans keep gradients exact, budgets hold.

* ``plan_chain`` against brute force over every partition of small random chains into
  stored / checkpointed / reversible regions, under the same cost model;
* a model whose blocks are stored, checkpointed and reversible at once has the gradients of
  the same model with every non-reversible block stored, in float64, with dropout on;
* ``convert(..., memory_budget=)``: a budget the original fits changes nothing, one nothing
  fits names the smallest, and in between the real step's measured peak is within budget.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch

import revcompile
from revcompile.budget import ReportError
from revcompile.passes.couplings import make_coupling
from revcompile.passes.recompute import MAX_CHECKPOINT_RUN, BlockCost, GapCost, GapOption, Region, chain_cost, plan_chain
from revcompile.pipeline import BlockModes
from revcompile.planner import _chain_costs, build_planned
from revcompile.reference import example_inputs, reference_vit
from revcompile.simulate import simulate_step_peak, tensor_peak
from tests.conftest import gradients, relative_error, zero_level


def _random_chain(rng: random.Random, n: int) -> tuple[BlockCost, ...]:
    return tuple(
        BlockCost(
            name=f"b{i}", saved=rng.randint(5, 60), input=rng.randint(1, 8), forward=float(rng.randint(1, 9)),
            residue=rng.choice([0, 0, rng.randint(0, 3)]), stream_pair=rng.randint(2, 16),
            joins_previous=i > 0 and rng.random() < 0.8, checkpointable=rng.random() < 0.9, reversible=rng.random() < 0.9,
        )
        for i in range(n)
    )


def _partitions(n: int, start: int = 0):
    """Every way to cut blocks start..n-1 into consecutive regions with a mode."""
    if start == n:
        yield ()
        return
    for end in range(start, n):
        for mode in ("stored", "checkpointed", "reversible"):
            if mode != "checkpointed" and end > start:
                continue  # stored and reversible regions are single blocks (segments form by adjacency)
            region = Region(mode, tuple(range(start, end + 1)))
            for rest in _partitions(n, end + 1):
                yield (region, *rest)


def _allowed(chain, regions) -> bool:
    for region in regions:
        blocks = [chain[i] for i in region.blocks]
        if region.mode == "reversible" and not all(b.reversible for b in blocks):
            return False
        if region.mode == "checkpointed":
            if not all(b.checkpointable for b in blocks) or len(blocks) > MAX_CHECKPOINT_RUN:
                return False
            if not all(b.joins_previous for b in blocks[1:]):
                return False
    return True


@pytest.mark.parametrize("seed", range(12))
def test_the_chain_dp_finds_the_brute_force_optimum(seed):
    rng = random.Random(seed)
    chain = _random_chain(rng, rng.randint(1, 5))
    plans = [chain_cost(chain, regions, 7) for regions in _partitions(len(chain)) if _allowed(chain, regions)]
    peaks = sorted({p.peak for p in plans})
    for budget in [peaks[0] - 1, *rng.sample(peaks, min(4, len(peaks))), peaks[-1]]:
        fitting = [p.extra_flops for p in plans if p.peak <= budget]
        found = plan_chain(chain, budget, 7)
        if not fitting:
            assert found is None
            continue
        assert found is not None and found.peak <= budget
        assert found.extra_flops == pytest.approx(min(fitting))
        assert _allowed(chain, found.regions)


def _random_gaps(rng: random.Random, n: int) -> tuple[GapCost, ...]:
    """Gaps at a few positions (before the first block .. after the last), one to three options each."""
    positions = sorted(rng.sample(range(n + 1), min(n + 1, rng.randint(1, 3))))
    return tuple(
        GapCost(f"gap{p}", p, tuple(GapOption(rng.randint(0, 40), rng.randint(0, 30), float(rng.randint(0, 6) if j else 0))
                                    for j in range(rng.randint(1, 3))))
        for p in positions
    )


def _with_gaps(regions, gaps, choice):
    """``regions`` with gap g's option ``choice[g]`` inserted where it sits in the chain."""
    out, pending = [], list(enumerate(gaps))
    for region in regions:
        while pending and pending[0][1].position <= region.blocks[0]:
            g, _ = pending.pop(0)
            out.append(Region("gap", (), g, choice[g]))
        out.append(region)
    return (*out, *(Region("gap", (), g, choice[g]) for g, _ in pending))


@pytest.mark.parametrize("seed", range(8))
def test_the_chain_dp_with_gaps_between_blocks_finds_the_brute_force_optimum(seed):
    rng = random.Random(100 + seed)
    chain = _random_chain(rng, rng.randint(1, 4))
    gaps = _random_gaps(rng, len(chain))
    choices = list(itertools.product(*(range(len(g.options)) for g in gaps)))
    plans = [chain_cost(chain, _with_gaps(regions, gaps, c), 7, gaps)
             for regions in _partitions(len(chain)) if _allowed(chain, regions) for c in choices]
    peaks = sorted({p.peak for p in plans})
    for budget in [peaks[0] - 1, *rng.sample(peaks, min(5, len(peaks))), peaks[-1]]:
        fitting = [p.extra_flops for p in plans if p.peak <= budget]
        found = plan_chain(chain, budget, 7, gaps)
        if not fitting:
            assert found is None
            continue
        assert found is not None and found.peak <= budget
        assert found.extra_flops == pytest.approx(min(fitting))
        assert sorted(found.gap_options()) == list(range(len(gaps)))


def test_recompute_never_rises_with_the_budget_and_vanishes_when_everything_fits():
    chain = _random_chain(random.Random(7), 24)
    everything_stored = chain_cost(chain, tuple(Region("stored", (i,)) for i in range(len(chain))))
    extra = [plan_chain(chain, budget).extra_flops for budget in range(200, everything_stored.peak + 1, 97)]
    assert all(a >= b for a, b in zip(extra, extra[1:]))
    loose = plan_chain(chain, everything_stored.peak)
    assert loose.extra_flops == 0 and set(loose.modes()) == {"stored"}


def _vit(depth=6, dtype=torch.float64):
    torch.manual_seed(0)
    model = reference_vit(depth=depth, dim=32, heads=2, num_classes=4).to(dtype)
    return model, example_inputs(model, batch_size=2, dtype=dtype)


def _assert_same_gradients(model, reference, args):
    """``model`` (reversible mode) has ``reference``'s outputs and gradients (autograd), every parameter and the input."""
    got, out = gradients(model, args, mode="reversible")
    want, ref_out = gradients(reference, args, mode="autograd")
    assert all(torch.equal(a, b) for a, b in zip(out, ref_out))
    floor = zero_level(want.values(), torch.float64)
    checked = 0
    for name, ref in want.items():
        if float(ref.norm()) <= floor:
            assert float((got[name] - ref).norm()) <= floor, name
            continue
        assert relative_error(got[name], ref) <= 1e-10, name
        checked += 1
    assert checked > 0.9 * len(want) and "input 0" in want


def _builder(model, args, coupling="revvit"):
    return lambda modes: build_planned(  # noqa: E731
        model, args, {}, tracer="auto", coupling=make_coupling(coupling), post_norm="skip", streams="exact", block_modes=modes
    )


@pytest.mark.parametrize("coupling", ["revvit", "dual"])
def test_stored_checkpointed_and_reversible_blocks_in_one_model_have_exact_gradients(coupling):
    model, args = _vit()
    build = _builder(model, args, coupling)
    mixed = build(BlockModes(stored=("blocks.0",), checkpointed=(("blocks.2", "blocks.3"),)))
    reference = build(BlockModes(stored=("blocks.0", "blocks.2", "blocks.3")))
    assert len(mixed.reversible_variants[0].regions) == 1
    assert [b.name for b in revcompile.explain(mixed).blocks] == ["blocks.1", "blocks.4", "blocks.5"]
    _assert_same_gradients(mixed, reference, args)


def test_recomputed_parts_between_blocks_keep_gradients_exact():
    """The stem and the head recomputed (every cut their lower-set options offer), blocks mixed."""
    model, args = _vit()
    build = _builder(model, args)
    _, gaps, _ = _chain_costs(build(None), args, {}, make_coupling("revvit"), "exact")
    assert [g.position for g in gaps] == [0, 6]  # before the first block, after the last
    cuts = tuple(nodes for gap in gaps for nodes in max(gap.options, key=lambda o: len(o.recomputed)).recomputed)
    assert len(cuts) >= 2
    mixed = build(BlockModes(stored=("blocks.0",), checkpointed=(("blocks.2",),), recomputed=cuts))
    assert len(mixed.reversible_variants[0].regions) == 1 + len(cuts)
    reference = build(BlockModes(stored=("blocks.0", "blocks.2")))
    _assert_same_gradients(mixed, reference, args)


def test_a_budget_the_original_fits_keeps_every_block_stored():
    model, args = _vit(depth=4, dtype=torch.float32)
    converted = revcompile.convert(model, args, memory_budget="4GiB")
    plan = revcompile.memory_plan(converted)
    assert plan.modes == {"stored": 4, "checkpointed": 0, "reversible": 0}
    assert plan.predicted_peak == plan.original_peak <= plan.budget
    explained = revcompile.explain(converted)
    assert not explained.blocks
    assert not any("no convertible blocks" in note for note in explained.notes), explained.notes
    assert all(skip.reason.startswith("stored: the memory plan") for skip in explained.skipped)
    torch.manual_seed(3)
    want = model(*args)
    torch.manual_seed(3)
    assert torch.equal(converted(*args), want)


def test_a_budget_nothing_fits_names_the_smallest():
    model, args = _vit(depth=4, dtype=torch.float32)
    with pytest.raises(ReportError, match=r"no plan fits 1\.0 KiB.*at least"):
        revcompile.convert(model, args, memory_budget="1KiB")
    with pytest.raises(ReportError, match="cannot read"):
        revcompile.plan_memory(model, args, "lots")


@pytest.mark.slow  # ~1 min on a loaded 2-core CPU: two plans, each simulated, then measured
def test_between_the_extremes_the_measured_step_stays_within_the_budget():
    torch.manual_seed(0)
    model = reference_vit(depth=6, dim=48, heads=2, num_classes=4)
    args = example_inputs(model, batch_size=8)
    original = revcompile.plan_memory(model, args, "4GiB").original_peak
    seen = set()
    for fraction in (0.45, 0.75):
        budget = int(original * fraction)
        try:
            converted = revcompile.convert(model, args, memory_budget=budget)
        except ReportError:
            pytest.fail(f"a budget of {fraction:.0%} of the original's peak should be feasible")
        plan = revcompile.memory_plan(converted)
        measured = tensor_peak(converted, args)
        assert measured <= budget, f"{plan}\nmeasured {measured} > budget {budget}"
        assert plan.predicted_peak == measured
        seen.add(tuple(sorted(m for m, n in plan.modes.items() if n)))
    assert any(len(modes) > 1 for modes in seen), f"every plan was uniform: {seen}"


def _small_swin(dtype=torch.float32, batch=2):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, embed_dim=16, depths=(2, 2),
                              num_heads=(1, 2), img_size=56, num_classes=4, drop_rate=0.1, drop_path_rate=0.0).to(dtype)
    return model, (torch.randn(batch, 3, 56, 56, dtype=dtype),)


def _swin_cuts(model, args):
    """Every cut the Swin's gaps offer in their most-recomputing options: stem, patch merging, head."""
    build = _builder(model, args)
    _, gaps, _ = _chain_costs(build(None), args, {}, make_coupling("revvit"), "exact")
    cuts = tuple(nodes for gap in gaps for nodes in max(gap.options, key=lambda o: o.kept and -o.kept).recomputed)
    assert any(any("downsample" in n for n in nodes) for nodes in cuts), cuts
    return build, cuts


def test_a_swin_with_its_stage_transition_recomputed_keeps_gradients_exact():
    model, args = _small_swin(torch.float64)
    build, cuts = _swin_cuts(model, args)
    mixed = build(BlockModes(stored=("layers.0.blocks.0",), checkpointed=(("layers.1.blocks.0",),), recomputed=cuts))
    reference = build(BlockModes(stored=("layers.0.blocks.0", "layers.1.blocks.0")))
    _assert_same_gradients(mixed, reference, args)


def test_a_swin_with_its_stage_transition_recomputed_is_simulated_byte_exactly():
    model, args = _small_swin(batch=4)
    build, cuts = _swin_cuts(model, args)
    for modes in (BlockModes(recomputed=cuts), BlockModes(checkpointed=(("layers.0.blocks.0", "layers.0.blocks.1"),), recomputed=cuts)):
        converted = build(modes)
        assert simulate_step_peak(converted, args).peak_bytes == tensor_peak(converted, args)

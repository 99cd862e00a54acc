"""How the planner tries candidates cheaply without changing what it chooses.

* every candidate converted from one shared trace (``trace_for_planning``) is the
  conversion a fresh ``build_planned`` makes: same plan and notes, same rewritten graph,
  same outputs, same simulated peak; and building candidates leaves the shared trace as it was;
* the every-block-reversible simulation is skipped when the DP, run as if a reversible
  backward needed no working memory, picks a plan without reversible blocks: the DP with
  the working memory counted picks a plan with the same recompute.
"""

from __future__ import annotations

import random
import re

import pytest
import torch

from revcompile.passes.couplings import make_coupling
from revcompile.passes.recompute import plan_chain
from revcompile.pipeline import BlockModes
from revcompile.planner import _chain_costs, build_planned, trace_for_planning
from revcompile.reference import example_inputs, reference_vit
from revcompile.simulate import simulate_step_peak
from tests import blocks as B
from tests.test_planner import _random_chain, _random_gaps


def _code(converted) -> str:
    """The rewritten graph's code, lifted constants' random names made equal."""
    code = converted.reversible_variants[0].compiled.graph.python_code("self").src
    return re.sub(r"_revcompile_constant_[0-9a-f]{12}", "_revcompile_constant_", code)


def _outputs(model, args) -> torch.Tensor:
    torch.manual_seed(5)
    return model(*args)


def test_candidates_from_one_trace_are_the_fresh_conversions():
    torch.manual_seed(0)
    model = reference_vit(depth=6, dim=32, heads=2, num_classes=4)
    args = example_inputs(model, batch_size=2)
    settings = dict(tracer="auto", coupling=make_coupling("revvit"), post_norm="skip", streams="exact")
    traced = trace_for_planning(model, args, {}, tracer="auto", post_norm="skip")
    before = traced.trace.graph_module.code
    _, gaps, _ = _chain_costs(build_planned(model, args, {}, **settings), args, {}, make_coupling("revvit"), "exact")
    cuts = tuple(nodes for gap in gaps for nodes in max(gap.options, key=lambda o: len(o.recomputed)).recomputed)
    assert cuts  # the stem and head offer something to recompute
    candidates = [BlockModes(), BlockModes(stored=("blocks.0",), checkpointed=(("blocks.2", "blocks.3"),)),
                  BlockModes(stored=("blocks.1",), checkpointed=(("blocks.4",),), recomputed=cuts),
                  BlockModes(stored=tuple(f"blocks.{i}" for i in range(6)))]
    for modes in candidates:
        shared = build_planned(model, args, {}, block_modes=modes, traced=traced, **settings)
        fresh = build_planned(model, args, {}, block_modes=modes, **settings)
        got, want = shared.reversible_plan, fresh.reversible_plan
        assert (got.signature(), got.notes, got.skipped) == (want.signature(), want.notes, want.skipped)
        assert _code(shared) == _code(fresh)
        regions = [len(m.reversible_variants[0].regions) for m in (shared, fresh)]
        assert regions[0] == regions[1] == len(modes.checkpointed) + len(modes.recomputed)
        assert torch.equal(_outputs(shared, args), _outputs(fresh, args))
        assert simulate_step_peak(shared, args).peak_bytes == simulate_step_peak(fresh, args).peak_bytes
    assert traced.trace.graph_module.code == before


class _WithConstants(B.PlainPositionStack):
    """Plain tensor attributes read from the original, and a constant the tracer makes."""

    def forward(self, x):
        return super().forward(x) * torch.tensor([2.0])


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_candidates_from_one_trace_lift_constants_and_read_plain_attributes_as_fresh_conversions(tracer):
    torch.manual_seed(0)
    model, x = _WithConstants(depth=3), B.tokens()
    settings = dict(tracer=tracer, coupling=make_coupling("revvit"), post_norm="skip", streams="exact")
    traced = trace_for_planning(model, (x,), {}, tracer=tracer, post_norm="skip")
    before = traced.trace.graph_module.code
    names = [b.name for b in build_planned(model, (x,), {}, **settings).reversible_plan.blocks]
    assert len(names) == 3
    built = []
    for modes in [BlockModes(), BlockModes(stored=(names[0],), checkpointed=((names[2],),))]:
        shared = build_planned(model, (x,), {}, block_modes=modes, traced=traced, **settings)
        fresh = build_planned(model, (x,), {}, block_modes=modes, **settings)
        assert shared.reversible_plan.signature() == fresh.reversible_plan.signature()
        assert _code(shared) == _code(fresh)
        assert torch.equal(_outputs(shared, (x,)), _outputs(fresh, (x,)))
        built.append((shared, fresh, _outputs(shared, (x,))))
    assert traced.trace.graph_module.code == before
    model.pos_embedding = model.pos_embedding + 1  # reassigned on the original: every candidate sees it
    for shared, fresh, earlier in built:
        assert torch.equal(_outputs(shared, (x,)), _outputs(fresh, (x,)))
        assert not torch.equal(_outputs(shared, (x,)), earlier)


def test_a_plan_chosen_without_the_reversible_working_memory_and_without_reversible_blocks_is_the_plan_with_it():
    rng = random.Random(11)
    without, with_reversible, changed = 0, 0, 0
    for _ in range(400):
        chain = _random_chain(rng, rng.randint(1, 7))
        gaps = _random_gaps(rng, len(chain))
        working = rng.randint(1, 60)
        budget = rng.randint(10, 250)
        guessed = plan_chain(chain, budget, 0, gaps)
        counted = plan_chain(chain, budget, working, gaps)
        if guessed is None:
            assert counted is None  # counting working memory only removes plans
            continue
        if "reversible" in guessed.modes():
            with_reversible += 1  # the planner simulates the working memory and plans again
            changed += counted is None or counted.extra_flops != guessed.extra_flops
            continue
        without += 1
        assert counted is not None and counted.peak <= budget
        assert counted.extra_flops == guessed.extra_flops
    # both branches of the planner were exercised, and counting the working memory does change plans that pay it
    assert without > 30 and with_reversible > 10 and changed > 5


def test_convert_with_a_budget_runs_the_chosen_plan_as_a_fresh_conversion_of_it():
    """``convert(memory_budget=)`` converts the plan from the planner's own trace: the same model as converting anew."""
    import revcompile

    torch.manual_seed(0)
    model = reference_vit(depth=6, dim=32, heads=2, num_classes=4)
    args = example_inputs(model, batch_size=2)
    settings = dict(tracer="auto", coupling=make_coupling("revvit"), post_norm="skip", streams="exact")
    original = simulate_step_peak(model, args).peak_bytes
    reversible = simulate_step_peak(build_planned(model, args, {}, **settings), args).peak_bytes
    converted = revcompile.convert(model, args, memory_budget=(original + reversible) // 2, check_conversion=False)
    plan = revcompile.memory_plan(converted)
    assert not plan.keeps_original and set(plan.modes.values()) != {0, 6}  # a mixed plan
    fresh = build_planned(model, args, {}, block_modes=plan.block_modes, **settings)
    assert converted.reversible_plan.signature() == fresh.reversible_plan.signature()
    assert _code(converted) == _code(fresh)
    assert torch.equal(_outputs(converted, args), _outputs(fresh, args))
    assert simulate_step_peak(converted, args).peak_bytes == plan.predicted_peak <= plan.budget

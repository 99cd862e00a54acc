"""Deep stacks planned on stand-ins: the model's peak against the whole step simulated, to the byte.

``plan_memory`` plans a model whose blocks are one stack of layers alike on the model with the
stack cut to three layers (``revcompile.planner._plan_on_stand_ins``); the peaks it returns
come from the chain model calibrated there. These tests convert each plan on the whole model
and simulate its whole step: the peak must be the one predicted, byte for byte, for every
family here and across budgets from near the smallest to above the original's.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import revcompile
from revcompile.passes.couplings import RevViT
from revcompile.budget import ReportError
from revcompile.planner import STAND_IN_MIN, build_planned
from revcompile.simulate import simulate_step_peak, tensor_peak
from tests import models

FRACTIONS = (0.06, 0.15, 0.4, 0.75, 1.05)


def _whole_step_peak(model, args, kwargs, plan) -> int:
    if plan.keeps_original:
        return simulate_step_peak(model, args, kwargs).peak_bytes
    converted = build_planned(model, args, kwargs, tracer="auto", coupling=RevViT(), post_norm="skip", streams="exact",
                              block_modes=plan.block_modes)
    return simulate_step_peak(converted, args, kwargs).peak_bytes


def test_a_view_of_a_parameter_allocates_nothing():
    """A linear saves ``weight.t()`` for its backward: a view of the parameter, not a new
    storage. Counted as one, a step's peak held every parameter it viewed, and the simulated
    all-reversible step grew with depth."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 512))
    x = torch.randn(2, 512)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    simulated = simulate_step_peak(model, (x,))
    # one layer's weight gradient before it is summed into .grad; counting the views held both weights
    assert simulated.peak_bytes < 0.6 * weights
    assert simulated.end_bytes == 0
    assert tensor_peak(model, (x,)) == simulated.peak_bytes


def test_the_all_reversible_step_of_a_reference_vit_peaks_alike_at_every_depth():
    args = None
    peaks = []
    for depth in (3, 6):
        model, args, kwargs, _ = models.reference_vit(depth)
        converted = build_planned(model, args, kwargs, tracer="auto", coupling=RevViT(), post_norm="skip", streams="exact")
        peaks.append(simulate_step_peak(converted, args, kwargs).peak_bytes)
    assert peaks[0] == peaks[1]


# timm's ViT at width 32 is planned whole: its original step peaks 5 KiB further above what
# its blocks keep at depth 4 than at depth 14 (weight gradients as large as activations), and
# the stand-in's check one layer deeper sees it. GPT-2 and Llama at width 32 fail that check
# too (not investigated further); whichever way a model is planned, its peak must hold.
PLANNED_ON_STAND_INS = {"reference_vit": True, "timm_vit": False, "hf_gpt2": False, "hf_llama": False}


@pytest.mark.parametrize("family", sorted(PLANNED_ON_STAND_INS))
def test_a_deep_stack_planned_on_stand_ins_peaks_where_its_whole_step_simulates(family):
    torch.manual_seed(0)
    model, args, kwargs, depth = getattr(models, family)(STAND_IN_MIN + 2)
    original = simulate_step_peak(model, args, kwargs).peak_bytes
    planned, modes = 0, set()
    for fraction in FRACTIONS:
        try:
            plan = revcompile.plan_memory(model, args, int(original * fraction), kwargs)
        except ReportError:
            continue
        assert plan.original_peak == original
        planned += "stand-in" in plan.predicted_by
        modes |= {mode for mode, n in plan.modes.items() if n}
        assert plan.predicted_peak <= plan.budget
        assert _whole_step_peak(model, args, kwargs, plan) == plan.predicted_peak, (fraction, plan.table())
    assert {"stored", "checkpointed"} <= modes
    if PLANNED_ON_STAND_INS[family]:
        assert planned >= 3, "the stand-ins planned too few budgets to test"
    else:
        assert planned == 0


def test_a_checked_plan_simulates_its_pattern_on_a_stand_in():
    torch.manual_seed(0)
    model, args, kwargs, _ = models.reference_vit(STAND_IN_MIN)
    original = simulate_step_peak(model, args, kwargs).peak_bytes
    plan = revcompile.plan_memory(model, args, int(original * 0.4), kwargs, check=True)
    assert "pattern" in plan.predicted_by and plan.modes["checkpointed"] > 0
    assert _whole_step_peak(model, args, kwargs, plan) == plan.predicted_peak
    unchecked = revcompile.plan_memory(model, args, int(original * 0.4), kwargs)
    assert (unchecked.blocks, unchecked.predicted_peak) == (plan.blocks, plan.predicted_peak)


def test_a_stack_the_forward_indexes_past_its_stand_in_is_planned_whole():
    class Indexed(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, images):
            vit = self.model
            x = vit.patch_embed(images).flatten(2).transpose(1, 2)
            x = torch.cat([vit.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + vit.pos_embed
            for i in range(STAND_IN_MIN):  # indexes layers a stand-in does not have
                x = vit.blocks[i](x)
            return vit.head(vit.norm(x)[:, 0])

    torch.manual_seed(0)
    vit, args, kwargs, _ = models.reference_vit(STAND_IN_MIN)
    model = Indexed(vit)
    original = simulate_step_peak(model, args, kwargs).peak_bytes
    plan = revcompile.plan_memory(model, args, int(original * 0.4), kwargs)
    assert plan.predicted_by == "simulating the planned step"
    assert plan.predicted_peak <= plan.budget

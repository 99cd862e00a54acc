"""The converted step does a hand-written Rev-ViT's arithmetic, and with exact streams only the stream arithmetic more.

Counts aten ops of one training step (``benchmarks/op_census.py``), not time: a cast, copy
or extra pass that slips into the runtime shows up here on any machine, where a timing
benchmark would hide it in noise.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import revcompile
from revcompile.reference import example_inputs, reference_vit

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from handwritten_revvit import HandwrittenRevViT  # noqa: E402
from op_census import arithmetic_difference, op_name, step_census  # noqa: E402


def _models(depth: int, dim: int, streams: str):
    torch.manual_seed(depth * dim)
    model = reference_vit(depth=depth, dim=dim, heads=2, img_size=16, patch_size=4, num_classes=5,
                          drop=0.0, attn_drop=0.0, drop_path=0.0)
    args = example_inputs(model, 3)
    return revcompile.convert(model, args, streams=streams), HandwrittenRevViT(model), args


@pytest.mark.parametrize("depth,dim", [(2, 32), (5, 48)])
def test_float32_streams_do_the_handwritten_arithmetic_and_nothing_more(depth, dim):
    converted, handwritten, args = _models(depth, dim, "float32")
    assert arithmetic_difference(step_census(converted, args), step_census(handwritten, args)) == {}


# What exact streams may add per block (and once per segment), in stream-sized passes:
# casts -- each branch's input to the model's dtype and its output to float64, in the
# forward and in the recompute, and each branch's cotangent there and back (12); the
# float64 stream adds and the reconstruction's subtractions with the grid rounding (4 each).
EXACT_STREAM_BUDGET = {"_to_copy": (12, 4), "add": (4, 1), "sub": (4, 1)}


@pytest.mark.parametrize("depth,dim", [(2, 32), (5, 48)])
def test_exact_streams_add_only_stream_casts_adds_and_subtractions(depth, dim):
    converted, handwritten, args = _models(depth, dim, "exact")
    extra = arithmetic_difference(step_census(converted, args), step_census(handwritten, args))
    assert set(extra) <= set(EXACT_STREAM_BUDGET), extra
    stream = args[0].shape[0] * 17 * dim  # batch x tokens x width: every extra op is one stream-sized pass
    for name, (calls, elements) in extra.items():
        per_block, fixed = EXACT_STREAM_BUDGET[name]
        assert calls <= per_block * depth + fixed, (name, calls)
        assert elements == calls * stream, (name, elements)


def test_census_sees_an_extra_copy():
    """The census is not blind: a model that clones its output is counted as doing more."""

    class Cloning(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x).clone()

    _, handwritten, args = _models(2, 32, "float32")
    extra = arithmetic_difference(step_census(Cloning(handwritten), args), step_census(handwritten, args))
    assert extra == {"clone": (1, args[0].shape[0] * 5)}


def test_op_names_fold_overloads_and_in_place_forms():
    assert op_name(torch.ops.aten.sub_.Tensor) == op_name(torch.ops.aten.sub.out) == "sub"
    assert op_name(torch.ops.aten._to_copy.default) == "_to_copy"

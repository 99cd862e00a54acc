"""Which branches draw random numbers (passes/randomness.py), and that only those replay generator state."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import revcompile
from revcompile.passes.randomness import branch_draws_random
from tests import blocks as B
from tests.conftest import assert_gradients_match, gradients, perturb_parameters, relative_error


class Op(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn, self.linear = fn, nn.Linear(B.DIM, B.DIM)

    def forward(self, x):
        return self.fn(self.linear(x))


def _attention(dropout_p):
    def fn(h):
        q = h.unflatten(-1, (2, -1)).transpose(1, 2)
        return F.scaled_dot_product_attention(q, q, q, dropout_p=dropout_p).transpose(1, 2).flatten(2)

    return fn


class Opaque(nn.Module):
    """Code from outside torch that fx keeps as a leaf: the passes cannot see whether it draws."""

    def forward(self, x):
        return x * 2


class LeafTracer(fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, Opaque) or super().is_leaf_module(m, qualname)


CASES = {  # name -> (branch body, draws random numbers)
    "dropout p=0.1": (lambda h: F.dropout(h, 0.1, True), True),
    "dropout p=0 (baked by tracing)": (lambda h: F.dropout(h, 0.0, True), False),
    "dropout, not training": (lambda h: F.dropout(h, 0.5, training=False), False),
    "dropout module p=0 (its rate is read when it runs)": (nn.Dropout(0.0), True),
    "rand_like noise": (lambda h: h + torch.rand_like(h), True),
    "bernoulli_ mask": (lambda h: h * torch.empty_like(h).bernoulli_(0.5), True),
    "attention, dropout_p=0.1": (_attention(0.1), True),
    "attention, dropout_p=0": (_attention(0.0), False),
    "gelu": (F.gelu, False),
    "opaque leaf module": (Opaque(), True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_random_ops_are_found_in_fx_graphs(case):
    fn, draws = CASES[case]
    model = Op(fn)
    graph = LeafTracer().trace(model)
    assert branch_draws_random(graph, model) is draws


@pytest.mark.parametrize("training, draws", [(True, True), (False, False)])
def test_random_ops_are_found_in_export_graphs(training, draws):
    model = Op(nn.Dropout(0.1)).train(training)
    exported = torch.export.export(model, (B.tokens(),)).graph_module
    assert branch_draws_random(exported.graph, exported) is draws


class HalfRandomBlock(nn.Module):
    """Dropout in the attention branch only: the MLP branch draws nothing."""

    def __init__(self):
        super().__init__()
        self.inner, self.drop = B.PreNormBlock(), nn.Dropout(0.3)

    def forward(self, x):
        x = x + self.drop(self.inner.attn(self.inner.norm1(x)))
        return x + self.inner.mlp(self.inner.norm2(x))


def _half_random():
    torch.manual_seed(0)
    model = perturb_parameters(B.sequential(HalfRandomBlock(), HalfRandomBlock(), HalfRandomBlock()).double())
    x = B.tokens(dtype=torch.float64)
    return revcompile.convert(model, x), x


@pytest.mark.parametrize("mode", ["reversible", "parallel"])
def test_only_branches_that_draw_replay_and_gradients_stay_exact(mode):
    converted, x = _half_random()
    (segment,) = converted.reversible_variants[0].segments
    assert segment.draws_random == (True, False) * 3
    assert_gradients_match(converted, (x,), tol=1e-10, mode=mode)


def test_a_drawing_branch_left_without_replay_gets_wrong_gradients():
    """Negative control: the flags are what decides replay, so marking the dropout branches as
    drawing nothing breaks the gradients the test above finds exact."""
    converted, x = _half_random()
    (segment,) = converted.reversible_variants[0].segments
    reference, _ = gradients(converted, (x,), mode="autograd")
    segment.draws_random = (False,) * len(segment.draws_random)
    broken, _ = gradients(converted, (x,), mode="reversible")
    worst = max(relative_error(broken[n], reference[n]) for n in reference if reference[n] is not None)
    assert worst > 1e-3

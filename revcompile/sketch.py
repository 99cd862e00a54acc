"""Randomized backprop through linear layers: the weight gradient from a sketch of the input.

A linear layer ``y = x Wᵀ + b`` keeps its whole input ``x`` (``N x d_in`` once the batch
and token dimensions are flattened into ``N``) only to form the weight gradient
``dW = dyᵀ x`` in backward. Following Bershatsky et al. ("Memory-efficient backpropagation
through large linear layers"), a sketched layer keeps ``S x`` instead, with ``S`` a random
``k x N`` matrix (``k = ceil(keep * N)``) such that ``E[Sᵀ S] = I``, and estimates

    dW ≈ (S dy)ᵀ (S x)          unbiased: E[dyᵀ Sᵀ S x] = dyᵀ x

The input gradient ``dx = dy W`` and the bias gradient ``db = Σ dy`` need no ``x`` and stay
exact, so every gradient upstream of a sketched layer is exact; only the sketched layers'
own weight gradients are approximate. ``ESTIMATORS``:

* ``"gaussian"``: ``S_ij ~ N(0, 1/k)``;
* ``"rademacher"``: ``S_ij = ±1/√k``;
* ``"rows"``: ``k`` rows of ``x`` drawn with replacement, row ``a`` with probability
  ``p_a ∝ ||x_a||`` and scaled by ``1/√(k p_a)``. The optimal importance is
  ``||x_a|| ||dy_a||``, but ``dy`` does not exist yet in forward; with the ``dy`` row
  norms unknown (taken equal), ``||x_a||`` minimizes the variance. Rows of ``x`` that are
  zero are never drawn, which is exact: they contribute nothing to ``dW``.

What is kept for backward: ``S x`` (``k x d_in`` in the layer's compute dtype), plus for
``"rows"`` the ``k`` indices and scales. For the dense estimators ``S`` itself is *not*
kept: it is ``k x N``, larger than ``S x`` whenever ``N > d_in`` (a batch of tokens is
usually larger than the width), so it is regenerated in backward from its seed, one
chunk of ``N`` at a time so that the transient is never larger than ``S x``. The cost is
drawing ``S`` twice.

Randomness and replay. Sketches come from a ``torch.Generator`` of their own, seeded with
a hash of (the layer's seed, its name, a per-layer draw count): the user's global
generators are never read or advanced, so dropout masks are the same with sketching on or
off, and the reversible runtime's replay of dropout (it restores the global generator
states around a branch's recompute) is unaffected. A sketch is drawn only when the forward
records a graph that needs the weight gradient. Under the reversible backward a branch runs
twice -- once without a graph in the forward, once with a graph in the backward -- and only
the second run draws, so there is exactly one draw per layer per training step in every
backward mode; the sketch used by the backward is the one its own forward drew.

Which layers (``revcompile.passes.sketch``): by default the linears *outside* reversible
segments, whose inputs are stored for the whole step (heads, embedding projections, blocks
left alone). Linears inside a segment keep their input only while their block is being
recomputed, one block at a time, so sketching them saves part of one block's transient,
not memory that grows with depth, while adding variance to every such layer; they are
sketched only when named (or ``layers="all"``).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ESTIMATORS",
    "SketchConfig",
    "SketchedLinear",
    "Sketch",
    "draw_sketch",
    "exact_linears",
    "row_probabilities",
    "seed_for",
    "sketch_compiled",
]

ESTIMATORS = {
    "gaussian": "S_ij ~ N(0, 1/k); S regenerated from its seed in backward",
    "rademacher": "S_ij = +-1/sqrt(k); S regenerated from its seed in backward",
    "rows": "k rows drawn with replacement, p_a proportional to ||x_a||, scaled by 1/sqrt(k p_a)",
}


@dataclass(frozen=True)
class SketchConfig:
    """``convert(..., sketch_linears=SketchConfig(...))``; a float ``f`` means ``SketchConfig(keep=f)``.

    ``keep``: the fraction of the flattened batch·tokens dimension kept, in (0, 1].
    ``layers``: ``None`` -- every linear outside reversible segments (inputs stored all
    step); ``"all"`` -- every linear; a collection of layer names (module paths such as
    ``"head"``); a mapping name -> keep fraction; or a predicate ``name -> bool``.
    ``estimator``: one of ``ESTIMATORS``. ``seed``: the base of every layer's sketch seeds.
    """

    keep: float = 0.25
    layers: object = None
    estimator: str = "gaussian"
    seed: int = 0

    @staticmethod
    def of(value) -> "SketchConfig | None":
        if value is None or isinstance(value, SketchConfig):
            config = value
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            config = SketchConfig(keep=float(value))
        else:
            raise TypeError(f"sketch_linears must be None, a fraction in (0, 1] or a SketchConfig, got {value!r}")
        if config is not None:
            config.check()
        return config

    def check(self) -> None:
        fractions = [self.keep] + (list(self.layers.values()) if isinstance(self.layers, Mapping) else [])
        for fraction in fractions:
            if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
                raise ValueError(f"sketch_linears: a kept fraction must be in (0, 1], got {fraction!r}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"sketch estimator must be one of {sorted(ESTIMATORS)}, got {self.estimator!r}")
        if isinstance(self.layers, str) and self.layers != "all":
            raise ValueError(f"sketch layers: a string must be 'all'; for one layer pass a list: [{self.layers!r}]")

    def keep_for(self, name: str) -> float:
        return float(self.layers[name]) if isinstance(self.layers, Mapping) else self.keep


# --- the sketch -----------------------------------------------------------------------------------

_EXACT = threading.local()  # .depth > 0: every sketched layer runs exact; .recorder: operand hooks


@contextlib.contextmanager
def exact_linears(recorder: dict | None = None):
    """Run sketched layers exactly (plain linear backward) inside the block.

    ``recorder``: a dict that receives ``layer -> (x, dy)`` (both flattened to 2-D) from
    each sketched layer's backward, for variance analysis.
    """
    previous = getattr(_EXACT, "depth", 0), getattr(_EXACT, "recorder", None)
    _EXACT.depth, _EXACT.recorder = previous[0] + 1, recorder if recorder is not None else previous[1]
    try:
        yield
    finally:
        _EXACT.depth, _EXACT.recorder = previous


def seed_for(base: int, layer: str, count: int) -> int:
    digest = hashlib.blake2b(f"{base}|{layer}|{count}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _generation_dtype(dtype: torch.dtype) -> torch.dtype:
    # S is drawn in one dtype whatever the values' dtype, so forward and backward agree
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class Sketch:
    """One draw of ``S`` (``rows x n``): enough to apply it to ``x`` in forward and to ``dy`` in backward."""

    estimator: str
    rows: int  # k
    n: int  # N, the flattened batch·tokens dimension
    seed: int
    chunk: int  # dense estimators: S is generated chunk columns at a time
    indices: torch.Tensor | None = None  # "rows": the rows drawn
    scales: torch.Tensor | None = None  # "rows": 1 / sqrt(k p_a)

    def apply(self, values: torch.Tensor) -> torch.Tensor:
        """``S @ values`` for ``values`` of shape ``(n, d)``."""
        if self.estimator == "rows":
            return values.index_select(0, self.indices) * self.scales.to(values.dtype)[:, None]
        generator = torch.Generator(device=values.device).manual_seed(self.seed)
        dtype = _generation_dtype(values.dtype)
        out = torch.zeros(self.rows, values.shape[1], dtype=values.dtype, device=values.device)
        for start in range(0, self.n, self.chunk):
            width = min(self.chunk, self.n - start)
            if self.estimator == "gaussian":
                block = torch.randn(width, self.rows, generator=generator, dtype=dtype, device=values.device)
            else:
                block = torch.randint(0, 2, (width, self.rows), generator=generator, device=values.device).to(dtype).mul_(2).sub_(1)
            out.addmm_(block.t().to(values.dtype), values[start : start + width])
        return out.mul_(1.0 / math.sqrt(self.rows))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return () if self.indices is None else (self.indices, self.scales)


def row_probabilities(x2d: torch.Tensor) -> torch.Tensor:
    """``p_a ∝ ||x_a||`` (uniform when ``x`` is all zeros), in float64."""
    norms = x2d.detach().double().norm(dim=1)
    total = norms.sum()
    return norms / total if total > 0 else torch.full_like(norms, 1.0 / len(norms))


def draw_sketch(estimator: str, x2d: torch.Tensor, keep: float, seed: int) -> Sketch:
    """Draw ``S`` for the ``(N, d_in)`` input ``x2d``, keeping ``ceil(keep * N)`` rows."""
    n = x2d.shape[0]
    rows = max(1, math.ceil(keep * n))
    chunk = max(1, min(n, x2d.shape[1]))  # the transient block of S is at most as large as S x
    if estimator != "rows":
        return Sketch(estimator, rows, n, seed, chunk)
    p = row_probabilities(x2d)
    generator = torch.Generator(device=x2d.device).manual_seed(seed)
    indices = torch.multinomial(p.to(x2d.device, torch.float64), rows, replacement=True, generator=generator)
    scales = (rows * p.to(x2d.device)[indices]).rsqrt().to(torch.float32 if x2d.dtype != torch.float64 else torch.float64)
    return Sketch(estimator, rows, n, seed, chunk, indices, scales)


# --- the layer --------------------------------------------------------------------------------------


def _forward_linear(x, weight, bias, weight_in_out: bool):
    """The layer's own forward: ``F.linear`` for ``(out, in)`` weights, ``addmm`` for ``(in, out)`` ones."""
    if not weight_in_out:
        return F.linear(x, weight, bias)
    return torch.addmm(bias, x, weight) if bias is not None else torch.mm(x, weight)


class _SketchedLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, estimator: str, keep: float, seed: int, weight_in_out: bool):
        y = _forward_linear(x, weight, bias, weight_in_out)
        x2d = x.reshape(-1, x.shape[-1]).to(y.dtype)
        sketch = draw_sketch(estimator, x2d, keep, seed)
        ctx.save_for_backward(sketch.apply(x2d), weight, *sketch.tensors())
        ctx.sketch = replace(sketch, indices=None, scales=None)
        ctx.x_meta = (x.shape, x.dtype)
        ctx.weight_in_out = weight_in_out
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        sx, weight, *rows = ctx.saved_tensors
        sketch = replace(ctx.sketch, indices=rows[0], scales=rows[1]) if rows else ctx.sketch
        x_shape, x_dtype = ctx.x_meta
        dy2d = dy.reshape(-1, dy.shape[-1])
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            w = weight.to(dy.dtype)
            dx = (dy2d.matmul(w.t()) if ctx.weight_in_out else dy2d.matmul(w)).reshape(x_shape).to(x_dtype)
        if ctx.needs_input_grad[1]:
            dw = sketch.apply(dy2d.to(sx.dtype)).t().matmul(sx)  # (out, in)
            dw = (dw.t() if ctx.weight_in_out else dw).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2d.sum(0)
        return dx, dw, db, None, None, None, None


class SketchedLinear:
    """The op a sketched linear node calls: ``(x, weight, bias=None) -> y``, exact forward.

    One instance per layer; it counts its draws, so every training step gets a fresh,
    reproducible sketch. Runs exactly (stores ``x``) inside ``exact_linears()``, when no
    graph is recorded, and when the weight needs no gradient.
    """

    def __init__(self, layer: str, keep: float, estimator: str, seed: int, weight_in_out: bool = False, weight: str = ""):
        self.layer, self.keep, self.estimator, self.seed = layer, keep, estimator, seed
        self.weight_in_out = weight_in_out
        self.weight = weight  # qualified name of the weight parameter in the model
        self.draws = 0

    @property
    def __name__(self) -> str:  # fx names the call after its target
        return "sketched_linear"

    def __repr__(self) -> str:
        return f"SketchedLinear({self.layer!r}, keep={self.keep}, estimator={self.estimator!r})"

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if getattr(_EXACT, "depth", 0) or not (torch.is_grad_enabled() and weight.requires_grad):
            y = _forward_linear(x, weight, bias, self.weight_in_out)
            recorder = getattr(_EXACT, "recorder", None)
            if recorder is not None and y.requires_grad:
                x2d = x.detach().reshape(-1, x.shape[-1])
                y.register_hook(lambda dy: recorder.__setitem__(self.layer, (x2d, dy.detach().reshape(-1, dy.shape[-1]))))
            return y
        seed = seed_for(self.seed, self.layer, self.draws)
        self.draws += 1
        return _SketchedLinearFunction.apply(x, weight, bias, self.estimator, self.keep, seed, self.weight_in_out)


# --- wiring into a conversion -----------------------------------------------------------------------


def _chooser(config: SketchConfig, outside: set[str], everything: set[str]) -> Callable[[str], bool]:
    layers = config.layers
    if layers is None:
        if not outside:
            raise ValueError(
                "sketch_linears: no linear layer is outside the reversible segments (their inputs are not stored); "
                f"name layers inside them with SketchConfig(layers=[...]) or layers='all'. Linear layers: {sorted(everything)[:8]}"
            )
        return outside.__contains__
    if layers == "all":
        return everything.__contains__
    if callable(layers) and not isinstance(layers, Mapping):
        return lambda name: bool(layers(name))
    if isinstance(layers, Iterable):
        names = set(layers)
        unknown = sorted(names - everything)
        if unknown:
            raise ValueError(
                f"sketch_linears: {unknown} are not linear layers of this model's graph; "
                f"its linear layers are {sorted(everything)}"
            )
        return names.__contains__
    raise TypeError(f"sketch layers must be None, 'all', names, a name -> fraction mapping or a predicate; got {layers!r}")


def _sketch_graph(gm: fx.GraphModule, choose, config: SketchConfig):
    from revcompile.passes.sketch import sketch_linears

    def make_op(site) -> SketchedLinear:
        keep = config.keep_for(site.layer)
        return SketchedLinear(site.layer, keep, config.estimator, config.seed, site.weight_in_out, site.weight)

    result = sketch_linears(gm, lambda site: choose(site.layer), make_op)
    ops = tuple(n.target for n in result.graph_module.graph.nodes if isinstance(n.target, SketchedLinear))
    return result.graph_module, ops


def sketch_compiled(gm: fx.GraphModule, segments: tuple, root: nn.Module, value) -> tuple:
    """Apply ``convert(..., sketch_linears=value)`` to a rewritten graph and its segments' branches.

    Returns ``(graph_module, segments, sketched ops)``; unchanged when ``value`` is None.
    """
    from revcompile.passes.sketch import find_linear_sites

    config = SketchConfig.of(value)
    if config is None:
        return gm, segments, ()
    branches = {(s, b, side): fx.GraphModule(root, getattr(block, side).graph)
                for s, seg in enumerate(segments) for b, block in enumerate(seg.blocks) for side in ("f", "g")}
    outside = {site.layer for site in find_linear_sites(gm)}
    inside = {site.layer for branch in branches.values() for site in find_linear_sites(branch)}
    choose = _chooser(config, outside, outside | inside)
    gm, ops = _sketch_graph(gm, choose, config)
    if config.layers is None:
        return gm, segments, ops
    new_segments = []
    for s, seg in enumerate(segments):
        blocks = []
        for b, block in enumerate(seg.blocks):
            sides = {}
            for side in ("f", "g"):
                branch_gm, branch_ops = _sketch_graph(branches[(s, b, side)], choose, config)
                sides[side] = replace(getattr(block, side), graph=branch_gm.graph)
                ops += branch_ops
            blocks.append(replace(block, **sides))
        new_segments.append(replace(seg, blocks=tuple(blocks)))
    return gm, tuple(new_segments), ops

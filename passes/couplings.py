"""Couplings: what a reversible block computes, as one definition each.

A block's residual sublayers (its attention branch F, then its MLP branch G) are applied
as *steps* on a pair of streams ``(prev, cur)``::

    h    = branch(cur)                          # the branch runs in the model's precision
    next = combine(prev, cur, h)                # the coupling's forward step
    prev = invert(cur, next, h, residue)        # its exact inverse, given the recomputed h
    (prev, cur) -> (cur, next)

Every consumer reads the coupling from here and nowhere else: the runtime runs
``enter``/``step``/``invert``/``gradient``/``leave``, the memory predictor runs the same
forward steps on fake tensors and counts ``residue_bytes``, the backward-program builder
(``schedule``) declares the per-step values a coupling saves (``saves_per_step``) as reads
of each recompute, and the drawing and the report print ``label`` and ``stream_names``.
Adding a coupling is adding a subclass of ``Coupling`` here and its tests.

Two couplings are defined:

* ``RevViT`` (Rev-ViT): ``next = prev + h``. Written as steps, ``(X1, X2) -F-> (X2, Y1)
  -G-> (Y1, Y2)`` is exactly ``Y1 = X1 + F(X2)``, ``Y2 = X2 + G(Y1)``; the segment's output
  fuses the two final streams (``fusion``). A different function from the original.
* ``DualResidual`` (Dr2Net/MEFT, made exact): ``next = alpha*cur + h + beta*prev`` with
  ``beta = 2**-k``. At ``beta -> 0, alpha = 1`` it is the original residual network, so
  pretrained weights keep their meaning; the output is the last stream itself. ``beta*prev``
  on the fixed-point grid is a floor shift whose dropped k bits are kept as a packed
  ``residue`` (MacKay et al. 2018), which makes the inverse exact for every k.

The streams' representation is ``StreamArithmetic``'s business: ``"exact"`` keeps them as
float64 multiples of ``2**-36`` (every branch output is rounded onto that grid before it is
added, so additions and subtractions are exact; for float32/float16/bfloat16 branch outputs by
two float64 additions, see ``_SHIFT``), ``"float32"``/``"model"`` as ordinary
floating point. Rounding is part of the architecture: its gradient is the identity (and a
floor shift's is ``beta``), so the stored-activation reference differentiates the same
function the reversible backward does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from revcompile.passes.plan import require_choice

__all__ = [
    "STREAM_PRECISIONS",
    "GRID_BITS",
    "stream_dtype",
    "StreamArithmetic",
    "Coupling",
    "RevViT",
    "DualResidual",
    "COUPLINGS",
    "FUSIONS",
    "make_coupling",
    "pack_bits",
    "unpack_bits",
]

# How the coupled streams are kept while the branches run (``convert(..., streams=)``).
STREAM_PRECISIONS = {
    "exact": "float64 on a fixed-point grid (2**-36): branch outputs are rounded onto it, so the "
    "stream additions are exact and so is reconstruction, at any depth and precision",
    "float32": "float32 when the model's stream is float16/bfloat16, else the model's precision",
    "model": "whatever precision the model computes the stream in",
}

# Fixed-point scale of "exact" streams. float64's 53-bit significand fixes range x resolution:
# 2**-36 resolves 1.5e-11 (finer than float32 above ~1e-4, so LayerScale-sized branch outputs
# survive) and stays exact while |x| < 2**17 = 131072 (LLM "massive activations" are ~1e4).
GRID_BITS = 36
_GRID = 2.0**GRID_BITS


# Adding 1.5 * 2**(52 - GRID_BITS) lands |v| < 2**15 in [2**16, 2**17), where float64's spacing
# is the grid's: the addition rounds v onto the grid (ties to even, as round() does) and the
# subtraction is exact (Sterbenz). A value of at most 24 significant bits (float32, float16,
# bfloat16) with |v| >= 2**15 is already on the grid and passes through both exactly. So for
# those dtypes, two additions give round(v * 2**36) / 2**36 bit for bit (but for the sign of
# a zero), in two float64 passes instead of three.
_SHIFT = 1.5 * 2.0 ** (52 - GRID_BITS)
_NARROW = (torch.float32, torch.float16, torch.bfloat16)


def _rounded_to_grid(value: torch.Tensor) -> torch.Tensor:
    """A new float64 tensor: ``value`` rounded onto the grid."""
    grid = value.to(torch.float64, copy=True)  # one float64 temporary, rounded in place
    if value.dtype in _NARROW:
        return grid.add_(_SHIFT).sub_(_SHIFT)
    return grid.mul_(_GRID).round_().div_(_GRID)


class _ToGrid(torch.autograd.Function):
    """Round onto the fixed-point grid in float64; the gradient passes straight through."""

    @staticmethod
    def forward(ctx, value: torch.Tensor) -> torch.Tensor:
        ctx.dtype = value.dtype
        return _rounded_to_grid(value)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.to(ctx.dtype)


class _FloorShift(torch.autograd.Function):
    """``floor(x * 2**-k)`` on the grid (exact in float64); its gradient is ``2**-k``."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, k: int) -> torch.Tensor:
        ctx.k = k
        return torch.floor(value * 2.0 ** (GRID_BITS - k)).div_(_GRID)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * 2.0**-ctx.k, None


def stream_dtype(precision: str, model_dtype: torch.dtype) -> torch.dtype | None:
    """The dtype streams are kept in for ``precision``; None keeps the model's own."""
    if precision == "exact":
        return torch.float64
    if precision == "float32" and model_dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return None


class StreamArithmetic:
    """How streams are entered, added to, subtracted from and left, for one precision.

    The branches always run in the model's own precision; only the streams'
    representation changes. ``add`` and ``subtract`` are inverses exactly for ``"exact"``
    and up to rounding otherwise.
    """

    def __init__(self, precision: str, model_dtype: torch.dtype):
        self.precision = precision
        self.exact = precision == "exact"
        self.model_dtype = model_dtype
        self.stream_dtype = stream_dtype(precision, model_dtype)

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        if self.exact:
            return _ToGrid.apply(x)
        return x if self.stream_dtype is None else x.to(self.stream_dtype)

    def branch_input(self, stream: torch.Tensor) -> torch.Tensor:
        return stream if self.stream_dtype is None else stream.to(self.model_dtype)

    def on_stream(self, branch_output: torch.Tensor) -> torch.Tensor:
        """A branch output as a stream value (rounded onto the grid when exact)."""
        if self.exact:
            return _ToGrid.apply(branch_output)
        return branch_output if self.stream_dtype is None else branch_output.to(self.stream_dtype)

    def add_branch(self, stream: torch.Tensor, branch_output: torch.Tensor) -> torch.Tensor:
        """``stream + on_stream(branch_output)``; exact streams add into the rounded copy when
        no graph is recorded (the reversible forward and recompute), saving a buffer."""
        value = self.on_stream(branch_output)
        if self.exact and not (value.requires_grad or stream.requires_grad):
            return value.add_(stream)
        return stream + value

    def subtract_branch(self, stream: torch.Tensor, branch_output: torch.Tensor, *, into_stream: bool = False) -> torch.Tensor:
        """``stream - on_stream(branch_output)``, the inverse of ``add_branch``. ``into_stream``
        (no graph recorded; the caller owns ``stream`` and needs it no more) writes the result
        over ``stream``: the same values, without a second stream alive."""
        value = self.on_stream(branch_output)
        if into_stream:
            return stream.sub_(value)
        if self.exact and not (value.requires_grad or stream.requires_grad):
            return torch.sub(stream, value, out=value)
        return stream - value

    @property
    def casts_branch_input(self) -> bool:
        """Whether branches read a cast copy of a stream (so a stream's pulled-back cotangent is a new tensor)."""
        return self.stream_dtype not in (None, self.model_dtype)

    def floor_shift(self, stream: torch.Tensor, k: int) -> torch.Tensor:
        """``2**-k * stream`` rounded down onto the grid (exact streams only)."""
        return _FloorShift.apply(stream, k)

    def leave(self, stream: torch.Tensor) -> torch.Tensor:
        return stream.to(self.model_dtype)


# --- packing the bits a floor shift drops --------------------------------------------------


def pack_bits(values: torch.Tensor, k: int) -> torch.Tensor:
    """Integers in ``[0, 2**k)`` as exactly ``k`` bits each: whole bytes, then bit planes."""
    flat = values.reshape(-1).to(torch.int64)
    planes = [((flat >> (8 * j)) & 255).to(torch.uint8) for j in range(k // 8)]
    n = flat.numel()
    padded = torch.nn.functional.pad(flat, (0, (-n) % 8)).view(-1, 8)
    weights = torch.tensor([1 << b for b in range(8)], dtype=torch.int64, device=flat.device)
    for bit in range(8 * (k // 8), k):
        planes.append((((padded >> bit) & 1) * weights).sum(1).to(torch.uint8))
    return torch.cat(planes) if planes else flat.new_empty(0, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, k: int, like: torch.Tensor) -> torch.Tensor:
    """The inverse of ``pack_bits``: int64 values shaped like ``like``."""
    n = like.numel()
    whole = k // 8
    values = torch.zeros(n, dtype=torch.int64, device=packed.device)
    for j in range(whole):
        values |= packed[j * n:(j + 1) * n].to(torch.int64) << (8 * j)
    rows = (n + 7) // 8
    shifts = torch.arange(8, device=packed.device)
    for p, bit in enumerate(range(8 * whole, k)):
        plane = packed[whole * n + p * rows: whole * n + (p + 1) * rows].to(torch.int64)
        values |= (((plane.unsqueeze(1) >> shifts) & 1).reshape(-1)[:n]) << bit
    return values.view(like.shape)


# --- the couplings -------------------------------------------------------------------------


class Coupling:
    """One coupling: forward step, inverse step, gradient step, what it saves, its label.

    Subclasses are frozen dataclasses holding their coefficients. Steps see a
    ``StreamArithmetic`` so that the same definition runs on exact and floating streams.
    """

    name: ClassVar[str]
    stream_names: ClassVar[tuple[str, str]]  # the two streams a segment carries, for pictures
    step_inputs: ClassVar[tuple[str, str]]  # what a block's F and G read, for pictures
    step_formulas: ClassVar[tuple[str, str]]  # what a block's F and G steps compute, for pictures
    saves_per_step: ClassVar[tuple[str, ...]] = ()  # values kept per step besides the final streams
    alpha: float = 0.0  # d next / d cur (straight through any rounding)
    beta: float = 1.0  # d next / d prev

    def label(self) -> str:
        raise NotImplementedError

    def keeps(self) -> str:
        """What a segment keeps for backward, in words."""
        kept = ", ".join(self.stream_names)
        return f"keeps the last {kept} only" if not self.saves_per_step else f"keeps the last {kept} + per-step residues"

    def check(self, precision: str) -> None:
        """Raise ValueError if this coupling cannot run on streams of ``precision``."""

    def enter(self, arith: StreamArithmetic, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start = arith.enter(x)
        return start, start

    def run(self, arith: StreamArithmetic, x: torch.Tensor, branches, *, keep_residues: bool = True, before_step=None):
        """The forward through a segment's steps: final ``(prev, cur)`` and each step's residue.

        ``branches`` are callables ``stream -> branch output`` in step order (block 0's F,
        its G, block 1's F, ...); ``before_step(j, prev, cur)`` is called before step ``j``
        (the runtime captures generator states and, when checking, the block inputs there).
        """
        prev, cur = self.enter(arith, x)
        residues = []
        for j, branch in enumerate(branches):
            if before_step is not None:
                before_step(j, prev, cur)
            nxt, residue = self.step(arith, prev, cur, branch(arith.branch_input(cur)), keep_residues)
            residues.append(residue)
            prev, cur = cur, nxt
        return prev, cur, residues

    def step(self, arith: StreamArithmetic, prev, cur, h, keep_residue: bool = True):
        """``(next, residue)``: the new stream and what the inverse needs besides ``cur``, ``next``, ``h``."""
        raise NotImplementedError

    def invert(self, arith: StreamArithmetic, cur, nxt, h, residue, *, overwrite_next: bool = False):
        """``prev`` from ``cur``, ``next`` and the recomputed ``h`` (detached). ``overwrite_next``:
        the caller owns ``next`` and needs it no more, so ``prev`` may be written over it."""
        raise NotImplementedError

    def gradient(self, d_cur, d_next, pulled, *, pulled_owned: bool = False):
        """Cotangents of ``(prev, cur)`` from those of ``(cur, next)``; ``pulled`` = J_h^T d_next.
        ``pulled_owned``: nothing else refers to ``pulled``, so the sum may be taken in it."""
        d_prev = d_next if self.beta == 1.0 else d_next * self.beta
        if pulled is not None:
            d_cur = pulled.add_(d_cur) if pulled_owned else d_cur + pulled
        if self.alpha:
            d_cur = d_cur + d_next * self.alpha
        return d_prev, d_cur

    def leave(self, arith: StreamArithmetic, prev, cur) -> torch.Tensor:
        raise NotImplementedError

    def leave_gradient(self, grad: torch.Tensor):
        """Cotangents of the final ``(prev, cur)`` from the segment output's."""
        raise NotImplementedError

    def residue_bytes(self, numel: int) -> int:
        """Bytes one step keeps for its inverse (``saves_per_step``), for a stream of ``numel``."""
        return 0


FUSIONS = {
    "mean": "(Y1 + Y2) / 2: both streams, at the scale of one (default)",
    "sum": "Y1 + Y2: both streams, at twice the scale of one",
}


@dataclass(frozen=True)
class RevViT(Coupling):
    """Rev-ViT: ``Y1 = X1 + F(X2)``, ``Y2 = X2 + G(Y1)``; the two streams fused at the end.

    Fusion keeps the model's width, so its own final norm and head still fit: ``"mean"``
    (both streams at the scale of one: at initialisation the output is close to ``x``) or
    ``"sum"``.
    """

    name: ClassVar[str] = "revvit"
    stream_names: ClassVar[tuple[str, str]] = ("X1", "X2")
    step_inputs: ClassVar[tuple[str, str]] = ("X2", "Y1")
    step_formulas: ClassVar[tuple[str, str]] = ("Y1 = X1 + F(X2)", "Y2 = X2 + G(Y1)")
    fusion: str = "mean"

    def __post_init__(self):
        require_choice("fusion", self.fusion, FUSIONS)

    def label(self) -> str:
        return f"Rev-ViT coupling, fusion {self.fusion}"

    def step(self, arith, prev, cur, h, keep_residue=True):
        return arith.add_branch(prev, h), None

    def invert(self, arith, cur, nxt, h, residue, *, overwrite_next=False):
        return arith.subtract_branch(nxt, h, into_stream=overwrite_next)

    def leave(self, arith, prev, cur):
        fused = prev + cur
        return arith.leave(fused / 2 if self.fusion == "mean" else fused)

    def leave_gradient(self, grad):
        half = grad / 2 if self.fusion == "mean" else grad
        return half, half


@dataclass(frozen=True)
class DualResidual(Coupling):
    """Dual residual (Dr2Net, MEFT), exact: ``x_{i+1} = alpha*x_i + F_i(x_i) + beta*x_{i-1}``.

    ``beta = 2**-k``: ``beta*x_{i-1}`` is a floor shift on the grid and the ``k`` bits it
    drops are the step's residue, so ``x_{i-1} = ((x_{i+1} - alpha*x_i - F_i(x_i)) << k) +
    residue`` exactly. ``alpha=None`` means ``1 - beta``: since ``x_i - x_{i-1}`` is the
    previous branch's output, the step then differs from the original network's only by
    ``-beta*F_{i-1}``, a damping of the previous branch; with ``alpha = 1`` it adds a copy of
    the whole stream. Both ``x_{-1}`` and ``x_0`` start as the segment input, so the first
    step is exactly the original's; the output is the last stream.
    """

    name: ClassVar[str] = "dual"
    stream_names: ClassVar[tuple[str, str]] = ("x_i-1", "x_i")
    step_inputs: ClassVar[tuple[str, str]] = ("x_i", "x_i+1")
    step_formulas: ClassVar[tuple[str, str]] = ("x_i+1 = a·x_i + F(x_i) + b·x_i-1", "x_i+2 = a·x_i+1 + G(x_i+1) + b·x_i")
    saves_per_step: ClassVar[tuple[str, ...]] = ("residue",)
    beta: float = 2.0**-8
    alpha: float | None = None

    MAX_K: ClassVar[int] = 30

    def __post_init__(self):
        object.__setattr__(self, "beta", _power_of_two(self.beta, self.MAX_K))
        if self.alpha is None:
            object.__setattr__(self, "alpha", 1.0 - self.beta)
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and 0.0 <= self.alpha <= 1.0):
            raise ValueError(f"alpha must be a number in [0, 1] (or None for 1 - beta), got {self.alpha!r}")
        object.__setattr__(self, "alpha", float(self.alpha))

    @property
    def k(self) -> int:
        return -int(math.log2(self.beta))

    def label(self) -> str:
        alpha = "1 - beta" if self.alpha == 1.0 - self.beta else f"{self.alpha:g}"
        return f"dual residual, beta = 2^-{self.k}, alpha = {alpha}, {self.k}-bit residues"

    def check(self, precision: str) -> None:
        if precision != "exact":
            raise ValueError(
                f"coupling='dual' keeps its streams on the exact fixed-point grid (its inverse divides by "
                f"beta otherwise); use streams='exact', not {precision!r}"
            )

    def _alpha_part(self, arith, cur):
        if self.alpha == 1.0:
            return cur
        if self.alpha == 1.0 - self.beta:
            return cur - arith.floor_shift(cur, self.k)  # exact on the grid
        return arith.on_stream(cur * self.alpha)  # recomputed identically in backward

    def step(self, arith, prev, cur, h, keep_residue=True):
        shifted = arith.floor_shift(prev, self.k)
        nxt = self._alpha_part(arith, cur) + arith.on_stream(h) + shifted
        if not keep_residue:
            return nxt, None
        with torch.no_grad():
            dropped = (prev - shifted.detach() * 2.0**self.k) * _GRID  # integers in [0, 2**k)
            return nxt, pack_bits(dropped, self.k)

    def invert(self, arith, cur, nxt, h, residue, *, overwrite_next=False):
        shifted = nxt - self._alpha_part(arith, cur) - arith.on_stream(h)
        dropped = unpack_bits(residue, self.k, cur).to(torch.float64) / _GRID
        return shifted * 2.0**self.k + dropped

    def leave(self, arith, prev, cur):
        return arith.leave(cur)

    def leave_gradient(self, grad):
        return torch.zeros_like(grad), grad

    def residue_bytes(self, numel: int) -> int:
        whole, bits = self.k // 8, self.k % 8
        return whole * numel + bits * ((numel + 7) // 8)


def _power_of_two(beta, max_k: int) -> float:
    """``beta`` if it is ``2**-k`` for ``0 <= k <= max_k``, else a ValueError naming the nearest ones."""
    if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"beta must be a power of two 2**-k with 0 <= k <= {max_k}, got {beta!r}")
    exponent = math.log2(beta)
    if exponent != int(exponent) or not -max_k <= exponent <= 0:
        low = min(max(math.floor(exponent), -max_k), 0)
        high = min(max(math.ceil(exponent), -max_k), 0)
        nearest = " or ".join(dict.fromkeys(f"2**{e} = {2.0**e:g}" for e in (low, high)))
        raise ValueError(
            f"beta must be a power of two 2**-k with 0 <= k <= {max_k} (so that beta*x is an exact shift "
            f"on the stream grid), got {beta!r}; the nearest are {nearest}"
        )
    return float(beta)


COUPLINGS = {
    RevViT.name: "Rev-ViT: Y1 = X1 + F(X2), Y2 = X2 + G(Y1), streams fused at the end (a new architecture)",
    DualResidual.name: "dual residual: x_{i+1} = alpha*x_i + F(x_i) + beta*x_{i-1}, beta = 2**-k; "
    "function-preserving as beta -> 0 (for pretrained weights), exact at every k",
}


def make_coupling(name: str, *, fusion: str = "mean", beta: float | None = None, alpha: float | None = None) -> Coupling:
    """The coupling ``convert(..., coupling=name)`` asks for, with its coefficients checked."""
    if name == RevViT.name:
        if beta is not None or alpha is not None:
            raise ValueError("beta and alpha are coefficients of coupling='dual'; coupling='revvit' has none")
        return RevViT(fusion)
    if name == DualResidual.name:
        return DualResidual(2.0**-8 if beta is None else beta, alpha)
    raise ValueError(f"coupling must be one of {sorted(COUPLINGS)}, got {name!r}")

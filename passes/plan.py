"""The result of detection: what becomes reversible, and what is left alone and why.

These frozen records cross every boundary of the compiler: detection produces a ``Plan``,
the rewrite turns its segments into graph calls, the scheduler builds backward programs
per segment, and the user reads it through ``revcompile.explain``. Values are named by
their fx node names, so a plan can be printed, compared and checked against a graph
without holding on to the graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Branch", "Residual", "BLOCK_FORMS", "Block", "Segment", "Skipped", "Plan", "require_choice"]


@dataclass(frozen=True)
class Branch:
    """A single-entry region computing one branch of a coupled block.

    The branch's value is the sum of ``outputs``: one output for most branches, one per
    attention residual when a decoder block's self- and cross-attention form ``F``.
    """

    kind: str  # "attention" | "mlp" | "other"
    entry: str  # the stream value the branch reads
    nodes: tuple[str, ...]  # the region, in program order
    outputs: tuple[str, ...]
    side_inputs: tuple[str, ...]  # values read from outside that do not depend on the stream
    parameters: tuple[str, ...]  # qualified names of the parameters it reads
    modules: tuple[str, ...]  # module paths the region's ops come from


@dataclass(frozen=True)
class Residual:
    """An add ``stream + branch`` whose branch is a single-entry single-exit region.

    ``parallel`` holds the attention and MLP parts of a parallel-residual branch
    (``x + attn(ln(x)) + mlp(ln(x))``), when the branch is one.
    """

    add: str
    stream: str
    branch: Branch
    parallel: tuple[Branch, Branch] | None = None

    @property
    def kind(self) -> str:
        return "parallel" if self.parallel else self.branch.kind


# How a block's residuals map onto its two branches F and G (what the coupling then does
# with F and G is revcompile.passes.couplings').
BLOCK_FORMS = {
    "sequential": "x + attn(x), then + mlp(.): F = the attention branch, G = the MLP branch",
    "decoder": "self- and cross-attention residuals, then MLP: F(x) = sa(x) + ca(x + sa(x)), G = MLP",
    "parallel": "x + attn(x) + mlp(x): F = the attention part, G = the MLP part",
}


def require_choice(option: str, value, choices) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices`` (a tuple, or a dict of value -> meaning).

    The one check of a named option (``fusion``, ``post_norm``, ``tracer``...): the passes
    that take an option and the API that takes it from the user raise the same message.
    """
    if value not in choices:
        listed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{option} must be one of {listed}; got {value!r}")


@dataclass(frozen=True)
class Block:
    """One reversible block: the residual adds it replaces and the two branches it couples.

    Casts, layout reshapes and (with ``post_norm="move"``) norms sitting on the stream
    between residuals are part of the branch that follows them.
    """

    name: str
    input: str
    output: str
    residuals: tuple[str, ...]
    form: str  # a key of BLOCK_FORMS
    f: Branch
    g: Branch
    replaces: tuple[str, ...] = ()  # every node of the traced graph the block takes over
    post_norm_moved: bool = False


@dataclass(frozen=True)
class Segment:
    index: int
    blocks: tuple[Block, ...]
    input: str
    output: str
    side_inputs: tuple[str, ...]
    ends_because: str
    output_layout: str | None = None  # a reshape re-applied to the output when its layout differs

    @property
    def name(self) -> str:
        first, last = self.blocks[0].name, self.blocks[-1].name
        return first if len(self.blocks) == 1 else f"{first} .. {last}"


@dataclass(frozen=True)
class Skipped:
    node: str
    module: str
    kind: str
    reason: str


@dataclass(frozen=True)
class Plan:
    """What the conversion found: segments to make reversible and residuals left alone."""

    segments: tuple[Segment, ...]
    skipped: tuple[Skipped, ...]
    residuals_found: int
    tracer: str = ""
    notes: tuple[str, ...] = field(default=())

    @property
    def blocks(self) -> tuple[Block, ...]:
        return tuple(b for s in self.segments for b in s.blocks)

    def node_owners(self) -> dict[str, int]:
        """Traced-graph node name -> index of the segment whose blocks take it over."""
        return {
            name: segment.index
            for segment in self.segments
            for block in segment.blocks
            for name in (*block.f.nodes, *block.g.nodes, *block.residuals)
        }

    def signature(self) -> tuple:
        """Which parameters each converted block uses: equal plans compute the same function."""
        return tuple(tuple((b.f.parameters, b.g.parameters) for b in s.blocks) for s in self.segments)

    def __str__(self) -> str:
        def count(n: int, word: str) -> str:
            return f"{n} {word}" + ("" if n == 1 else "s")

        lines = [
            f"Plan ({self.tracer or 'unknown'} tracer): {count(len(self.blocks), 'block')} in "
            f"{count(len(self.segments), 'reversible segment')}; {count(self.residuals_found, 'residual')} found, "
            f"{len(self.skipped)} left as they are"
        ]
        for seg in self.segments:
            side = ", ".join(seg.side_inputs) or "none"
            kinds = sorted({b.form for b in seg.blocks} - {"sequential"})
            kinds += ["post-norm moved into branches"] if any(b.post_norm_moved for b in seg.blocks) else []
            how = f", {', '.join(kinds)}" if kinds else ""
            lines.append(
                f"  segment {seg.index}: {seg.name} ({count(len(seg.blocks), 'block')}{how}), input {seg.input}, "
                f"side inputs: {side}; ends: {seg.ends_because}"
            )
        for skip in self.skipped:
            where = f" [{skip.module}]" if skip.module else ""
            lines.append(f"  skipped {skip.kind} residual {skip.node}{where}: {skip.reason}")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)

"""The result of detection: what becomes reversible, and what is left alone and why.

These frozen records cross every boundary of the compiler: detection produces a ``Plan``,
the rewrite turns its segments into graph calls, the scheduler builds backward programs
per segment, and the user reads it through ``revcompile.explain``. Values are named by
their fx node names, so a plan can be printed, compared and checked against a graph
without holding on to the graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Branch", "Residual", "Block", "Segment", "Skipped", "Plan"]


@dataclass(frozen=True)
class Branch:
    """A single-entry single-exit region computing one residual branch."""

    kind: str  # "attention" | "mlp" | "other"
    entry: str  # the stream value the branch reads
    nodes: tuple[str, ...]  # the region, in program order
    output: str
    side_inputs: tuple[str, ...]  # values read from outside that do not depend on the stream
    parameters: tuple[str, ...]  # qualified names of the parameters it reads
    modules: tuple[str, ...]  # module paths the region's ops come from


@dataclass(frozen=True)
class Residual:
    add: str
    stream: str
    branch: Branch

    @property
    def kind(self) -> str:
        return self.branch.kind


@dataclass(frozen=True)
class Block:
    """An attention residual and the MLP residual after it, as the coupling will run them.

    ``f`` is the attention branch and ``g`` the MLP branch. When a cast sits on the stream
    between two residuals (Llama's ``x.to(float32)``), it is part of the branch after it.
    """

    name: str
    input: str
    output: str
    attention: Residual
    mlp: Residual
    f: Branch
    g: Branch


@dataclass(frozen=True)
class Segment:
    index: int
    blocks: tuple[Block, ...]
    input: str
    output: str
    side_inputs: tuple[str, ...]
    ends_because: str

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
            lines.append(
                f"  segment {seg.index}: {seg.name} ({len(seg.blocks)} blocks), input {seg.input}, "
                f"side inputs: {side}; ends: {seg.ends_because}"
            )
        for skip in self.skipped:
            where = f" [{skip.module}]" if skip.module else ""
            lines.append(f"  skipped {skip.kind} residual {skip.node}{where}: {skip.reason}")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)

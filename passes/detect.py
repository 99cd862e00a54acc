"""Assemble residuals into reversible blocks and chain blocks into segments.

A block is what the coupling ``Y1 = X1 + F(X2)``, ``Y2 = X2 + G(Y1)`` replaces
(``revcompile.passes.plan.BLOCK_FORMS``):

* sequential: an attention residual whose output feeds an MLP residual and nothing else
  (F = attention branch, G = MLP branch);
* decoder: consecutive attention residuals (self- then cross-attention) before the MLP
  residual; F is their composite, ``F(x) = sa(x) + ca(x + sa(x))``;
* parallel: one residual ``x + attn(x) + mlp(x)``; F and G are its two parts.

Between residuals the stream may pass through ops that keep its values: casts (Llama's
RMSNorm casts to float32), layout reshapes to explicit sizes (timm Swin flattens the
spatial grid for its MLP), and -- only with ``post_norm="move"`` -- the LayerNorm of a
post-norm block (BERT). Such a chain becomes the first ops of the branch after it. The
stream is kept in the segment input's layout; a branch that reads another layout
re-lays it out through its chain, and one that returns another layout is reshaped back.

Consecutive blocks whose intermediate outputs are read by nothing else form a segment; a
hidden-state tap, a stage transition, or a side input computed inside ends it. Every
top-level residual left alone is reported with its reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import torch.fx as fx

from revcompile.passes.graph_view import GraphView, shape_key
from revcompile.passes.patterns import NORM, RESIDUAL_ADD, STREAM_TRANSPARENT, is_layout_reshape
from revcompile.passes.plan import Block, Branch, Plan, Residual, Segment, Skipped, require_choice
from revcompile.passes.residuals import find_residuals, make_branch

__all__ = ["POST_NORM", "find_reversible_blocks"]

POST_NORM = {
    "skip": "leave post-norm blocks (norm after the residual add) as they are, with a reason",
    "move": "convert them with each such norm moved into the branch after it (pre-norm placement)",
}

_POST_NORM_HINT = (
    "post-norm block (a norm after the residual add); pass post_norm='move' to convert it with "
    "each norm moved into the branch that follows (see docs/design.md)"
)


@dataclass(frozen=True)
class _Handover:
    """How the stream passes from one residual to the next.

    ``chain``: the value-keeping ops in between when nothing else reads the stream there;
    else None and ``reason`` says why. ``connected`` is False when the stream does not pass
    from one to the other at all: two separate streams, which ends no segment.
    """

    chain: tuple[fx.Node, ...] | None
    norm_moved: bool = False
    reason: str | None = None
    connected: bool = True


class _Unit:
    """A candidate block before chaining: its residuals in order and its branches' parts."""

    def __init__(self, residuals: list[Residual], chains: list[list[fx.Node]], post_norm_moved: bool):
        self.residuals = residuals  # attention residual(s) then MLP residual, or one parallel
        self.chains = chains  # between consecutive residuals of the unit
        self.post_norm_moved = post_norm_moved

    @property
    def first(self) -> Residual:
        return self.residuals[0]

    @property
    def last(self) -> Residual:
        return self.residuals[-1]


class _Assembler:
    def __init__(self, view: GraphView, residuals: tuple[Residual, ...], post_norm: str, excluded=None):
        self.view = view
        self.excluded = dict(excluded or {})
        self.nodes = view.nodes
        self.residuals = residuals
        self.post_norm = post_norm
        self.skipped: list[Skipped] = []
        self.by_root: dict[fx.Node, list[Residual]] = {}
        for res in residuals:
            root, _ = self.strip(self.nodes[res.stream], allow_norm=True)
            self.by_root.setdefault(root, []).append(res)

    # -- stream hand-over -------------------------------------------------------------------

    def strip(self, node: fx.Node, allow_norm: bool) -> tuple[fx.Node, list[fx.Node]]:
        """Follow value-keeping ops (casts, layout reshapes, norms if allowed) up the stream."""
        chain: list[fx.Node] = []
        while node.args and isinstance(node.args[0], fx.Node) and (
            STREAM_TRANSPARENT.matches(node, self.view.gm)
            or is_layout_reshape(node)
            or (allow_norm and NORM.matches(node, self.view.gm) and not chain)
        ):
            chain.insert(0, node)
            node = node.args[0]
        return node, chain

    def handover(self, producer: fx.Node, consumer: Residual, allow_norm: bool):
        """(chain, other readers) if ``consumer`` reads the stream ``producer`` hands over."""
        root, chain = self.strip(self.nodes[consumer.stream], allow_norm)
        if root is not producer:
            return None, None
        allowed = set(chain) | {self.nodes[n] for n in consumer.branch.nodes} | {self.nodes[consumer.add]}
        return chain, [u for v in (producer, *chain) for u in v.users if u not in allowed]

    def private_handover(self, producer: fx.Node, consumer: Residual) -> _Handover:
        """How the stream passes from ``producer`` to ``consumer``: privately (a chain), or why not."""
        chain, extra = self.handover(producer, consumer, allow_norm=False)
        if chain is not None and not extra:
            return _Handover(tuple(chain))
        chain_n, extra_n = self.handover(producer, consumer, allow_norm=True)
        if chain_n is not None and not extra_n and any(NORM.matches(n, self.view.gm) for n in chain_n):
            if self.post_norm == "move":
                return _Handover(tuple(chain_n), norm_moved=True)
            return _Handover(None, reason=_POST_NORM_HINT)
        if extra:
            return _Handover(None, reason=f"its output is also used by {self.view.describe(extra)}")
        return _Handover(None, reason="the stream does not pass from one to the other directly", connected=False)

    # -- blocks -----------------------------------------------------------------------------

    def skip(self, res: Residual, kind: str, reason: str) -> None:
        self.skipped.append(Skipped(res.add, self.view.module_path(self.nodes[res.add]), kind, reason))

    def units(self) -> list[_Unit]:
        units, used = [], set()
        for res in self.residuals:
            if res.add in used:
                continue
            if res.kind == "parallel":
                units.append(_Unit([res], [], False))
                used.add(res.add)
            elif res.kind == "attention":
                unit = self.sequential_unit(res, used)
                if unit is not None:
                    units.append(unit)
                    used.update(r.add for r in unit.residuals)
        for unit in [u for u in units if self.unit_name(u) in self.excluded]:
            units.remove(unit)
            for res in unit.residuals:
                self.skip(res, res.kind, self.excluded[self.unit_name(unit)])
        for res in self.residuals:
            if res.add not in used and not any(s.node == res.add for s in self.skipped):
                self.skip(res, res.kind, self.why_alone(res))
        return units

    def sequential_unit(self, first: Residual, used: set) -> _Unit | None:
        chain_of: list[Residual] = [first]
        chains: list[list[fx.Node]] = []
        moved = False
        while True:
            current = chain_of[-1]
            followers = [r for r in self.by_root.get(self.nodes[current.add], []) if r.add not in used and r.kind in ("mlp", "attention")]
            follower = next((r for r in followers if r.kind == "mlp"), None) or next(iter(followers), None)
            if follower is None:
                users = self.view.describe(self.nodes[current.add].users)
                self.skip(first, "attention", f"no MLP residual reads its output (it goes to {users})")
                return None
            handover = self.private_handover(self.nodes[current.add], follower)
            if handover.chain is None:
                self.skip(first, "attention", handover.reason)
                return None
            moved = moved or handover.norm_moved
            chain_of.append(follower)
            chains.append(list(handover.chain))
            if follower.kind == "mlp":
                return _Unit(chain_of, chains, moved)

    def why_alone(self, res: Residual) -> str:
        if res.kind == "other":
            return "its branch has no parameters and no attention; nothing to gain"
        root, chain = self.strip(self.nodes[res.stream], allow_norm=True)
        if any(NORM.matches(n, self.view.gm) for n in chain) and self.post_norm == "skip":
            return _POST_NORM_HINT
        if RESIDUAL_ADD.matches(root) and root.name not in {r.add for r in self.residuals}:
            return (
                f"its stream comes from {self.view.describe([root])}, an add whose skip path is itself "
                "transformed (a stage transition, which stays ordinary autograd)"
            )
        if res.kind == "mlp":
            return f"no attention residual precedes it on the stream (its stream is {self.view.describe([root])})"
        return "it is not paired with an MLP residual"

    def block(self, unit: _Unit, entry: fx.Node, entry_chain: list[fx.Node]) -> Block:
        nodes = self.nodes
        if unit.first.kind == "parallel":
            f_part, g_part = unit.first.parallel
            f = self.branch(entry, entry_chain, [f_part], [])
            g = self.branch(entry, entry_chain, [g_part], [])
            form = "parallel"
        else:
            attention, mlp = unit.residuals[:-1], unit.last
            inner = [nodes[a.add] for a in attention[:-1]]
            f = self.branch(entry, entry_chain, [a.branch for a in attention], inner + [n for c in unit.chains[:-1] for n in c])
            g = self.branch(nodes[attention[-1].add], unit.chains[-1], [mlp.branch], [])
            form = "sequential" if len(attention) == 1 else "decoder"
        name = self.unit_name(unit)
        adds = tuple(r.add for r in unit.residuals)
        replaced = set(f.nodes) | set(g.nodes) | set(adds) | {n for r in unit.residuals for n in r.branch.nodes}
        return Block(
            name, entry.name, unit.last.add, adds, form, f, g,
            replaces=tuple(n.name for n in self.view.sorted(self.nodes[n] for n in replaced)),
            post_norm_moved=unit.post_norm_moved,
        )

    def unit_name(self, unit: _Unit) -> str:
        return self.block_name(unit) or "/".join(r.add for r in unit.residuals)

    def block_name(self, unit: _Unit) -> str:
        """The module owning the block's residual adds (``blocks.3``, ``encoder.block.0``)."""
        paths = [self.view.module_path(self.nodes[r.add]).split(".") for r in unit.residuals]
        prefix: list[str] = []
        for parts in zip(*paths):
            if len(set(parts)) != 1:
                break
            prefix.append(parts[0])
        if any(len(p) > len(prefix) and p[len(prefix)].isdigit() for p in paths) and len(set(map(tuple, paths))) > 1:
            prefix = prefix[:-1]  # `layer.0` and `layer.1` are sub-layers of the block above them
        return ".".join(prefix)

    def branch(self, entry: fx.Node, chain: list[fx.Node], parts: list[Branch], extra: list[fx.Node]) -> Branch:
        members = set(chain) | set(extra) | {self.nodes[n] for p in parts for n in p.nodes}
        outputs = tuple(self.nodes[o] for p in parts for o in p.outputs)
        return make_branch(self.view, entry, members, outputs)

    # -- segments ---------------------------------------------------------------------------

    def inputs_of(self, run) -> list[tuple[list[fx.Node], fx.Node]]:
        """(chain, stream read by the region) for every branch entry of the run."""
        entries = []
        for position, (unit, entry_chain) in enumerate(run):
            entries.append((entry_chain if position else [], self.nodes[unit.first.stream]))
            if unit.first.kind != "parallel":
                entries.append((unit.chains[-1], self.nodes[unit.last.stream]))
        return entries

    def inside(self, run) -> set[fx.Node]:
        nodes = set()
        for unit, entry_chain in run:
            nodes.update(entry_chain)
            nodes.update(n for c in unit.chains for n in c)
            for res in unit.residuals:
                nodes.update(self.nodes[n] for n in res.branch.nodes)
                nodes.add(self.nodes[res.add])
        return nodes

    def output_layout(self, run) -> fx.Node | None:
        """The reshape that puts the segment output into the layout its readers expect."""
        unit, entry_chain = run[-1]
        chain = entry_chain if unit.first.kind == "parallel" else unit.chains[-1]
        reshapes = [n for n in chain if is_layout_reshape(n)]
        return reshapes[-1] if reshapes else None

    def run_problem(self, run) -> str | None:
        """Why ``run`` cannot be one segment, or None."""
        layout = shape_key(self.nodes[run[0][0].first.stream])
        for chain, stream in self.inputs_of(run):
            if shape_key(stream) != layout and not any(is_layout_reshape(n) for n in chain):
                return f"{stream.name} has shape {list(shape_key(stream) or [])}, another layout than the stream"
        inside = self.inside(run)
        if shape_key(self.nodes[run[-1][0].last.add]) != layout:
            reshape = self.output_layout(run)
            if reshape is None or any(a in inside for a in reshape.all_input_nodes[1:]):
                return "its output's layout cannot be restored outside the segment"
        unit, _ = run[-1]
        side = {self.nodes[s] for r in unit.residuals for s in r.branch.side_inputs}
        computed_inside = [s for s in self.view.sorted(side) if s in inside or nx.ancestors(self.view.dag, s) & inside]
        if computed_inside:
            return f"the next block reads {self.view.describe(computed_inside)}, computed inside this segment"
        return None

    def segments(self, units: list[_Unit]) -> list[Segment]:
        order, nodes = self.view.order, self.nodes
        runs: list[list[tuple[_Unit, list[fx.Node]]]] = []
        ends: list[str] = []
        for unit in sorted(units, key=lambda u: order[nodes[u.first.add]]):
            if runs:
                previous = runs[-1][-1][0]
                handover = self.private_handover(nodes[previous.last.add], unit.first)
                if handover.chain is not None:
                    chain = list(handover.chain)
                    problem = self.run_problem(runs[-1] + [(unit, chain)])
                    if problem is None:
                        runs[-1].append((unit, chain))
                        unit.post_norm_moved = unit.post_norm_moved or handover.norm_moved
                        continue
                    ends[-1] = problem
                elif handover.connected:  # the next block reads this stream, but not privately
                    ends[-1] = handover.reason
            problem = self.run_problem([(unit, [])])
            if problem is not None:
                for res in unit.residuals:
                    self.skip(res, res.kind, problem)
                continue
            runs.append([(unit, [])])
            ends.append("")
        return [self.segment(index, run, end) for index, (run, end) in enumerate(zip(runs, ends))]

    def segment(self, index: int, run, end: str) -> Segment:
        blocks = []
        for position, (unit, entry_chain) in enumerate(run):
            entry = entry_chain[0].args[0] if position and entry_chain else self.nodes[unit.first.stream]
            blocks.append(self.block(unit, entry, entry_chain if position else []))
        last = self.nodes[blocks[-1].output]
        layout = shape_key(self.nodes[blocks[0].input])
        reshape = self.output_layout(run) if shape_key(last) != layout else None
        side = self.view.sorted({self.nodes[s] for b in blocks for s in b.f.side_inputs + b.g.side_inputs})
        return Segment(
            index=index,
            blocks=tuple(blocks),
            input=blocks[0].input,
            output=blocks[-1].output,
            side_inputs=tuple(n.name for n in side),
            ends_because=end or f"its output goes to {self.view.describe(list(last.users))}",
            output_layout=reshape.name if reshape is not None else None,
        )


def find_reversible_blocks(gm: fx.GraphModule, *, post_norm: str = "skip", excluded=None) -> Plan:
    """Detect the reversible blocks of ``gm`` and chain them into segments.

    ``post_norm`` (a key of ``POST_NORM``) says what to do with post-norm blocks.
    ``excluded`` maps block names to a reason: those blocks are left as they are and
    reported with it (the conversion check excludes blocks that fail to reconstruct).
    """
    require_choice("post_norm", post_norm, POST_NORM)
    view = GraphView(gm)
    search = find_residuals(gm, view)
    assembler = _Assembler(view, search.residuals, post_norm, excluded)
    segments = assembler.segments(assembler.units())
    skipped = sorted(list(search.rejected) + assembler.skipped, key=lambda s: view.order[view.nodes[s.node]])
    return Plan(segments=tuple(segments), skipped=tuple(skipped), residuals_found=len(search.residuals) + len(search.rejected))

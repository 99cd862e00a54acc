"""Replace selected linear ops by a sketched linear: exact forward, randomized weight gradient.

A linear layer stores its whole input only to form its weight gradient. The runtime op
this pass inserts (``revcompile.sketch.SketchedLinear``, passed in by the caller: passes
never import the runtime) stores a random sketch of the input instead; see that module for
the estimator. This pass only finds the linear ops and swaps them, whatever form the
tracer left them in (``LINEAR_FORMS``):

* fx: ``call_module`` of an ``nn.Linear``; ``F.linear`` calls;
* torch.export (aten): ``linear``, ``addmm(bias, x, Wᵀ)`` / ``mm(x, Wᵀ)`` with the weight
  transposed by ``t``/``transpose``/``permute``, and ``addmm(bias, x, W)`` / ``mm(x, W)``
  with a weight stored ``(in, out)`` (HuggingFace's GPT-2 ``Conv1D``).

Each replaced op becomes ``sketched_linear(x, weight, bias)`` with the weight and bias as
``get_attr`` nodes of the model's own parameters. The input graph module is not modified.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

__all__ = ["LinearSite", "LINEAR_FORMS", "SketchResult", "find_linear_sites", "sketch_linears"]

aten = torch.ops.aten


@dataclass(frozen=True)
class LinearSite:
    """One linear op of a graph: where its operands come from."""

    node: str  # the op's node name
    layer: str  # unique per site: the module path (``"#2"`` appended for its second use)
    weight: str  # qualified name of the weight parameter
    bias: str | None  # qualified name of the bias parameter, if it is one
    form: str  # a key of LINEAR_FORMS
    weight_in_out: bool  # weight stored (in, out): y = x @ W (+ b)


@dataclass(frozen=True)
class _Operands:
    x: fx.Node
    weight: str
    bias: fx.Node | str | None  # a node of the graph, a parameter name, or absent
    weight_in_out: bool


@dataclass(frozen=True)
class SketchResult:
    graph_module: fx.GraphModule
    sketched: tuple[LinearSite, ...]

    @property
    def modified(self) -> bool:
        return bool(self.sketched)


def _parameter(root: nn.Module, target: str) -> nn.Parameter | None:
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, nn.Parameter) and obj.dim() == 2 else None


_TRANSPOSES = (aten.t.default, aten.transpose.int, aten.permute.default)


def _weight(root, node, transposed: bool) -> str | None:
    """The parameter behind ``node`` (itself, or a 2-D transpose of it when ``transposed``)."""
    if transposed:
        if not (isinstance(node, fx.Node) and node.op == "call_function"):
            return None
        swaps = {aten.t.default: (), aten.transpose.int: ((0, 1), (1, 0), (-2, -1), (-1, -2)),
                 aten.permute.default: (([1, 0],),)}
        if node.target not in swaps or (node.args[1:] and tuple(node.args[1:]) not in swaps[node.target]):
            return None
        node = node.args[0]
    if isinstance(node, fx.Node) and node.op == "get_attr" and _parameter(root, node.target) is not None:
        return node.target
    return None


def _is_value(node) -> bool:
    return isinstance(node, fx.Node) and node.op != "get_attr"


def _module_linear(root, node) -> _Operands | None:
    if node.op != "call_module":
        return None
    module = root.get_submodule(node.target)
    if not isinstance(module, nn.Linear) or type(module).forward is not nn.Linear.forward or not node.args:
        return None  # a subclass with its own forward (LoRA, quantized) computes something else
    bias = f"{node.target}.bias" if module.bias is not None else None
    return _Operands(node.args[0], f"{node.target}.weight", bias, False)


def _functional_linear(root, node) -> _Operands | None:
    if node.op != "call_function" or node.target not in (F.linear, torch._C._nn.linear, aten.linear.default):
        return None
    args = list(node.args) + [None] * (3 - len(node.args))
    x, weight, bias = args[0], node.kwargs.get("weight", args[1]), node.kwargs.get("bias", args[2])
    name = _weight(root, weight, transposed=False)
    return _Operands(x, name, bias, False) if name and _is_value(x) else None


def _matmul_linear(root, node) -> _Operands | None:
    if node.op != "call_function" or node.target not in (aten.addmm.default, aten.mm.default, torch.addmm, torch.mm):
        return None
    if any(node.kwargs.get(k, 1) != 1 for k in ("beta", "alpha")) or set(node.kwargs) - {"beta", "alpha"}:
        return None
    bias, (x, w) = (node.args[0], node.args[1:3]) if node.target in (aten.addmm.default, torch.addmm) else (None, node.args[:2])
    if not _is_value(x) or (bias is not None and not isinstance(bias, fx.Node)):
        return None
    for transposed in (True, False):
        name = _weight(root, w, transposed)
        if name:
            return _Operands(x, name, bias, not transposed)
    return None


# (form, matcher): the spellings of a linear layer the tracers produce.
LINEAR_FORMS: tuple[tuple[str, Callable], ...] = (
    ("module", _module_linear),  # fx: self.fc(x) on an nn.Linear
    ("functional", _functional_linear),  # fx: F.linear(x, w, b); export: aten.linear(x, w, b)
    ("matmul", _matmul_linear),  # export: addmm(b, x, t(w)), mm(x, t(w)); Conv1D: addmm(b, x, w)
)


def _match(root, node) -> tuple[str, _Operands] | None:
    for form, matcher in LINEAR_FORMS:
        operands = matcher(root, node)
        if operands is not None:
            return form, operands
    return None


def _layer_name(operands: _Operands) -> str:
    return operands.weight[: -len(".weight")] if operands.weight.endswith(".weight") else operands.weight


def _sites(gm: fx.GraphModule) -> list[tuple[fx.Node, LinearSite, _Operands]]:
    found, uses = [], {}
    for node in gm.graph.nodes:
        matched = _match(gm, node)
        if matched is None:
            continue
        form, operands = matched
        base = _layer_name(operands)
        uses[base] = uses.get(base, 0) + 1
        layer = base if uses[base] == 1 else f"{base}#{uses[base]}"
        bias = operands.bias if isinstance(operands.bias, str) else (
            operands.bias.target if isinstance(operands.bias, fx.Node) and operands.bias.op == "get_attr" else None)
        found.append((node, LinearSite(node.name, layer, operands.weight, bias, form, operands.weight_in_out), operands))
    return found


def find_linear_sites(gm: fx.GraphModule) -> tuple[LinearSite, ...]:
    """Every linear op of ``gm`` whose weight is a 2-D parameter, in program order."""
    return tuple(site for _, site, _ in _sites(gm))


def _copy(gm: fx.GraphModule) -> tuple[fx.Graph, dict[fx.Node, fx.Node]]:
    graph = fx.Graph()
    mapping: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, mapping))
    graph._codegen = gm.graph._codegen
    return graph, mapping


def sketch_linears(gm: fx.GraphModule, choose: Callable[[LinearSite], bool], make_op: Callable[[LinearSite], Callable]) -> SketchResult:
    """A copy of ``gm`` whose linear ops chosen by ``choose`` call ``make_op(site)(x, weight, bias)``."""
    graph, mapping = _copy(gm)
    sketched = []
    for old, site, operands in _sites(gm):
        if not choose(site):
            continue
        node = mapping[old]
        with graph.inserting_before(node):
            weight = graph.get_attr(site.weight)
            if isinstance(operands.bias, str):
                bias = graph.get_attr(operands.bias)
            else:
                bias = mapping[operands.bias] if isinstance(operands.bias, fx.Node) else None
            call = graph.call_function(make_op(site), (mapping[operands.x], weight, bias))
        call.meta = {k: v for k, v in node.meta.items() if k in ("val", "tensor_meta", "nn_module_stack", "stack_trace")}
        call.meta["revcompile_sketched"] = site.layer
        node.replace_all_uses_with(call)
        mapping[old] = call
        dead = list(node.all_input_nodes)
        graph.erase_node(node)
        while dead:  # a transpose of the weight, and its get_attr, that only fed this op
            value = dead.pop()
            if not value.users and (value.op == "get_attr" or value.target in _TRANSPOSES):
                dead.extend(value.all_input_nodes)
                graph.erase_node(value)
        sketched.append(site)
    graph.lint()
    return SketchResult(fx.GraphModule(gm, graph, type(gm).__name__), tuple(sketched))

"""Which branches draw random numbers, so that only those save generator state.

The runtime saves the generators' state before each branch in the forward and restores it
around the branch's recompute, so that dropout draws the same masks twice. A branch that
draws nothing needs neither. Whether one draws is read off its graph: an op that draws
(the tables below; aten ops say so in their ``nondeterministic_seeded`` tag), unless a
constant argument switches its draws off (``p=0``, ``training=False``, as tracing bakes
them in); and code the passes cannot see into -- a leaf module or a wrapped function from
outside torch -- counts as drawing. A dropout *module* counts as drawing whatever its ``p``:
``p`` is read when it runs, and a user may raise it after conversion.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from revcompile.passes.patterns import OpPattern, module_of

__all__ = ["RANDOM", "draws_random", "branch_draws_random"]

_FUNCTIONAL_DROPOUTS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout)

# Ops that draw from a generator, in the fx dialect (aten ops are recognised by their tag).
RANDOM = OpPattern(
    name="random",
    functions=frozenset({
        *_FUNCTIONAL_DROPOUTS, F.rrelu, F.gumbel_softmax, F.scaled_dot_product_attention, torch.dropout,
        torch.feature_dropout, torch.alpha_dropout, torch.bernoulli, torch.rand, torch.rand_like, torch.randn,
        torch.randn_like, torch.randint, torch.randint_like, torch.randperm, torch.normal, torch.poisson,
        torch.multinomial, torch.rrelu,
    }),
    methods=frozenset({"bernoulli", "bernoulli_", "uniform_", "normal_", "random_", "exponential_", "geometric_",
                       "cauchy_", "log_normal_", "multinomial"}),
    modules=(nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout, nn.RReLU),
)

# Where a constant argument switches the draws off: (name, position, default) per function,
# and the value that means "no draws". aten ops are read by their schemas' argument names.
_SWITCHES = {
    **{f: (("p", 1, 0.5), ("training", 2, f not in (F.alpha_dropout, F.feature_alpha_dropout))) for f in _FUNCTIONAL_DROPOUTS},
    F.scaled_dot_product_attention: (("dropout_p", 4, 0.0),),
    torch.dropout: (("p", 1, None), ("train", 2, None)),
}
_OFF = {"p": 0.0, "dropout_p": 0.0, "train": False, "training": False}

# Code outside torch that fx records without looking inside is opaque; these modules are not.
_TRANSPARENT_MODULES = ("torch", "_operator", "operator", "builtins", "math")


def _argument(node: fx.Node, name: str, position: int, default):
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[position] if position < len(node.args) else default


def _switched_off(node: fx.Node) -> bool:
    """A constant argument of ``node`` turns its draws off (``p=0.0``, ``training=False``)."""
    schema = getattr(node.target, "_schema", None)
    if schema is not None:  # dropout and attention ops skip their draws at rate 0 (bernoulli(p=0) still draws)
        if not any(word in schema.name for word in ("dropout", "attention")):
            return False
        switches = [(a.name, i, a.default_value) for i, a in enumerate(schema.arguments) if a.name in _OFF]
    else:
        switches = _SWITCHES.get(node.target, ())
    for name, position, default in switches:
        value = _argument(node, name, position, default)
        if not isinstance(value, fx.Node) and value is not None and value == _OFF[name]:
            return True
    return False


def _opaque(node: fx.Node, root: nn.Module | None) -> bool:
    if node.op == "call_module":
        module = module_of(node, root) if root is not None else None
        return module is None or not type(module).__module__.startswith("torch.")
    if node.op == "call_function" and not isinstance(node.target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        if getattr(node.target, "__objclass__", None) is torch._C.TensorBase:
            return False  # a Tensor method called as a function
        home = getattr(node.target, "__module__", None) or ""
        return node.target is not operator.getitem and not home.split(".")[0] in _TRANSPARENT_MODULES
    return False


def draws_random(node: fx.Node, root: nn.Module | None = None) -> bool:
    """Whether running ``node`` may draw from a random generator."""
    if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverloadPacket):
        overloads = [getattr(node.target, name) for name in node.target.overloads()]
        return any(torch.Tag.nondeterministic_seeded in op.tags for op in overloads)
    if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
        return torch.Tag.nondeterministic_seeded in node.target.tags and not _switched_off(node)
    if RANDOM.matches(node, root):
        return node.op == "call_module" or not _switched_off(node)
    return _opaque(node, root)


def branch_draws_random(graph: fx.Graph, root: nn.Module | None = None) -> bool:
    """Whether any node of a branch graph may draw (the runtime then saves generator state for it)."""
    return any(draws_random(node, root) for node in graph.nodes)

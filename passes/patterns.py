"""What the passes look for, declared as data.

Residual detection is structural (regions of the data-flow graph), but a few questions are
about single operations: is this node an addition, does this branch contain attention, does
this op only read a tensor's shape, does it write into its input. Those answers live here
as tables, one entry per operation spelling, so that a new spelling (a new aten overload, a
new leaf module) is one line, not a new branch in a pass.

Every table covers both graph dialects the frontends produce: module-level ``torch.fx``
graphs (``call_module`` leaves, ``call_method`` on tensors, ``torch.nn.functional`` calls)
and aten-level graphs from ``torch.export`` (``torch.ops.aten.*`` overloads).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

aten = torch.ops.aten

__all__ = [
    "OpPattern",
    "RESIDUAL_ADD",
    "ATTENTION",
    "SHAPE_QUERY",
    "GUARD",
    "STREAM_TRANSPARENT",
    "LAYOUT_RESHAPE",
    "NORM",
    "VIEW",
    "STATEFUL_MODULES",
    "UNDECLARED_WRITES",
    "FRESH_RESULT",
    "MAY_RETURN_INPUT",
    "INPLACE_ADD",
    "OUT_OF_PLACE",
    "ELEMENT_SPELLINGS",
    "is_inplace",
    "written_arguments",
    "is_layout_reshape",
    "module_of",
]


def _overloads(*packets) -> frozenset:
    """All overloads of the given aten op packets (``aten.add`` -> add.Tensor, add.Scalar, ...)."""
    found = set()
    for packet in packets:
        for name in packet.overloads():
            found.add(getattr(packet, name))
    return frozenset(found)


def _aten_overloads(*names: str) -> frozenset:
    """Like ``_overloads`` by name, skipping ops this torch version does not have."""
    packets = []
    for name in names:
        try:
            packets.append(getattr(aten, name))
        except (AttributeError, RuntimeError):
            continue
    return _overloads(*packets)


@dataclass(frozen=True)
class OpPattern:
    """One kind of operation, in every spelling a traced graph may use for it.

    ``functions`` are ``call_function`` targets, ``methods`` are ``call_method`` names
    (``x.softmax(...)``), ``modules`` are ``call_module`` leaf types, and ``attributes``
    are ``getattr(x, name)`` lookups that fx records as calls of the builtin ``getattr``.
    ``name_hints`` match opaque leaves by name (a function's ``__name__`` or a leaf
    module's class name, lower-cased), for libraries that hide an op from fx.
    """

    name: str
    functions: frozenset = frozenset()
    methods: frozenset = frozenset()
    modules: tuple = ()
    attributes: frozenset = frozenset()
    name_hints: tuple = ()

    def matches(self, node: fx.Node, root: nn.Module | None = None) -> bool:
        if node.op == "call_function":
            if node.target is getattr and self.attributes:
                return len(node.args) >= 2 and node.args[1] in self.attributes
            if node.target in self.functions:
                return True
            return self._hinted(getattr(node.target, "__name__", ""))
        if node.op == "call_method":
            return node.target in self.methods
        if node.op == "call_module" and root is not None:
            module = module_of(node, root)
            if self.modules and isinstance(module, self.modules):
                return True
            return module is not None and self._hinted(type(module).__name__)
        return False

    def _hinted(self, name: str) -> bool:
        name = name.lower()
        return any(hint in name for hint in self.name_hints)

    def __add__(self, other: "OpPattern") -> "OpPattern":
        return OpPattern(
            name=f"{self.name}+{other.name}",
            functions=self.functions | other.functions,
            methods=self.methods | other.methods,
            modules=self.modules + other.modules,
            attributes=self.attributes | other.attributes,
            name_hints=self.name_hints + other.name_hints,
        )


def module_of(node: fx.Node, root: nn.Module) -> nn.Module | None:
    """The leaf module a ``call_module`` node calls, or None."""
    if node.op != "call_module":
        return None
    try:
        return root.get_submodule(node.target)
    except AttributeError:
        return None


# `s + r`: the join of a residual connection.
RESIDUAL_ADD = OpPattern(
    name="residual_add",
    functions=frozenset({operator.add, torch.add, aten.add.Tensor}),
    methods=frozenset({"add"}),
)

# Any of these inside a branch makes it an attention branch (softmax over scores, fused
# attention kernels, or an attention leaf module).
ATTENTION = OpPattern(
    name="attention",
    functions=frozenset(
        {F.scaled_dot_product_attention, F.softmax, torch.softmax, F.multi_head_attention_forward}
        | _overloads(
            aten.scaled_dot_product_attention,
            aten._scaled_dot_product_flash_attention,
            aten._scaled_dot_product_efficient_attention,
            aten._scaled_dot_product_flash_attention_for_cpu,
            aten._scaled_dot_product_cudnn_attention,
            aten._softmax,
            aten.softmax,
            aten._safe_softmax,
            aten._native_multi_head_attention,
        )
    ),
    methods=frozenset({"softmax"}),
    modules=(nn.MultiheadAttention, nn.Softmax),
    # opaque attention leaves: torchvision's fx-wrapped shifted_window_attention, say
    name_hints=("attention",),
)

# Ops that read only metadata (shape, rank, dtype) of a tensor. Residual adds preserve
# shape, so such a query on a stream value can be answered by any earlier stream value.
SHAPE_QUERY = OpPattern(
    name="shape_query",
    functions=frozenset(_overloads(aten.sym_size, aten.sym_numel, aten.sym_stride)),
    methods=frozenset({"size", "dim"}),
    attributes=frozenset({"shape", "ndim"}),
)

# Assertions the tracers insert about inputs and shapes. They produce no value used by
# the computation; the converted model re-checks its inputs against the traced variant.
GUARD = OpPattern(
    name="guard",
    functions=frozenset(
        {torch._assert, getattr(fx, "_symbolic_trace")._assert_is_none}
        | _overloads(
            aten._assert_tensor_metadata,
            aten._assert_scalar,
            aten.sym_constrain_range_for_size,
            aten.sym_constrain_range,
            aten._assert_async,
        )
        | ({getattr(torch, "_check")} if hasattr(torch, "_check") else set())
    ),
)

# Unary ops that hand the stream on as the same value (possibly cast or made contiguous).
# A chain of them between two residuals is moved into the branch that follows, so that
# Llama's `x.to(float32)` inside RMSNorm does not break the pairing of its residuals.
STREAM_TRANSPARENT = OpPattern(
    name="stream_transparent",
    functions=frozenset(_overloads(aten.to, aten._to_copy, aten.contiguous, aten.clone, aten.alias)),
    methods=frozenset({"to", "float", "contiguous", "type_as", "clone"}),
)

# Reshapes to an explicit size list. They only re-index elements in row-major order, so
# applying one to any tensor with the same elements in the same order gives the same
# result, whatever that tensor's own shape: the stream can be kept in one layout and
# re-laid-out at each branch (timm Swin's `x.reshape(B, -1, C)` around its MLP residual).
LAYOUT_RESHAPE = OpPattern(
    name="layout_reshape",
    functions=frozenset({torch.reshape} | _overloads(aten.view, aten.reshape, aten._unsafe_view)),
    methods=frozenset({"view", "reshape"}),
)

# Normalisations that post-norm blocks apply to the stream after a residual add.
NORM = OpPattern(
    name="norm",
    functions=frozenset(
        {getattr(F, f) for f in ("layer_norm", "rms_norm") if hasattr(F, f)}
        | _aten_overloads("layer_norm", "native_layer_norm", "rms_norm")
    ),
    modules=tuple(getattr(nn, m) for m in ("LayerNorm", "RMSNorm") if hasattr(nn, m)),
)

# Ops whose result shares storage with their first argument: an in-place write through
# one of them reaches the original tensor.
VIEW = OpPattern(
    name="view",
    functions=frozenset(
        {operator.getitem, torch.transpose, torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
        | _overloads(
            aten.view,
            aten._unsafe_view,
            aten.reshape,
            aten.transpose,
            aten.permute,
            aten.expand,
            aten.slice,
            aten.select,
            aten.unsqueeze,
            aten.squeeze,
            aten.t,
            aten.alias,
            aten.unflatten,
            aten.split,
            aten.chunk,
            aten.unbind,
            aten.narrow,
            aten.as_strided,
        )
    ),
    methods=frozenset(
        {
            "view", "view_as", "reshape", "transpose", "permute", "expand", "expand_as",
            "unsqueeze", "squeeze", "flatten", "unflatten", "narrow", "select", "t",
            "split", "chunk", "unbind",
        }
    ),
)

# "Element i of x along dim": spelling -> (where the dim and index are: (position, keyword,
# default) each; how the same graph dialect spells unbind). ``q, k, v = qkv`` unpacks a
# tensor in fx as one getitem per element where eager code runs one unbind; selects of every
# element are the same. Normalisation turns a full set of them into one unbind.
ELEMENT_SPELLINGS = {
    OpPattern("getitem", functions=frozenset({operator.getitem})): (((None, None, 0), (1, "index", None)), ("call_method", "unbind")),
    OpPattern("select", functions=frozenset({torch.select}), methods=frozenset({"select"})):
        (((1, "dim", None), (2, "index", None)), ("call_method", "unbind")),
    OpPattern("aten_select", functions=_overloads(aten.select)): (((1, "dim", None), (2, "index", None)),
                                                                  ("call_function", aten.unbind.int)),
}

# Modules that update state (running statistics) every training forward: recomputing
# their branch would update it a second time.
STATEFUL_MODULES = (nn.modules.batchnorm._BatchNorm,)


@dataclass(frozen=True)
class HiddenWrite:
    """Where an op writes into arguments that its schema does not mark as written.

    ``written`` are (name, position) of the arguments updated; the write happens only when
    the argument ``flag`` = (name, position, default) is true (``training`` for batch norm).
    """

    written: tuple[tuple[str, int], ...]
    flag: tuple[str, int, bool]


_BN_ATEN = HiddenWrite((("running_mean", 3), ("running_var", 4)), ("training", 5, False))
_IN_ATEN = HiddenWrite((("running_mean", 3), ("running_var", 4)), ("use_input_stats", 5, False))

# Ops that update running statistics in training although their schema has no ``(a!)`` on
# them: ``aten.batch_norm`` is composite (what torch.export leaves in its graphs), and the
# ``torch.nn.functional`` forms are what fx records for functional code. A branch holding
# one would apply the update again when it is recomputed. (Ops whose schema does mark the
# write, like ``_native_batch_norm_legit``, need no entry.)
UNDECLARED_WRITES = {
    **{op: _BN_ATEN for op in _aten_overloads(
        "batch_norm", "native_batch_norm", "_batch_norm_impl_index", "cudnn_batch_norm", "miopen_batch_norm"
    )},
    **{op: _IN_ATEN for op in _aten_overloads("instance_norm")},
    torch.batch_norm: _BN_ATEN,
    torch.instance_norm: _IN_ATEN,
    F.batch_norm: HiddenWrite((("running_mean", 1), ("running_var", 2)), ("training", 5, False)),
    F.instance_norm: HiddenWrite((("running_mean", 1), ("running_var", 2)), ("use_input_stats", 5, True)),
}

# Ops whose result is always a new tensor, sharing storage with none of their inputs.
FRESH_RESULT = OpPattern(
    name="fresh_result",
    functions=frozenset(
        {operator.add, operator.sub, operator.mul, operator.truediv, operator.matmul, operator.neg,
         torch.add, torch.sub, torch.mul, torch.matmul, torch.bmm, F.linear, F.gelu, F.silu, F.relu,
         F.layer_norm, F.softmax, torch.softmax, F.scaled_dot_product_attention, F.conv1d, F.conv2d}
        | _aten_overloads(
            "add", "sub", "mul", "div", "neg", "mm", "bmm", "addmm", "matmul", "linear", "gelu", "silu",
            "relu", "tanh", "layer_norm", "native_layer_norm", "_softmax", "softmax", "convolution", "conv1d",
            "conv2d", "scaled_dot_product_attention",
        )
    ),
    methods=frozenset({"add", "sub", "mul", "div", "matmul", "softmax", "neg"}),
    modules=(nn.Linear, nn.Conv1d, nn.Conv2d, nn.LayerNorm, nn.GELU, nn.SiLU, nn.Tanh),
)

# Ops that may hand back their first input itself (dropout in eval mode, identity, a cast
# to the same dtype), besides views: an in-place write to their result reaches the input.
MAY_RETURN_INPUT = OpPattern(
    name="may_return_input",
    functions=frozenset({F.dropout, torch.dropout} | _aten_overloads("dropout", "alias", "to", "_to_copy", "contiguous", "clone")),
    methods=frozenset({"to", "float", "double", "half", "type_as", "contiguous"}),
    modules=(nn.Dropout, nn.Identity, nn.ReLU),
)

# ``t += u`` spelt every way the tracers record it, and its out-of-place form.
INPLACE_ADD = OpPattern(
    name="inplace_add",
    functions=frozenset({operator.iadd} | _overloads(aten.add_)),
    methods=frozenset({"add_"}),
)
OUT_OF_PLACE = {operator.iadd: operator.add, aten.add_.Tensor: aten.add.Tensor, aten.add_.Scalar: aten.add.Scalar, "add_": "add"}

_INPLACE_FUNCTIONS = frozenset({operator.setitem, operator.iadd, operator.imul, operator.isub, operator.itruediv})


def is_layout_reshape(node: fx.Node) -> bool:
    """A reshape to an explicit size list (not a dtype view, not a dim-relative flatten)."""
    if not LAYOUT_RESHAPE.matches(node) or len(node.args) < 2:
        return False
    sizes = node.args[1] if isinstance(node.args[1], (list, tuple)) else node.args[1:]
    return all(isinstance(s, (int, fx.Node)) and not isinstance(s, bool) for s in sizes) and not any(
        isinstance(s, fx.Node) and isinstance(s.meta.get("val"), torch.Tensor) for s in sizes
    )


def is_inplace(node: fx.Node, root: nn.Module | None = None) -> bool:
    """True if the node writes into its first argument."""
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.startswith("_")
    if node.op == "call_function":
        if node.target in _INPLACE_FUNCTIONS:
            return True
        schema = getattr(node.target, "_schema", None)
        if schema is not None:
            return any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments[:1])
        return False
    if node.op == "call_module" and root is not None:
        module = module_of(node, root)
        return bool(getattr(module, "inplace", False))
    return False


def _argument(node: fx.Node, name: str, position: int, default=None):
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[position] if position < len(node.args) else default


def _nodes_in(value) -> list[fx.Node]:
    if isinstance(value, fx.Node):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, fx.Node)]
    return []


def written_arguments(node: fx.Node, root: nn.Module | None = None) -> list[fx.Node]:
    """Every value ``node`` writes into: its schema's ``(a!)`` arguments (all of them, not
    only the first), an ``out=`` argument, the first argument of in-place methods, operators
    and ``inplace=True`` leaves, and the running statistics ``UNDECLARED_WRITES`` names."""
    written: list[fx.Node] = []
    if is_inplace(node, root) and node.args:
        written += _nodes_in(node.args[0])
    if node.op != "call_function":
        return list(dict.fromkeys(written))
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        for position, argument in enumerate(schema.arguments):
            if argument.alias_info is not None and argument.alias_info.is_write:
                written += _nodes_in(_argument(node, argument.name, len(node.args) if argument.kwarg_only else position))
    written += _nodes_in(node.kwargs.get("out"))
    hidden = UNDECLARED_WRITES.get(node.target)
    if hidden is not None and _argument(node, *hidden.flag) is not False:
        for name, position in hidden.written:
            written += _nodes_in(_argument(node, name, position))
    return list(dict.fromkeys(written))

"""torch.export of a stack of identical layers: two layers traced, the others copied from the second.

``torch.export`` costs a few milliseconds per traced op (fake tensors, symbolic shapes,
proxies), so a 32-layer language model spends most of its conversion exporting 32 copies
of the same layer. When a model's layers are one ``nn.ModuleList`` of modules with the same
class, submodules, parameter and buffer shapes and settings (they may differ in
``layer_idx``, which HuggingFace layers use only to index a key/value cache), the model is
exported with the list cut to its first two layers, and the graph of layer 1 is copied for
layers 2 .. n-1, each copy reading its own layer's parameters and carrying its own module
path (so blocks are named as in a full export).

Nothing is assumed that is not checked: the two traced layers must have the same graph
(so the layer's index did not change what it computes), the code after the layers may read
only the last layer's values, and the stitched graph must give bit for bit the original
model's output on the example call (same random draws, buffers restored afterwards).
Anything else -- a list the forward indexes past its cut, hooks on a layer, a check that
fails -- returns ``None`` and the caller exports the whole model.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

__all__ = ["LayerStack", "find_layer_stack", "find_memory_stack", "stand_in_stack", "stitch_layers", "truncated_stack", "same_output", "training_output"]

MIN_LAYERS = 4  # below this, exporting every layer costs about as much as two plus the checks
TRACED = 2
# Attributes identical layers may differ in: HuggingFace layers' position in the stack,
# read only to index a key/value cache (training passes ``use_cache=False``).
_INDEX_ATTRIBUTES = frozenset({"layer_idx"})


@dataclass(frozen=True)
class LayerStack:
    """The model's ``nn.ModuleList`` of identical layers: its module path and length."""

    path: str
    count: int

    def layer(self, index: int) -> str:
        return f"{self.path}.{index}" if self.path else str(index)


def _attributes(module: nn.Module, memory: bool = False):
    """A module's plain settings (``None`` if one of them is a tensor or cannot be compared).
    ``memory``: a float setting only as zero or not (a drop rate: whether a mask is drawn)."""
    items = []
    for key, value in vars(module).items():
        if key.startswith("_") or key == "training" or key in _INDEX_ATTRIBUTES:
            continue
        if isinstance(value, torch.Tensor):
            return None  # a plain tensor attribute is the layer's own state: no copying
        items.append((key, ("a float", value != 0) if memory and isinstance(value, float) else value))
    return items


def _layout(layer: nn.Module, memory: bool = False):
    """What two layers must share to compute the same function of their own parameters
    (``memory``: to use the same memory at each step -- float settings only zero or not)."""
    modules = []
    for name, module in layer.named_modules():
        if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks:
            return None
        attributes = _attributes(module, memory)
        if attributes is None:
            return None
        modules.append((name, type(module), module.training, attributes))
    tensors = [
        (name, type(t), tuple(t.shape), t.dtype, t.device, t.requires_grad)
        for name, t in (*layer.named_parameters(remove_duplicate=False), *layer.named_buffers(remove_duplicate=False))
    ]
    return modules, tensors


def _identical(layers: list[nn.Module], memory: bool = False) -> bool:
    if not all(isinstance(layer, nn.Module) for layer in layers):
        return False  # a list with empty slots (None entries; x-transformers has them)
    first = _layout(layers[0], memory)
    if first is None:
        return False
    try:
        return all(_layout(layer, memory) == first for layer in layers[1:])
    except Exception:  # noqa: BLE001 -- settings that do not compare: not provably the same
        return False


def find_layer_stack(model: nn.Module, kinds: tuple[type, ...] = (nn.ModuleList,), least: int = MIN_LAYERS) -> LayerStack | None:
    """The longest container of one of ``kinds`` holding at least ``least`` identical layers, if any
    (its layers named ``0 .. n-1``, as ``LayerStack.layer`` names them)."""
    best = None
    for name, module in model.named_modules():
        if type(module) in kinds and len(module) >= least and (best is None or len(module) > best.count):
            if list(module._modules) == [str(i) for i in range(len(module))] and _identical(list(module)):
                best = LayerStack(name, len(module))
    return best


@contextlib.contextmanager
def _stack_holding(model: nn.Module, stack: LayerStack, pick):
    """``model`` with the stack holding ``pick(its layers)`` (in a container of its own type), restored on exit."""
    parent_path, _, leaf = stack.path.rpartition(".")
    parent = model.get_submodule(parent_path)
    full = parent._modules[leaf]
    layers = pick(list(full))
    parent._modules[leaf] = nn.Sequential(*layers) if type(full) is nn.Sequential else nn.ModuleList(layers)
    try:
        yield
    finally:
        parent._modules[leaf] = full


def truncated_stack(model: nn.Module, stack: LayerStack, count: int = TRACED):
    """``model`` with the stack holding only its first ``count`` layers, restored on exit."""
    return _stack_holding(model, stack, lambda layers: layers[:count])


def find_memory_stack(model: nn.Module, least: int) -> LayerStack | None:
    """The longest ``nn.ModuleList`` or ``nn.Sequential`` of at least ``least`` layers (named
    ``0 .. n-1``) whose middle layers (all but the first and the last) use memory alike
    (``_layout(memory=True)``: stochastic depth's per-layer rates differ; timm's first layer,
    at rate 0, has no drop-path module at all): a memory plan's stand-ins
    (``stand_in_stack``) keep the real first and last layers."""
    best = None
    for name, module in model.named_modules():
        if type(module) not in (nn.ModuleList, nn.Sequential) or len(module) < least:
            continue
        layers = list(module)
        if (best is None or len(module) > best.count) and list(module._modules) == [str(i) for i in range(len(module))]:
            if isinstance(layers[0], nn.Module) and isinstance(layers[-1], nn.Module) and _identical(layers[1:-1], memory=True):
                best = LayerStack(name, len(module))
    return best


def stand_in_stack(model: nn.Module, stack: LayerStack, count: int):
    """``model`` with the stack holding ``count`` of its layers -- its first, its second ..
    up to ``count - 1``, and its last -- restored on exit: a shallower model whose ends are
    the real ones."""
    return _stack_holding(model, stack, lambda layers: [*layers[:count - 1], layers[-1]])


def _layer_of(node: fx.Node, stack: LayerStack) -> int | None:
    """Which traced layer ``node`` belongs to (its innermost module is in it), if any."""
    module_stack = node.meta.get("nn_module_stack")
    if not module_stack:
        return None
    path = list(module_stack.values())[-1][0]
    for index in range(TRACED):
        prefix = stack.layer(index)
        if path == prefix or path.startswith(prefix + "."):
            return index
    return None


def _module_stack_for(meta: dict, old: str, new: str) -> dict:
    """``meta`` with the module paths under layer ``old`` moved to layer ``new`` (the prefix
    only: a submodule list inside the layer keeps its own indices)."""
    stack = meta.get("nn_module_stack")
    if not stack:
        return dict(meta)
    moved = {}
    for key, (path, kind) in stack.items():
        new_path = new + path[len(old):] if path == old or path.startswith(old + ".") else path
        new_key = key[: len(key) - len(path)] + new_path if key.endswith(path) else key
        moved[new_key] = (new_path, kind)
    return {**meta, "nn_module_stack": moved}


def _same_step(a: fx.Node, b: fx.Node, pairs: dict, renamed_attr, carried: dict) -> bool:
    """``b`` (layer 1) does what ``a`` (layer 0) does, on the corresponding values.

    A value layer 0 reads from before the stack (the embeddings, say) is either read by
    layer 1 too (a side input: a mask, rotary tables) or replaced throughout by one value
    of layer 0 (what the layer passes on); ``carried`` records those replacements.
    """
    if a.op != b.op or a.target != b.target:
        return False
    a_leaves, a_spec = pytree.tree_flatten((a.args, a.kwargs))
    b_leaves, b_spec = pytree.tree_flatten((b.args, b.kwargs))
    if a_spec != b_spec:
        return False
    for x, y in zip(a_leaves, b_leaves):
        if not isinstance(x, fx.Node) or not isinstance(y, fx.Node):
            if isinstance(x, fx.Node) or isinstance(y, fx.Node) or type(x) is not type(y) or x != y:
                return False
        elif x in pairs or renamed_attr(x) is not x:
            if y is not pairs.get(x, renamed_attr(x)):
                return False
        elif y is not x and (y not in pairs or carried.setdefault(x, y) is not y):
            return False
    return True


def stitch_layers(graph: fx.Graph, stack: LayerStack) -> dict[str, str] | None:
    """Copy traced layer 1 into layers 2 .. n-1 in ``graph`` (in place).

    Returns the parameter/buffer targets the copies read (new target -> layer-1 target),
    or ``None`` (graph untouched) when the graph does not have the expected shape.
    """
    nodes = list(graph.nodes)
    owner = {node: _layer_of(node, stack) for node in nodes}
    layers = [[n for n in nodes if owner[n] == i] for i in range(TRACED)]
    first, second = layers
    if not first or len(first) != len(second):
        return None
    position = {node: i for i, node in enumerate(nodes)}
    start, end = position[second[0]], position[second[-1]]
    if end - start + 1 != len(second) or position[first[-1]] > start:
        return None  # layer 1 is not one contiguous run after layer 0
    if any(n.op not in ("get_attr", "placeholder") for n in nodes[position[first[-1]] + 1:start]):
        return None  # code runs between the layers: a copy would leave it out
    prefixes = [stack.layer(i) + "." for i in range(TRACED)]
    attrs = {n.target: n for n in nodes if n.op == "get_attr"}

    def renamed_attr(node, src=prefixes[0], dst=prefixes[1]):
        if node.op == "get_attr" and str(node.target).startswith(src):
            return attrs.get(dst + str(node.target)[len(src):])
        return node

    pairs, carried = dict(zip(first, second)), {}
    if not all(_same_step(a, b, pairs, renamed_attr, carried) for a, b in pairs.items()):
        return None
    after = nodes[end + 1:]
    if any(arg in pairs for node in after for arg in node.all_input_nodes):
        return None  # the code after the layers reads more than the last layer
    return _copy_layers(graph, stack, second, pairs, after[0], attrs)


def _copy_layers(graph: fx.Graph, stack: LayerStack, second: list, pairs: dict, after: fx.Node, attrs: dict) -> dict[str, str]:
    source = stack.layer(1)
    previous = dict(pairs)  # layer-0 node -> the same value in the layer before the one being copied
    current = {node: node for node in second}
    read: dict[str, str] = {}
    first_node = next(iter(graph.nodes))
    for index in range(TRACED, stack.count):
        target_layer = stack.layer(index)
        copies: dict[fx.Node, fx.Node] = {}

        def value(arg, copies=copies, previous=previous, target_layer=target_layer):
            if arg in copies:
                return copies[arg]
            if arg.op == "get_attr" and str(arg.target).startswith(source + "."):
                target = target_layer + str(arg.target)[len(source):]
                if target not in attrs:
                    with graph.inserting_before(first_node):
                        attrs[target] = graph.create_node("get_attr", target)
                    attrs[target].meta = dict(arg.meta)
                    read[target] = str(arg.target)
                return attrs[target]
            return previous.get(arg, arg)  # a layer-0 value: the same value of the layer before

        with graph.inserting_before(after):
            for node in second:
                copy = graph.node_copy(node, value)
                copy.meta = _module_stack_for(node.meta, source, target_layer)
                copies[node] = copy
        previous = {a: copies[b] for a, b in pairs.items()}
        current = copies
    node = after
    while node is not None and node.op != "root":  # the code after the layers reads the last layer
        node.args, node.kwargs = pytree.tree_map(lambda a: current.get(a, a) if isinstance(a, fx.Node) else a, (node.args, node.kwargs))
        node = node.next
    return read


def training_output(model: nn.Module, call, run=None) -> list[torch.Tensor]:
    """The tensors of ``model``'s output on ``call`` as in a training step, detached.

    Gradients on, autocast off, the random generators seeded with 0 (and restored after),
    buffers restored after. ``run`` stands in for the model's forward (a stitched graph's):
    both then draw the same random numbers, so equal outputs mean equal computations.
    """
    run = run or (lambda: model(*call.positional, **call.keyword))
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    tensors = [t for t in call.flat_inputs() if isinstance(t, torch.Tensor)]
    devices = sorted({t.device.index or 0 for t in [*tensors, *model.parameters()] if t.is_cuda})
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=devices))
            stack.enter_context(torch.enable_grad())
            stack.enter_context(torch.autocast("cpu", enabled=False))
            if torch.cuda.is_available():
                stack.enter_context(torch.autocast("cuda", enabled=False))
            torch.manual_seed(0)
            return [t.detach() for t in pytree.tree_leaves(run()) if isinstance(t, torch.Tensor)]
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                if buffer.shape == saved.shape:
                    buffer.copy_(saved)


def same_output(model: nn.Module, stitched: fx.GraphModule, call) -> bool:
    """Whether ``stitched`` gives bit for bit ``model``'s output on ``call`` (``training_output``).

    The model's side is ``call.reference`` when the caller has already run it that way
    (``convert``'s input check does), else a run of its own. The stitched graph runs node
    by node (``fx.Interpreter``, the same ops on the same values): generating its Python
    code would cost more than the run, and only the graph that comes out of the pipeline
    is ever called as a module.
    """
    flat = call.flat_inputs()  # the placeholders of an exported graph, in order
    try:
        want = call.reference if call.reference is not None else training_output(model, call)
        got = training_output(model, call, run=lambda: fx.Interpreter(stitched).run(*flat))
    except Exception:  # noqa: BLE001 -- a stitched graph that does not run is not the model
        return False
    return len(want) == len(got) and all(
        a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(want, got)
    )

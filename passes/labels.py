"""Human-readable names for graph values: which module a node came from, what a part is called.

Both the memory prediction and the drawing speak to the user in the model's own terms
(``blocks.3.attn``, not ``matmul_7``). Module-level fx graphs and aten-level export graphs
record that differently (``nn_module_stack`` metadata, ``call_module`` targets); this is
the one place that reads it.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from passes.plan import Plan

__all__ = ["block_adds", "module_path", "segment_nodes", "short_target", "tensor_bytes"]


def _clean(path: str) -> str:
    # torch.export may spell paths as L['self'].layers[0].attn; keep the dotted form.
    path = path.replace("L['self'].", "").replace("L['self']", "")
    return path.replace("[", ".").replace("]", "").replace("'", "")


def module_path(node: fx.Node) -> str:
    """The innermost module ``node`` was traced in ("" for the model's own code)."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return "" if path.startswith("_empty_nn_module_stack") else _clean(path)
    if node.op == "call_module":
        return str(node.target)
    return ""


def short_target(node: fx.Node) -> str:
    """The operation a node performs, briefly: ``linear``, ``softmax``, ``view``."""
    if node.op == "call_module":
        return str(node.target).rsplit(".", 1)[-1]
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_function":
        name = (getattr(node.target, "__name__", None) or str(node.target)).split(".")[0]  # aten: "linear.default"
        return {"add": "+", "mul": "*", "sub": "-", "truediv": "/", "getitem": "[]"}.get(name, name)
    return node.op


def block_adds(block) -> tuple[str, ...]:
    """The residual adds a block replaces."""
    residuals = getattr(block, "residuals", None)
    if residuals is not None:
        return tuple(residuals)
    return (block.attention.add, block.mlp.add)


def segment_nodes(plan: Plan) -> dict[str, int]:
    """Node name -> index of the segment whose blocks contain it (in the traced graph)."""
    owner: dict[str, int] = {}
    for segment in plan.segments:
        for block in segment.blocks:
            for name in (*block.f.nodes, *block.g.nodes, *block_adds(block)):
                owner[name] = segment.index
    return owner


def tensor_bytes(value) -> int:
    """Bytes of a tensor (or of the tensors in a tuple/list), from its shape and dtype."""
    if isinstance(value, torch.Tensor):
        try:
            return int(value.numel()) * value.element_size()
        except Exception:  # noqa: BLE001 -- symbolic sizes without a hint
            return 0
    if isinstance(value, (tuple, list)):
        return sum(tensor_bytes(v) for v in value)
    return 0

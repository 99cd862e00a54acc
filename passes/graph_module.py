"""GraphModules that generate their Python code when it is first needed.

``fx.GraphModule`` generates and ``exec``s the code of its whole graph when it is built and
on every ``recompile()``. A 32-layer language model's aten graph has about 2,000 nodes, so
each of those costs tens of milliseconds, and the compile pipeline builds or recompiles
such a module once per pass (trace, normalize, rewrite, constant lifting) while only the
last graph is ever run. torch's ``_LazyGraphModule`` keeps ``recompile()`` as a mark and
generates the code when the module is called or its ``code`` is read, so every pass still
ends with ``recompile()`` and every module still runs, at the cost of one code generation.
"""

from __future__ import annotations

import torch.fx as fx

try:  # torch >= 2.3; older versions generate the code eagerly
    from torch.fx._lazy_graph_module import _LazyGraphModule as _GraphModuleClass
except ImportError:  # pragma: no cover
    _GraphModuleClass = fx.GraphModule

__all__ = ["graph_module"]


def graph_module(root, graph: fx.Graph, class_name: str = "GraphModule") -> fx.GraphModule:
    """``fx.GraphModule(root, graph, class_name)`` whose code is generated on first use."""
    return _GraphModuleClass(root, graph, class_name)

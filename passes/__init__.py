"""revcompile's compile passes, installed as ``revcompile.passes``: graph in, frozen result out.

The pipeline, in the order ``revcompile.pipeline`` runs it:

    normalize   guards out, shape queries on the stream origin, in-place adds made explicit
    residuals   residual adds whose branch is a single-entry region (with the reason when not)
    detect      attention/MLP blocks, chains of them -> segments: a ``plan.Plan``
    rewrite     each segment -> one ``reversible_segment_<i>`` call + its branch programs
    sketch      opt-in: chosen linear ops -> ones whose weight gradient comes from a sketch
    couplings   what a block computes: forward, inverse and gradient steps, what it saves
    schedule    each segment's backward as a program of steps, streams and waits
    memory      saved-for-backward and working bytes predicted on fake tensors

With a memory budget (``convert(..., memory_budget=)``, ``revcompile.planner``):

    block_costs what each block costs stored, checkpointed or reversible (fake tensors, FLOPs)
    gap_costs   the graph between blocks (stem, stage transitions, head) as cost graphs
    lower_sets  Kusumoto's lower-set DP: which parts of such a graph to recompute
    recompute   the chain DP: per block stored / checkpointed / reversible, per gap an option
    checkpoint  runs of blocks, or parts between them, recomputed in backward -> one call each

``graph_view`` and ``patterns`` are what the structural passes share: a networkx view of
the graph and the op patterns declared as data. Passes never import the runtime or CLI.
"""

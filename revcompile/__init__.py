"""revcompile: convert transformers into reversible networks by rewriting their graphs.

    converted = revcompile.convert(model, example_inputs)
    revcompile.explain(converted)            # what became reversible, what did not and why
    revcompile.set_backward(converted, "autograd")   # the stored-activation reference
    revcompile.set_backward(converted, "parallel")   # two-stream backward on CUDA (PaReprop)
    revcompile.convert(model, inputs, coupling="dual")  # keeps a pretrained model's function (fine-tuning)
    print(revcompile.backward_program(converted))    # its steps, streams, waits and proofs
    revcompile.verify(converted, example_inputs)     # gradients equal that reference?
    revcompile.memory_report(model, example_inputs)  # memory saved: measured, predicted, largest batch
    revcompile.predict_memory(meta_model, example_inputs)  # the same, predicted only, nothing allocated
    revcompile.convert(model, inputs, memory_budget="6GiB")  # per block stored/checkpointed/reversible
    revcompile.draw(converted, "model.svg")          # the rewritten graph as a picture

See docs/design.md for the pipeline and docs/usage.md for a walk-through.
"""

from revcompile import api
from revcompile.api import (
    backward_program,
    beta_schedule,
    convert,
    explain,
    find_converted,
    memory_plan,
    reconstruction_report,
    set_backward,
    set_coefficients,
    unconvert,
)
from revcompile.converted import ReversibleModel
from revcompile.errors import ConversionError
from revcompile.planner import MemoryPlan, plan_memory
from revcompile.predict import FitPrediction, predict_memory
from revcompile.report import MemoryReport, memory_report
from revcompile.runtime import BACKWARD_MODES
from revcompile.show import draw
from revcompile.sketch import SketchConfig
from revcompile.verify import VerifyReport, verify

__all__ = [
    *api.__all__,
    "verify",
    "VerifyReport",
    "memory_report",
    "MemoryReport",
    "predict_memory",
    "FitPrediction",
    "plan_memory",
    "MemoryPlan",
    "draw",
    "ReversibleModel",
    "ConversionError",
    "BACKWARD_MODES",
    "SketchConfig",
]

__version__ = "0.1.0"

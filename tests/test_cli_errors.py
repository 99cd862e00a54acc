"""What a user sees on stderr when the command line meets a bad model, bad inputs or an untraceable
model: at most five lines, no traceback, the culprit named, torch's own logging kept out.

Each case runs the real command in a process of its own (``tests.cli_processes``: warnings,
torch's log handlers and tracebacks write to its stderr as they would in a terminal); the
processes are forked from one that has imported the CLI, so the import is paid once. The
functions at the top are the ``package.module:callable`` models they load.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import revcompile
from revcompile.reference import reference_vit
from tests import blocks as B
from tests.nanogpt import nanogpt

ROOT = Path(__file__).resolve().parents[1]
TINY = {"depth": 2, "dim": 32, "heads": 2}


def vit_with_integer_images():
    """A float model given integer example inputs (the CLI casts float inputs to --dtype, not these)."""
    return reference_vit(**TINY), torch.randint(0, 255, (2, 3, 32, 32))


def vit_with_wrong_image_size():
    return reference_vit(**TINY), torch.randn(2, 3, 31, 31)


class DataDependent(B.Stack):
    """Python control flow on a tensor's value: neither torch.fx nor torch.export can follow it."""

    def forward(self, x):
        if x.sum() > 0:
            x = -x
        return super().forward(x)


def data_dependent():
    return DataDependent(), B.tokens()


def tensors_not_a_model():
    """A mistake: returns the inputs and a size instead of a model."""
    return torch.randn(2, 3), torch.randn(2, 3), 3


# case -> (argv, fragments stderr must contain, expected exit status)
CASES = {
    "wrong-channels": (["show", "tests.test_cli:tiny_vit", "--input-shape", "4,32,32"],
                       ["images (float32[2, 4, 32, 32])", "patch_embed (Conv2d)", "to have 3 channels"], 1),
    "wrong-image-size": (["report", "tests.test_cli_errors:vit_with_wrong_image_size"],
                         ["images (float32[2, 3, 31, 31])", "must match the size"], 1),
    "wrong-dtype": (["report", "tests.test_cli_errors:vit_with_integer_images"],
                    ["images (int64[2, 3, 32, 32])", "Input type (long int)"], 1),
    "data-dependent": (["show", "tests.test_cli_errors:data_dependent"],
                       ["could not trace DataDependent", "fx: TraceError", "export: ", "Try:"], 1),
    "not-a-module": (["report", "tests.test_cli_errors:tensors_not_a_model"],
                     ["returned a tuple of 3 (Tensor, Tensor, int)", "expected a torch.nn.Module"], 2),
    "bad-config": (["report", "--config", "depth"], ["revcompile: error: --config expects key=value"], 2),
    "nanogpt": (["report", "tests.nanogpt:nanogpt", "--batch-size", "2"], [], 0),
    "verbose": (["show", "tests.test_cli_errors:data_dependent", "--verbose"], [], 1),
}
QUIET_FAILURES = [case for case in CASES if case not in ("nanogpt", "verbose")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every case's command line, run as processes of their own (``tests.cli_processes``)."""
    out_dir = tmp_path_factory.mktemp("cli")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "120"}
    cases = {case: argv for case, (argv, _, _) in CASES.items()}
    subprocess.run([sys.executable, "-m", "tests.cli_processes", str(out_dir), json.dumps(cases)],
                   cwd=ROOT, env=env, check=True, timeout=900)
    return out_dir


def _finished(runs, case):
    """(exit status, stdout, the whole stderr) of one case."""
    read = lambda suffix: (runs / f"{case}{suffix}").read_text()  # noqa: E731
    return int(read(".status")), read(".out"), read(".err")


@pytest.mark.parametrize("case", QUIET_FAILURES)
def test_bad_models_and_inputs_get_a_short_stderr_naming_the_culprit(runs, case):
    _, fragments, status = CASES[case]
    code, out, err = _finished(runs, case)
    assert code == status, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) <= 5, err
    assert err.startswith("revcompile: "), err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"


def test_nanogpt_converts_through_the_export_fallback_without_noise(runs):
    code, out, err = _finished(runs, "nanogpt")
    assert code == 0, err
    assert err == "", err
    assert "export trace" in out.splitlines()[0]
    assert "fx tracing failed (fx: TypeError: slice indices must be integers" in " ".join(out.split())
    assert "Converted 2 blocks into 1 reversible segment" in out


def test_nanogpt_explain_names_the_tracer_and_gradients_are_exact(capfd):
    from tests.conftest import assert_gradients_match

    model, tokens = nanogpt()
    converted = revcompile.convert(model.double(), tokens)
    plan = revcompile.explain(converted)
    assert plan.tracer == "export" and len(plan.blocks) == 2
    assert str(plan).startswith("Plan (export tracer)")
    assert any("slice indices must be integers" in note for note in plan.notes)
    assert capfd.readouterr().err == ""
    assert_gradients_match(converted, (tokens,), tol=1e-10)


def test_torch_diagnostics_come_back_with_the_revcompile_logger_at_debug(capfd):
    with pytest.raises(revcompile.ConversionError, match="could not trace"):
        revcompile.convert(DataDependent(), B.tokens())
    assert capfd.readouterr().err == ""
    logger = logging.getLogger("revcompile")
    logger.setLevel(logging.DEBUG)
    try:
        with pytest.raises(revcompile.ConversionError):
            revcompile.convert(DataDependent(), B.tokens())
    finally:
        logger.setLevel(logging.NOTSET)
    assert "def forward" in capfd.readouterr().err  # torch.export's partial graph, printed before it raises


def test_verbose_lets_torch_diagnostics_through_on_the_command_line(runs):
    code, _, err = _finished(runs, "verbose")
    assert code == 1
    assert "def forward" in err and err.strip().splitlines()[-1].startswith("revcompile: cannot convert")


# --- the same check through the Python API ----------------------------------------------------


@pytest.mark.parametrize(
    "make_input, fragments",
    [
        (lambda: torch.randn(2, 3, 31, 31), ["images (float32[2, 3, 31, 31])", "ReferenceViT raises RuntimeError"]),
        (lambda: torch.randn(2, 4, 32, 32), ["images (float32[2, 4, 32, 32])", "patch_embed (Conv2d)", "3 channels"]),
        (lambda: torch.randn(2, 3, 32, 32, dtype=torch.float64), ["images (float64[2, 3, 32, 32])", "parameters are float32"]),
    ],
    ids=["image-size", "channels", "dtype"],
)
def test_convert_names_the_example_input_the_model_cannot_take(make_input, fragments):
    with pytest.raises(revcompile.ConversionError) as caught:
        revcompile.convert(reference_vit(**TINY), make_input())
    message = str(caught.value)
    assert "\n" not in message and message.startswith("the model cannot run on example input images")
    for fragment in fragments:
        assert fragment in message


def test_token_ids_outside_the_vocabulary_are_named():
    model, tokens = nanogpt()
    with pytest.raises(revcompile.ConversionError, match=r"idx \(int64\[2, 12\]\): transformer.wte \(Embedding\) raises IndexError"):
        revcompile.convert(model, tokens + 64)


class NormalizedStack(B.Stack):
    """BatchNorm and dropout before the blocks: running statistics and a random draw in forward."""

    def __init__(self):
        super().__init__(depth=2)
        self.batch_norm, self.dropout = torch.nn.BatchNorm1d(B.DIM), torch.nn.Dropout(0.5)

    def forward(self, x):
        return super().forward(self.dropout(self.batch_norm(x.transpose(1, 2)).transpose(1, 2)))


def test_the_input_check_leaves_running_statistics_and_random_state_alone():
    from revcompile.frontend import bind_call
    from revcompile.inputs import check_example_inputs

    model, x = NormalizedStack().train(), B.tokens()
    batch_norm = model.batch_norm
    before = (batch_norm.running_mean.clone(), batch_norm.num_batches_tracked.clone(), torch.get_rng_state())
    check_example_inputs(model, bind_call(model, (x,), {}))
    assert torch.equal(batch_norm.running_mean, before[0]) and torch.equal(batch_norm.num_batches_tracked, before[1])
    assert torch.equal(torch.get_rng_state(), before[2])

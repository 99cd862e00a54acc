"""The training-curves benchmark runs end to end (``--quick``) and logs what docs/training.md
reads; its reversible arms train exactly as their autograd references do.

Needs transformers (HF GPT-2 from a config) and scikit-learn (the bundled digits)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARMS = ["original", "revvit mean", "revvit mean, autograd", "revvit sum", "dual k=8"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("train_curves") / "curves.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "train_curves.py"), "--quick", "--json", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout


def _relative(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


@pytest.mark.slow
def test_every_arm_logs_every_step(quick_run):
    results, stdout = quick_run
    steps = results["meta"]["steps"]
    for model in ("gpt2", "vit"):
        arms = results[model]["arms"]
        assert list(arms) == ARMS
        depth = results[model]["model"].get("layers") or results[model]["model"]["depth"]
        groups = {f"block {i} {b}" for i in range(depth) for b in "FG"} | {"outside blocks"}
        for arm, log in arms.items():
            assert len(log["loss"]) == len(log["grad_norm"]) == len(log["lr"]) == steps
            assert set(log["groups"]) == groups and all(len(v) == steps for v in log["groups"].values())
            # the groups partition the parameters: their norms make up the total
            total = sum(v[0] ** 2 for v in log["groups"].values()) ** 0.5
            assert abs(total - log["grad_norm"][0]) <= 1e-4 * total
            streams = log["streams"][0]
            assert (streams is None) == (arm == "original")
            assert streams is None or (len(streams) == 4 and min(streams) > 0)
        assert max(arms["original"]["lr"]) == pytest.approx(results[model]["lr"])
    assert "| revvit mean |" in stdout


@pytest.mark.slow
def test_the_reversible_backward_trains_as_its_autograd_reference(quick_run):
    results, _ = quick_run
    for model in ("gpt2", "vit"):
        arms = results[model]["arms"]
        reversible, reference = arms["revvit mean"], arms["revvit mean, autograd"]
        assert _relative(reversible["grad_norm"], reference["grad_norm"]) <= 1e-4
        assert _relative(reversible["loss"], reference["loss"]) <= 1e-5
        check = results[model]["exactness"]
        assert check["dtype"] == "float64" and check["worst_relative_error"] <= 1e-10, check
        # the check ran on the state the training run reached at that step
        assert check["rerun_grad_norm_float32"] == arms[check["arm"]]["grad_norm"][check["step"]]


@pytest.mark.slow
def test_fusion_mean_and_sum_train_alike_under_a_final_norm(quick_run):
    """Both models end in a LayerNorm, which cannot tell (Y1 + Y2) / 2 from Y1 + Y2 but for its eps."""
    results, _ = quick_run
    for model in ("gpt2", "vit"):
        mean, total = results[model]["arms"]["revvit mean"], results[model]["arms"]["revvit sum"]
        assert _relative(total["loss"], mean["loss"]) <= 1e-3
        assert mean["streams"][0][:2] == pytest.approx(total["streams"][0][:2])

"""The fine-tuning benchmark runs end to end (``--quick``), writes what docs/finetuning.md
reads, and its dual-coupling arm keeps the pretrained model's loss within 1%.

The image experiment needs scikit-learn (its bundled digits); without it the run fails with
that message rather than skipping."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARMS = ["original", "revvit", "dual k=8", "dual k=4", "dual k=2", "dual k=2 alpha=1", "dual schedule k=8..2"]

@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finetune")
    command = [sys.executable, str(ROOT / "benchmarks" / "finetune.py"), "--quick",
               "--json", str(out / "finetune.json"), "--image", str(out / "curves.png")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "finetune.json").read_text()), out, done.stdout


@pytest.mark.slow
def test_quick_run_writes_every_arm_of_both_experiments(quick_run):
    results, out, stdout = quick_run
    assert {"command", "date", "machine", "gpt", "vit", "depth12_saved_bytes"} <= set(results)
    assert (out / "curves.png").stat().st_size > 0
    for name in ("gpt", "vit"):
        experiment = results[name]
        assert list(experiment["arms"]) == ARMS
        steps = experiment["finetune"]["steps"]
        for arm, data in experiment["arms"].items():
            after = data["val_loss_after_conversion"]
            assert set(after) == {"pretrain_task", "finetune_task"}
            curve = data["curve"]
            assert curve[0] == [0, after["finetune_task"]] and curve[-1] == [steps, data["final_val_loss"]]
            assert all(math.isfinite(loss) for _, loss in curve)
            assert data["median_step_s"] > 0
            saved = data["saved_for_backward_bytes"]
            if arm == "dual schedule k=8..2":  # fewer remainder bits at the end of the schedule
                assert saved["end"] < saved["start"] == experiment["arms"]["dual k=8"]["saved_for_backward_bytes"]
            else:
                assert saved > 0
        original = experiment["arms"]["original"]["saved_for_backward_bytes"]
        assert all(experiment["arms"][arm]["saved_for_backward_bytes"] < original for arm in ("revvit", "dual k=2"))
    assert "| dual k=8 |" in stdout


@pytest.mark.slow
def test_dual_at_k_8_keeps_the_pretrained_loss_within_one_percent(quick_run):
    results, _, _ = quick_run
    arms = results["gpt"]["arms"]
    original = arms["original"]["val_loss_after_conversion"]["pretrain_task"]
    assert original < math.log(256) - 0.5  # pretraining learned something: a bytewise guess costs ln 256
    dual = arms["dual k=8"]["val_loss_after_conversion"]["pretrain_task"]
    revvit = arms["revvit"]["val_loss_after_conversion"]["pretrain_task"]
    assert abs(dual / original - 1) <= 0.01, (dual, original)
    assert abs(dual - original) < abs(revvit - original)  # Rev-ViT coupling is another function
    vit = results["vit"]["arms"]
    vit_original = vit["original"]["val_loss_after_conversion"]["pretrain_task"]
    assert abs(vit["dual k=8"]["val_loss_after_conversion"]["pretrain_task"] / vit_original - 1) <= 0.01


@pytest.mark.slow
def test_dual_at_k_8_saves_at_most_a_tenth_at_depth_12(quick_run):
    results, _, _ = quick_run
    depth12 = results["depth12_saved_bytes"]
    assert depth12["model"]["layers"] == 12 and depth12["model"]["width"] == 128
    assert depth12["dual k=8"] * 10 <= depth12["original"], depth12

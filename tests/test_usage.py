"""The training script in docs/usage.md runs as written, under torchrun, and resumes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from revcompile.reference import reference_vit

USAGE = Path(__file__).resolve().parents[1] / "docs" / "usage.md"


def _training_script() -> str:
    blocks = [b for b in re.findall(r"```python\n(.*?)```", USAGE.read_text(), re.S) if b.startswith("# train_ddp.py")]
    assert len(blocks) == 1, "docs/usage.md should hold exactly one train_ddp.py block"
    return blocks[0]


def _torchrun(script: Path, checkpoint: Path, steps: int) -> str:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(script), "--steps", str(steps), "--depth", "3", "--batch-size", "4", "--checkpoint", str(checkpoint)]
    cpu_only = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # gloo on CPU processes, also on a GPU machine
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=cpu_only)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def test_the_torchrun_training_script_trains_checkpoints_and_resumes(tmp_path):
    script = tmp_path / "train_ddp.py"
    script.write_text(_training_script())
    checkpoint = tmp_path / "checkpoint.pt"

    assert "step 2: loss" in _torchrun(script, checkpoint, steps=2)
    first = torch.load(checkpoint)
    assert first["step"] == 2
    # the checkpoint is the original model's: it loads strictly into an unconverted model
    reference_vit(depth=3).load_state_dict(first["model"], strict=True)

    assert "step 3: loss" in _torchrun(script, checkpoint, steps=3)  # resumes at step 2
    resumed = torch.load(checkpoint)
    assert resumed["step"] == 3
    assert any(not torch.equal(resumed["model"][k], first["model"][k]) for k in first["model"])

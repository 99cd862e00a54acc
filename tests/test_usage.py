"""The training scripts in docs/usage.md run as written, under torchrun: DDP (checkpoints and
resumes) and FSDP2 per block (the loss goes down, the checkpoint is the original model's)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from revcompile.reference import reference_vit

USAGE = Path(__file__).resolve().parents[1] / "docs" / "usage.md"


def _training_script(name: str = "train_ddp.py") -> str:
    blocks = [b for b in re.findall(r"```python\n(.*?)```", USAGE.read_text(), re.S) if b.startswith(f"# {name}")]
    assert len(blocks) == 1, f"docs/usage.md should hold exactly one {name} block"
    return blocks[0]


def _torchrun(script: Path, checkpoint: Path, steps: int, *options: str) -> str:
    options = options or ("--depth", "3", "--batch-size", "4")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(script), "--steps", str(steps), *options, "--checkpoint", str(checkpoint)]
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


@pytest.mark.slow  # ~55 s on a loaded 2-core CPU: two torch.export conversions under torchrun, and one here
def test_the_torchrun_fsdp_per_block_script_trains_and_saves_the_original_checkpoint(tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoConfig, LlamaForCausalLM

    import revcompile

    script = tmp_path / "train_fsdp.py"
    script.write_text(_training_script("train_fsdp.py"))
    checkpoint = tmp_path / "llama.pt"
    out = _torchrun(script, checkpoint, 4, "--layers", "2", "--hidden", "32", "--heads", "2", "--batch-size", "2")
    losses = [float(loss) for loss in re.findall(r"step \d+: loss (\S+)", out)]
    assert len(losses) == 4 and losses[-1] < losses[0], out

    state = torch.load(checkpoint, weights_only=True)
    config = AutoConfig.for_model("llama", num_hidden_layers=2, hidden_size=32, intermediate_size=128, num_attention_heads=2)
    torch.manual_seed(0)
    original = LlamaForCausalLM(config)  # the script's initial weights
    assert list(state) == list(original.state_dict())
    assert all(state[k].dtype == v.dtype and state[k].shape == v.shape for k, v in original.state_dict().items())
    assert any(not torch.equal(state[k], v) for k, v in original.state_dict().items())  # trained
    original.load_state_dict(state, strict=True)

    # and back into a converted model (what resuming does before fully_shard)
    tokens = torch.randint(0, config.vocab_size, (2, 64))
    converted = revcompile.convert(LlamaForCausalLM(config), tokens, {"labels": tokens})
    converted.load_state_dict(state, strict=True)
    for key, value in converted.state_dict().items():
        assert torch.equal(value, state[key]), key

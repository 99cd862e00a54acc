"""Predicting without storage: the meta/fake path agrees with the real one, and allocates nothing."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from torch import nn

import revcompile
from revcompile.budget import ReportError, training_state
from revcompile.models_spec import SpecError, build_model, parse_spec
from revcompile.report import predict

ROOT = Path(__file__).resolve().parents[1]
LLAMA = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100}
VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}


def _build(family: str, device: str):
    torch.manual_seed(0)
    if family == "llama":
        return build_model(parse_spec("hf:llama"), LLAMA, batch_size=2, seq_len=32, device=device)
    return build_model(parse_spec("timm:vit_small_patch16_224"), VIT, batch_size=2, device=device)


def _real_prediction(family: str, dtype: torch.dtype, autocast: torch.dtype | None):
    """What ``revcompile report`` predicts for the real model (its parameters in memory)."""
    built = _build(family, "cpu")
    model = built.model.to(dtype)
    args = tuple(a.to(dtype) if a.is_floating_point() else a for a in built.args)
    converted = revcompile.convert(model, args)
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        prediction = predict(converted, args, {}, 2)
    return prediction, training_state(model, "adamw", 0), model, args


@pytest.mark.parametrize("family, dtype, autocast", [
    ("vit", torch.float32, None),
    pytest.param("llama", torch.bfloat16, None, marks=pytest.mark.slow),  # torch.export, twice
    pytest.param("llama", torch.float32, torch.bfloat16, marks=pytest.mark.slow),
])
def test_meta_path_predicts_what_the_real_path_predicts(family, dtype, autocast):
    real, real_state, real_model, real_args = _real_prediction(family, dtype, autocast)
    built = _build(family, "meta")
    assert next(built.model.parameters()).is_meta and built.args[0].is_meta
    fit = revcompile.predict_memory(built.model, built.args, dtype=dtype, autocast=autocast, reserve=0)
    assert asdict(fit.prediction) == asdict(real)
    assert fit.training == real_state
    assert fit.parameter_count == sum(p.numel() for p in _build(family, "cpu").model.parameters())
    assert next(built.model.parameters()).is_meta  # the caller's model is left as it was
    if family == "vit":  # a real model is predicted from its shapes too, and left untouched
        before = {k: v.clone() for k, v in real_model.state_dict().items()}
        again = revcompile.predict_memory(real_model, real_args, dtype=dtype, autocast=autocast, reserve=0)
        assert asdict(again.prediction) == asdict(real)
        assert all(torch.equal(before[k], v) for k, v in real_model.state_dict().items())


def test_autocast_is_counted():
    built = _build("vit", "meta")
    plain = revcompile.predict_memory(built.model, built.args).prediction
    amp = revcompile.predict_memory(built.model, built.args, autocast="bfloat16").prediction
    # what the linear layers and attention save is bfloat16 under autocast: fewer bytes per sample
    assert amp.original_saved.per_sample < 0.8 * plain.original_saved.per_sample


def test_a_factory_is_built_on_the_meta_device_and_sizes_a_batch():
    from revcompile.reference import ReferenceViT

    fit = revcompile.predict_memory(lambda: ReferenceViT(depth=4, dim=32, heads=2), torch.empty(2, 3, 32, 32, device="meta"),
                                    memory_cap="64MiB", reserve=0)
    cap, state, p = fit.capacity, fit.training, fit.prediction
    assert len(fit.plan.blocks) == 4 and cap.converted > cap.original > 0
    for peak, batch in ((p.original_peak, cap.original), (p.converted_peak, cap.converted)):
        assert state.total + peak.at(batch) <= cap.memory_cap < state.total + peak.at(batch + 1)


class _ReadsValuesWhenBuilt(nn.Module):
    def __init__(self):
        super().__init__()
        self.depth = int(torch.linspace(1, 3, 3)[-1].item())


def test_a_constructor_that_reads_values_is_a_clear_error():
    with pytest.raises(ReportError, match="meta device failed.*reads tensor values"):
        revcompile.predict_memory(_ReadsValuesWhenBuilt, torch.empty(2, 3, device="meta"))


def test_an_explicit_sequence_length_beyond_the_config_raises_the_limit_and_says_so():
    built = build_model(parse_spec("hf:llama"), LLAMA, batch_size=2, seq_len=4096, device="meta")
    assert built.args[0].shape == (2, 4096) and built.model.config.max_position_embeddings == 4096
    assert built.notes == ("max_position_embeddings raised from 2048 to 4096 for --seq-len 4096",)
    with pytest.raises(SpecError, match="longer than --config max_position_embeddings=512"):
        build_model(parse_spec("hf:llama"), dict(LLAMA, max_position_embeddings=512), batch_size=2, seq_len=4096, device="meta")
    default = build_model(parse_spec("hf:gpt2"), {"n_layer": 1, "n_positions": 32, "n_embd": 32, "n_head": 2}, batch_size=2)
    assert default.args[0].shape == (2, 32) and default.notes == ()  # no --seq-len: capped, as before


# Parameters alone would need 16 GiB (a 1M-token vocabulary at width 4096, float32); the
# child may map at most 8 GiB of address space in all, so one real parameter cannot exist.
_HUGE = ["hf:llama", "--config", "hidden_size=4096", "--config", "intermediate_size=8192", "--config", "num_hidden_layers=1",
         "--config", "num_attention_heads=32", "--config", "vocab_size=1048576", "--seq-len", "2048", "--batch-size", "2"]
_ADDRESS_SPACE = 8 * 2**30


def _limit_address_space():
    resource.setrlimit(resource.RLIMIT_AS, (_ADDRESS_SPACE, _ADDRESS_SPACE))


@pytest.mark.slow
def test_predict_only_allocates_no_parameters_or_activations():
    command = [sys.executable, "-m", "revcompile.cli", "report", *_HUGE, "--predict-only", "--memory-cap", "256GiB", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600, preexec_fn=_limit_address_space)
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads(done.stdout)
    assert data["training_state"]["parameters"] > 2 * _ADDRESS_SPACE
    assert "no storage is allocated" in data["method"]
    assert data["capacity"]["converted"] > 0 and data["capacity"]["original"] > 0  # one layer: no gain expected
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 < 2 * 2**30


def test_cli_predict_only_prints_the_header_and_both_largest_batches(capsys):
    from revcompile.cli import main

    tiny = ["--config", "depth=2", "--config", "dim=32", "--config", "heads=2", "--batch-size", "2"]
    assert main(["report", *tiny, "--predict-only", "--memory-cap", "256MiB", "--reserve", "0"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "Predicted, not measured" in out and "no storage is allocated for parameters or activations" in out
    assert "largest batch under 256.0 MiB" in out
    assert main(["report", *tiny, "--autocast", "bfloat16"]) == 2
    assert "--autocast is counted by --predict-only" in capsys.readouterr().err

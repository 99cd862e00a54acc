"""The command line as a user meets it: model specs, JSON, and one-line errors.

The functions at the top are ``package.module:callable`` models for the CLI to import.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from revcompile.cli import main
from revcompile.reference import example_inputs, reference_vit

TINY = ["--config", "depth=2", "--config", "dim=32", "--config", "heads=2", "--batch-size", "2"]


def tiny_vit(depth: int = 2):
    """A model without inputs: the CLI needs --input-shape."""
    return reference_vit(depth=depth, dim=32, heads=2)


def tiny_vit_with_inputs():
    """A model with its own example inputs."""
    model = reference_vit(depth=2, dim=32, heads=2)
    return model, torch.randn(3, 3, 32, 32)


def _run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _report_json(argv, capsys) -> dict:
    code, out, err = _run(["report", *argv, "--json"], capsys)
    assert code == 0, err
    return json.loads(out)


# --- report on every kind of model spec ------------------------------------------------------


def test_report_default_model_prints_the_tables(capsys):
    # the default model is the 12-block reference ViT; a narrow one keeps the test fast
    narrow = ["--config", "dim=32", "--config", "heads=2"]
    code, out, err = _run(["report", *narrow, "--batch-size", "2", "--memory-cap", "1GiB", "--reserve", "0"], capsys)
    assert code == 0, err
    assert "reference-vit (built-in ViT, depth 12)" in out
    assert "Converted 12 blocks into 1 reversible segment" in out
    for heading in ("Measured: one training step", "Predicted from the graphs", "Predicted largest training batch under 1.0 GiB"):
        assert heading in out
    assert "Prediction vs measurement" in out


@pytest.mark.parametrize(
    "argv, blocks",
    [
        (["timm:vit_tiny_patch16_224", "--config", "depth=2", "--config", "img_size=32", "--config", "patch_size=8"], 2),
        (["torchvision:vit_b_16", "--config", "image_size=32"], 12),
        (["hf:gpt2", "--config", "n_layer=2", "--config", "n_embd=32", "--config", "n_head=2",
          "--config", "vocab_size=100", "--config", "n_positions=32", "--seq-len", "16"], 2),
        (["tests.test_cli:tiny_vit", "--input-shape", "3,32,32", "--config", "depth=3"], 3),
        (["tests.test_cli:tiny_vit_with_inputs"], 2),
    ],
    ids=["timm", "torchvision", "hf", "callable+input-shape", "callable-returning-inputs"],
)
def test_report_json_for_each_spec(argv, blocks, capsys):
    data = _report_json([*argv, "--batch-size", "2"], capsys)
    assert data["plan"]["blocks"] == blocks
    measured = data["measured"]
    assert measured["original"]["saved_bytes"] > measured["converted"]["saved_bytes"] > 0
    assert data["prediction"] is not None, data["prediction_failure"]
    assert 2 not in data["prediction"]["batches"]  # fitted away from the measured batch


def test_json_agrees_with_the_python_api(capsys):
    import revcompile

    data = _report_json([*TINY, "--memory-cap", "256MiB", "--reserve", "16MiB", "--optimizer", "sgd"], capsys)
    torch.manual_seed(0)  # the CLI's default --seed
    model = reference_vit(depth=2, dim=32, heads=2)
    (x,) = example_inputs(model, batch_size=2)
    report = revcompile.memory_report(model, x, memory_cap="256MiB", reserve="16MiB", optimizer="sgd")
    assert data["measured"]["original"]["saved_bytes"] == report.original.saved_bytes
    assert data["measured"]["converted"]["saved_bytes"] == report.converted.saved_bytes
    assert data["prediction"]["original_saved"]["per_sample"] == report.prediction.original_saved.per_sample
    assert data["prediction"]["converted_peak"] == {"fixed": report.prediction.converted_peak.fixed,
                                                     "per_sample": report.prediction.converted_peak.per_sample}
    assert data["capacity"]["original"] == report.capacity.original
    assert data["capacity"]["converted"] == report.capacity.converted
    assert data["training_state"]["optimizer_state"] == 0  # sgd without momentum keeps no state
    assert data["plan"]["segments"][0]["blocks"] == [b.name for b in report.plan.blocks]


# --- errors: one line, non-zero exit, no traceback ------------------------------------------


def test_report_with_a_budget_prints_the_plan_and_the_measured_peak_against_it(capsys):
    code, out, err = _run(["report", "tests.test_cli:tiny_vit", "--input-shape", "3,32,32", "--config", "depth=4",
                           "--batch-size", "8", "--budget", "3MiB"], capsys)
    assert code == 0, err
    assert "Memory plan for a budget of 3.0 MiB" in out
    assert "within the budget" in out, out
    assert re.search(r"blocks\.\d.*(stored|checkpointed|reversible)", out)


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["report", "timm:vit_not_a_model"], "unknown timm model"),
        (["report", "torchvision:vit_b_17"], "unknown torchvision model"),
        (["report", "hf:gpt3000"], "unknown HuggingFace model type"),
        (["report", "vit_base_patch16_224"], "timm:vit_base_patch16_224"),
        (["report", "no_such_package.models:build"], "cannot import"),
        (["report", "--config", "depth"], "--config expects key=value"),
        (["report", "--config", "depthh=3"], "does not accept this --config"),
        (["report", "hf:gpt2", "--config", "n_layerz=2"], "has no field 'n_layerz'"),
        (["report", *TINY, "--memory-cap", "64KiB", "--reserve", "0"], "is too small"),
        (["report", *TINY, "--memory-cap", "lots"], "cannot read 'lots' as a size"),
        (["report", *TINY, "--budget", "1KiB"], "no plan fits 1.0 KiB"),
        (["report", "tests.test_cli:tiny_vit"], "--input-shape"),
        (["show", *TINY, "-o", "picture.png"], "must end in one of"),
    ],
)
def test_user_errors_are_one_line(argv, fragment, capsys):
    code, out, err = _run(argv, capsys)
    assert code != 0
    assert fragment in err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


def test_bad_options_are_one_line_too(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["report", "--device", "tpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "invalid choice: 'tpu'" in err


# --- show ---------------------------------------------------------------------------------


def _segments_in_svg(path: Path) -> int:
    root = ET.parse(path).getroot()  # valid XML, or this raises
    return sum(1 for g in root.iter("{http://www.w3.org/2000/svg}g") if g.get("class") == "cluster segment")


def test_show_writes_one_cluster_per_segment(tmp_path, capsys):
    svg, dot = tmp_path / "two.svg", tmp_path / "two.dot"
    for path in (svg, dot):
        code, _, err = _run(["show", "tests.test_draw:two_stages", "-o", str(path)], capsys)
        assert code == 0, err
    assert _segments_in_svg(svg) == 2
    text = dot.read_text()
    assert text.count("subgraph \"cluster_f0_cluster_s") == 2
    assert text.count("{") == text.count("}")
    assert "stage1.0" in svg.read_text() and "stage2.1" in svg.read_text()


def test_show_before_and_expanded(tmp_path, capsys):
    path = tmp_path / "both.svg"
    code, _, err = _run(["show", *TINY, "--before", "--expand", "-o", str(path)], capsys)
    assert code == 0, err
    root = ET.parse(path).getroot()
    classes = [g.get("class") for g in root.iter("{http://www.w3.org/2000/svg}g")]
    assert classes.count("cluster planned") == 1  # the original, with the blocks that will convert framed
    assert classes.count("cluster segment") == 1
    assert classes.count("cluster branch_f") == classes.count("cluster branch_g") == 2


def test_show_without_output_prints_the_plan_tree(capsys):
    code, out, err = _run(["show", *TINY], capsys)
    assert code == 0, err
    assert "reversible segment 0: blocks.0 .. blocks.1" in out
    assert "F  norm1 → attn" in out and "G  norm2 → mlp" in out
    assert "ends:" in out

"""benchmarks/gpu_check.py, the prepared GPU run, in its CPU dry run.

One dry run of a subset of the parts (a training-step part, the CUDA tests, peak memory,
bf16 drift) with one more part given a limit it cannot meet: every file is written, every
part has numbers or says why not, the part over its limit is reported as timed out and
the parts after it still run, and the CUDA tests' skips are reported as skips.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
RUN = ["cuda_tests", "train_step_vit_b", "train_step_mvitv2_t", "peak_memory", "bf16_drift"]
TIMED_OUT = "train_step_mvitv2_t"  # before peak_memory and bf16_drift in the run's order
sys.path.insert(0, str(SCRIPT.parent))
import gpu_report  # noqa: E402  (benchmarks/ is not a package)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    command = [sys.executable, str(SCRIPT), str(out), "--dry-run", "--parts", *RUN, "--limit", f"{TIMED_OUT}=0.1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text())


def _numbers(row: dict, keys) -> bool:
    return all(isinstance(row.get(k), (int, float)) and row[k] == row[k] for k in keys)


@pytest.mark.slow
def test_every_file_is_written_and_well_formed(dry_run):
    out, results = dry_run
    assert list(results["parts"]) == RUN
    for part in RUN:
        assert (out / f"{part}.md").read_text().startswith("# "), part
        assert (out / "logs" / f"{part}.log").exists(), part
        assert json.loads((out / f"{part}.json").read_text())["status"] == results["parts"][part]["status"]
    meta = results["meta"]
    summary = (out / "summary.md").read_text()
    assert meta["dry_run"] is True and "CPU" in meta["device_name"]
    for text in (meta["device_name"], meta["torch"], meta["date"][:10]):
        assert text in summary


@pytest.mark.slow
def test_every_part_has_numbers_or_an_explicit_status(dry_run):
    _, results = dry_run
    parts = results["parts"]
    assert {name: parts[name]["status"] for name in RUN} == {name: "timed out" if name == TIMED_OUT else "ok" for name in RUN}
    step = parts["train_step_vit_b"]["rows"]
    assert {r["variant"] for r in step["equal_batch"]} == {"original", "reversible", "parallel"}
    for row in step["equal_batch"]:
        assert _numbers(row, ("seconds", "peak_bytes")) and row["peak_bytes"] > 0, row
    for row in step["largest_batch"]:  # a batch is checked when one is predicted to fit (CPU heap noise can say none)
        assert _numbers(row, ("per_sample_bytes", "predicted_batch")), row
        assert _numbers(row, ("checked_batch", "checked_peak_bytes")) == (row["predicted_batch"] >= 1), row
    peaks = parts["peak_memory"]["rows"]["peaks"]
    assert {(r["variant"], r["batch"]) for r in peaks} == {(v, b) for v in ("original", "reversible", "parallel") for b in (2, 4)}
    for row in peaks:
        assert _numbers(row, ("peak_bytes",)), row
    drift = parts["bf16_drift"]["rows"]["drift"]
    assert len(drift) == 2
    for row in drift:
        assert _numbers(row, ("reconstruction_drift", "gradient_error_worst")) and row["finite"], row


@pytest.mark.slow
def test_a_part_over_its_limit_is_killed_and_the_rest_still_run(dry_run):
    out, results = dry_run
    part = results["parts"][TIMED_OUT]
    assert part["status"] == "timed out" and part["limit_s"] == 0.1
    assert not part.get("complete") and not part.get("rows", {}).get("equal_batch")
    assert results["parts"]["peak_memory"]["status"] == results["parts"]["bf16_drift"]["status"] == "ok"
    assert "timed out" in (out / f"{TIMED_OUT}.md").read_text()


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the report of CUDA tests that skip; here they run")
def test_cuda_tests_that_skip_are_reported_as_skipped(dry_run):
    out, results = dry_run
    tests = results["parts"]["cuda_tests"]["rows"]["tests"]
    assert tests and {t["outcome"] for t in tests} == {"skipped"}
    assert results["parts"]["cuda_tests"]["counts_text"] == [f"skipped: no CUDA: {len(tests)}"]
    assert "passed" not in (out / "cuda_tests.md").read_text()


@pytest.mark.slow
def test_goals_are_not_measured_in_a_dry_run_and_judged_on_a_gpu(dry_run):
    _, results = dry_run
    assert {g["verdict"] for g in results["goals"]} == {"not measured"}
    judged = {g["goal"]: g for g in gpu_report.evaluate_goals(results, on_gpu=True)}
    hierarchical = judged["parallel >= 1.2x reversible throughput on the hierarchical models"]
    assert hierarchical["ratios"] == {} and hierarchical["verdict"] == "not measured"  # Swin-T not run, MViTv2-T killed
    speed = judged["reversible >= 0.75x original throughput at equal batch"]
    seconds = {r["variant"]: r["seconds"] for r in results["parts"]["train_step_vit_b"]["rows"]["equal_batch"]}
    ratio = seconds["original"] / seconds["reversible"]
    assert speed["ratios"] == {"ViT-B/16 (timm)": pytest.approx(ratio)}
    assert speed["verdict"] == ("not met" if ratio < 0.75 else "not measured")  # three models have no numbers
    peaks = {(r["variant"], r["batch"]): r["peak_bytes"] for r in results["parts"]["peak_memory"]["rows"]["peaks"]}
    slope = {v: (peaks[(v, 4)] - peaks[(v, 2)]) / 2 for v in ("original", "reversible")}
    memory = judged["ViT-L/16 peak memory per sample >= 16x lower than the original"]
    if slope["reversible"] > 0:
        reduction = slope["original"] / slope["reversible"]
        assert memory["ratios"] == {"ViT-L/16, reversible": pytest.approx(reduction)}
        assert memory["verdict"] == ("met" if reduction >= 16 else "not met")
    else:  # CPU heap noise can leave no growth to divide by: then it cannot be judged
        assert memory["verdict"] == "not measured"


def test_bad_options_get_a_clear_error(tmp_path):
    for options, message in ((["--limit", "nonsense=1"], "PART=SECONDS"), (["--jobs", "2"], "--dry-run only")):
        done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), *options], capture_output=True, text=True, timeout=120)
        assert done.returncode != 0 and message in done.stderr, done.stderr

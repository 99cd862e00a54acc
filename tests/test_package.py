"""The installed package: the passes install as ``revcompile.passes``, never as a top-level ``passes``."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_built_wheel_has_revcompile_passes_and_no_top_level_passes(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True, cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("revcompile-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top_level == {"revcompile"}, top_level
    for module in ("passes/detect.py", "passes/rewrite.py", "passes/schedule.py", "show/render.py"):
        assert f"revcompile/{module}" in names


def test_the_installed_passes_import_as_revcompile_passes(tmp_path):
    # run outside the checkout, so only what is installed can be imported
    probe = "import importlib.util as u, revcompile.passes.detect; print(u.find_spec('passes') is None)"
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True, cwd=tmp_path)
    assert out.stdout.strip() == "True"

"""GPU validation in one prepared run: every CUDA check this project has, each part under its own time limit.

    python benchmarks/gpu_check.py OUT_DIR              # on a CUDA machine; <= 8 minutes on one H200
    python benchmarks/gpu_check.py OUT_DIR --dry-run    # the same code paths on CPU, tiny sizes

Parts, in order, each in a process of its own so that one that hangs or crashes loses
only itself (killed, with its process group, at its limit; the others still run). On the
GPU they run one at a time; a dry run runs ``--jobs`` of them side by side (default: the
CPU count, at most 4), since its numbers are not measurements:

* ``cuda_tests``: ``pytest`` on tests/test_cuda.py, test_parallel.py, test_schedule.py
  (JUnit XML kept). The dry run selects the CUDA-marked tests, which skip without a GPU:
  they are reported as skipped, never as passed.
* ``train_step_<model>`` for ViT-B/16, Swin-T, MViTv2-T, GPT-2: original, reversible,
  parallel and (CUDA only) auto timed at one equal batch (``train_step.Bench``), then the
  largest batch under a memory cap, by ``revcompile.budget`` from the measured peaks.
* ``peak_memory``: ViT-L/16, the peak of one training step at two batches per variant
  (``max_memory_allocated`` after ``reset_peak_memory_stats``); the slope is per sample.
* ``bf16_drift``: ``numerics.measure`` for every bf16 case at depth 48.

Writes into OUT_DIR: ``results.json`` (everything), ``<part>.json`` (its rows, status,
times) and ``<part>.md`` per part, ``summary.md`` (device, torch, date, the parts' status, the issue's goals as met /
not met / not measured), ``logs/<part>.log``. ``--limit PART=SECONDS`` overrides one
part's limit (the test uses it to time a part out); ``--parts`` runs a subset.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

from gpu_report import THROUGHPUT_MODELS, evaluate_goals, part_markdown, summary_markdown

REPO = Path(__file__).resolve().parent.parent
CUDA_TEST_FILES = ("tests/test_cuda.py", "tests/test_parallel.py", "tests/test_schedule.py")
GPU_BUDGET_S = 8 * 60
# A dry run's part needs at most ~30 s of CPU; on a shared two-core machine that can take several minutes.
DRY_LIMIT_S = 300


@dataclass(frozen=True)
class Part:
    name: str
    title: str
    limit_s: float  # on the GPU; their sum stays under GPU_BUDGET_S with room for process start-up
    dry_limit_s: float


PARTS = (
    Part("cuda_tests", "CUDA tests", 110, DRY_LIMIT_S),
    *(Part(f"train_step_{key}", f"Training step: {model}", limit, DRY_LIMIT_S)
      for (key, model), limit in zip(THROUGHPUT_MODELS.items(), (45, 45, 70, 60))),
    Part("peak_memory", "Peak memory per sample: ViT-L/16", 45, DRY_LIMIT_S),
    Part("bf16_drift", "bf16 drift", 70, DRY_LIMIT_S),
)
assert sum(p.limit_s for p in PARTS) <= GPU_BUDGET_S - 30, "the parts' limits must fit the GPU budget"


def part_command(part: str, out: Path, dry_run: bool) -> list[str]:
    if part == "cuda_tests":
        selection = ["-m", "cuda"] if dry_run else []  # without CUDA the rest are ordinary CPU tests, run in CI
        return [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "--junitxml", str(out / "cuda_tests.xml"),
                *selection, *CUDA_TEST_FILES]
    return [sys.executable, str(Path(__file__).resolve()), str(out), "--child", part] + (["--dry-run"] if dry_run else [])


class Running:
    """One part's process, in a process group of its own so that it is killed whole at its limit."""

    def __init__(self, part: str, out: Path, limit_s: float, dry_run: bool):
        self.part, self.out, self.limit_s = part, out, limit_s
        self.log_path = out / "logs" / f"{part}.log"
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(part_command(part, out, dry_run), cwd=REPO, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        self.began = time.perf_counter()
        self.code: int | None = None
        self.timed_out = False
        self.cpu_seconds = 0.0

    def finished(self) -> bool:
        """Reap the process if it ended; kill it if it ran past its limit."""
        pid, status, usage = os.wait4(self.process.pid, os.WNOHANG)
        if pid == 0 and time.perf_counter() - self.began > self.limit_s:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:  # it ended between the check and the kill
                pass
            pid, status, usage = os.wait4(self.process.pid, 0)
            self.timed_out = True
        if pid == 0:
            return False
        self.seconds = time.perf_counter() - self.began
        self.code = os.waitstatus_to_exitcode(status)
        self.process.returncode = self.code  # reaped here: Popen must not wait for it again
        self.cpu_seconds = usage.ru_utime + usage.ru_stime  # its cost, whatever the machine's load
        return True

    def result(self) -> dict:
        out, log_path = self.out, self.log_path
        collected = collect_cuda_tests(out, log_path) if self.part == "cuda_tests" else collect_child(out / f"{self.part}.json")
        if self.timed_out:
            status, detail = "timed out", f"killed after {self.limit_s:g} s; rows written before that are kept"
        elif self.code != 0 or not collected.get("complete"):
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            status, detail = "failed", f"exit code {self.code}: {tail[0][:200]}"
        else:
            status, detail = "ok", ""
        return {"status": status, "detail": detail, "seconds": self.seconds, "cpu_seconds": self.cpu_seconds,
                "limit_s": self.limit_s, "log": str(log_path.relative_to(out)), **collected}


def run_parts(limits: dict[str, float], out: Path, dry_run: bool, jobs: int) -> dict[str, dict]:
    """Run the parts, ``jobs`` at a time, in order; each one's result once it ends or is killed."""
    waiting, running, results = list(limits), [], {}
    while waiting or running:
        while waiting and len(running) < jobs:
            part = waiting.pop(0)
            print(f"[gpu_check] {part} (limit {limits[part]:g} s) ...", flush=True)
            running.append(Running(part, out, limits[part], dry_run))
        for job in [job for job in running if job.finished()]:
            running.remove(job)
            results[job.part] = job.result()
            print(f"[gpu_check] {job.part}: {results[job.part]['status']} in {job.seconds:.1f} s", flush=True)
        time.sleep(0.05)
    return {part: results[part] for part in limits}


def collect_child(path: Path) -> dict:
    if not path.exists():
        return {"complete": False, "rows": {}}
    return json.loads(path.read_text())


def collect_cuda_tests(out: Path, log_path: Path) -> dict:
    """Outcomes from the JUnit XML, or from pytest's verbose lines when it was killed before writing it."""
    junit = out / "cuda_tests.xml"
    tests = []
    if junit.exists():
        for case in ElementTree.parse(junit).iter("testcase"):
            outcome, message = "passed", ""
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                    message = child.get("message", "")
            tests.append({"name": f"{case.get('classname')}.{case.get('name')}", "outcome": outcome, "message": message})
    else:
        for line in log_path.read_text(errors="replace").splitlines():
            name, _, rest = line.partition(" ")
            word = rest.split(" ")[0] if "::" in name else ""
            if word in ("PASSED", "FAILED", "SKIPPED", "ERROR"):
                tests.append({"name": name, "outcome": word.lower(), "message": rest[len(word):].strip()})
    return {"complete": junit.exists(), "rows": {"tests": tests}, "counts_text": count_outcomes(tests)}


def count_outcomes(tests: list[dict]) -> list[str]:
    """``passed: 49``, ``skipped: no CUDA (19)``: skips grouped by why, so no skip reads as a pass."""
    counts: dict[str, int] = {}
    for test in tests:
        if test["outcome"] == "skipped":
            key = "skipped: no CUDA" if "CUDA" in test["message"] else f"skipped: {test['message'][:80]}"
        else:
            key = test["outcome"]
        counts[key] = counts.get(key, 0) + 1
    return [f"{key}: {count}" for key, count in sorted(counts.items())] or ["no test outcomes recorded"]


def parse_limits(items: list[str]) -> dict[str, float]:
    limits = {}
    names = {p.name for p in PARTS}
    for item in items:
        name, _, seconds = item.partition("=")
        if name not in names or not seconds:
            raise SystemExit(f"--limit {item!r}: write PART=SECONDS with PART one of {', '.join(sorted(names))}")
        limits[name] = float(seconds)
    return limits


def reported(parts: dict, key: str, fallback: str) -> str:
    """What the parts' processes reported about their machine (the parent never touches the device)."""
    values = {p["meta"][key] for p in parts.values() if p.get("meta")}
    return ", ".join(sorted(values)) or fallback


def main_parent(args) -> None:
    out: Path = args.out
    if not args.dry_run and args.jobs not in (None, 1):
        raise SystemExit("--jobs: on the GPU the parts run one at a time (side by side they would disturb each other's "
                         "timings and peaks); --jobs is for --dry-run only")
    overrides = parse_limits(args.limit)
    if not args.dry_run and not cuda_available():
        raise SystemExit("no CUDA device here: run on a GPU machine, or add --dry-run for the CPU dry run")
    (out / "logs").mkdir(parents=True, exist_ok=True)
    limits = {p.name: overrides.get(p.name, p.dry_limit_s if args.dry_run else p.limit_s)
              for p in PARTS if not args.parts or p.name in args.parts}
    began, started = time.perf_counter(), datetime.now(timezone.utc)
    parts = run_parts(limits, out, args.dry_run, args.jobs or (min(os.cpu_count() or 1, 4) if args.dry_run else 1))
    meta = {"date": started.isoformat(timespec="seconds"), "dry_run": args.dry_run,
            "device_name": reported(parts, "device_name", "unknown (no part reported its device)"),
            "torch": reported(parts, "torch", version("torch")), "wall_seconds": time.perf_counter() - began,
            "cpu_seconds": sum(p["cpu_seconds"] for p in parts.values()),
            "worst_case_seconds": sum(p["limit_s"] for p in parts.values())}
    results = {"meta": meta, "parts": parts}
    results["goals"] = evaluate_goals(results, on_gpu=not args.dry_run)
    titles = {p.name: p.title for p in PARTS}
    for name, part in parts.items():  # the part's own file, now with its status (a killed part may have none)
        (out / f"{name}.json").write_text(json.dumps(part, indent=2, default=str))
        (out / f"{name}.md").write_text(part_markdown(name, titles[name], part))
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "summary.md").write_text(summary_markdown(results, titles))
    print((out / "summary.md").read_text())


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="directory for the results (created)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: the same code paths in under 2 minutes")
    parser.add_argument("--parts", nargs="+", choices=[p.name for p in PARTS], help="run only these parts")
    parser.add_argument("--jobs", type=int, help="dry run only: parts run side by side (default: the CPU count, at most 4)")
    parser.add_argument("--limit", action="append", default=[], metavar="PART=SECONDS", help="override a part's time limit")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one measuring part in this process
    args = parser.parse_args()
    if args.child:
        import gpu_parts

        gpu_parts.run(args.child, args.out, args.dry_run)
    else:
        main_parent(args)


if __name__ == "__main__":
    main()

"""How long `revcompile.convert` takes, by depth and frontend (a benchmark, never a test).

    OMP_NUM_THREADS=1 python benchmarks/convert_time.py [--depths 6 12 24] [--llama-depths 4 8 16 32]
                                                        [--repeats 3] [--models llama] [--out benchmarks/results]
                                                        [--baseline GIT_REVISION]

Builds models with random weights (full-width timm ViT-B/16 through torch.fx, full-width
HuggingFace GPT-2 and a small HuggingFace Llama config through torch.export), converts each
``--repeats`` times and prints a markdown table of the median wall-clock time (and the
median CPU time of the process, which a machine shared with other jobs inflates less); the
same numbers go to ``<out>/convert_time.json``. ``--models`` (substrings of the names) reruns
some models only; the other rows are kept from the existing file, each row with its date.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

import revcompile


def timm_vit_base(depth: int):
    import timm

    model = timm.create_model("vit_base_patch16_224", pretrained=False, depth=depth)
    return model, (torch.randn(2, 3, 224, 224),)


def hf_gpt2(depth: int):
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    model = AutoModel.from_config(AutoConfig.for_model("gpt2", n_layer=depth))
    return model, (torch.randint(0, 50257, (2, 128)),)


# A small Llama: hidden 256, MLP 688 (~2.7x), 4 heads, vocabulary 1000, batch 2 x 64 tokens.
LLAMA = dict(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=4, vocab_size=1000)


def hf_llama(depth: int):
    from transformers import LlamaConfig, LlamaModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    model = LlamaModel(LlamaConfig(num_hidden_layers=depth, max_position_embeddings=256, **LLAMA))
    return model, (torch.randint(0, LLAMA["vocab_size"], (2, 64)),)


MODELS = {"timm vit_base_patch16_224 (fx)": timm_vit_base, "HF gpt2 (export)": hf_gpt2,
          "HF Llama h256 i688 4 heads v1000 (export)": hf_llama}


def convert_once(name: str, depth: int) -> dict:
    """Wall-clock and CPU seconds of one ``revcompile.convert`` of a fresh model."""
    torch.manual_seed(0)
    model, inputs = MODELS[name](depth)
    wall, cpu = time.perf_counter(), time.process_time()
    converted = revcompile.convert(model, inputs)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"wall": wall, "cpu": cpu, "blocks": len(revcompile.explain(converted).blocks)}


def summary(runs: list[dict]) -> dict:
    return {"seconds": round(statistics.median(r["wall"] for r in runs), 2),
            "cpu_seconds": round(statistics.median(r["cpu"] for r in runs), 2), "runs": [round(r["wall"], 2) for r in runs]}


def time_conversion(name: str, depth: int, repeats: int) -> dict:
    """Median wall-clock and CPU seconds of ``revcompile.convert`` over ``repeats`` fresh models."""
    runs = [convert_once(name, depth) for _ in range(repeats)]
    return {"depth": depth, "blocks": runs[-1]["blocks"], **summary(runs)}


class Worker:
    """A process converting on request with one version of revcompile (``--serve``)."""

    def __init__(self, pythonpath: str | None = None):
        env = dict(os.environ, **({"PYTHONPATH": pythonpath} if pythonpath else {}))
        self.process = subprocess.Popen([sys.executable, __file__, "--serve"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        ready, _, where = self.process.stdout.readline().strip().partition(" ")
        assert ready == "ready", "the worker did not start"
        assert pythonpath is None or where.startswith(pythonpath), f"the worker imported revcompile from {where}"

    def convert(self, name: str, depth: int) -> dict:
        self.process.stdin.write(f"{name}\t{depth}\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def serve() -> None:
    """Worker mode: one JSON line per ``MODEL<TAB>DEPTH`` line read, after a warm-up conversion."""
    convert_once("HF Llama h256 i688 4 heads v1000 (export)", 4)
    print("ready", revcompile.__file__, flush=True)
    for line in sys.stdin:
        name, depth = line.rstrip("\n").split("\t")
        print(json.dumps(convert_once(name, int(depth))), flush=True)


def unpacked(revision: str, into: str) -> str:
    """``revcompile/`` and ``passes/`` as of ``revision``, importable from the returned directory."""
    archive = subprocess.run(["git", "archive", revision, "revcompile", "passes"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", into], input=archive, check=True)
    os.symlink("../passes", os.path.join(into, "revcompile", "passes"))  # the package-dir mapping of pyproject.toml
    return into


def time_interleaved(name: str, depth: int, repeats: int, workers: dict[str, Worker]) -> dict:
    """Like ``time_conversion`` for the working tree, with the baseline's runs alternating with its own."""
    runs: dict[str, list] = {"current": [], "baseline": []}
    for repeat in range(repeats):
        for which in (("baseline", "current") if repeat % 2 == 0 else ("current", "baseline")):
            runs[which].append(workers[which].convert(name, depth))
    return {"depth": depth, "blocks": runs["current"][-1]["blocks"], **summary(runs["current"]),
            "baseline": {"blocks": runs["baseline"][-1]["blocks"], **summary(runs["baseline"])}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[6, 12, 24])
    parser.add_argument("--llama-depths", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=None, help="substrings of the model names to run (default: all)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--baseline", default=None, help="a git revision to time interleaved with the working tree")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve()
    chosen = [name for name in MODELS if args.models is None or any(m.lower() in name.lower() for m in args.models)]
    with tempfile.TemporaryDirectory() as directory:
        workers = {"baseline": Worker(unpacked(args.baseline, directory)), "current": Worker()} if args.baseline else None
        try:
            rows = [dict(model=name, date=date.today().isoformat(), **row) for name, row in _timed(chosen, args, workers)]
        finally:
            for worker in (workers or {}).values():
                worker.close()
    meta = {"date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "repeats": args.repeats,
            "statistic": "median"}
    if args.baseline:
        meta["baseline"] = args.baseline + " (" + subprocess.run(["git", "rev-parse", "--short", args.baseline], capture_output=True,
                                                                  text=True).stdout.strip() + "), interleaved"
    rows = _kept_rows(args.out / "convert_time.json", chosen) + rows
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "convert_time.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\n{meta['date']}, CPU ({meta['threads']} threads), torch {meta['torch']}, median of {args.repeats}\n")
    print("| model | depth | blocks converted | convert time (s) | CPU time (s) | baseline (s) |\n|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['model']} | {row['depth']} | {row['blocks']} | {row['seconds']} | {row.get('cpu_seconds', '')} "
              f"| {row.get('baseline', {}).get('seconds', '')} |")


def _timed(chosen: list[str], args, workers: dict | None):
    """(model, row) for every chosen model and depth, printed as they finish."""
    for name, build in MODELS.items():
        if name not in chosen:
            continue
        for depth in args.llama_depths if build is hf_llama else args.depths:
            if workers:
                row = time_interleaved(name, depth, args.repeats, workers)
            else:
                row = time_conversion(name, depth, args.repeats)
            before = f"; baseline {row['baseline']['seconds']:.2f} s, runs {row['baseline']['runs']}" if workers else ""
            print(f"{name:42s} depth {depth:3d}: {row['blocks']:3d} blocks in {row['seconds']:6.2f} s "
                  f"(cpu {row['cpu_seconds']:.2f} s; runs {row['runs']}{before})", flush=True)
            yield name, row


def _kept_rows(path: Path, rerun: list[str]) -> list[dict]:
    """Rows of the models not rerun, from an earlier result file (dated with that run)."""
    if not path.exists():
        return []
    earlier = json.loads(path.read_text())
    return [{**row, "date": row.get("date", earlier["meta"]["date"])} for row in earlier["rows"] if row["model"] not in rerun]


if __name__ == "__main__":
    main()

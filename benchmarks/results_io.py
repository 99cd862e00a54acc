"""How every benchmark script records where and when it ran, and writes its results."""

from __future__ import annotations

import json
import platform
from datetime import date
from pathlib import Path

import torch

__all__ = ["run_meta", "write_results"]


def run_meta(**extra) -> dict:
    """The date, machine, thread count and torch version of this run, and ``extra``."""
    return {"date": date.today().isoformat(), "machine": platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, **extra}


def write_results(data: dict, json_path: Path, doc_path: Path, markdown: str) -> None:
    """The results as JSON (what docs quote and tests check) and as the Markdown shown in docs."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(data, indent=2))
    doc_path.parent.mkdir(parents=True, exist_ok=True)
    doc_path.write_text(markdown)
    print(f"wrote {doc_path} and {json_path}")

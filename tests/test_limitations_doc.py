"""docs/limitations.md: every row names tests, and every test it names exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_row_is_backed_by_an_existing_test():
    text = (ROOT / "docs" / "limitations.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| what you do")]
    assert len(rows) >= 20
    previous: list = []
    for row in rows:
        cell = row.rsplit("|", 2)[-2]
        cited = re.findall(r"`(?:tests/)?(test_\w+\.py)(?:::(\w+))?`", cell)
        if not cited and cell.strip() == "same test":
            cited = previous
        assert cited, f"no test named in: {row[:80]}"
        previous = cited
        for path, name in cited:
            source = (ROOT / "tests" / path).read_text()
            if name:
                assert re.search(rf"def {name}\(", source), f"{path}::{name} does not exist"

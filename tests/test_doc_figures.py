"""Figures quoted in the docs match the benchmark result files they come from.

The convention (docs/benchmarks.md, "Figures in the docs"): a figure is followed by an HTML
comment naming its result file under ``benchmarks/results/``, and a key when the file is JSON:

    ... runs at 0.68x<!-- result: train_step_cpu_exact.md --> the original's throughput
    ... 9.81 s<!-- result: convert_time.json rows[model=HF gpt2 (export)&depth=24].seconds -->
    ... 11.6x<!-- result: train_step_cpu_exact-memory.json max_batch[variant=reversible].largest_batch / max_batch[variant=original].largest_batch -->

and a table, a list or a pasted output block copied from a result file has the comment on the
line above it. Without a key, each figure (or each row / item / output line) must appear in the
file: as text in a text file, as a value in a JSON file. JSON holds base units, which the
quoted unit converts: bytes for KiB/MiB/GiB, seconds for s/ms, fractions for %, ratios for x.
A figure matches when the value rounds to it at the digits it is quoted with.

In the docs listed in ``STRICT``, every figure in prose with a unit (x, %, s, ms, KiB, MiB,
GiB) outside code must carry such a comment, unless it is a bound -- a target, a cap, a
setting -- written after "within", "at least", "at most", "under", "over", "above", "below",
"default", "every", ">=" or "<=".
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Docs whose every figure in prose is referenced. docs/benchmarks.md is not (yet): its GPU
# check section quotes dry-run times and time limits that have no result file.
STRICT = ["README.md", "docs/design.md", "docs/usage.md", "docs/numerics.md", "docs/training.md"]

MARKER = re.compile(r"<!--\s*result:\s*(?P<file>\S+)(?:\s+(?P<key>.*?))?\s*-->")
NUMBER = r"\d[\d,]*(?:\.\d+)?"
UNITS = {"KiB": 1 / 1024, "MiB": 1 / 1024**2, "GiB": 1 / 1024**3, "ms": 1e3, "%": 1e2, "s": 1.0, "x": 1.0, "": 1.0}
FIGURE = re.compile(rf"(?P<number>{NUMBER})(?:-(?P<upper>{NUMBER}))?\s?(?P<unit>KiB|MiB|GiB|ms|%|s|x)?$")
UNIT_FIGURE = re.compile(rf"(?<![\w.^/*-])({NUMBER})(?:-{NUMBER})?\s?(?:KiB|MiB|GiB|ms|%|s|x)(?!\w)")
BOUND = re.compile(r"(?:within|at least|at most|under|over|above|below|default|every|>=|<=)(?: the| a| an)?\s*[~]?$")


def _lookup(data, key: str):
    """``rows[model=HF gpt2 (export)&depth=24].seconds`` -> the value (a row is picked by its fields)."""
    for part in re.findall(r"[^.\[\]]+(?:\[[^\]]*\])?", key):
        name, _, selector = part.partition("[")
        if name:
            data = data[int(name)] if isinstance(data, list) else data[name]
        if selector:
            wanted = dict(item.split("=", 1) for item in selector.rstrip("]").split("&"))
            matches = [row for row in data if all(str(row.get(k)) == v for k, v in wanted.items())]
            assert len(matches) == 1, f"{key}: {len(matches)} rows match [{selector}"
            data = matches[0]
    return data


def _leaves(data) -> list[float]:
    if isinstance(data, dict):
        return [v for value in data.values() for v in _leaves(value)]
    if isinstance(data, list):
        return [v for value in data for v in _leaves(value)]
    return [float(data)] if isinstance(data, (int, float)) and not isinstance(data, bool) else []


def _matches(quoted: str, unit: str, value: float) -> bool:
    decimals = len(quoted.partition(".")[2])
    return round(value * UNITS[unit], decimals) == float(quoted.replace(",", ""))


def _check_figure(figure: str, file: Path, key: str | None) -> None:
    parsed = FIGURE.search(figure.strip())
    assert parsed, f"no figure before the marker: ...{figure[-40:]!r}"
    quoted = [parsed["number"]] + ([parsed["upper"]] if parsed["upper"] else [])
    unit = parsed["unit"] or ""
    if file.suffix != ".json":
        assert parsed.group(0) in file.read_text() or all(q in file.read_text() for q in quoted), \
            f"{parsed.group(0)!r} does not appear in {file.name}"
        return
    data = json.loads(file.read_text())
    if key:
        parts = [p.strip() for p in key.split(" / ")]
        value = float(_lookup(data, parts[0])) / (float(_lookup(data, parts[1])) if len(parts) == 2 else 1.0)
        assert len(quoted) == 1 and _matches(quoted[0], unit, value), f"{figure.strip()!r} but {file.name} {key} = {value}"
        return
    leaves = _leaves(data)
    for q in quoted:
        assert any(_matches(q, unit, v) for v in leaves), f"{q}{unit} is no value of {file.name}"


def _block_span(lines: list[str], start: int) -> tuple[int, list[str]]:
    """(end, content lines) of the table, list or fenced block starting at ``lines[start]``."""
    if start >= len(lines):
        return start, []
    if lines[start].startswith("```"):
        end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("```")) + 1
        return end, [line for line in lines[start + 1:end - 1] if line.strip()]
    prefix = "|" if lines[start].startswith("|") else "- " if lines[start].startswith("- ") else None
    end = start
    while prefix and end < len(lines) and lines[end].startswith(prefix):
        end += 1
    content = lines[start:end]
    return end, content[2:] if prefix == "|" else content  # a table's rows after its header and separator


def _markers():
    for doc in DOCS:
        lines = doc.read_text().splitlines()
        for number, line in enumerate(lines):
            for marker in MARKER.finditer(line):
                yield doc, lines, number, line, marker


def test_every_marked_figure_matches_its_result_file():
    checked = 0
    for doc, lines, number, line, marker in _markers():
        where = f"{doc.relative_to(ROOT)}:{number + 1}"
        file = RESULTS / marker["file"]
        assert file.is_file(), f"{where}: no result file benchmarks/results/{marker['file']}"
        if line.strip() == marker.group(0):  # on its own line: the table or block below it
            _, block = _block_span(lines, number + 1)
            assert block, f"{where}: a marker on its own line must stand right above a table, a list or a code block"
            text = file.read_text()
            for row in block:
                if file.suffix == ".json":  # every cell that is a figure
                    for cell in row.strip("|").split("|"):
                        if FIGURE.fullmatch(cell.strip()):
                            _check_figure(cell, file, None)
                else:
                    assert row.strip() in text, f"{where}: {row.strip()!r} is not in {file.name}"
        else:
            _check_figure(line[: marker.start()], file, marker["key"])
        checked += 1
    assert checked >= 10


def _prose(lines: list[str]):
    """(line number, text) of lines outside code blocks, tables, marked blocks and inline code."""
    fenced, skip_to, in_code = False, 0, False
    for number, line in enumerate(lines):
        if number < skip_to:
            continue
        marker = MARKER.fullmatch(line.strip())
        if marker and not fenced:
            skip_to = _block_span(lines, number + 1)[0]
            continue
        if line.startswith("```"):
            fenced = not fenced
            continue
        if fenced or line.startswith("|"):
            continue
        in_code = in_code and bool(line.strip())  # a code span may wrap, not past its paragraph
        text = []
        for char in line:
            in_code = not in_code if char == "`" else in_code
            text.append(" " if in_code or char == "`" else char)
        yield number, "".join(text)


@pytest.mark.parametrize("doc", STRICT)
def test_figures_in_prose_name_their_result_file(doc):
    lines = (ROOT / doc).read_text().splitlines()
    unreferenced = []
    for number, text in _prose(lines):
        for figure in UNIT_FIGURE.finditer(text):
            after = text[figure.end():]
            if MARKER.match(after) or BOUND.search(text[: figure.start()].rstrip()):
                continue
            unreferenced.append(f"{doc}:{number + 1}: {figure.group(0)!r}")
    assert not unreferenced, "figures without <!-- result: FILE [KEY] -->:\n" + "\n".join(unreferenced)


def test_the_checker_catches_a_wrong_figure(tmp_path):
    data = {"rows": [{"model": "a", "seconds": 0.4567, "bytes": 3 * 1024**2}]}
    file = tmp_path / "r.json"
    file.write_text(json.dumps(data))
    _check_figure("takes 457 ms", file, "rows[model=a].seconds")
    _check_figure("keeps 3.0 MiB", file, "rows[model=a].bytes")
    _check_figure("0.46 s", file, None)
    for wrong, key in (("takes 0.45 s", "rows[model=a].seconds"), ("2.9 MiB", "rows[model=a].bytes"), ("0.47 s", None)):
        with pytest.raises(AssertionError):
            _check_figure(wrong, file, key)
    text = tmp_path / "r.txt"
    text.write_text("| peak | 470.7 MiB | 2.0x |")
    _check_figure("only 2.0x", text, None)
    with pytest.raises(AssertionError):
        _check_figure("only 2.1x", text, None)


IMAGE = re.compile(r"!\[[^\]]*\]\((?P<path>[^)\s]+)\)")


@pytest.mark.parametrize("doc", [str(d.relative_to(ROOT)) for d in DOCS])
def test_every_picture_a_doc_shows_exists(doc):
    path = ROOT / doc
    missing = [m["path"] for m in IMAGE.finditer(path.read_text()) if not (path.parent / m["path"]).is_file()]
    assert not missing, f"{doc} shows pictures that are not in the repository: {missing}"


def test_the_planner_picture_is_drawn_from_its_results(tmp_path):
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from planner_figure import plot

    results = json.loads((RESULTS / "planner.json").read_text())
    assert plot(results, tmp_path / "frontier.png")
    assert (tmp_path / "frontier.png").stat().st_size > 10_000

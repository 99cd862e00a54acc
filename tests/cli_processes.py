"""Run several ``revcompile`` command lines as processes of their own, importing the CLI once.

    python -m tests.cli_processes OUT_DIR '{"case": ["report", "--config", "depth"], ...}'

Each command line runs in a child forked from one process that has imported
``revcompile.cli`` (the import is most of a short command's time), with its stdout and
stderr at the file-descriptor level going to ``OUT_DIR/<case>.out`` and ``.err`` and its
exit status to ``.status``: a fresh process in all that the command does, as in a shell,
including warnings, torch's log handlers and an uncaught exception's traceback. Whatever
the shared import itself writes to stderr is what every command would print first, so it
is written in front of each ``.err``.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path


def _redirect(out: Path, err: Path) -> None:
    for stream, path in ((1, out), (2, err)):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, stream)
        os.close(fd)


def _run_child(argv: list[str]) -> int:
    from revcompile.cli import main

    sys.argv = ["revcompile", *argv]
    try:
        return main(argv) or 0
    except SystemExit as exit_:  # argparse errors
        return exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:  # noqa: BLE001 -- what the interpreter would print for an uncaught error
        traceback.print_exc()
        return 1


def run(out_dir: Path, cases: dict[str, list[str]]) -> None:
    saved = os.dup(2)
    _redirect(out_dir / "_import.out", out_dir / "_import.err")
    import revcompile.cli  # noqa: F401 -- the shared import

    sys.stdout.flush(), sys.stderr.flush()
    os.dup2(saved, 2)
    children = {}
    for case, argv in cases.items():
        pid = os.fork()
        if pid == 0:
            _redirect(out_dir / f"{case}.out", out_dir / f"{case}.err")
            status = _run_child(argv)
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(status)
        children[pid] = case
    imported = (out_dir / "_import.err").read_text()
    while children:
        pid, status = os.wait()
        case = children.pop(pid)
        (out_dir / f"{case}.status").write_text(str(os.waitstatus_to_exitcode(status)))
        err = out_dir / f"{case}.err"
        err.write_text(imported + err.read_text())


if __name__ == "__main__":
    run(Path(sys.argv[1]), json.loads(sys.argv[2]))

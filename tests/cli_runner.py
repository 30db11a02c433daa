"""Runs `lmesh ...` in this process, for tests that run many commands (a subprocess costs a second each here)."""

from __future__ import annotations

import contextlib
import io
import logging


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `lmesh ARGV`. Call it in a thread of its own (`asyncio.to_thread`) from async
    tests: it runs its own event loop. A SystemExit (argparse refusing the command line itself) is 64 + its code."""
    from services.cli import main

    out, err = io.StringIO(), io.StringIO()
    lmesh_logger = logging.getLogger("lmesh")
    level = lmesh_logger.level  # operator commands quieten it; the rest of the session must not notice
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = 64 + int(exit_.code or 0)
        finally:
            lmesh_logger.setLevel(level)
    return code, out.getvalue(), err.getvalue()

"""Running the `underpaint` command in tests: in this process by default, as a real process on request.

Starting a process costs seconds of imports (torch, diffusers) before the command does anything,
so most tests call :func:`underpaint.cli.main.main` here, with what a process would give it: its
own standard streams, environment and working folder, Python's warnings and the library's log
records on its standard error as an unconfigured interpreter prints them, an uncaught exception
as a traceback and exit status 1. ``process=True`` runs ``python -m underpaint`` for the tests that
check the real entry point.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
import traceback
import warnings
from pathlib import Path


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None,
            process: bool = False) -> subprocess.CompletedProcess:
    if process:
        return subprocess.run([sys.executable, "-m", "underpaint", *args], capture_output=True, text=True,
                              cwd=cwd, env={**os.environ, **(env or {})}, timeout=300)
    from underpaint.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    handler = logging.StreamHandler(err)  # as logging's last-resort handler: WARNING and up, message only
    handler.setLevel(logging.WARNING)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        os.environ.update(env or {})
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("default")  # a fresh interpreter's: each warning once
            warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: err.write(
                warnings.formatwarning(message, category, filename, lineno, line))
            try:
                code = main(list(args))
            except SystemExit as exc:  # argparse's usage errors and --help
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except Exception:  # noqa: BLE001 - what the interpreter would print
                traceback.print_exc(file=err)
                code = 1
    finally:
        root.removeHandler(handler)
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return subprocess.CompletedProcess(["underpaint", *args], code, out.getvalue(), err.getvalue())

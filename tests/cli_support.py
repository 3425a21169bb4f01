"""`sdengine ARGS` in this process: `main(argv)` with its own stdout, stderr, working directory and umask,
and torch's thread count restored afterwards (`--threads` and the CPU backends set it process-wide).

About 0.1 s a call against 2-6 s for a subprocess, which spends most of it importing torch. Tests that need a
real process (argv bytes, torch blocked, signals, exit codes at interpreter level) run one instead."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess


def invoke(*args: str, cwd=None, umask: int | None = None) -> subprocess.CompletedProcess:
    import torch

    from sdengine.cli import main

    out, err, here, threads = io.StringIO(), io.StringIO(), os.getcwd(), torch.get_num_threads()
    saved_umask = os.umask(umask) if umask is not None else None
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exc:  # argparse's own errors and --help
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        os.chdir(here)
        if saved_umask is not None:
            os.umask(saved_umask)
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess(["sdengine", *args], code, out.getvalue(), err.getvalue())

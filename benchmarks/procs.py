"""Child processes of the GPU scripts, in their own process groups, that never outlive the parent.

Each part runs in a new session (so a part's time limit can kill its whole group: inductor's compile workers
too). A new session also escapes the kill a shell's `timeout` sends to the parent's group, so the parent
kills every live child group itself: on SIGTERM, SIGINT or SIGHUP (then it exits with 128 + the signal, as
a process killed by it would) and at exit. A killed device command then leaves no GPU work running.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
from typing import Any

_LIVE: dict[int, subprocess.Popen] = {}
_INSTALLED = False


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL `proc`'s process group (it leads one: started with start_new_session) and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # gone already
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    _LIVE.pop(proc.pid, None)


def kill_all() -> None:
    for proc in list(_LIVE.values()):
        kill_group(proc)


def _on_signal(signum: int, frame: Any) -> None:
    kill_all()
    signal.signal(signum, signal.SIG_DFL)
    sys.stdout.flush()
    os._exit(128 + signum)


def install() -> None:
    """Kill the live children at exit and on SIGTERM/SIGINT/SIGHUP (once per process)."""
    global _INSTALLED
    if _INSTALLED:
        return
    atexit.register(kill_all)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    _INSTALLED = True


def start(cmd: list[str], **kwargs: Any) -> subprocess.Popen:
    """Popen `cmd` in a new session, registered so that the parent's end kills its group."""
    install()
    proc = subprocess.Popen(cmd, start_new_session=True, **kwargs)
    _LIVE[proc.pid] = proc
    return proc


def wait(proc: subprocess.Popen, limit: float) -> int | str:
    """The child's exit code, or "timeout" after `limit` seconds (its group killed)."""
    try:
        rc = proc.wait(timeout=max(limit, 0.1))
    except subprocess.TimeoutExpired:
        kill_group(proc)
        return "timeout"
    kill_group(proc)  # workers it left behind in its group go too
    return rc

"""Helper processes that die with the process that started them.

The memory measurement runs models in a forkserver and a worker forked from it; after a
SIGKILL of the benchmark they would otherwise live on, holding a model in memory. On Linux,
`prctl(PR_SET_PDEATHSIG, SIGKILL)` asks the kernel to kill a process when its parent ends.
The forkserver imports `amg.measure.forkserver_guard` as a preload module; workers call
`die_with_parent` as their initializer. The benchmark process itself is never guarded (it
may rightly outlive its shell).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_parent() -> None:
    """SIGKILL this process when its parent dies (Linux; elsewhere nothing happens)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # not allowed here (a sandbox): the process is merely not guarded
    if os.getppid() == 1:  # the parent died before the request: follow it now
        os._exit(1)


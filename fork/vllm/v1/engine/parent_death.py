# SPDX-License-Identifier: Apache-2.0
"""Fork fix: an engine core ends with the process that started it.

vLLM's engine core runs on when its front end is killed with SIGKILL, which leaves no
exit handler to stop it: it goes on generating for requests nobody reads, then idles,
with its workers and the route-log writer. The kernel's parent-death signal (Linux)
turns that death into the SIGTERM the engine core already handles as a shutdown.
"""

import ctypes
import multiprocessing
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def term_with_parent() -> None:
    """Called in the engine core's process once its SIGTERM handler is installed. The
    kernel follows the thread that started this process: vLLM starts engine cores from
    its front end's main thread."""
    parent = multiprocessing.parent_process()
    if sys.platform != "linux" or parent is None:
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent.pid:  # it died before the call
        os.kill(os.getpid(), signal.SIGTERM)

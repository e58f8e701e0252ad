"""Which process made something: this host's name and whether a process on it is gone.

Leases (``pipeline.context``) and the export's temporary files (``dataset``) carry the host
and pid of the process that made them, so a later run can tell a dead owner's leftovers
from a live owner's work. A pid is only judged on the host that issued it; from any other
host (a shared disk, a shared database) its owner is never presumed dead.
"""

from __future__ import annotations

import os
import re
import socket


def this_host() -> str:
    """This machine's host name, as owners record it."""
    return socket.gethostname()


def host_tag() -> str:
    """This host's name reduced to ``[A-Za-z0-9-]`` (at most 40 characters), for file names."""
    return re.sub(r"[^A-Za-z0-9-]+", "-", this_host())[:40] or "host"


def pid_gone(pid: int) -> bool:
    """True when no process ``pid`` runs on this host. A process of another user counts as
    running (we may not signal it, but it is there)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False

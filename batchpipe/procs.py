"""Which process made something: where its pid means something, and whether it is gone.

Leases (``pipeline.context``) and the export's temporary files (``dataset``) carry the
:func:`pid_home` and pid of the process that made them, so a later run can tell a dead
owner's leftovers from a live owner's work. A pid is only judged where it was issued: the
same host name, boot and PID namespace. From anywhere else (another machine sharing the
disk or the database, a container that shares the host name but not the PIDs, the same
machine before a reboot) its owner is never presumed dead; its lease runs out instead.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import socket
from pathlib import Path


def this_host() -> str:
    """This machine's host name."""
    return socket.gethostname()


@functools.cache
def _pid_scope() -> str:
    """This boot and PID namespace as 8 hex digits; empty where /proc does not tell them.

    The host name alone is not enough: containers with host networking share it while each
    numbers its processes apart, so a pid alive in one is "gone" in the other; and two
    machines (or one machine across a reboot) can share a name.
    """
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""
    return hashlib.sha256(f"{boot} {namespace}".encode()).hexdigest()[:8]


def pid_home() -> str:
    """Where this process's pid is meaningful: ``host/scope`` (``host`` without /proc)."""
    scope = _pid_scope()
    return f"{this_host()}/{scope}" if scope else this_host()


def host_tag() -> str:
    """:func:`pid_home` reduced to ``[A-Za-z0-9-]`` (at most 40 characters), for file names."""
    host = re.sub(r"[^A-Za-z0-9-]+", "-", this_host()) or "host"
    scope = _pid_scope()
    return f"{host[:31]}-{scope}" if scope else host[:40]


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

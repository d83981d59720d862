"""Ports for the servers a run starts, safe when many runs start servers at once.

Choosing a port by binding port 0 and closing the socket leaves a window before the
server binds it: a run started beside this one may be handed the same port, and its
server then answers this run's clients (a gateway with another secret refuses them all
with 4001). So a port is taken from below the kernel's ephemeral range, where no
outgoing connection is ever given one, and reserved for this process's life by a lock
on one byte of a shared file that every other load-generator process checks.
``holds_listener`` then tells whether what answers on a port is the server this run
started (``servers`` waits for its own, never a neighbour's).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import socket
import tempfile
from pathlib import Path

from loadtest.procstat import listening_inodes

LOWEST = 15000  # below: ports that other software is configured to use
LOCKS = Path(tempfile.gettempdir()) / "loadtest-ports.lock"  # byte N locked: port N taken
_held: set[int] = set()
# The lock file, open for this process's life: closing any descriptor of it drops all of
# this process's locks on it, so nothing else here opens it.
_locks: list[int] = []


def ephemeral_low() -> int:
    """The lowest port the kernel gives an outgoing connection."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing on ``host`` is bound to, reserved for this process: another
    process calling this skips it until this one ends."""
    top = ephemeral_low()
    candidates = list(range(LOWEST, top)) if top - LOWEST >= 1000 else []
    random.shuffle(candidates)
    for port in candidates[:2000]:
        if port not in _held and _bindable(host, port) and _reserve(port):
            return port
    while True:  # no room below the ephemeral range: the kernel's choice, still reserved
        with socket.socket() as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port not in _held and _reserve(port):
            return port


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _reserve(port: int) -> bool:
    """Lock byte ``port`` of the lock file (a record lock: the kernel drops it when this
    process ends, however it ends)."""
    if not _locks:
        _locks.append(os.open(LOCKS, os.O_CREAT | os.O_RDWR, 0o666))
    try:
        fcntl.lockf(_locks[0], fcntl.LOCK_EX | fcntl.LOCK_NB, 1, port)
    except OSError:
        return False
    _held.add(port)
    return True


def holds_listener(pid: int, port: int) -> bool | None:
    """Whether process ``pid`` or one of its descendants (a server's workers) holds a
    socket listening on ``port``; None: cannot tell (no such process, or no /proc)."""
    if not Path(f"/proc/{pid}").exists():
        return None
    inodes = listening_inodes(port)
    for member in family(pid):
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{member}/fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in inodes:
                        return True
    return False


def family(pid: int) -> list[int]:
    """``pid`` and its descendants, from the parent ids in /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(proc.name))
    found, todo = [pid], [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found

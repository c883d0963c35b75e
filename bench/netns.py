"""Run Python code inside a network namespace without leaving the benchmark process.

On Linux a network namespace belongs to a *thread*: ``setns(fd, CLONE_NEWNET)`` moves only the
calling thread, and every socket keeps the namespace it was created in. So ``NsThread("ns")`` is
one worker thread that entered namespace ``ns`` once and then runs whatever it is given: an
``httpx.Client`` created and used there talks to ``127.0.0.1`` *of that namespace*, i.e. to a
daemon started with ``ip netns exec ns ...``, and its traffic never touches the emulated link.
Subprocesses started from that thread are in the namespace too (they inherit the thread's).

``NsThread(None)`` is the same worker thread in the current namespace (the loopback profile).
Entering a namespace needs root (CAP_SYS_ADMIN); /proc/thread-self/net shows the thread's view.
"""
from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["NsThread", "enter_netns", "listening"]

CLONE_NEWNET = 0x40000000
T = TypeVar("T")
_libc = ctypes.CDLL(None, use_errno=True)


def enter_netns(name: str) -> None:
    """Moves the calling thread into network namespace ``/run/netns/<name>``."""
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


class NsThread:
    """One worker thread living in network namespace ``ns`` (None: the current one)."""

    def __init__(self, ns: str | None, name: str = "ns"):
        self.ns = ns
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"{name}-{ns or 'root'}",
                                        initializer=enter_netns if ns else None,
                                        initargs=(ns,) if ns else ())
        self.call(lambda: None)     # enter now, so that a failure shows at once

    def call(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """Runs ``fn(*args, **kw)`` in the namespace's thread and returns its result."""
        return self._pool.submit(fn, *args, **kw).result()

    def submit(self, fn: Callable[..., T], *args: Any, **kw: Any):
        return self._pool.submit(fn, *args, **kw)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def listening(port: int) -> bool:
    """True when a TCP socket listens on ``port`` in the *calling thread's* namespace."""
    want = f":{port:04X}"
    for name in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/thread-self/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[1].endswith(want) and fields[3] == "0A":
                return True
    return False

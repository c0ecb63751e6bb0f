"""One run per workdir: `<workdir>/run.lock` is held (fcntl.flock) for the whole run.

The kernel drops a flock when its process dies, however it dies (kill -9 included), so a lock
file left by a dead run is simply taken over; a live run's lock makes a second run stop with
`WorkdirBusyError` naming the holder. The file records the holder (pid, host, start time) for
that message only; the flock is what decides.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from typing import Optional

LOCK_FILE = "run.lock"
_HELD: set[str] = set()  # lock paths this process holds (the CLI locks before the Trainer does)

log = logging.getLogger(__name__)


class WorkdirBusyError(RuntimeError):
    """Another live process is training in this workdir."""


def _holder(text: str) -> str:
    try:
        h = json.loads(text)
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h["time"]))
        return f"pid {h['pid']} on {h['host']}, started {started}"
    except (ValueError, KeyError, TypeError):
        return "an unknown process"


class WorkdirLock:
    """Context manager: `with WorkdirLock(workdir): ...` (raises WorkdirBusyError if taken)."""

    def __init__(self, workdir: str):
        self.path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
        self._fd: Optional[int] = None
        self._nested = False

    def acquire(self) -> None:
        if self.path in _HELD:  # already ours: a second flock would block on ourselves
            self._nested = True
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        previous = os.read(fd, 4096).decode("utf-8", "replace")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise WorkdirBusyError(
                f"workdir {os.path.dirname(self.path)} is in use by another run "
                f"({_holder(previous)}); wait for it to finish or use another --workdir") from None
        if previous.strip():  # the file outlived its process: that run died without cleanup
            log.warning("taking over the stale lock %s of a run that is gone (%s)", self.path,
                        _holder(previous))
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "time": time.time()}).encode())
        self._fd = fd
        _HELD.add(self.path)

    def release(self) -> None:
        if self._fd is None:
            return
        _HELD.discard(self.path)
        try:
            os.ftruncate(self._fd, 0)  # an empty file: released cleanly, not stale
        finally:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

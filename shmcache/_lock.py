"""The segment's writer lock: ``fcntl.flock`` on one open file description per thread.

Why this shape (each point was a measured defect of simpler designs):

* ``flock`` locks belong to the open file description.  Descriptions inherited
  across ``fork`` are shared with the parent, so each *process* needs its own; and
  servers that fork from C (uWSGI's default) never run ``os.register_at_fork``
  hooks, so the owner pid is checked at every use, not only in a fork hook.
* Each *thread* gets its own description too.  Two descriptions exclude each other
  even within one process, so no ``threading.Lock`` is needed — and none can be
  left held by an interrupt or inherited held across a fork.
* Releasing is a single C call on the caller's own description
  (``fcntl.flock(fd, LOCK_UN)``), safe to run whether or not the lock was had.  The
  callers put it first in a ``finally`` whose ``try`` *contains* the acquire, so a
  KeyboardInterrupt or an exception from a signal handler that lands at any
  bytecode (CPython delivers them only after calls and at loop back-edges) can never
  leave the lock held: either the lock was not taken yet, or the ``finally`` runs.
* The kernel drops a ``flock`` when its holder dies, even by SIGKILL; a
  ``multiprocessing.Lock`` would stay held forever.
* ``filelock`` costs ~200 µs an acquire (it opens and closes the file each time);
  this costs ~2 µs uncontended.

Acquiring never blocks in the kernel: it retries a non-blocking ``flock``, first
yielding the CPU a few times, then with a short exponential back-off until the
deadline, so no caller waits longer than the cache's ``lock_timeout``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
import weakref
from typing import Final

from ._errors import SegmentReplacedError

__all__ = ["LOCK_EX_NB", "UNLOCK", "SegmentLock", "flock"]

_FIRST_BACKOFF_S: Final = 20e-6
_MAX_BACKOFF_S: Final = 2e-3
_YIELDS_BEFORE_SLEEP: Final = 8

# Re-exported so callers' ``finally`` blocks release with one C call and no lookup
# that could run Python code.
flock: Final = fcntl.flock
UNLOCK: Final = fcntl.LOCK_UN
LOCK_EX_NB: Final = fcntl.LOCK_EX | fcntl.LOCK_NB


class _ThreadFd:
    """One thread's open file description of the segment, closed when dropped."""

    __slots__ = ("__weakref__", "fd", "pid")

    def __init__(self, fd: int, pid: int) -> None:
        self.fd = fd
        self.pid = pid

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)

    def __del__(self) -> None:  # the thread ended, or the lock was dropped
        self.close()


class SegmentLock:
    """An exclusive, inter-process and inter-thread lock on one segment file.

    Args:
        path: The segment file (used to re-open it when ``/proc/self/fd`` is not
            available).
        fd: An fd of the segment file owned by the caller; the lock opens its own
            descriptions of the same file and never closes ``fd``.
    """

    def __init__(self, path: str, fd: int) -> None:
        self._path = path
        self._source_fd = fd
        stat = os.fstat(fd)
        self._identity = (stat.st_dev, stat.st_ino)
        self._local = threading.local()
        # Every thread's description, so close() can close them all.
        self._all: weakref.WeakSet[_ThreadFd] = weakref.WeakSet()
        self._closed = False

    def _reopen(self) -> int:
        """Open a new file description of the segment file."""
        try:
            new_fd = os.open(f"/proc/self/fd/{self._source_fd}", os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            # No /proc (macOS): re-open by name and make sure it is still our file.
            new_fd = os.open(self._path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        stat = os.fstat(new_fd)
        if (stat.st_dev, stat.st_ino) != self._identity:
            os.close(new_fd)
            raise SegmentReplacedError(
                f"segment {self._path} was replaced while this process had it open; "
                "re-open the cache"
            )
        return new_fd

    def thread_fd(self, pid: int | None = None) -> int:
        """This thread's own description of the segment (made on first use).

        Args:
            pid: ``os.getpid()``, when the caller has just asked (it costs a syscall).

        Returns -1 when the lock is closed or no description could be opened (the
        caller then treats the lock as not had).
        """
        entry: _ThreadFd | None = getattr(self._local, "entry", None)
        if pid is None:
            pid = os.getpid()
        if entry is not None and entry.pid == pid:
            return entry.fd
        if self._closed:
            return -1
        if entry is not None:
            # Inherited across a fork (maybe one made from C): that description is
            # shared with the parent.  Closing our copy leaves the parent's lock be.
            entry.close()
        try:
            entry = _ThreadFd(self._reopen(), pid)
        except OSError:
            return -1
        self._local.entry = entry
        self._all.add(entry)
        return entry.fd

    @staticmethod
    def _try(fd: int) -> bool:
        try:
            fcntl.flock(fd, LOCK_EX_NB)
        except BlockingIOError:
            return False
        except (OSError, ValueError):  # no fd: closed, or it could not be opened
            return False
        return True

    def try_acquire_fd(self, fd: int) -> bool:
        """Take the lock on ``fd`` (from :meth:`thread_fd`) if it is free now."""
        return fd >= 0 and self._try(fd)

    def acquire_fd(self, fd: int, timeout_s: float) -> bool:
        """Take the lock on ``fd`` (from :meth:`thread_fd`), waiting at most ``timeout_s``.

        Returns:
            True if the lock is now held, False if the deadline passed first.
        """
        if fd < 0:
            return False
        if self._try(fd):  # the uncontended case: no clock, no wait
            return True
        deadline = time.monotonic() + timeout_s
        # A holder needs a few µs, but the shortest sleep lasts ~60 µs: yield the CPU
        # a few times before sleeping.
        for _ in range(_YIELDS_BEFORE_SLEEP):
            os.sched_yield()
            if self._try(fd):
                return True
        backoff = _FIRST_BACKOFF_S
        while not self._try(fd):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(backoff, remaining))
            backoff = min(backoff * 2, _MAX_BACKOFF_S)
        return True

    # Convenience forms for callers outside the hot paths (tests, tools).  They are
    # not interrupt-proof on their own: put release() in a finally.

    def try_acquire(self) -> bool:
        """Take the lock for the calling thread if it is free right now."""
        return self.try_acquire_fd(self.thread_fd())

    def acquire(self, timeout_s: float) -> bool:
        """Take the lock for the calling thread, waiting at most ``timeout_s``."""
        return self.acquire_fd(self.thread_fd(), timeout_s)

    def release(self) -> None:
        """Release the calling thread's lock (a no-op if it does not hold it)."""
        entry: _ThreadFd | None = getattr(self._local, "entry", None)
        if entry is not None and entry.fd >= 0 and entry.pid == os.getpid():
            with contextlib.suppress(OSError):
                fcntl.flock(entry.fd, UNLOCK)

    def close(self) -> None:
        """Close every description this lock opened in this process (idempotent)."""
        self._closed = True
        for entry in list(self._all):
            entry.close()  # a fork child's copies too: closing them frees no lock
        self._all = weakref.WeakSet()

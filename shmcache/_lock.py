"""The segment's writer lock: ``fcntl.flock`` on a per-process fd plus a thread lock.

Why not one of the ready-made locks:

* ``flock`` locks belong to the open file description. A child that used an fd
  inherited across ``fork`` would share its parent's lock (neither excludes the
  other, and its unlock would release the parent's), so each process opens its own
  fd: after a fork the child re-opens the file before its first acquire.
* Threads of one process share that fd and are not excluded by ``flock`` either,
  hence the ``threading.Lock`` in front of it.
* The kernel drops a ``flock`` when its holder dies, even by SIGKILL; a
  ``multiprocessing.Lock`` would stay held forever.
* ``filelock`` costs ~200 µs an acquire (it opens and closes the file each time);
  this costs ~2 µs uncontended.

Acquiring never blocks in the kernel: it retries a non-blocking ``flock``, first
yielding the CPU a few times, then with a short exponential back-off until the
deadline, so no caller waits longer than the cache's ``lock_timeout``.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
import weakref
from typing import Final

from ._errors import SegmentReplacedError, ShmCacheError

__all__ = ["SegmentLock"]

_FIRST_BACKOFF_S: Final = 20e-6
_MAX_BACKOFF_S: Final = 2e-3
_YIELDS_BEFORE_SLEEP: Final = 8

# Every live lock, so a fork hook can make each one usable in the child.
_LIVE_LOCKS: weakref.WeakSet[SegmentLock] = weakref.WeakSet()


class SegmentLock:
    """An exclusive, inter-process and inter-thread lock on one segment file.

    Args:
        path: The segment file (used to re-open it after a fork when
            ``/proc/self/fd`` is not available).
        fd: An fd of the segment file owned by the caller; the lock opens its own
            description of the same file and never closes ``fd``.
    """

    def __init__(self, path: str, fd: int) -> None:
        self._path = path
        stat = os.fstat(fd)
        self._identity = (stat.st_dev, stat.st_ino)
        self._thread_lock = threading.Lock()
        self._fd = self._reopen(fd)
        self._pid = os.getpid()
        _LIVE_LOCKS.add(self)

    def _reopen(self, fd: int) -> int:
        """Open a new file description of the same file as ``fd``."""
        proc_path = f"/proc/self/fd/{fd}"
        try:
            new_fd = os.open(proc_path, os.O_RDWR | os.O_CLOEXEC)
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

    def _after_fork_in_child(self) -> None:
        # The inherited description is shared with the parent: leave it to the
        # parent (closing our copy does not release the parent's lock) and open ours.
        self._thread_lock = threading.Lock()
        inherited = self._fd
        try:
            self._fd = self._reopen(inherited)
        except (OSError, ShmCacheError):
            self._fd = -1
        finally:
            if inherited >= 0:
                os.close(inherited)
        self._pid = os.getpid()

    def _try_flock(self) -> bool:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def try_acquire(self) -> bool:
        """Take the lock if it is free right now; never waits."""
        if self._fd < 0 or not self._thread_lock.acquire(blocking=False):
            return False
        if self._try_flock():
            return True
        self._thread_lock.release()
        return False

    def acquire(self, timeout_s: float) -> bool:
        """Take the lock, waiting at most ``timeout_s`` seconds.

        Returns:
            True if the lock is now held, False if the deadline passed first.
        """
        thread_lock = self._thread_lock
        if thread_lock.acquire(False):  # the uncontended case: no clock, no wait
            deadline = None
        else:
            deadline = time.monotonic() + timeout_s
            if not thread_lock.acquire(timeout=timeout_s):
                return False
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
        except (OSError, ValueError):  # no fd: closed, or the re-open after a fork failed
            thread_lock.release()
            return False
        if deadline is None:
            deadline = time.monotonic() + timeout_s
        # A holder needs a few µs, but the shortest sleep lasts ~60 µs: yield the CPU
        # a few times before sleeping.
        for _ in range(_YIELDS_BEFORE_SLEEP):
            os.sched_yield()
            if self._try_flock():
                return True
        backoff = _FIRST_BACKOFF_S
        while not self._try_flock():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                thread_lock.release()
                return False
            time.sleep(min(backoff, remaining))
            backoff = min(backoff * 2, _MAX_BACKOFF_S)
        return True

    def release(self) -> None:
        """Release the lock held by this thread."""
        try:
            if self._fd >= 0:  # closed meanwhile: closing dropped the flock already
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()

    def close(self) -> None:
        """Close this process's lock fd (idempotent)."""
        _LIVE_LOCKS.discard(self)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _reinit_locks_in_child() -> None:
    for lock in list(_LIVE_LOCKS):
        lock._after_fork_in_child()


os.register_at_fork(after_in_child=_reinit_locks_in_child)

"""Helpers shared by the hardening tests: forked children with deadlines, raw
segment access, and value bookkeeping.

Every child is a real process (``os.fork``); the parent waits for it with an
explicit deadline and kills it in ``finally`` so no test leaves a straggler.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Final

HEAD_WORD_BYTE: Final = 32 * 8  # byte offset of the log head word in the header
TAIL_WORD_BYTE: Final = 33 * 8
BUSY_WORD_BYTE: Final = 34 * 8


class ChildTimeout(AssertionError):
    """A child process did not finish before its deadline (a hang)."""


@contextlib.contextmanager
def forked(target: Callable[[], int]) -> Iterator[int]:
    """Fork a child that runs ``target`` and ``os._exit``s with its return value.

    Yields the child's pid; on exit the child is SIGKILLed if still alive and
    reaped, so a failing test never leaves it behind.
    """
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            code = target()
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 99
        finally:
            os._exit(code)
    try:
        yield pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def wait_exit(pid: int, deadline_s: float) -> int:
    """Wait for ``pid`` to end within ``deadline_s`` seconds; return its wait status.

    Raises:
        ChildTimeout: the child is still running at the deadline.
    """
    end = time.monotonic() + deadline_s
    delay = 0.001
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() >= end:
            raise ChildTimeout(f"child {pid} still running after {deadline_s} s")
        time.sleep(delay)  # polling with a deadline, not synchronisation by sleep
        delay = min(delay * 2, 0.02)


def run_in_child(target: Callable[[], int], deadline_s: float) -> int:
    """Run ``target`` in a forked child; return its exit code (raise on hang)."""
    with forked(target) as pid:
        status = wait_exit(pid, deadline_s)
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def poke(path: str, offset: int, data: bytes) -> None:
    """Overwrite bytes of a segment file from outside the cache (``pwrite``)."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def peek(path: str, offset: int, length: int) -> bytes:
    """Read bytes of a segment file from outside the cache (``pread``)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)

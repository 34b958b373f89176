"""The writer lock: excludes processes and threads, bounded waits, released on death."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from shmcache._lock import SegmentLock


@pytest.fixture
def lock_file(tmp_path: Path) -> str:
    path = tmp_path / "segment"
    path.write_bytes(b"\0" * 64)
    return str(path)


def _open_lock(path: str) -> SegmentLock:
    fd = os.open(path, os.O_RDWR)
    try:
        return SegmentLock(path, fd)
    finally:
        os.close(fd)


def _hold_until_killed(path: str, ready: int) -> None:
    lock = _open_lock(path)
    assert lock.acquire(5)
    os.write(ready, b"1")
    while True:
        time.sleep(60)  # only SIGKILL ends this


def test_other_process_is_excluded_then_kernel_releases_on_sigkill(lock_file: str) -> None:
    read_fd, write_fd = os.pipe()
    child = multiprocessing.get_context("fork").Process(
        target=_hold_until_killed, args=(lock_file, write_fd)
    )
    child.start()
    try:
        assert os.read(read_fd, 1) == b"1"
        lock = _open_lock(lock_file)
        assert lock.acquire(0.05) is False
        assert lock.try_acquire() is False
        os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
        child.join(10)
        assert lock.acquire(5) is True
        lock.release()
        lock.close()
    finally:
        if child.is_alive():
            child.kill()
        child.join(10)
        os.close(read_fd)
        os.close(write_fd)


def test_acquire_gives_up_at_the_deadline(lock_file: str) -> None:
    holder, waiter = _open_lock(lock_file), _open_lock(lock_file)
    assert holder.acquire(1)
    started = time.monotonic()
    assert waiter.acquire(0.1) is False
    assert time.monotonic() - started < 5  # bounded, not a benchmark
    holder.release()
    assert waiter.acquire(0.1) is True
    waiter.release()
    holder.close()
    waiter.close()


def test_threads_sharing_one_lock_are_excluded(lock_file: str) -> None:
    lock = _open_lock(lock_file)
    inside = 0
    overlaps = 0

    def work() -> None:
        nonlocal inside, overlaps
        for _ in range(2000):
            assert lock.acquire(10)
            inside += 1
            if inside != 1:
                overlaps += 1
            inside -= 1
            lock.release()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert overlaps == 0
    lock.close()


def test_close_is_idempotent_and_unusable_after(lock_file: str) -> None:
    lock = _open_lock(lock_file)
    lock.close()
    lock.close()
    assert lock.try_acquire() is False
    assert lock.acquire(0.01) is False

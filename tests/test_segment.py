"""Segment files: creation races, atomic creation, naming."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

from _samples import CacheFactory

from shmcache import SharedMemoryCache
from shmcache._segment import check_name, default_directory, segment_path


def _open_and_report(directory: str) -> tuple[int, int]:
    cache = SharedMemoryCache("herd", directory=directory, size_bytes=2 << 20)
    info = os.stat(cache.path)
    cache.close()
    return info.st_ino, info.st_size


def test_many_processes_creating_at_once_share_one_segment(cache_dir: Path) -> None:
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        results = pool.map(_open_and_report, [str(cache_dir)] * 8)
    assert len(set(results)) == 1 and results[0][1] == 2 << 20
    leftovers = [p.name for p in cache_dir.iterdir() if ".tmp-" in p.name]
    assert leftovers == []
    (cache_dir / "herd.v1.shm").unlink()


def test_stale_temp_file_of_a_dead_creator_is_removed(cache_dir: Path) -> None:
    cache_dir.mkdir(mode=0o700)
    # A creator killed mid-creation leaves its temp file; pid 2**22+1 is never alive.
    stale = cache_dir / f".late.v1.shm.tmp-{2**22 + 1}"
    stale.write_bytes(b"half made")
    cache = SharedMemoryCache("late", directory=cache_dir, size_bytes=1 << 20)
    assert not stale.exists()
    assert cache.stats().entries == 0
    cache.close()
    cache.unlink()


def test_segment_name_carries_the_format_version(tmp_path: Path) -> None:
    assert segment_path(str(tmp_path), "app", 7) == str(tmp_path / "app.v7.shm")
    assert check_name("a.b-c_1") == "a.b-c_1"
    assert default_directory().endswith(f"shmcache-{os.geteuid()}")


def test_default_directory_is_used_and_private(make_cache: CacheFactory) -> None:
    cache = SharedMemoryCache("default-dir-test", size_bytes=1 << 20)
    try:
        assert os.path.dirname(cache.path) == default_directory()
        assert os.stat(default_directory()).st_mode & 0o777 == 0o700
    finally:
        cache.close()
        cache.unlink()


def _hold_creation_lock(lock_path: str, ready: int) -> None:
    import fcntl
    import time

    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(ready, b"1")
    while True:
        time.sleep(60)  # a stopped creator: only SIGKILL ends this


def test_a_stuck_creator_delays_opening_by_at_most_lock_timeout(cache_dir: Path) -> None:
    import signal
    import time

    cache_dir.mkdir(mode=0o700)
    read_fd, write_fd = os.pipe()
    holder = multiprocessing.get_context("fork").Process(
        target=_hold_creation_lock, args=(str(cache_dir / ".stuck.v1.shm.lock"), write_fd)
    )
    holder.start()
    try:
        assert os.read(read_fd, 1) == b"1"
        started = time.monotonic()
        cache = SharedMemoryCache("stuck", directory=cache_dir, lock_timeout=0.2)
        assert time.monotonic() - started < 10  # not the old 30 s wait: a liveness bound
        assert cache.lookup("p", "l") is None
        cache.close()
        cache.unlink()
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # type: ignore[arg-type]
        holder.join(10)
        os.close(read_fd)
        os.close(write_fd)

"""Segment files: creation races, atomic creation, naming, and errors at open."""

from __future__ import annotations

import contextlib
import errno
import multiprocessing
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _hardening_helpers import Children, read_json_from, write_json_to
from _samples import CacheFactory

from shmcache import (
    InvalidArgumentError,
    SegmentDirectoryError,
    SegmentOpenError,
    SegmentPermissionError,
    SharedMemoryCache,
    ShmCacheError,
)
from shmcache._arena import FORMAT_VERSION
from shmcache._segment import check_name, default_directory, segment_path

V = f"v{FORMAT_VERSION}"
NOBODY = 65534


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
    (cache_dir / f"herd.{V}.shm").unlink()


def test_stale_temp_file_of_a_dead_creator_is_removed(cache_dir: Path) -> None:
    cache_dir.mkdir(mode=0o700)
    # A creator killed mid-creation leaves its temp file; pid 2**22+1 is never alive.
    stale = cache_dir / f".late.{V}.shm.tmp-{2**22 + 1}"
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
        target=_hold_creation_lock, args=(str(cache_dir / f".stuck.{V}.shm.lock"), write_fd)
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


# -- errors at open: ShmCacheErrors that name the path given and what to do (defect 6) --


def _open_error(directory: object, name: str = "app") -> BaseException:
    with pytest.raises(ShmCacheError) as raised:
        SharedMemoryCache(name, directory=directory, size_bytes=1 << 20)  # type: ignore[arg-type]
    return raised.value


def _assert_helpful(exc: BaseException, *named: str) -> None:
    message = str(exc)
    for text in named:
        assert text in message, message
    assert ".tmp-" not in message  # never the internal temp file
    assert "directory=" in message  # says what to pass instead


@pytest.mark.parametrize(
    "name", ["", ".hidden", "a b", "x" * 65, "../etc", "a/b", "caf\u00e9", "nul\0"]
)
def test_invalid_names_are_invalid_argument_errors(name: str, tmp_path: Path) -> None:
    exc = _open_error(tmp_path, name)
    assert isinstance(exc, InvalidArgumentError) and isinstance(exc, ValueError)
    assert "invalid cache name" in str(exc)
    assert list(tmp_path.iterdir()) == []  # refused before anything was made


def test_a_name_of_the_wrong_type_stays_a_plain_type_error(tmp_path: Path) -> None:
    with pytest.raises(TypeError) as raised:
        SharedMemoryCache(b"app", directory=tmp_path)  # type: ignore[arg-type]
    assert not isinstance(raised.value, ShmCacheError)


def test_directory_that_is_a_regular_file(tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    exc = _open_error(a_file)
    assert isinstance(exc, SegmentDirectoryError) and isinstance(exc, NotADirectoryError)
    assert exc.errno == errno.ENOTDIR
    _assert_helpful(exc, str(a_file), "regular file")
    assert a_file.read_text() == "not a directory"


def test_directory_under_a_regular_file(tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    exc = _open_error(a_file / "sub" / "deeper")
    assert isinstance(exc, NotADirectoryError) and isinstance(exc, ShmCacheError)
    _assert_helpful(exc, str(a_file / "sub" / "deeper"), f"{str(a_file)!r} is a regular file")


def test_directory_that_is_a_dangling_symlink(tmp_path: Path) -> None:
    link = tmp_path / "link"
    os.symlink(tmp_path / "gone", link)
    exc = _open_error(link)
    assert isinstance(exc, FileNotFoundError) and isinstance(exc, ShmCacheError)
    _assert_helpful(exc, str(link), "does not exist")


@pytest.mark.parametrize("directory", ["", "nul\0byte"])
def test_empty_or_nul_directory_is_an_invalid_argument(directory: str) -> None:
    exc = _open_error(directory)
    assert isinstance(exc, InvalidArgumentError) and isinstance(exc, ValueError)
    _assert_helpful(exc)
    assert ("empty path" if not directory else "NUL") in str(exc)


def test_directory_of_the_wrong_type_stays_a_plain_type_error() -> None:
    with pytest.raises(TypeError) as raised:
        SharedMemoryCache("app", directory=42)  # type: ignore[arg-type]
    assert not isinstance(raised.value, ShmCacheError)


def _open_as(uid: int, directory: str) -> dict[str, Any]:
    """Open a cache in a child running as ``uid``; return what it raised, as JSON."""
    read_fd, write_fd = os.pipe()

    def child() -> int:
        os.close(read_fd)
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        try:
            SharedMemoryCache("app", directory=directory, size_bytes=1 << 20).close()
        except BaseException as exc:
            write_json_to(write_fd, {
                "classes": [cls.__name__ for cls in type(exc).__mro__],
                "errno": getattr(exc, "errno", None),
                "message": str(exc),
            })
            return 0
        write_json_to(write_fd, {"classes": [], "errno": None, "message": "opened"})
        return 0

    with Children() as children:
        pid = children.spawn(child)
        os.close(write_fd)
        try:
            result: dict[str, Any] = read_json_from(read_fd, 30.0)
        finally:
            os.close(read_fd)
        assert children.wait(pid, 30.0) == 0
    return result


@contextlib.contextmanager
def _read_only_directory(tmp_path: Path) -> Iterator[tuple[str, Callable[[str], dict[str, Any]]]]:
    """A directory the opener may not write (mode 0500), and how to open a cache there.

    root bypasses file modes, so as root the cache is opened in a child that drops
    to an unprivileged uid and owns the directory; otherwise in this process.
    """
    if os.geteuid() != 0:
        directory = tmp_path / "read-only"
        directory.mkdir(mode=0o500)
        try:
            yield str(directory), lambda d: _open_in_process(d)
        finally:
            directory.chmod(0o700)
        return
    # A directory nobody can reach: pytest's tmp_path is private to root.
    base = tempfile.mkdtemp(prefix="shmcache-ro-")
    try:
        os.chown(base, NOBODY, NOBODY)
        os.chmod(base, 0o500)
        yield base, lambda d: _open_as(NOBODY, d)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _open_in_process(directory: str) -> dict[str, Any]:
    try:
        SharedMemoryCache("app", directory=directory, size_bytes=1 << 20).close()
    except BaseException as exc:
        return {"classes": [cls.__name__ for cls in type(exc).__mro__],
                "errno": getattr(exc, "errno", None), "message": str(exc)}
    return {"classes": [], "errno": None, "message": "opened"}


def test_read_only_directory_is_a_permission_error_naming_it(tmp_path: Path) -> None:
    with _read_only_directory(tmp_path) as (directory, open_there):
        result = open_there(directory)
        assert SegmentPermissionError.__name__ in result["classes"], result
        assert {"ShmCacheError", "PermissionError"} <= set(result["classes"])
        assert result["errno"] in (errno.EACCES, errno.EPERM)
        message = result["message"]
        assert directory in message and "permission denied" in message
        assert ".tmp-" not in message and "directory=" in message
        assert os.listdir(directory) == []  # no temp file, no lock file left


def test_missing_directory_under_a_read_only_one(tmp_path: Path) -> None:
    with _read_only_directory(tmp_path) as (directory, open_there):
        wanted = os.path.join(directory, "sub", "segments")
        result = open_there(wanted)
        assert SegmentPermissionError.__name__ in result["classes"], result
        message = result["message"]
        assert wanted in message and f"permission denied in {directory}" in message
        assert "mkdir" in message and "directory=" in message
        assert os.listdir(directory) == []


@contextlib.contextmanager
def _read_only_mount(tmp_path: Path) -> Iterator[Path]:
    """A read-only tmpfs (needs root and the right to mount); skips otherwise."""
    mount_point = tmp_path / "ro-mount"
    mount_point.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a read-only tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m,mode=0700", "tmpfs", str(mount_point)],
        capture_output=True, timeout=30, check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace')}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, timeout=30,
                       check=False)


@pytest.mark.parametrize("below", ["", "sub"])
def test_read_only_file_system(tmp_path: Path, below: str) -> None:
    with _read_only_mount(tmp_path) as mount_point:
        directory = mount_point / below if below else mount_point
        exc = _open_error(directory)
        assert isinstance(exc, SegmentOpenError) and isinstance(exc, OSError)
        assert exc.errno == errno.EROFS
        _assert_helpful(exc, str(mount_point), "read-only file system")

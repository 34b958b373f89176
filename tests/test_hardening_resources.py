"""Resource limits: a full tmpfs, file descriptors, temp files, a truncated segment."""

from __future__ import annotations

import errno
import faulthandler
import logging
import os
import resource
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from _hardening_helpers import open_fds, poke, run_in_child
from langchain_core.outputs import Generation

from shmcache import SegmentCorruptError, SegmentSpaceError, SharedMemoryCache, ShmCacheError
from shmcache._arena import FORMAT_VERSION

LLM = "llm"
MIB = 1 << 20


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs mounted in a temp dir (root only), unmounted at teardown."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mount_point)],
        capture_output=True, text=True, check=False, timeout=30,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False, timeout=30)


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


@pytest.mark.timeout(60)
def test_full_tmpfs_refuses_creation_cleanly(small_tmpfs: Path) -> None:
    """No room for the segment: SegmentSpaceError (an OSError, ENOSPC) naming the
    remedies, no SIGBUS, no segment or temp file left; caches already there go on."""
    directory = small_tmpfs / "segments"

    def create_too_big() -> int:
        try:
            SharedMemoryCache("big", directory=directory, size_bytes=4 * MIB)
        except SegmentSpaceError as exc:
            assert isinstance(exc, ShmCacheError) and isinstance(exc, OSError)
            assert exc.errno == errno.ENOSPC
            assert "size_bytes" in str(exc) and "directory=" in str(exc)
            return 0
        return 3

    assert run_in_child(create_too_big, deadline_s=30) == 0  # -SIGBUS would show here
    assert not [n for n in _leftovers(directory) if n.endswith(".shm") or ".tmp-" in n]

    # Half full: one 1 MiB cache fits, then a filler leaves less than 1 MiB free.
    with SharedMemoryCache("fits", directory=directory, size_bytes=MIB) as fits:
        fits.update("p", LLM, [Generation(text="kept")])
        (small_tmpfs / "filler").write_bytes(b"\0" * (MIB // 2))
        assert run_in_child(
            lambda: 0 if _refused(directory, "nofit", MIB) else 3, deadline_s=30
        ) == 0
        assert fits.lookup("p", LLM) == [Generation(text="kept")]
        fits.update("q", LLM, [Generation(text="still writable")])
        assert fits.lookup("q", LLM) == [Generation(text="still writable")]
        assert fits.check() == []
        fits.unlink()
    assert not [n for n in _leftovers(directory) if n.endswith(".shm") or ".tmp-" in n]


def _refused(directory: Path, name: str, size: int) -> bool:
    try:
        SharedMemoryCache(name, directory=directory, size_bytes=size)
    except SegmentSpaceError:
        return True
    return False


@pytest.mark.timeout(60)
def test_full_tmpfs_leaves_no_file_at_all(small_tmpfs: Path) -> None:
    """After SegmentSpaceError the directory holds nothing of that name."""
    directory = small_tmpfs / "segments"
    assert run_in_child(lambda: 0 if _refused(directory, "big", 4 * MIB) else 3, 30) == 0
    assert _leftovers(directory) == []


@pytest.mark.timeout(120)
def test_fd_count_and_files_stable_over_1000_open_close_cycles(tmp_path: Path) -> None:
    """1,000 open/close cycles (every tenth creates and removes another segment), and
    300 refused opens, leave the fd count and the directory as they were."""
    directory = tmp_path / "segments"
    keeper = SharedMemoryCache("keep", directory=directory, size_bytes=MIB)
    try:
        keeper.update("p", LLM, [Generation(text="v")])
        keeper.lookup("p", LLM)  # its first count makes the owner-slot file, once
        for broken in ("link", "mode", "header"):
            made = SharedMemoryCache(broken, directory=directory, size_bytes=MIB)
            made.close()
        os.rename(directory / f"link.v{FORMAT_VERSION}.shm", directory / "elsewhere")
        os.symlink(directory / "elsewhere", directory / f"link.v{FORMAT_VERSION}.shm")
        os.chmod(directory / f"mode.v{FORMAT_VERSION}.shm", 0o640)
        poke(str(directory / f"header.v{FORMAT_VERSION}.shm"), 0, b"garbage!")
        files_before = _leftovers(directory)
        fds_before = open_fds()
        for i in range(1000):
            with SharedMemoryCache("keep", directory=directory, size_bytes=MIB) as cache:
                assert cache.lookup("p", LLM) == [Generation(text="v")]
            if i % 10 == 0:
                other = SharedMemoryCache(f"tmp{i}", directory=directory, size_bytes=MIB)
                other.update("x", LLM, [Generation(text="y")])
                other.close()
                other.unlink()
        for i in range(300):
            with pytest.raises(ShmCacheError):
                SharedMemoryCache(("link", "mode", "header")[i % 3], directory=directory)
        assert open_fds() == fds_before
        assert _leftovers(directory) == files_before
    finally:
        keeper.close()
        keeper.unlink()


def _open_with_few_fds() -> int:
    """In a child: open a cache with only 1..5 fds free; each attempt must succeed or
    raise OSError/ShmCacheError, and leak no fd.  Returns 0 when all did."""
    logging.disable(logging.WARNING)
    directory = os.environ["SHMCACHE_FD_TEST_DIR"]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    bad = []
    for free in range(1, 6):
        before = set(os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, hard))
        fillers = []
        try:
            while True:
                fillers.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass
        for _ in range(free):
            os.close(fillers.pop())
        outcome = "ok"
        try:
            SharedMemoryCache("few", directory=directory, size_bytes=MIB).close()
        except (OSError, ShmCacheError):
            outcome = "refused"
        except BaseException as exc:  # what the contract rules out
            outcome = f"{type(exc).__name__}: {exc}"
            bad.append(outcome)
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        leaked = set(os.listdir("/proc/self/fd")) - before
        if leaked:
            bad.append(f"{free} free fds: {outcome}, leaked fds {sorted(leaked)}")
    if bad:
        print(bad)
    return 0 if not bad else 1


@pytest.mark.timeout(60)
def test_open_with_fds_nearly_exhausted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Near the fd limit an open either works or fails cleanly, leaking nothing."""
    with SharedMemoryCache("few", directory=tmp_path, size_bytes=MIB) as cache:
        cache.update("p", LLM, [Generation(text="v")])
        monkeypatch.setenv("SHMCACHE_FD_TEST_DIR", str(tmp_path))
        try:
            assert run_in_child(_open_with_few_fds, deadline_s=30) == 0
        finally:
            cache.unlink()


@pytest.mark.timeout(60)
def test_segment_truncated_from_outside_is_sigbus_not_a_wrong_answer(tmp_path: Path) -> None:
    """Documents what is *not* promised: a segment truncated under a process that maps
    it kills that process with SIGBUS when it touches the lost pages.  A process that
    opens it afterwards gets SegmentCorruptError naming `shmcache rm`."""
    cache = SharedMemoryCache("cut", directory=tmp_path, size_bytes=MIB)
    try:
        for i in range(200):
            cache.update(f"p{i}", LLM, [Generation(text=f"v{i} " + "z" * 3000)])

        def reader() -> int:
            faulthandler.disable()  # the SIGBUS is expected: no traceback dump
            os.truncate(cache.path, 8192)
            for i in range(200):
                cache.lookup(f"p{i}", LLM)
            return 0

        assert run_in_child(reader, deadline_s=30) == -signal.SIGBUS
        with pytest.raises(SegmentCorruptError, match="shmcache rm cut"):
            SharedMemoryCache("cut", directory=tmp_path, size_bytes=MIB)
    finally:
        cache.unlink()

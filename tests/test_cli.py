"""The ``shmcache`` command, run as a real subprocess."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _hardening_helpers import Children, kill_at_step, wait_exit, wait_stopped
from _samples import CacheFactory, text_generations

import shmcache._arena
from shmcache import SharedMemoryCache
from shmcache._arena import FORMAT_VERSION
from shmcache.cli import _flock_holder

V: str = f"v{FORMAT_VERSION}"
# Liveness bounds for commands behind a stopped lock holder: generous (they cover
# the interpreter's start), yet far below the old 5.5 s / 10.5 s.
READ_ONLY_BOUND_S = 2.0
LOCK_TIMEOUT_S = 1.5
SLACK_S = 1.0


def run_cli(*args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shmcache", *args],
        capture_output=True, text=True, timeout=timeout_s, check=False,
    )


@pytest.fixture
def filled(make_cache: CacheFactory) -> SharedMemoryCache:
    cache = make_cache("cli")
    cache.update("p1", "llm-a", text_generations("one"))
    cache.update("p2", "llm-b", text_generations("two"))
    cache.lookup("p1", "llm-a")
    cache.flush()
    return cache


def test_ls_lists_caches(filled: SharedMemoryCache, cache_dir: Path) -> None:
    (cache_dir / "old.v0.shm").write_bytes(b"an older release's segment")
    result = run_cli("ls", "--directory", str(cache_dir))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["NAME", "FORMAT", "SIZE"]
    assert any(line.split()[:4] == ["cli", V, "1.0", "MiB"] for line in lines)
    assert any(line.startswith("old") and "other shmcache release" in line for line in lines)
    assert (cache_dir / "old.v0.shm").read_bytes() == b"an older release's segment"


def test_ls_empty_directory(tmp_path: Path) -> None:
    result = run_cli("ls", "--directory", str(tmp_path))
    assert result.returncode == 0 and "no caches" in result.stdout


def test_stats_json_counts_nothing_itself(filled: SharedMemoryCache, cache_dir: Path) -> None:
    before = filled.stats()
    result = run_cli("stats", "cli", "--directory", str(cache_dir), "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["entries"] == 2 and data["updates"] == 2 and data["hits"] == 1
    assert data["size_bytes"] == 1 << 20 and data["path"] == filled.path
    # The CLI sums the segment as stats() does: every counter, the same values.
    assert {key: data[key] for key in before.as_dict()} == before.as_dict()
    run_cli("stats", "cli", "--directory", str(cache_dir))
    assert filled.stats() == before


def test_stats_text(filled: SharedMemoryCache, cache_dir: Path) -> None:
    result = run_cli("stats", "cli", "--directory", str(cache_dir))
    assert result.returncode == 0
    assert "entries" in result.stdout and "2" in result.stdout


def test_clear_by_llm_string_then_all(filled: SharedMemoryCache, cache_dir: Path) -> None:
    result = run_cli("clear", "cli", "--llm-string", "llm-a", "--directory", str(cache_dir))
    assert result.returncode == 0, result.stderr
    assert filled.lookup("p1", "llm-a") is None
    assert filled.lookup("p2", "llm-b") == text_generations("two")
    assert run_cli("clear", "cli", "--directory", str(cache_dir)).returncode == 0
    assert filled.lookup("p2", "llm-b") is None
    assert filled.stats().entries == 0


def test_check_ok_then_damaged(filled: SharedMemoryCache, cache_dir: Path) -> None:
    ok = run_cli("check", "cli", "--directory", str(cache_dir))
    assert ok.returncode == 0 and ok.stdout.startswith("ok:")
    data = Path(filled.path).read_bytes()
    at = data.index(b"one")
    with open(filled.path, "r+b") as handle:
        handle.seek(at)
        handle.write(b"ONE")
    bad = run_cli("check", "cli", "--directory", str(cache_dir))
    assert bad.returncode == 1
    assert "DAMAGED" in bad.stdout and "crc" in bad.stdout
    assert filled.lookup("p1", "llm-a") is None  # never the damaged value


def test_check_damaged_header(filled: SharedMemoryCache, cache_dir: Path) -> None:
    with open(filled.path, "r+b") as handle:
        handle.write(b"NOTACACHE")
    result = run_cli("check", "cli", "--directory", str(cache_dir))
    assert result.returncode == 1
    assert "shmcache rm cli" in result.stdout


def test_rm_removes_the_segment(filled: SharedMemoryCache, cache_dir: Path) -> None:
    result = run_cli("rm", "cli", "--directory", str(cache_dir))
    assert result.returncode == 0
    assert not Path(filled.path).exists()
    assert list(cache_dir.glob(".cli.*")) == []  # its lock and owner-slot files too
    assert filled.lookup("p2", "llm-b") == text_generations("two")  # still attached
    again = run_cli("rm", "cli", "--directory", str(cache_dir))
    assert again.returncode == 2 and "no cache named" in again.stderr


@pytest.mark.parametrize("command", ["stats", "clear", "check"])
def test_missing_cache_is_an_error_and_is_not_created(command: str, tmp_path: Path) -> None:
    result = run_cli(command, "absent", "--directory", str(tmp_path))
    assert result.returncode != 0
    assert "no cache named 'absent'" in result.stderr + result.stdout
    assert not (tmp_path / f"absent.{V}.shm").exists()


def test_bad_name_and_usage(tmp_path: Path) -> None:
    bad = run_cli("stats", "../etc", "--directory", str(tmp_path))
    assert bad.returncode == 2 and "invalid cache name" in bad.stderr
    assert run_cli().returncode == 2
    assert run_cli("frobnicate").returncode == 2


def test_bad_lock_timeout_is_a_usage_error(filled: SharedMemoryCache, cache_dir: Path) -> None:
    for bad in ("0", "-1", "nan", "inf", "soon"):
        result = run_cli("check", "cli", "--directory", str(cache_dir), "--lock-timeout", bad)
        assert result.returncode == 2 and "--lock-timeout" in result.stderr, bad


def test_bad_directory_is_reported_not_a_traceback(tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    for command in (["ls"], ["stats", "x"], ["check", "x"]):
        result = run_cli(*command, "--directory", str(a_file))
        assert result.returncode != 0
        assert "not usable as a cache directory" in result.stderr
        assert "Traceback" not in result.stderr
    empty = run_cli("ls", "--directory", "")
    assert empty.returncode == 2 and "empty path" in empty.stderr


# -- ls notes what is not a cache (defect 7) ----------------------------------------


def test_ls_lists_the_caches_and_notes_the_other_files(
    filled: SharedMemoryCache, cache_dir: Path
) -> None:
    planted = {
        f"bad name.{V}.shm": b"",
        f".hidden.{V}.shm": b"",
        f".cli.{V}.shm.tmp-{2**22 + 1}.abcd": b"half made",  # a dead creator's temp file
        "notes.txt": b"hello",
        "old.v0.shm": b"an older release's segment",
        b"odd\xffname.shm".decode(errors="surrogateescape"): b"",
    }
    for entry, data in planted.items():
        (cache_dir / entry).write_bytes(data)
    (cache_dir / "subdir").mkdir()
    result = run_cli("ls", "--directory", str(cache_dir))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    table, _, rest = out.partition("other files")
    assert any(line.split()[:2] == ["cli", V] for line in table.splitlines()), out
    assert "old" in table and "other shmcache release" in table
    assert f"bad name.{V}.shm" in rest and "not a valid cache name" in rest
    assert f".hidden.{V}.shm" in rest
    assert "creator that died" in rest
    assert "notes.txt" in rest and "subdir" in rest
    assert "odd" in rest  # printed escaped, not a UnicodeEncodeError
    assert ".lock" not in out and ".owners" not in out  # the package's own files
    for entry, data in planted.items():
        assert (cache_dir / entry).read_bytes() == data  # left alone


def test_ls_with_only_other_files_says_no_caches(tmp_path: Path) -> None:
    (tmp_path / f"bad name.{V}.shm").write_bytes(b"")
    result = run_cli("ls", "--directory", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "no caches" in result.stdout and "bad name" in result.stdout


def test_ls_reports_a_damaged_or_refused_segment_and_goes_on(
    filled: SharedMemoryCache, make_cache: CacheFactory, cache_dir: Path
) -> None:
    other = make_cache("other")
    with open(other.path, "r+b") as handle:
        handle.write(b"NOTACACHE")
    (cache_dir / f"short.{V}.shm").write_bytes(b"tiny")
    os.chmod(cache_dir / f"short.{V}.shm", 0o600)
    (cache_dir / f"shared.{V}.shm").write_bytes(b"\0" * (1 << 20))
    os.chmod(cache_dir / f"shared.{V}.shm", 0o644)
    result = run_cli("ls", "--directory", str(cache_dir))
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    assert "hits" in rows["cli"]
    assert "DAMAGED" in rows["other"] and "shmcache rm other" in rows["other"]
    assert "DAMAGED" in rows["short"]
    assert "cannot read" in rows["shared"] and "0644" in rows["shared"]


def test_stats_and_ls_write_nothing(make_cache: CacheFactory, cache_dir: Path) -> None:
    cache = make_cache("quiet")
    cache.update("p", "llm", text_generations("v"))
    cache.lookup("p", "llm")
    cache.close()
    for companion in cache_dir.glob(".quiet.*"):
        companion.unlink()  # its creation lock and owner-slot file
    before = Path(cache.path).read_bytes()
    assert run_cli("stats", "quiet", "--directory", str(cache_dir)).returncode == 0
    assert run_cli("ls", "--directory", str(cache_dir)).returncode == 0
    # Not a byte changed (no counter slot claimed, nothing repaired) and no file made.
    assert Path(cache.path).read_bytes() == before
    assert sorted(p.name for p in cache_dir.iterdir()) == [f"quiet.{V}.shm"]


# -- behind a stopped lock holder (defect 8) -------------------------------------------


def _update_and_stop_holding_the_lock(directory: Path) -> int:
    """Child: a writer that SIGSTOPs itself in the middle of a public update()."""
    cache = SharedMemoryCache("cli", directory=directory, size_bytes=1 << 20)
    shmcache._arena.step_hook = kill_at_step(1, signal.SIGSTOP)  # step 1: write begun
    cache.update("held", "llm-a", text_generations("held"))
    shmcache._arena.step_hook = None
    cache.close()
    return 0


@contextlib.contextmanager
def _stopped_lock_holder(directory: Path) -> Iterator[int]:
    """A child process stopped while it holds the cache's writer lock; yields its pid.

    On exit it is resumed and killed (if it is still there) and reaped.
    """
    with Children() as children:
        pid = children.spawn(lambda: _update_and_stop_holding_the_lock(directory))
        try:
            wait_stopped(pid, 10.0)
            yield pid
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    # Children's exit SIGKILLed and reaped whatever was left.


def _resume_and_reap(pid: int) -> int:
    os.kill(pid, signal.SIGCONT)
    return wait_exit(pid, 10.0)


def test_stats_and_ls_answer_at_once_behind_a_stopped_lock_holder(
    filled: SharedMemoryCache, cache_dir: Path
) -> None:
    before = filled.stats()
    with _stopped_lock_holder(cache_dir):
        # A subprocess timeout is the bound: no micro-benchmark.
        stats = run_cli("stats", "cli", "--directory", str(cache_dir), "--json",
                        timeout_s=READ_ONLY_BOUND_S)
        listing = run_cli("ls", "--directory", str(cache_dir), timeout_s=READ_ONLY_BOUND_S)
    assert stats.returncode == 0, stats.stderr
    data = json.loads(stats.stdout)
    assert data["entries"] == before.entries and data["hits"] == before.hits
    assert listing.returncode == 0, listing.stderr
    assert any(line.split()[:2] == ["cli", V] for line in listing.stdout.splitlines())


@pytest.mark.parametrize("command", [["check"], ["clear"], ["clear", "--llm-string", "llm-a"]])
def test_check_and_clear_give_up_after_one_lock_timeout_and_name_the_holder(
    filled: SharedMemoryCache, cache_dir: Path, command: list[str]
) -> None:
    baseline_started = time.monotonic()
    assert run_cli("ls", "--directory", str(cache_dir)).returncode == 0
    startup_s = time.monotonic() - baseline_started  # the interpreter's start, roughly
    args = [*command[:1], "cli", *command[1:], "--directory", str(cache_dir),
            "--lock-timeout", str(LOCK_TIMEOUT_S)]
    with _stopped_lock_holder(cache_dir) as holder:
        started = time.monotonic()
        result = run_cli(*args, timeout_s=startup_s + 2 * LOCK_TIMEOUT_S + 10)
        elapsed = time.monotonic() - started
        assert result.returncode == 3, (result.stdout, result.stderr)
        # It waited for the lock once, not twice (2 x 1.5 s would exceed the bound).
        assert LOCK_TIMEOUT_S <= elapsed < startup_s + LOCK_TIMEOUT_S + SLACK_S, elapsed
        message = result.stderr
        assert f"pid {holder}" in message and "stopped" in message
        assert f"kill -CONT {holder}" in message
        assert "shmcache check" not in message + result.stdout  # not the command that failed
        assert filled.lookup("p2", "llm-b") == text_generations("two")  # nothing cleared
        # Resumed, the holder finishes its update and the command goes through.
        assert os.WIFEXITED(status := _resume_and_reap(holder)) and os.WEXITSTATUS(status) == 0
        again = run_cli(*args)
        assert again.returncode == 0, (again.stdout, again.stderr)


def test_flock_holder_is_found_in_proc_locks(tmp_path: Path) -> None:
    """The fallback when the segment names no holder (a lock taken by other code)."""
    if not os.path.exists("/proc/locks"):
        pytest.skip("no /proc/locks on this system")
    target = tmp_path / "locked"
    target.write_bytes(b"")
    read_fd, write_fd = os.pipe()

    def hold() -> int:
        fd = os.open(target, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(write_fd, b"1")
        os.kill(os.getpid(), signal.SIGSTOP)
        return 0

    try:
        with Children() as children:
            pid = children.spawn(hold)
            assert os.read(read_fd, 1) == b"1"
            assert _flock_holder(str(target)) == pid
            children.kill(pid)
        assert _flock_holder(str(target)) is None
    finally:
        os.close(read_fd)
        os.close(write_fd)

"""The ``shmcache`` command, run as a real subprocess."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from _hardening_helpers import Children, kill_at_step, wait_exit, wait_stopped
from _samples import CacheFactory, text_generations
from prometheus_client.parser import text_string_to_metric_families

import shmcache._arena
from shmcache import SharedMemoryCache
from shmcache._arena import FORMAT_VERSION
from shmcache._engine import Engine, Prepared
from shmcache._metrics import render
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
    assert lines[0].split()[:4] == ["NAME", "KIND", "FORMAT", "SIZE"]
    assert any(line.split()[:5] == ["cli", "llm", V, "1.0", "MiB"] for line in lines)
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
    assert any(line.split()[:3] == ["cli", "llm", V] for line in table.splitlines()), out
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
    assert any(line.split()[:3] == ["cli", "llm", V] for line in listing.stdout.splitlines())


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


# -- kinds: byte stores and node caches have their own segments ---------------------

KIND_ENTRIES = 3


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@pytest.fixture
def kind_segment(cache_dir: Path) -> Iterator[Callable[..., Engine]]:
    """Open segments of another kind through the engine every front-end uses, with
    ``KIND_ENTRIES`` entries (``value-0`` ...) and ``hits`` hits; unlinked at teardown."""
    opened: list[Engine] = []

    def make(name: str, kind: str, hits: int = 0) -> Engine:
        engine = Engine(name, kind=kind, owner="test", directory=cache_dir, size_bytes=1 << 20)
        opened.append(engine)
        items = [Prepared(_digest(f"k{i}"), 0, f"value-{i}".encode(), 0.0)
                 for i in range(KIND_ENTRIES)]
        assert engine.put(items)
        for i in range(hits):
            assert engine.get(_digest(f"k{i % KIND_ENTRIES}"), 0, bytes, bytes) is not None
        engine.flush()
        return engine

    yield make
    for engine in opened:
        engine.close()
        engine.unlink()


def _rows(stdout: str) -> list[list[str]]:
    """The table rows of ``ls`` (name, kind, format, ...), header left out."""
    table = stdout.partition("\nother files")[0].splitlines()
    return [line.split() for line in table[1:] if line.strip()]


def test_ls_lists_every_kind(
    filled: SharedMemoryCache, kind_segment: Callable[..., Engine], cache_dir: Path
) -> None:
    kind_segment("cli", "bytes", hits=2)
    kind_segment("emb", "nodes")
    (cache_dir / "old.v0.bytes.shm").write_bytes(b"an older release's byte store")
    result = run_cli("ls", "--directory", str(cache_dir))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].split()[:3] == ["NAME", "KIND", "FORMAT"]
    rows = _rows(result.stdout)
    # By name, then kind (the LLM cache first); each row its own segment's counts.
    assert [row[:3] for row in rows] == [
        ["cli", "llm", V], ["cli", "bytes", V], ["emb", "nodes", V], ["old", "bytes", "v0"],
    ], result.stdout
    # NAME KIND FORMAT SIZE(2) ENTRIES USED(2) NOTE: "H hits / M misses"
    assert rows[0][3:6] == ["1.0", "MiB", "2"] and rows[0][8:] == ["1", "hits", "/", "0", "misses"]
    assert rows[1][5] == str(KIND_ENTRIES) and rows[1][8:] == ["2", "hits", "/", "0", "misses"]
    assert "other shmcache release" in " ".join(rows[3])
    # The companion files of every kind are the package's own: not listed.
    assert list(cache_dir.glob(".cli.*.bytes.shm.*")), "no companion file to leave out"
    assert "other files" not in result.stdout and ".lock" not in result.stdout


def test_stats_of_another_kind(
    filled: SharedMemoryCache, kind_segment: Callable[..., Engine], cache_dir: Path
) -> None:
    store = kind_segment("cli", "bytes", hits=4)
    where = ["--directory", str(cache_dir)]
    result = run_cli("stats", "cli", "--kind", "bytes", *where, "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert (data["kind"], data["path"]) == ("bytes", store.path)
    assert {key: data[key] for key in store.stats().as_dict()} == store.stats().as_dict()
    assert (data["entries"], data["hits"], data["updates"]) == (KIND_ENTRIES, 4, KIND_ENTRIES)
    # The default kind is still the LLM cache of that name.
    llm = json.loads(run_cli("stats", "cli", *where, "--json").stdout)
    assert (llm["kind"], llm["entries"], llm["path"]) == ("llm", 2, filled.path)
    text = run_cli("stats", "cli", "--kind", "bytes", *where)
    assert text.returncode == 0 and text.stdout.startswith(f"cli [bytes] ({store.path})")
    missing = run_cli("stats", "cli", "--kind", "nodes", *where)
    assert missing.returncode == 2 and missing.stdout == ""
    assert "no cache named 'cli' of kind nodes" in missing.stderr
    bad = run_cli("stats", "cli", "--kind", "tables", *where)
    assert bad.returncode == 2 and "--kind" in bad.stderr


def test_clear_check_and_rm_of_another_kind(
    filled: SharedMemoryCache, kind_segment: Callable[..., Engine], cache_dir: Path
) -> None:
    store = kind_segment("cli", "bytes")
    where = ["--directory", str(cache_dir)]
    ok = run_cli("check", "cli", "--kind", "bytes", *where)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout == f"ok: {store.path}: {KIND_ENTRIES} entries, " \
        f"{store.stats().used_bytes} bytes in use\n"

    refused = run_cli("clear", "cli", "--kind", "bytes", "--llm-string", "x", *where)
    assert refused.returncode == 2 and "LLM caches only" in refused.stderr
    assert store.stats().entries == KIND_ENTRIES

    cleared = run_cli("clear", "cli", "--kind", "bytes", *where)
    assert cleared.returncode == 0, cleared.stderr
    assert store.stats().entries == 0
    assert store.get(_digest("k0"), 0, bytes, bytes) is None  # gone for this process too
    assert filled.lookup("p2", "llm-b") == text_generations("two")  # the LLM cache: untouched

    # Damage in a record of the byte store: check says so and names the fix.
    assert store.put([Prepared(_digest("again"), 0, b"stored-again", 0.0)])
    data = Path(store.path).read_bytes()
    with open(store.path, "r+b") as handle:
        handle.seek(data.index(b"stored-again"))
        handle.write(b"STORED")
    bad = run_cli("check", "cli", "--kind", "bytes", *where)
    assert bad.returncode == 1 and "DAMAGED" in bad.stdout and "crc" in bad.stdout
    assert f"shmcache clear cli --kind bytes --directory {cache_dir}" in bad.stdout
    # A damaged header: check and ls name the command that removes that segment.
    with open(store.path, "r+b") as handle:
        handle.write(b"NOTACACHE")
    header = run_cli("check", "cli", "--kind", "bytes", *where)
    assert header.returncode == 1 and "DAMAGED" in header.stdout
    assert "shmcache rm cli --kind bytes" in header.stdout
    listing = run_cli("ls", *where)
    damaged = [row for row in _rows(listing.stdout) if row[:2] == ["cli", "bytes"]]
    assert "DAMAGED:" in damaged[0] and "--kind" in damaged[0], listing.stdout

    removed = run_cli("rm", "cli", "--kind", "bytes", *where)
    assert removed.returncode == 0, removed.stderr
    assert not Path(store.path).exists()
    assert list(cache_dir.glob(".cli.*.bytes.shm.*")) == []  # its lock and owner files
    assert Path(filled.path).exists()  # the LLM cache of that name stays
    again = run_cli("rm", "cli", "--kind", "bytes", *where)
    assert again.returncode == 2 and "no cache named 'cli' of kind bytes" in again.stderr


@pytest.mark.parametrize("command", ["check", "clear"])
def test_another_kind_behind_a_stopped_lock_holder(
    kind_segment: Callable[..., Engine], cache_dir: Path, command: str
) -> None:
    kind_segment("held", "nodes")

    def hold() -> int:
        engine = Engine("held", kind="nodes", owner="test", directory=cache_dir)
        shmcache._arena.step_hook = kill_at_step(1, signal.SIGSTOP)  # step 1: write begun
        engine.put([Prepared(_digest("held"), 0, b"held", 0.0)])
        shmcache._arena.step_hook = None
        engine.close()
        return 0

    args = [command, "held", "--kind", "nodes", "--directory", str(cache_dir),
            "--lock-timeout", str(LOCK_TIMEOUT_S)]
    with Children() as children:
        holder = children.spawn(hold)
        try:
            wait_stopped(holder, 10.0)
            result = run_cli(*args, timeout_s=LOCK_TIMEOUT_S + 30)
            assert result.returncode == 3, (result.stdout, result.stderr)
            assert f"pid {holder}" in result.stderr and f"kill -CONT {holder}" in result.stderr
            assert os.WIFEXITED(status := _resume_and_reap(holder))
            assert os.WEXITSTATUS(status) == 0
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(holder, signal.SIGCONT)
    again = run_cli(*args)
    assert again.returncode == 0, (again.stdout, again.stderr)


# -- stats --prometheus -----------------------------------------------------------------


def test_stats_prometheus_prints_the_exposition(
    filled: SharedMemoryCache, kind_segment: Callable[..., Engine], cache_dir: Path
) -> None:
    before = filled.stats()
    result = run_cli("stats", "cli", "--prometheus", "--directory", str(cache_dir))
    assert result.returncode == 0, result.stderr
    assert result.stdout == render([("cli", "llm", before)])
    families = {f.name: f for f in text_string_to_metric_families(result.stdout)}
    assert families["shmcache_hits"].type == "counter"
    assert families["shmcache_hits"].samples[0].labels == {"cache": "cli", "kind": "llm"}
    assert families["shmcache_hits"].samples[0].value == 1
    assert families["shmcache_entries"].samples[0].value == 2
    assert filled.stats() == before  # the CLI's read counted nothing

    store = kind_segment("cli", "bytes", hits=3)
    result = run_cli("stats", "cli", "--kind", "bytes", "--prometheus",
                     "--directory", str(cache_dir))
    assert result.returncode == 0, result.stderr
    assert result.stdout == render([("cli", "bytes", store.stats())])
    assert 'shmcache_hits_total{cache="cli",kind="bytes"} 3\n' in result.stdout


def test_stats_prometheus_of_a_missing_cache_is_an_error(tmp_path: Path) -> None:
    result = run_cli("stats", "absent", "--prometheus", "--directory", str(tmp_path))
    assert result.returncode == 2
    assert result.stdout == ""  # nothing a scraper could take for metrics
    assert "no cache named 'absent'" in result.stderr
    both = run_cli("stats", "absent", "--prometheus", "--json", "--directory", str(tmp_path))
    assert both.returncode == 2 and "not allowed with" in both.stderr

"""shmcache.prometheus.ShmCacheCollector in a real prometheus_client registry.

The caches are written by separate real processes; the scrapes read the segments
as any other process would (read-only, counting nothing) and must report exactly
what ``stats()`` reports, for every kind of segment.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import DuplicateTimeseries

from shmcache import CacheStats, InvalidArgumentError, SharedMemoryCache, ShmCacheError
from shmcache._arena import FORMAT_VERSION
from shmcache._engine import Engine
from shmcache._metrics import METRICS, render
from shmcache._segment import segment_path
from shmcache.prometheus import ShmCacheCollector

SIZE = 1 << 20
READY_TIMEOUT_S = 60.0

# A separate process writing an LLM cache "app", a byte store "app" and a node
# cache "emb" (the other kinds through the engine their front-ends share), with
# known counts; it prints "ready", then waits for a line on stdin before closing.
WRITER = textwrap.dedent(
    """
    import hashlib, sys
    from langchain_core.outputs import Generation
    from shmcache import SharedMemoryCache
    from shmcache._engine import Engine, Prepared

    directory = sys.argv[1]
    def digest(key):
        return hashlib.sha256(key.encode()).digest()

    cache = SharedMemoryCache("app", directory=directory, size_bytes=1 << 20, coalesce=False)
    for i in range(5):
        cache.update(f"p{i}", "llm", [Generation(text=f"answer {i}")])
    for i in range(8):
        assert cache.lookup(f"p{i % 5}", "llm") is not None
    for i in range(3):
        assert cache.lookup(f"absent {i}", "llm") is None

    engines = []
    for name, kind, n in (("app", "bytes", 3), ("emb", "nodes", 2)):
        engine = Engine(name, kind=kind, owner="writer", directory=directory, size_bytes=1 << 20)
        engines.append(engine)
        assert engine.put([Prepared(digest(f"k{i}"), 0, b"v" * (i + 1), 0.0) for i in range(n)])
        for i in range(n + 1):  # n hits, then one miss
            engine.get(digest(f"k{i}"), 0, bytes, bytes)
    print("ready", flush=True)
    sys.stdin.readline()
    cache.close()
    for engine in engines:
        engine.close()
    """
)
# What the writer did, per (cache, kind): (hits, misses, updates, entries).
WRITTEN = {("app", "llm"): (8, 3, 5, 5), ("app", "bytes"): (3, 1, 3, 3),
           ("emb", "nodes"): (2, 1, 2, 2)}


@pytest.fixture
def directory(tmp_path: Path) -> Iterator[Path]:
    """A segment directory; every segment left in it is removed afterwards."""
    path = tmp_path / "segments"
    yield path
    if path.exists():
        for entry in path.iterdir():
            entry.unlink()


@pytest.fixture
def writer(directory: Path) -> Iterator[subprocess.Popen[str]]:
    """The writer process, once it has written and printed "ready"."""
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(directory)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], READY_TIMEOUT_S)
        assert ready, f"writer not ready within {READY_TIMEOUT_S:.0f} s"
        line = proc.stdout.readline()
        assert line == "ready\n", (line, proc.stderr.read() if proc.stderr else "")
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def finish(proc: subprocess.Popen[str]) -> None:
    """Let the writer close its caches and exit."""
    assert proc.stdin is not None
    proc.stdin.write("\n")
    proc.stdin.flush()
    assert proc.wait(timeout=30) == 0


Scraped = dict[tuple[str, str], dict[str, float]]


def scrape(registry: CollectorRegistry) -> Scraped:
    """``{(cache, kind): {metric name: value}}`` from one real scrape of ``registry``."""
    found: Scraped = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            key = (sample.labels["cache"], sample.labels["kind"])
            found.setdefault(key, {})[sample.name] = sample.value
    return found


def as_metrics(stats: CacheStats) -> dict[str, float]:
    return {spec.name: float(getattr(stats, spec.field)) for spec in METRICS}


def stats_of(directory: Path) -> dict[tuple[str, str], CacheStats]:
    """What ``stats()`` says of each segment the writer made (opening counts nothing)."""
    found = {}
    with SharedMemoryCache("app", directory=directory, coalesce=False) as cache:
        found[("app", "llm")] = cache.stats()
    for name, kind in (("app", "bytes"), ("emb", "nodes")):
        engine = Engine(name, kind=kind, owner="test", directory=directory)
        try:
            found[(name, kind)] = engine.stats()
        finally:
            engine.close()
    return found


def registry_with(*collectors: ShmCacheCollector) -> CollectorRegistry:
    registry = CollectorRegistry()
    for collector in collectors:
        registry.register(collector)
    return registry


def test_scrape_equals_stats_of_segments_written_by_another_process(
    writer: subprocess.Popen[str], directory: Path
) -> None:
    registry = registry_with(ShmCacheCollector(directory=directory))  # every segment
    while_open = scrape(registry)
    expected = stats_of(directory)
    assert set(while_open) == set(WRITTEN)
    for key, (hits, misses, updates, entries) in WRITTEN.items():
        assert while_open[key] == as_metrics(expected[key]), key
        # ... and those are what the writer did (its counts are in the segment at once).
        stats = expected[key]
        assert (stats.hits, stats.misses, stats.updates, stats.entries) == (
            hits, misses, updates, entries
        )
        assert while_open[key]["shmcache_size_bytes"] == SIZE
    finish(writer)
    assert scrape(registry) == while_open  # closing loses and adds nothing
    # The CLI's text (render) and the collector agree on names, types and help texts.
    text = render([("app", "llm", expected["app", "llm"])])
    ours = {f.name: (f.type, f.documentation) for f in text_string_to_metric_families(text)}
    theirs = {f.name: (f.type, f.documentation)
              for f in text_string_to_metric_families(generate_latest(registry).decode())}
    assert ours == theirs and len(ours) == len(METRICS)


def test_a_killed_writers_counts_are_still_the_hosts(
    writer: subprocess.Popen[str], directory: Path
) -> None:
    registry = registry_with(ShmCacheCollector("app", "emb", directory=directory))
    before = scrape(registry)
    os.kill(writer.pid, signal.SIGKILL)
    assert writer.wait(timeout=10) == -signal.SIGKILL
    assert scrape(registry) == before
    assert before["app", "llm"]["shmcache_hits_total"] == WRITTEN["app", "llm"][0]


def test_names_and_kinds_choose_the_segments(
    writer: subprocess.Popen[str], directory: Path, caplog: pytest.LogCaptureFixture
) -> None:
    only_bytes = scrape(registry_with(ShmCacheCollector("app", directory=directory,
                                                        kinds=["bytes"])))
    assert set(only_bytes) == {("app", "bytes")}
    app = scrape(registry_with(ShmCacheCollector("app", directory=directory)))
    assert set(app) == {("app", "llm"), ("app", "bytes")}  # no node cache named app
    with caplog.at_level(logging.DEBUG, logger="shmcache"):
        some = scrape(registry_with(
            ShmCacheCollector("missing", "emb", "app", directory=directory, kinds=("nodes", "llm"))
        ))
    assert set(some) == {("emb", "nodes"), ("app", "llm")}
    missing = [r for r in caplog.records if "missing.v" in r.getMessage()]
    assert missing and all(r.levelno == logging.DEBUG for r in missing)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_scrapes_write_nothing_and_count_nothing(writer: subprocess.Popen[str],
                                                 directory: Path) -> None:
    finish(writer)
    for companion in directory.glob(".*"):
        companion.unlink()  # creation locks and owner-slot files
    files = {p.name: p.read_bytes() for p in directory.iterdir()}
    registry = registry_with(ShmCacheCollector(directory=directory))
    first = scrape(registry)
    for _ in range(3):
        assert scrape(registry) == first  # reads are not counted as hits or misses
    # Not a byte changed (no owner slot claimed, nothing repaired) and no file made.
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == files


def test_segments_that_vanish_or_break_are_skipped(
    writer: subprocess.Popen[str], directory: Path, caplog: pytest.LogCaptureFixture
) -> None:
    finish(writer)
    registry = registry_with(ShmCacheCollector(directory=directory))
    assert len(scrape(registry)) == 3
    os.unlink(segment_path(str(directory), "emb", FORMAT_VERSION, "nodes"))
    assert set(scrape(registry)) == {("app", "llm"), ("app", "bytes")}
    with open(segment_path(str(directory), "app", FORMAT_VERSION, "bytes"), "r+b") as handle:
        handle.write(b"NOTACACHE")
    with caplog.at_level(logging.DEBUG, logger="shmcache"):
        assert set(scrape(registry)) == {("app", "llm")}  # the rest is still served
        assert set(scrape(registry)) == {("app", "llm")}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings  # once, not at every scrape
    assert "app.v" in warnings[0].getMessage() and "shmcache rm app --kind bytes" in \
        warnings[0].getMessage()


def test_other_files_in_the_directory_are_not_segments(directory: Path) -> None:
    directory.mkdir(mode=0o700)
    with SharedMemoryCache("real", directory=directory, size_bytes=SIZE) as cache:
        cache.update("p", "llm", [])  # skipped (empty value): counted, nothing stored
        for entry, data in {
            "old.v0.shm": b"an older release's segment",
            f"bad name.v{FORMAT_VERSION}.shm": b"",
            "notes.txt": b"hello",
        }.items():
            (directory / entry).write_bytes(data)
        scraped = scrape(registry_with(ShmCacheCollector(directory=directory)))
        assert set(scraped) == {("real", "llm")}
        assert scraped["real", "llm"] == as_metrics(cache.stats())
        assert scraped["real", "llm"]["shmcache_skipped_total"] == 1


def test_missing_directory_yields_nothing(tmp_path: Path) -> None:
    every = registry_with(ShmCacheCollector(directory=tmp_path / "never-made"))
    named = registry_with(ShmCacheCollector("app", directory=tmp_path / "nor-this"))
    assert scrape(every) == scrape(named) == {}
    assert not (tmp_path / "never-made").exists()  # a scrape creates nothing


def test_describe_names_the_metrics_without_reading_segments(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    registry.register(ShmCacheCollector(directory=tmp_path))
    # Same names twice in one registry: refused, as for any prometheus_client metric.
    with pytest.raises(DuplicateTimeseries):
        registry.register(ShmCacheCollector("other", directory=tmp_path))
    described = {family.name for family in ShmCacheCollector(directory=tmp_path).describe()}
    assert described == {spec.name.removesuffix("_total") for spec in METRICS}


def test_bad_arguments_are_refused_at_construction(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="invalid cache name"):
        ShmCacheCollector("../etc", directory=tmp_path)
    with pytest.raises(TypeError):
        ShmCacheCollector(3, directory=tmp_path)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="kinds="):
        ShmCacheCollector("app", directory=tmp_path, kinds="llm")
    with pytest.raises(InvalidArgumentError, match="unknown kind"):
        ShmCacheCollector("app", directory=tmp_path, kinds=["tables"])
    with pytest.raises(TypeError):
        ShmCacheCollector(directory=42)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="empty path"):
        ShmCacheCollector(directory="")
    assert "every segment" in repr(ShmCacheCollector(directory=tmp_path))


def test_import_without_prometheus_client_names_the_extra() -> None:
    code = textwrap.dedent(
        """
        import sys
        sys.modules["prometheus_client"] = None  # as if it were not installed
        from shmcache import ShmCacheError
        try:
            import shmcache.prometheus
        except ImportError as exc:
            assert isinstance(exc, ShmCacheError), type(exc).__mro__
            print(type(exc).__name__, exc.name, exc, sep="|")
        else:
            raise SystemExit("imported without prometheus_client")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    kind, name, message = result.stdout.strip().split("|")
    assert (kind, name) == ("PrometheusDependencyError", "prometheus_client")
    assert "pip install 'shmcache[prometheus]'" in message
    assert issubclass(ShmCacheError, Exception)

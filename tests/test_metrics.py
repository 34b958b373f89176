"""shmcache._metrics: the Prometheus text exposition of segment counters."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import pytest
from _samples import CacheFactory, text_generations
from prometheus_client.parser import text_string_to_metric_families

from shmcache import CacheStats, InvalidArgumentError, SegmentCorruptError, ShmCacheError
from shmcache._metrics import (
    CONTENT_TYPE,
    METRICS,
    escape_help,
    escape_label_value,
    read_stats,
    render,
)

FIELDS = [field.name for field in dataclasses.fields(CacheStats)]


def numbered_stats(start: int = 1) -> CacheStats:
    """Every field a different value: hits=start, misses=start+1, ... in field order."""
    return CacheStats(**{name: start + i for i, name in enumerate(FIELDS)})


EXPECTED = """\
# HELP shmcache_hits_total Lookups that returned a value.
# TYPE shmcache_hits_total counter
shmcache_hits_total{cache="app",kind="llm"} 1
# HELP shmcache_misses_total Lookups that returned nothing (absent, expired, evicted, damaged).
# TYPE shmcache_misses_total counter
shmcache_misses_total{cache="app",kind="llm"} 2
# HELP shmcache_updates_total Entries written.
# TYPE shmcache_updates_total counter
shmcache_updates_total{cache="app",kind="llm"} 3
# HELP shmcache_evictions_total Entries removed to make room.
# TYPE shmcache_evictions_total counter
shmcache_evictions_total{cache="app",kind="llm"} 4
# HELP shmcache_skipped_total Updates not stored (value not storable, too large, lock timeout).
# TYPE shmcache_skipped_total counter
shmcache_skipped_total{cache="app",kind="llm"} 5
# HELP shmcache_coalesced_total Hits served to a lookup that waited for another caller's \
computation (also counted in hits).
# TYPE shmcache_coalesced_total counter
shmcache_coalesced_total{cache="app",kind="llm"} 9
# HELP shmcache_coalesce_timeouts_total Leases taken over because their holder kept them \
coalesce_timeout seconds.
# TYPE shmcache_coalesce_timeouts_total counter
shmcache_coalesce_timeouts_total{cache="app",kind="llm"} 10
# HELP shmcache_uncoalesced_total Misses that could not take a lease and so were not coalesced.
# TYPE shmcache_uncoalesced_total counter
shmcache_uncoalesced_total{cache="app",kind="llm"} 11
# HELP shmcache_remote_hits_total Lookups served by the remote tier after a local miss \
(also counted in hits).
# TYPE shmcache_remote_hits_total counter
shmcache_remote_hits_total{cache="app",kind="llm"} 12
# HELP shmcache_remote_misses_total Lookups that asked the remote tier and found nothing usable.
# TYPE shmcache_remote_misses_total counter
shmcache_remote_misses_total{cache="app",kind="llm"} 13
# HELP shmcache_remote_errors_total Remote-tier calls that failed (timeout, refused, server error).
# TYPE shmcache_remote_errors_total counter
shmcache_remote_errors_total{cache="app",kind="llm"} 14
# HELP shmcache_entries Entries stored now.
# TYPE shmcache_entries gauge
shmcache_entries{cache="app",kind="llm"} 6
# HELP shmcache_used_bytes Log bytes taken by the entries stored now.
# TYPE shmcache_used_bytes gauge
shmcache_used_bytes{cache="app",kind="llm"} 7
# HELP shmcache_size_bytes The segment file's length in bytes.
# TYPE shmcache_size_bytes gauge
shmcache_size_bytes{cache="app",kind="llm"} 8
"""


def test_exposition_text_is_exactly_as_expected() -> None:
    assert render([("app", "llm", numbered_stats())]) == EXPECTED


def test_every_stats_field_is_exported_once_under_the_agreed_name() -> None:
    assert sorted(spec.field for spec in METRICS) == sorted(FIELDS)
    names = {spec.field: (spec.name, spec.type) for spec in METRICS}
    counters = ["hits", "misses", "updates", "evictions", "skipped", "coalesced",
                "coalesce_timeouts", "uncoalesced", "remote_hits", "remote_misses",
                "remote_errors"]
    assert names == {
        **{field: (f"shmcache_{field}_total", "counter") for field in counters},
        "entries": ("shmcache_entries", "gauge"),
        "used_bytes": ("shmcache_used_bytes", "gauge"),
        "size_bytes": ("shmcache_size_bytes", "gauge"),
    }
    text = render([("app", "bytes", numbered_stats())])
    samples = [line for line in text.splitlines() if not line.startswith("#")]
    assert len(samples) == len(FIELDS)
    # Each field's own value (numbered_stats gives each a different one) under its name.
    for spec in METRICS:
        value = getattr(numbered_stats(), spec.field)
        assert f'{spec.name}{{cache="app",kind="bytes"}} {value}' in samples


def test_output_parses_with_prometheus_client() -> None:
    segments = [("app", "llm", numbered_stats(1)), ("app", "bytes", numbered_stats(100)),
                ("emb", "nodes", numbered_stats(1000))]
    text = render(segments)
    families = list(text_string_to_metric_families(text))
    assert len(families) == len(METRICS)
    for family, spec in zip(families, METRICS, strict=True):
        # prometheus_client names a counter family without its _total suffix.
        assert family.name == spec.name.removesuffix("_total")
        assert (family.type, family.documentation) == (spec.type, spec.help)
        assert [(s.name, s.labels, s.value) for s in family.samples] == [
            (spec.name, {"cache": name, "kind": kind}, getattr(stats, spec.field))
            for name, kind, stats in segments
        ]
    # One HELP and TYPE per family; its samples follow it, in the order given.
    assert text.count("# HELP shmcache_hits_total ") == 1
    at = text.index("# TYPE shmcache_hits_total counter\n")
    assert text[at:].splitlines()[1:4] == [
        'shmcache_hits_total{cache="app",kind="llm"} 1',
        'shmcache_hits_total{cache="app",kind="bytes"} 100',
        'shmcache_hits_total{cache="emb",kind="nodes"} 1000',
    ]


def test_label_values_are_escaped() -> None:
    assert escape_label_value('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
    assert escape_label_value("plain-name.1") == "plain-name.1"
    odd = 'we"ird\\na\nme'
    text = render([(odd, 'k"\\\n', numbered_stats())])
    assert 'shmcache_hits_total{cache="we\\"ird\\\\na\\nme",kind="k\\"\\\\\\n"} 1\n' in text
    assert text.count("\n") == 3 * len(METRICS)  # no raw newline from a label
    for family in text_string_to_metric_families(text):
        assert family.samples[0].labels == {"cache": odd, "kind": 'k"\\\n'}


def test_help_text_is_escaped() -> None:
    assert escape_help("back\\slash\nnew line") == "back\\\\slash\\nnew line"
    assert escape_help('"quotes" stay') == '"quotes" stay'


def test_big_counters_keep_every_digit() -> None:
    top = (1 << 64) - 1
    stats = dataclasses.replace(numbered_stats(), hits=top, used_bytes=0)
    text = render([("app", "llm", stats)])
    assert f'shmcache_hits_total{{cache="app",kind="llm"}} {top}\n' in text
    assert 'shmcache_used_bytes{cache="app",kind="llm"} 0\n' in text
    hits = next(f for f in text_string_to_metric_families(text) if f.name == "shmcache_hits")
    assert math.isclose(hits.samples[0].value, top)


def test_no_segment_renders_nothing_and_a_pair_given_twice_is_refused() -> None:
    assert render([]) == ""
    with pytest.raises(InvalidArgumentError, match="given twice") as caught:
        render([("app", "llm", numbered_stats()), ("app", "llm", numbered_stats())])
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, ShmCacheError)
    # The same name in two kinds is two segments.
    assert render([("app", "llm", numbered_stats()), ("app", "bytes", numbered_stats())])
    assert CONTENT_TYPE.startswith("text/plain; version=0.0.4")


def test_read_stats_reads_a_live_segment_without_touching_it(make_cache: CacheFactory) -> None:
    cache = make_cache("reader")
    cache.update("p", "llm", text_generations("v"))
    cache.lookup("p", "llm")
    cache.lookup("absent", "llm")
    before = Path(cache.path).read_bytes()
    assert read_stats(cache.path, "fix it") == cache.stats()
    assert Path(cache.path).read_bytes() == before  # no slot claimed, nothing repaired
    assert cache.stats().hits == 1 and cache.stats().misses == 1


def test_read_stats_of_a_missing_or_damaged_segment(make_cache: CacheFactory) -> None:
    cache = make_cache("broken")
    with pytest.raises(FileNotFoundError):
        read_stats(os.path.join(os.path.dirname(cache.path), "absent.shm"), "fix it")
    with open(cache.path, "r+b") as handle:
        handle.write(b"NOTACACHE")
    with pytest.raises(SegmentCorruptError, match="run the fix"):
        read_stats(cache.path, "run the fix")

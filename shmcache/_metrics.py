"""Segment counters as Prometheus metrics: what is exported, and the text format.

One job: turn the :class:`~shmcache.CacheStats` of segments, each named by
``(cache name, kind)``, into the Prometheus text exposition format (version 0.0.4,
https://prometheus.io/docs/instrumenting/exposition_formats/).  ``shmcache stats
NAME --prometheus`` prints it; :mod:`shmcache.prometheus` builds prometheus_client
metric families from the same :data:`METRICS` table, so both expose the same names,
types, help texts and labels.

Every metric carries two labels: ``cache`` (the name) and ``kind`` (``llm``,
``bytes``, ``nodes``: the front-end whose segment it is).  The counters are the
segment's own, summed over every process that used it since the segment was
created, so whichever process reads them reports the host's totals.

:func:`read_stats` is the one function here that touches a segment: it maps it
read-only and sums its counters without counting anything itself (no lock, no
owner slot, no write) -- what the CLI's ``ls``/``stats`` and the collector need.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal

from . import _arena
from ._arena import Arena
from ._errors import InvalidArgumentError
from ._segment import open_read_only
from ._stats import CacheStats

__all__ = [
    "CONTENT_TYPE",
    "LABEL_NAMES",
    "METRICS",
    "MetricSpec",
    "escape_help",
    "escape_label_value",
    "read_stats",
    "render",
]

# What a /metrics endpoint serving render()'s output sends as Content-Type.
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
LABEL_NAMES: Final = ("cache", "kind")


@dataclass(frozen=True)
class MetricSpec:
    """One exported metric.

    Attributes:
        field: The :class:`~shmcache.CacheStats` field it exports.
        name: The full metric name (counters end in ``_total``).
        type: ``"counter"`` (only grows while the segment lives) or ``"gauge"``.
        help: The ``# HELP`` text.
    """

    field: str
    name: str
    type: Literal["counter", "gauge"]
    help: str


def _counter(field: str, help_text: str) -> MetricSpec:
    return MetricSpec(field, f"shmcache_{field}_total", "counter", help_text)


def _gauge(field: str, name: str, help_text: str) -> MetricSpec:
    return MetricSpec(field, name, "gauge", help_text)


# Every CacheStats field, once (tests/test_metrics.py holds the table to that).
METRICS: Final[tuple[MetricSpec, ...]] = (
    _counter("hits", "Lookups that returned a value."),
    _counter("misses", "Lookups that returned nothing (absent, expired, evicted, damaged)."),
    _counter("updates", "Entries written."),
    _counter("evictions", "Entries removed to make room."),
    _counter("skipped", "Updates not stored (value not storable, too large, lock timeout)."),
    _counter("coalesced", "Hits served to a lookup that waited for another caller's "
             "computation (also counted in hits)."),
    _counter("coalesce_timeouts", "Leases taken over because their holder kept them "
             "coalesce_timeout seconds."),
    _counter("uncoalesced", "Misses that could not take a lease and so were not coalesced."),
    _counter("remote_hits", "Lookups served by the remote tier after a local miss "
             "(also counted in hits)."),
    _counter("remote_misses", "Lookups that asked the remote tier and found nothing usable."),
    _counter("remote_errors", "Remote-tier calls that failed (timeout, refused, server error)."),
    _gauge("entries", "shmcache_entries", "Entries stored now."),
    _gauge("used_bytes", "shmcache_used_bytes", "Log bytes taken by the entries stored now."),
    _gauge("size_bytes", "shmcache_size_bytes", "The segment file's length in bytes."),
)


def escape_label_value(value: str) -> str:
    r"""A label value as the text format writes it: ``\``, ``"`` and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    r"""A ``# HELP`` text as the text format writes it: ``\`` and newline escaped."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def render(segments: Iterable[tuple[str, str, CacheStats]]) -> str:
    """The Prometheus text exposition of the given segments' counters.

    Each metric family appears once (``# HELP``, ``# TYPE``, then one sample per
    segment, in the order given), labelled ``cache="NAME",kind="KIND"``.

    Args:
        segments: ``(cache name, kind, stats)`` of each segment, each pair once.

    Returns:
        The exposition text, ending in a newline; empty when there is no segment.

    Raises:
        InvalidArgumentError: a ``(name, kind)`` pair appears twice (its samples
            would collide; also a ``ValueError``).
    """
    rows: list[tuple[str, CacheStats]] = []
    seen: set[tuple[str, str]] = set()
    for name, kind, stats in segments:
        if (name, kind) in seen:
            raise InvalidArgumentError(
                f"segment ({name!r}, {kind!r}) given twice; pass each (name, kind) once"
            )
        seen.add((name, kind))
        labels = f'cache="{escape_label_value(name)}",kind="{escape_label_value(kind)}"'
        rows.append((labels, stats))
    if not rows:
        return ""
    lines: list[str] = []
    for spec in METRICS:
        lines.append(f"# HELP {spec.name} {escape_help(spec.help)}")
        lines.append(f"# TYPE {spec.name} {spec.type}")
        for labels, stats in rows:
            lines.append(f"{spec.name}{{{labels}}} {int(getattr(stats, spec.field))}")
    return "\n".join(lines) + "\n"


def read_stats(path: str, fix_hint: str) -> CacheStats:
    """The counters of the segment at ``path``, read without touching it.

    The segment is mapped read-only and no lock is taken: the answer comes at once
    even while a writer holds the lock (or is stopped holding it), no owner slot is
    claimed, nothing is counted or repaired.  The sums are those of
    :meth:`SharedMemoryCache.stats` less what open instances have not published
    yet (hit/miss counts are published at once; the rest within about a second).

    Args:
        path: The segment file.
        fix_hint: What a damaged header's error message tells the user to do.

    Raises:
        FileNotFoundError: there is no segment at ``path`` (callers say so their way).
        SegmentPermissionError: the file is a symlink, not ours, or not private.
        SegmentCorruptError: the file is too short or its header is damaged (a
            :class:`~shmcache.SegmentFormatError` for another format version).
    """
    mapped = open_read_only(path, _arena.HEADER_BYTES)
    try:
        arena = Arena(mapped.mapping, _arena.read_geometry(mapped.mapping, path, fix_hint))
        try:
            return CacheStats(**arena.counts())
        finally:
            arena.release()
    finally:
        mapped.close()


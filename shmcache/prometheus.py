"""A prometheus_client collector for shmcache segments: the host's totals on /metrics.

Needs the optional extra: ``pip install 'shmcache[prometheus]'`` (prometheus_client).

Example:
    >>> from prometheus_client import CollectorRegistry, generate_latest
    >>> from shmcache.prometheus import ShmCacheCollector
    >>> registry = CollectorRegistry()
    >>> registry.register(ShmCacheCollector("myapp"))
    >>> generate_latest(registry)  # doctest: +SKIP
    b'# HELP shmcache_hits_total Lookups that returned a value, ...'

Why no multiprocess mode: the counters live in the segment itself, summed over
every process that ever used it, and the collector reads them from the segment at
each scrape.  So under gunicorn (or uWSGI, or a multiprocessing pool) *any*
worker's ``/metrics`` serves the host's totals -- whichever worker the scrape
reaches, the numbers are the same -- with no ``PROMETHEUS_MULTIPROC_DIR``, no
``MultiProcessCollector`` and no per-worker files.  (An app that already uses
prometheus_client's multiprocess mode for its own metrics simply registers this
collector in the registry it serves as well.)  Hit and miss counts are in the
segment at once; other processes' remaining counts within about a second.

Scrapes read segments read-only: no lock is taken (a scrape answers at once even
while a writer holds the lock), no owner slot is claimed, nothing is counted.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Final

from ._arena import FORMAT_VERSION
from ._errors import InvalidArgumentError, ShmCacheError
from ._metrics import LABEL_NAMES, METRICS, read_stats
from ._segment import (
    SEGMENT_KINDS,
    check_name,
    parse_segment_filename,
    resolve_directory,
    segment_path,
)
from ._stats import CacheStats

__all__ = ["PrometheusDependencyError", "ShmCacheCollector"]

logger = logging.getLogger("shmcache")

# Distinct scrape problems remembered, so each is logged at WARNING once.
_MAX_WARNED: Final = 256
_EXTRA_HINT: Final = "install it with `pip install 'shmcache[prometheus]'`"


class PrometheusDependencyError(ShmCacheError, ImportError):
    """``shmcache.prometheus`` was imported but prometheus_client is not installed."""


try:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    from prometheus_client.metrics_core import Metric
except ImportError as _exc:
    raise PrometheusDependencyError(
        f"shmcache.prometheus needs the prometheus_client package, which is not "
        f"installed; {_EXTRA_HINT}",
        name="prometheus_client",
    ) from _exc


# The LLM cache first, then the other front-ends by name.
_ALL_KINDS: Final = tuple(sorted(SEGMENT_KINDS, key=lambda kind: (kind != "llm", kind)))


def _check_kinds(kinds: Iterable[str] | None) -> tuple[str, ...]:
    if kinds is None:
        return _ALL_KINDS
    if isinstance(kinds, str):
        raise TypeError(f"kinds must be an iterable of kinds, e.g. kinds=({kinds!r},)")
    chosen = set()
    for kind in kinds:
        if not isinstance(kind, str):
            raise TypeError(f"kinds must hold str, not {type(kind).__name__}")
        if kind not in SEGMENT_KINDS:
            raise InvalidArgumentError(
                f"unknown kind {kind!r} in kinds=; use some of {list(_ALL_KINDS)}"
            )
        chosen.add(kind)
    return tuple(kind for kind in _ALL_KINDS if kind in chosen)


def _families() -> list[CounterMetricFamily | GaugeMetricFamily]:
    families: list[CounterMetricFamily | GaugeMetricFamily] = []
    for spec in METRICS:
        family_type = CounterMetricFamily if spec.type == "counter" else GaugeMetricFamily
        families.append(family_type(spec.name, spec.help, labels=LABEL_NAMES))
    return families


class ShmCacheCollector:
    """Exports the counters of shmcache segments, read from the segments at each scrape.

    Register it in a ``prometheus_client.CollectorRegistry`` (or the default
    ``REGISTRY``).  Each scrape maps the segments read-only and reports every
    :class:`~shmcache.CacheStats` field as a metric (``shmcache_hits_total``, ...,
    ``shmcache_entries``, ``shmcache_used_bytes``, ``shmcache_size_bytes``) with the
    labels ``cache`` (the name) and ``kind`` (``llm``: ``SharedMemoryCache``;
    ``bytes``: ``SharedMemoryByteStore``; ``nodes``: the LangGraph node cache).

    The values are the host's totals (every process of the segment, summed), so
    under gunicorn any worker's ``/metrics`` serves the same numbers: no
    prometheus_client multiprocess mode is needed.  See the module docstring.

    Register one collector per registry (a second one exports the same metric
    names, which the registry refuses): pass it every name to export.

    Args:
        *names: Cache names to export.  None given: every segment of this shmcache
            release's format found in the directory at each scrape (segments of
            other releases' formats are left out).
        directory: The segment directory, as given to the caches (default: theirs,
            ``/dev/shm/shmcache-<uid>``).  A directory that does not exist (yet)
            yields no metrics.
        kinds: The kinds to export (default: every kind).  With names, each name's
            segment of each kind is looked for; those missing at scrape time are
            skipped (logged at DEBUG on the ``shmcache`` logger).

    Raises:
        TypeError: a name, the directory or a kind has the wrong type, or ``kinds``
            is a bare ``str``.
        InvalidArgumentError: an invalid cache name or unknown kind (also a
            ``ValueError``).
    """

    def __init__(
        self,
        *names: str,
        directory: str | os.PathLike[str] | None = None,
        kinds: Iterable[str] | None = None,
    ) -> None:
        self._names = tuple(dict.fromkeys(check_name(name) for name in names))
        self._kinds = _check_kinds(kinds)
        self._directory = None if directory is None else os.fspath(directory)
        resolve_directory(self._directory, create=False)  # a bad type or value: now
        # Problems already logged at WARNING (then at DEBUG), by (path, message).
        self._warned: set[tuple[str, str]] = set()

    def __repr__(self) -> str:
        names = ", ".join(repr(name) for name in self._names) or "<every segment>"
        return (
            f"ShmCacheCollector({names}, directory={self._directory!r}, "
            f"kinds={self._kinds!r})"
        )

    def describe(self) -> Iterable[Metric]:
        """The metric families, without samples (reads no segment).

        A registry uses them to refuse a second collector exporting the same names.
        """
        return _families()

    def collect(self) -> Iterable[Metric]:
        """Read the segments now and return their metric families."""
        families = _families()
        for name, kind, stats in self.snapshots():
            labels = [name, kind]
            for spec, family in zip(METRICS, families, strict=True):
                family.add_metric(labels, int(getattr(stats, spec.field)))
        return families

    def snapshots(self) -> list[tuple[str, str, CacheStats]]:
        """``(name, kind, stats)`` of each segment found now, in a stable order.

        Never raises for a segment: one that is missing is skipped quietly, one that
        cannot be read (damaged, not private, ...) is skipped with a WARNING (once
        per problem) so that the other metrics of the app are still served.
        """
        try:
            directory = resolve_directory(self._directory, create=False)
        except (OSError, ShmCacheError) as exc:
            self._warn(str(self._directory), exc)
            return []
        found: list[tuple[str, str, CacheStats]] = []
        for name, kind in self._segments(directory):
            path = segment_path(directory, name, FORMAT_VERSION, kind)
            fix = f"remove it with `shmcache rm {name}{_cli_where(kind, self._directory)}`"
            try:
                stats = read_stats(path, fix)
            except FileNotFoundError:
                logger.debug("shmcache metrics: no segment %s; skipped", path)
                continue
            except (OSError, ShmCacheError, ValueError) as exc:
                self._warn(path, exc)
                continue
            found.append((name, kind, stats))
        return found

    def _segments(self, directory: str) -> list[tuple[str, str]]:
        if self._names:
            return [(name, kind) for name in self._names for kind in self._kinds]
        try:
            entries = os.listdir(directory)
        except FileNotFoundError:
            return []
        except OSError as exc:
            self._warn(directory, exc)
            return []
        order = {kind: i for i, kind in enumerate(self._kinds)}
        segments: list[tuple[str, str]] = []
        for entry in entries:
            parsed = parse_segment_filename(entry)
            if parsed is None or parsed[1] != FORMAT_VERSION or parsed[2] not in order:
                continue
            try:
                check_name(parsed[0])
            except InvalidArgumentError:
                continue  # not a name any cache can have
            segments.append((parsed[0], parsed[2]))
        return sorted(segments, key=lambda seg: (seg[0], order[seg[1]]))

    def _warn(self, where: str, exc: BaseException) -> None:
        key = (where, str(exc))
        if key in self._warned:
            logger.debug("shmcache metrics: %s skipped: %s", where, exc)
            return
        if len(self._warned) >= _MAX_WARNED:
            self._warned.clear()
        self._warned.add(key)
        logger.warning("shmcache metrics: %s skipped: %s", where, exc)


def _cli_where(kind: str, directory: str | None) -> str:
    kind_part = "" if kind == "llm" else f" --kind {kind}"
    return kind_part + (f" --directory {directory}" if directory else "")

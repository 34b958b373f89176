"""The statistics snapshot returned by :meth:`SharedMemoryCache.stats`."""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["CacheStats"]


@dataclass(frozen=True)
class CacheStats:
    """Counters of one segment, summed over every process that used it.

    Event counts (``hits`` … ``skipped``) run from the segment's creation;
    ``clear()`` resets none of them.  ``entries`` and ``used_bytes`` describe what
    is stored now (expired entries count until their space is reused).

    Attributes:
        hits: Lookups that returned a value.
        misses: Lookups that returned None (absent, expired, evicted, damaged).
        updates: Entries written.
        evictions: Entries removed to make room (log full or index bucket full).
        skipped: Updates not stored (value not storable, too large, lock timeout).
        entries: Entries stored now.
        used_bytes: Log bytes taken by the entries stored now.
        size_bytes: The segment file's length.
        coalesced: Hits served to a lookup that waited for another caller's model
            call (request coalescing); also counted in ``hits``.
        coalesce_timeouts: Leases taken over because their holder kept them
            ``coalesce_timeout`` seconds.
        uncoalesced: Misses that could not take a lease (lock not had in time, no
            free lease entry or owner slot) and so were not coalesced.
        remote_hits: Lookups served by the remote tier (Redis) after a local miss,
            directly or after waiting for another host's model call; also counted
            in ``hits``.  The value is then in this host's segment too.
        remote_misses: Lookups that asked the remote tier and found nothing usable
            (absent, expired, or a value that failed its checks).
        remote_errors: Remote calls that failed (timeout, connection refused, server
            error).  Calls skipped while the remote is known to be down count in
            none of the three.
    """

    hits: int
    misses: int
    updates: int
    evictions: int
    skipped: int
    entries: int
    used_bytes: int
    size_bytes: int
    coalesced: int = 0
    coalesce_timeouts: int = 0
    uncoalesced: int = 0
    remote_hits: int = 0
    remote_misses: int = 0
    remote_errors: int = 0

    def as_dict(self) -> dict[str, int]:
        """Return the counters as a plain dict (e.g. for JSON)."""
        return asdict(self)

"""Refuse to publish a figure that the run itself contradicts.

Two checks, both computed from the same run's own numbers:

* **Stored keys must hit.** A phase that looks up keys it (or the writer) stored
  counts every lookup that returned ``None``. When more than
  :data:`MISS_TOLERANCE` of them missed, the figure measures misses (or evictions),
  not hits, and is not published. The same goes for updates that the store skipped
  (not stored): an update figure made of skips measures the skip path.
* **Physics.** ``N`` processes on ``C`` cores, each operation costing what the same
  run's latency phases measured (the cheapest any round of that peer measured, see
  :func:`best_costs`), cannot exceed
  ``min(N, C) / (f_hit * hit_us + f_miss * miss_us + f_update * update_us)`` operations
  per second (``f_*`` = the phase's own counted shares of hits, misses and updates).
  A throughput above that bound times :data:`THROUGHPUT_MARGIN` (noise, warm caches)
  means the phase did cheaper work than it claims, and is not published.

A figure that fails is moved out of its published key (set to ``None``) into
``result["invalid"][key] = {"value": raw, "reason": ...}``; the report prints the
reason instead of the number, and ratios and targets built on it become "—".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

MISS_TOLERANCE: Final = 0.001
"""Share of lookups of stored keys (or of updates) allowed to miss (or be skipped)."""

THROUGHPUT_MARGIN: Final = 1.25
"""Allowed excess of a throughput over what the run's per-op costs allow (noise)."""

WAITING_SLEEPS_PER_KOP: Final = 100.0
"""Voluntary sleeps per 1,000 ops above which a phase waits on another process.

The bound assumes that an operation occupies the caller's CPU for its whole latency.
A client of a server (Manager, Redis) or of fsync spends most of it asleep, and its
latency alone (one client: the server idles between requests and must be woken) is
not the cost of an operation under concurrency, so the bound does not apply there;
the counts are still checked.
"""


def stored_key_misses(
    lookups: int | None,
    misses: int | None,
    what: str = "lookups of stored keys",
    tolerance: float = MISS_TOLERANCE,
) -> str | None:
    """Why a figure is invalid because lookups of stored keys missed, or ``None``.

    Args:
        lookups: Lookups of keys that were stored before the phase.
        misses: How many of them returned ``None``.
        what: Noun phrase for the message.
        tolerance: Largest acceptable share of misses.
    """
    if not lookups or misses is None:
        return None
    if misses < 0:
        return f"inconsistent counts: {misses} misses of {lookups:,} {what}"
    if misses > tolerance * lookups:
        return (
            f"{misses:,} of {lookups:,} {what} missed ({misses / lookups:.1%}; "
            f"tolerance {tolerance:.1%}): the figure measures misses, not hits"
        )
    return None


def skipped_updates(
    updates: int | None, skipped: int | None, tolerance: float = MISS_TOLERANCE
) -> str | None:
    """Why an update or throughput figure is invalid because updates were not stored."""
    if not updates or skipped is None:
        return None
    if skipped > tolerance * updates:
        return (
            f"{skipped:,} of {updates:,} updates were skipped (not stored; "
            f"{skipped / updates:.1%} > {tolerance:.1%}): the figure measures the skip path"
        )
    return None


def max_ops_per_s(
    processes: int,
    cpus: int | None,
    *,
    hits: int,
    misses: int = 0,
    updates: int = 0,
    hit_us: float,
    miss_us: float | None = None,
    update_us: float | None = None,
) -> float | None:
    """The most operations per second the phase can do at the given per-op costs.

    ``min(processes, cpus)`` cores' worth of time divided by the mean cost of one
    operation of the phase's own mix. An unknown ``miss_us`` is taken as ``hit_us``
    (a miss that reached the store; the miss check rejects a phase full of them).

    Returns:
        ops/s, or ``None`` when the mix is empty or a needed cost is unknown.
    """
    total = hits + misses + updates
    if total <= 0 or not hit_us or hit_us <= 0:
        return None
    if updates and (update_us is None or update_us <= 0):
        return None
    miss_cost = hit_us if miss_us is None or miss_us <= 0 else miss_us
    mean_us = (hits * hit_us + misses * miss_cost + updates * (update_us or 0.0)) / total
    parallel = min(processes, cpus) if cpus else processes
    return parallel * 1e6 / mean_us


def exceeds_bound(
    ops_s: float | None,
    bound: float | None,
    margin: float = THROUGHPUT_MARGIN,
    basis: str = "",
) -> str | None:
    """Why ``ops_s`` is invalid because it beats the physical ``bound`` times ``margin``."""
    if ops_s is None or bound is None:
        return None
    if ops_s > bound * margin:
        return (
            f"{ops_s:,.0f} ops/s is {ops_s / bound:.2f}x the {bound:,.0f} ops/s that "
            f"this run's per-op costs allow{f' ({basis})' if basis else ''}; "
            f"limit {margin:.2f}x"
        )
    return None


def _cheapest(*values: Any) -> float | None:
    nums = [v for v in values if isinstance(v, (int, float)) and v > 0]
    return min(nums) if nums else None


COST_KEYS: Final = ("hit_us", "hit_warm_us", "miss_us", "update_us")
"""Per-op latencies (µs) a throughput bound is built from."""


def best_costs(records: Sequence[Mapping[str, Any]], cpus: int | None) -> dict[str, float]:
    """The cheapest cost of each kind that any record (round) of one peer measured.

    A throughput bound built from these is the most generous the run supports: load
    from other programs that slowed one latency phase cannot make a later, quieter
    throughput window look impossible. Figures that their own counts invalidate (a
    "hit" that missed is cheap) are left out.
    """
    best: dict[str, float] = {}
    for rec in records:
        bad = validate_peer(rec, cpus)
        for key in COST_KEYS:
            value = rec.get(key)
            if key in bad or not isinstance(value, (int, float)) or value <= 0:
                continue
            best[key] = min(best.get(key, value), float(value))
    return best


def waits_on_others(res: Mapping[str, Any]) -> bool:
    """Whether the mixed phase mostly waited (server round trips, fsync), not computed."""
    waits = res.get("mixed_waits_per_kop")
    return isinstance(waits, (int, float)) and waits > WAITING_SLEEPS_PER_KOP


def mixed_bound(
    res: Mapping[str, Any],
    cpus: int | None,
    costs: Mapping[str, Any] | None = None,
    processes: int = 2,
) -> float | None:
    """Physical bound of a peer's mixed phase from its counted mix and per-op costs.

    Args:
        res: The peer's record (its ``counts["mixed"]``; its costs unless ``costs``).
        cpus: Usable CPUs.
        costs: Per-op µs by :data:`COST_KEYS` (default: the record's own), e.g. the
            run's :func:`best_costs`. The cheaper of first and second read is the hit.
        processes: Concurrent processes of the phase.

    Returns:
        ops/s, or ``None`` when unknown or when the phase waits on another process
        (:func:`waits_on_others`: the bound does not apply).
    """
    costs = res if costs is None else costs
    counts = (res.get("counts") or {}).get("mixed") or {}
    hit_us = _cheapest(costs.get("hit_us"), costs.get("hit_warm_us"))
    if hit_us is None or not counts or waits_on_others(res):
        return None
    return max_ops_per_s(
        processes, cpus,
        hits=counts.get("hits", 0), misses=counts.get("misses", 0),
        updates=counts.get("updates", 0),
        hit_us=hit_us, miss_us=costs.get("miss_us"), update_us=costs.get("update_us"),
    )  # fmt: skip


def validate_peer(
    res: Mapping[str, Any], cpus: int | None, costs: Mapping[str, Any] | None = None
) -> dict[str, str]:
    """Reasons, by result key, why figures of one peer's record may not be published.

    Args:
        res: One round's (or the merged) record of a peer.
        cpus: Usable CPUs (bounds the parallelism of the mixed phase).
        costs: Per-op µs for the throughput bound (default: the record's own).
    """
    costs = res if costs is None else costs
    counts = res.get("counts") or {}
    reasons: dict[str, str] = {}

    def add(key: str, reason: str | None) -> None:
        if reason and key in res:
            reasons[key] = f"{reasons[key]}; {reason}" if key in reasons else reason

    write = counts.get("write") or {}
    add("update_us", skipped_updates(write.get("updates"), write.get("skipped")))
    hit = counts.get("hit") or {}
    add("hit_us", stored_key_misses(hit.get("lookups"), hit.get("misses")))
    add("hit_warm_us", stored_key_misses(hit.get("lookups"), hit.get("misses")))
    plain = counts.get("hit_plain") or {}
    add("hit_plain_us", stored_key_misses(plain.get("lookups"), plain.get("misses")))
    miss = counts.get("miss") or {}
    if miss.get("hits"):
        add("miss_us", f"{miss['hits']:,} lookups of keys never stored returned a value")
    mixed = counts.get("mixed") or {}
    if mixed and res.get("mixed_ops_s") is not None:
        add("mixed_ops_s", stored_key_misses(mixed.get("lookups"), mixed.get("misses")))
        add("mixed_ops_s", skipped_updates(mixed.get("updates"), mixed.get("skipped")))
        add("mixed_ops_s", stored_key_misses(
            mixed.get("resident_checked"), mixed.get("resident_missing"),
            "stored keys looked up after the phase",
        ))  # fmt: skip
        hit_us = _cheapest(costs.get("hit_us"), costs.get("hit_warm_us"))
        add("mixed_ops_s", exceeds_bound(
            res.get("mixed_ops_s"), mixed_bound(res, cpus, costs),
            basis=f"2 processes on {cpus or '?'} CPUs, {mixed.get('hits', 0):,} hits at "
            f"{hit_us or 0:.2f} µs, {mixed.get('misses', 0):,} misses, "
            f"{mixed.get('updates', 0):,} updates at {costs.get('update_us') or 0:.2f} µs",
        ))  # fmt: skip
    return reasons


def validate_readers(
    readers: Mapping[str, Any], hit_us: float | None, cpus: int | None
) -> dict[str, str]:
    """Reasons why reader-scaling figures may not be published (misses, physics)."""
    reasons: dict[str, str] = {}
    for n, key in ((1, "readers_1_ops_s"), (2, "readers_2_ops_s")):
        c = (readers.get("counts") or {}).get(f"readers_{n}") or {}
        why = [stored_key_misses(c.get("lookups"), c.get("misses"))]
        bound = max_ops_per_s(n, cpus, hits=c.get("hits", 0), misses=c.get("misses", 0),
                              hit_us=hit_us or 0.0)  # fmt: skip
        why.append(exceeds_bound(readers.get(key), bound,
                                 basis=f"{n} reader(s), hit {hit_us or 0:.2f} µs"))  # fmt: skip
        found = "; ".join(w for w in why if w)
        if found:
            reasons[key] = found
    if reasons and "scaling" in readers:
        reasons["scaling"] = "built on an invalid throughput: " + "; ".join(reasons.values())
    return reasons


def validate_curve_point(point: Mapping[str, Any]) -> dict[str, str]:
    """Reasons why figures of one entries/size-curve point may not be published."""
    counts = point.get("counts") or {}
    reasons: dict[str, str] = {}
    hit = counts.get("hit") or {}
    why = stored_key_misses(hit.get("lookups"), hit.get("misses"))
    if why:
        reasons["hit_us"] = reasons["hit_warm_us"] = why
    skipped = [
        skipped_updates(c.get("updates"), c.get("skipped"))
        for c in (counts.get("write") or {}, counts.get("update_more") or {})
    ]
    if skipped[1]:
        reasons["update_us"] = skipped[1]
    if skipped[0] and "hit_us" in point:
        reasons.setdefault("hit_us", "the writer's updates were skipped: " + skipped[0])
    miss = counts.get("miss") or {}
    if miss.get("hits"):
        reasons["miss_us"] = f"{miss['hits']:,} lookups of keys never stored returned a value"
    return {k: v for k, v in reasons.items() if k in point}


def unpublish(record: dict[str, Any], reasons: Mapping[str, str]) -> dict[str, Any]:
    """Move each invalid figure to ``record["invalid"]`` with its reason; return ``record``.

    The published key is set to ``None`` so that no ratio, target or plot uses it.
    """
    if not reasons:
        return record
    invalid = record.setdefault("invalid", {})
    for key, reason in reasons.items():
        if key in invalid:
            continue
        invalid[key] = {"value": record.get(key), "reason": reason}
        record[key] = None
    return record

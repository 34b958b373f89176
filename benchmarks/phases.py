"""Measurement phases; each function runs inside a fresh worker process.

Timing: ``time.perf_counter_ns`` around batches of ``cfg.batch`` operations; the
reported figure is the median over batches of the per-operation time in µs.  Key
strings are built before each batch starts, so only cache calls are timed.
Throughput phases run for a fixed duration after a barrier and report their own
monotonic start/end (``perf_counter_ns`` is CLOCK_MONOTONIC: comparable across
processes), so the parent computes aggregate ops/s over the union of the windows.
"""

from __future__ import annotations

import functools
import itertools
import pickle
import random
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from langchain_core.caches import BaseCache
from langchain_core.outputs import Generation

from benchmarks import workload as wl
from benchmarks.peers import PeerSpec, close_cache, open_cache


@dataclass(frozen=True)
class PhaseConfig:
    """What a phase works on; identical in every process of one measurement.

    Attributes:
        entries: Chat entries written, under ``prompt(0) .. prompt(entries - 1)``.
        plain_entries: Plain ``Generation`` entries, under ``plain_prompt(i)``.
        sample: Timed lookups per lookup phase (and timed updates in ``update_more``).
        batch: Operations per timed batch.
        duration_s: Length of each throughput window.
        windows: Throughput windows per measurement (the parent takes the median).
        seed: Seed of the key sampling.
        value_bytes: ``None`` for the standard ~1 KB chat value; else the text length
            of the (size-curve) chat value.
        llm: The llm_string, built by LangChain in the parent (see ``wl.llm_string``).
        max_ops_per_window: Most operations one worker does in one throughput window
            (``None``: no limit). Bounds how much a mixed phase writes, so that the
            store can be sized to keep every stored key (see :func:`mixed_updates_bound`).
    """

    entries: int
    plain_entries: int
    sample: int
    batch: int
    duration_s: float
    windows: int = 3
    seed: int = 1234
    value_bytes: int | None = None
    llm: str = field(default_factory=wl.llm_string)
    max_ops_per_window: int | None = None


MIXED_CYCLE_OPS: Final = 2048
"""Operations in one mixed worker's cycle (repeated for the whole phase)."""

MIXED_UPDATE_SHARE: Final = 0.1
"""Share of updates in the mixed phase (the rest are lookups of stored keys)."""

WINDOW_STEP_OPS: Final = 32
"""Operations between two clock reads in a throughput window."""


_SIZED_VARIANTS = 4


@functools.lru_cache(maxsize=_SIZED_VARIANTS)
def _sized(variant: int, value_bytes: int) -> list[Any]:
    return wl.sized_value(variant, value_bytes)


def value_for(cfg: PhaseConfig, i: int) -> list[Any]:
    """The value stored under ``prompt(i)`` in this configuration."""
    if cfg.value_bytes is None:
        return wl.chat_value(i)
    return _sized(i % _SIZED_VARIANTS, cfg.value_bytes)


def peak_rss_mb() -> float:
    """This process's peak resident set size, in MB (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _time_lookups(
    cache: BaseCache,
    prompts: Sequence[str],
    cfg: PhaseConfig,
    after_batch: Callable[[], object] | None = None,
) -> tuple[list[float], int]:
    """Per-op µs of each batch of lookups, and how many returned ``None``.

    ``after_batch`` runs after each batch, untimed.
    """
    llm, batch = cfg.llm, cfg.batch
    lookup = cache.lookup
    per_op: list[float] = []
    missing = 0
    for chunk in wl.batches(prompts, batch):
        t0 = time.perf_counter_ns()
        for p in chunk:
            if lookup(p, llm) is None:
                missing += 1
        per_op.append((time.perf_counter_ns() - t0) / len(chunk) / 1000)
        if after_batch is not None:
            after_batch()
    return per_op, missing


def _time_updates(
    cache: BaseCache,
    indices: Sequence[int],
    key: Callable[[int], str],
    value: Callable[[int], Any],
    cfg: PhaseConfig,
) -> list[float]:
    """Per-op µs of each batch of updates of ``key(i) -> value(i)``."""
    llm, batch = cfg.llm, cfg.batch
    update = cache.update
    per_op: list[float] = []
    for chunk in wl.batches(indices, batch):
        items = [(key(i), value(i)) for i in chunk]
        t0 = time.perf_counter_ns()
        for p, v in items:
            update(p, llm, v)
        per_op.append((time.perf_counter_ns() - t0) / len(items) / 1000)
    return per_op


def _stats(cache: BaseCache) -> dict[str, int] | None:
    """shmcache's ``stats()`` as a dict (``None`` for other caches)."""
    stats = getattr(cache, "stats", None)
    if stats is None:
        return None
    import dataclasses

    return {k: int(v) for k, v in dataclasses.asdict(stats()).items()}


def skipped_so_far(cache: BaseCache) -> int | None:
    """Updates the store reports as not stored, summed over its processes.

    shmcache: ``stats().skipped``; warp-cache: ``oversize_skips``. ``None`` for stores
    that have no skip path (their failed updates raise, which fails the phase).
    """
    stats = _stats(cache)
    if stats is not None:
        return stats.get("skipped")
    if hasattr(cache, "oversize_skips"):
        return int(cache.oversize_skips())
    return None


def _delta(after: int | None, before: int | None) -> int | None:
    return None if after is None or before is None else after - before


def _lookup_counts(lookups: int, missing: int) -> dict[str, int]:
    return {"lookups": lookups, "hits": lookups - missing, "misses": missing}


def phase_baseline() -> dict[str, Any]:
    """Peak RSS of a worker that only imported LangChain and built the workload."""
    wl.prompt(0)
    wl.chat_value(0)
    return {"rss_mb": peak_rss_mb()}


def phase_write(spec: PeerSpec, cfg: PhaseConfig) -> dict[str, Any]:
    """Writer: insert every entry, timing each batch (update µs on a growing store)."""
    cache = open_cache(spec)
    try:
        skipped_before = skipped_so_far(cache)
        t0 = time.perf_counter()
        chat = _time_updates(
            cache, range(cfg.entries), wl.prompt, functools.partial(value_for, cfg), cfg
        )
        plain = _time_updates(cache, range(cfg.plain_entries), wl.plain_prompt, wl.plain_value, cfg)
        out: dict[str, Any] = {
            "update_us": _median(chat),
            "update_plain_us": _median(plain),
            "populate_s": time.perf_counter() - t0,
            "stats": _stats(cache),
            "counts": {"write": {
                "updates": cfg.entries + cfg.plain_entries,
                "skipped": _delta(skipped_so_far(cache), skipped_before),
            }},
        }  # fmt: skip
        if hasattr(cache, "oversize_skips"):
            out["oversize_skips"] = cache.oversize_skips()
    finally:
        close_cache(cache)
    out["rss_mb"] = peak_rss_mb()
    return out


def phase_hit(spec: PeerSpec, cfg: PhaseConfig) -> dict[str, Any]:
    """A reader that is not the writer: look up stored keys in random order.

    ``hit_us`` is the first read of each key in this process (what a fresh worker
    pays, page faults included); ``hit_warm_us`` the second read of the same keys.
    """
    chat_prompts = [wl.prompt(i) for i in wl.sample(cfg.entries, cfg.sample, cfg.seed)]
    plain_n = min(cfg.sample, cfg.plain_entries)
    plain_prompts = [wl.plain_prompt(i) for i in wl.sample(cfg.plain_entries, plain_n, cfg.seed)]
    cache = open_cache(spec)
    try:
        chat, missing = _time_lookups(cache, chat_prompts, cfg)
        plain, plain_missing = _time_lookups(cache, plain_prompts, cfg)
        # Same keys again: the pages are now mapped in this process (no first-touch
        # page faults), which isolates the cost of the cache's own code.
        warm, warm_missing = _time_lookups(cache, chat_prompts, cfg)
    finally:
        close_cache(cache)
    return {
        "hit_us": _median(chat),
        "hit_warm_us": _median(warm),
        "hit_plain_us": _median(plain),
        "hit_missing": missing + plain_missing + warm_missing,
        "hit_lookups": 2 * len(chat_prompts) + len(plain_prompts),
        "counts": {
            "hit": _lookup_counts(2 * len(chat_prompts), missing + warm_missing),
            "hit_plain": _lookup_counts(len(plain_prompts), plain_missing),
        },
        "rss_mb": peak_rss_mb(),
    }


def phase_miss(spec: PeerSpec, cfg: PhaseConfig) -> dict[str, Any]:
    """Look up keys that were never stored."""
    prompts = [wl.missing_prompt(i) for i in range(cfg.sample)]
    cache = open_cache(spec)
    # A coalescing cache takes a lease at each miss, which its computing caller's
    # update would end: this phase never updates, so it ends them after each batch
    # (untimed), or the lease windows would fill and the later misses would go
    # uncoalesced and measure another path.  How many did is counted.
    release = getattr(cache, "release_leases", None)
    stats = getattr(cache, "stats", None) if release is not None else None
    uncoalesced_before = stats().uncoalesced if stats is not None else 0
    try:
        per_op, missing = _time_lookups(cache, prompts, cfg, release)
        uncoalesced = (stats().uncoalesced - uncoalesced_before) if stats is not None else 0
    finally:
        close_cache(cache)
    counts = _lookup_counts(len(prompts), missing)
    if stats is not None:
        counts["uncoalesced"] = uncoalesced
    return {
        "miss_us": _median(per_op),
        "false_hits": len(prompts) - missing,
        "counts": {"miss": counts},
        "rss_mb": peak_rss_mb(),
    }


def phase_update_more(spec: PeerSpec, cfg: PhaseConfig) -> dict[str, Any]:
    """Insert ``cfg.sample`` new keys into a store already holding ``cfg.entries``."""
    cache = open_cache(spec)
    try:
        skipped_before = skipped_so_far(cache)
        start = cfg.entries + cfg.plain_entries + 10_000_000
        per_op = _time_updates(
            cache, range(start, start + cfg.sample), wl.prompt,
            functools.partial(value_for, cfg), cfg,
        )  # fmt: skip
        stats = _stats(cache)
        skipped = _delta(skipped_so_far(cache), skipped_before)
    finally:
        close_cache(cache)
    return {
        "update_us": _median(per_op),
        "stats": stats,
        "counts": {"update_more": {"updates": cfg.sample, "skipped": skipped}},
        "rss_mb": peak_rss_mb(),
    }


def compare(expected: Sequence[Generation], got: Any) -> str | None:
    """``None`` if ``got`` equals ``expected`` class for class; else what differs."""
    if type(got) is not list:
        return f"lookup returned {type(got).__name__}, not list"
    if len(got) != len(expected):
        return f"{len(got)} generations instead of {len(expected)}"
    for n, (e, g) in enumerate(zip(expected, got, strict=True)):
        if type(g) is not type(e):
            return f"generation {n}: {type(g).__name__} instead of {type(e).__name__}"
        e_msg, g_msg = getattr(e, "message", None), getattr(g, "message", None)
        if type(g_msg) is not type(e_msg):
            return f"generation {n}: message {type(g_msg).__name__} not {type(e_msg).__name__}"
        if e_msg is not None:
            for name in type(e_msg).model_fields:
                if getattr(e_msg, name) != getattr(g_msg, name):
                    return f"generation {n}: message.{name} differs"
        for name in type(e).model_fields:
            if name != "message" and getattr(e, name) != getattr(g, name):
                return f"generation {n}: {name} differs"
        if g != e:
            return f"generation {n}: == is False"
    return None


def check_fidelity(cache: BaseCache, cfg: PhaseConfig) -> dict[str, Any]:
    """Read back chat and plain values; check class-exact equality and fresh objects."""
    llm = cfg.llm
    rng = random.Random(cfg.seed + 7)
    chat_ids = sorted({0, cfg.entries - 1, *(rng.randrange(cfg.entries) for _ in range(6))})
    plain_ids = sorted({0, cfg.plain_entries - 1}) if cfg.plain_entries else []
    checks: list[tuple[str, Sequence[Generation]]] = [
        (wl.prompt(i), value_for(cfg, i)) for i in chat_ids
    ] + [(wl.plain_prompt(i), wl.plain_value(i)) for i in plain_ids]
    problems = []
    for p, expected in checks:
        problem = compare(expected, cache.lookup(p, llm))
        if problem:
            problems.append(problem)
    # Fresh objects: two lookups give distinct lists and objects, and mutating one
    # (LangChain sets usage_metadata["total_cost"] = 0 on a hit) leaves the cache as is.
    p0, expected0 = checks[0]
    first, second = cache.lookup(p0, llm), cache.lookup(p0, llm)
    fresh = bool(first) and bool(second) and first is not second and first[0] is not second[0]
    if first and hasattr(first[0], "message") and first[0].message.usage_metadata is not None:
        first[0].message.usage_metadata["total_cost"] = 0  # type: ignore[typeddict-unknown-key]
        fresh = fresh and compare(expected0, cache.lookup(p0, llm)) is None
    return {
        "fidelity_ok": not problems,
        "fidelity_checked": len(checks),
        "fidelity_problem": problems[0] if problems else None,
        "fresh_objects": fresh,
    }


def phase_fidelity(spec: PeerSpec, cfg: PhaseConfig) -> dict[str, Any]:
    """Fidelity check from a process that did not write the values."""
    cache = open_cache(spec)
    try:
        out = check_fidelity(cache, cfg)
    finally:
        close_cache(cache)
    out["rss_mb"] = peak_rss_mb()
    return out


def _updates_between(prefix: Sequence[int], start: int, stop: int) -> int:
    """Updates among operations ``start .. stop - 1`` of an endlessly repeated cycle.

    Args:
        prefix: ``prefix[k]`` = updates among the cycle's first ``k`` operations.
        start: First operation (counted from the phase's first, across windows).
        stop: One past the last operation.
    """
    n = len(prefix) - 1
    if n <= 0:
        return 0

    def upto(k: int) -> int:
        cycles, rest = divmod(k, n)
        return cycles * prefix[n] + prefix[rest]

    return upto(stop) - upto(start)


def _run_windows(
    ops: Sequence[Callable[[], Any]],
    barrier: Any,
    cfg: PhaseConfig,
    active: Sequence[bool] | None = None,
    is_update: Sequence[bool] | None = None,
) -> dict[str, Any]:
    """Run ``ops`` cyclically in windows of ``cfg.duration_s``, each started at ``barrier``.

    A window ends at its deadline or once it did ``cfg.max_ops_per_window`` operations
    (rounded up to a whole step), whichever comes first; its rate is computed over
    the time it really ran either way.

    Args:
        ops: Operations to cycle through. A lookup returns ``None`` on a miss; an
            update returns ``None`` (``BaseCache.update``).
        barrier: Shared by all concurrent workers; every window starts when all arrive.
        cfg: Window length, count (when ``active`` is None) and operation budget.
        active: Per window, whether this worker runs in it (an idle worker goes
            straight to the next barrier and reports ``None`` for that window).
        is_update: Per operation of ``ops``, whether it is an update (default: all
            are lookups). Lookups are counted as hits or misses.

    Returns:
        ``windows``: per window, this worker's monotonic start/end, op count, CPU
        time, voluntary context switches (sleeps: lock back-off, I/O, a server) and
        the counts of lookups, hits, misses and updates it did.
    """
    schedule = [True] * cfg.windows if active is None else list(active)
    step = WINDOW_STEP_OPS
    n_ops = len(ops)
    prefix = list(itertools.accumulate((bool(u) for u in is_update or [False] * n_ops), initial=0))
    limit = cfg.max_ops_per_window or sys.maxsize
    windows: list[dict[str, int] | None] = []
    done = 0
    for runs in schedule:
        barrier.wait()
        if not runs:
            windows.append(None)
            continue
        waits_start = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw
        cpu_start = time.process_time_ns()
        start = time.perf_counter_ns()
        deadline = start + int(cfg.duration_s * 1e9)
        first = done
        ops_in_window = 0
        nones = 0
        now = start
        while now < deadline and ops_in_window < limit:
            base = done % n_ops
            chunk = ops[base : base + step]
            for op in chunk:
                if op() is None:
                    nones += 1
            done += len(chunk)
            ops_in_window += len(chunk)
            now = time.perf_counter_ns()
        cpu_ns = time.process_time_ns() - cpu_start
        waits = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw - waits_start
        updates = _updates_between(prefix, first, done)
        lookups = ops_in_window - updates
        misses = nones - updates  # every update returns None; the other Nones are misses
        windows.append(
            {"start_ns": start, "end_ns": now, "ops": ops_in_window, "cpu_ns": cpu_ns,
             "voluntary_waits": waits, "lookups": lookups, "hits": lookups - misses,
             "misses": misses, "updates": updates, "budget_reached": ops_in_window >= limit}
        )  # fmt: skip
    return {"windows": windows, "rss_mb": peak_rss_mb()}


def mixed_plan(cfg: PhaseConfig, worker: int) -> list[tuple[int, bool]]:
    """The mixed cycle of one worker: (entry number, is an update) per operation.

    Every key is a stored one (``prompt(0 .. entries - 1)``); an update rewrites the
    value that is already there.
    """
    rng = random.Random(cfg.seed * 31 + worker)
    plan = []
    for _ in range(MIXED_CYCLE_OPS):
        i = rng.randrange(cfg.entries)
        plan.append((i, rng.random() < MIXED_UPDATE_SHARE))
    return plan


def mixed_updates_bound(cfg: PhaseConfig, workers: int = 2) -> int | None:
    """The most updates ``workers`` mixed processes can make in the whole phase.

    ``None`` when windows have no operation budget (then only time bounds it). A
    log-structured store (shmcache's ring) must hold this many rewritten records on
    top of the stored entries, or rewrites evict stored keys during the phase.
    """
    if cfg.max_ops_per_window is None:
        return None
    ops_per_worker = cfg.windows * (cfg.max_ops_per_window + WINDOW_STEP_OPS - 1)
    total = 0
    for worker in range(workers):
        flags = [upd for _, upd in mixed_plan(cfg, worker)]
        total += _updates_between(list(itertools.accumulate(flags, initial=0)), 0, ops_per_worker)
    return total


def _populate(cache: BaseCache, cfg: PhaseConfig) -> None:
    """Store every chat and plain entry of ``cfg`` (what :func:`phase_write` stores)."""
    llm = cfg.llm
    for i in range(cfg.entries):
        cache.update(wl.prompt(i), llm, value_for(cfg, i))
    for i in range(cfg.plain_entries):
        cache.update(wl.plain_prompt(i), llm, wl.plain_value(i))


def _resident(cache: BaseCache, cfg: PhaseConfig) -> dict[str, int]:
    """Look up every stored key once: how many are still there (none should be lost)."""
    llm = cfg.llm
    missing = sum(cache.lookup(wl.prompt(i), llm) is None for i in range(cfg.entries))
    missing += sum(cache.lookup(wl.plain_prompt(i), llm) is None for i in range(cfg.plain_entries))
    return {"resident_checked": cfg.entries + cfg.plain_entries, "resident_missing": missing}


_STORE_COUNTERS: Final = ("hits", "misses", "updates", "skipped", "evictions")


def phase_mixed(spec: PeerSpec, cfg: PhaseConfig, barrier: Any, worker: int) -> dict[str, Any]:
    """One of two concurrent processes: 90% lookups / 10% updates of stored keys.

    The phase has a fresh store of its own: worker 0 creates it and stores every entry
    (untimed) while the other waits at a barrier, then attaches. Each worker
    counts its own hits, misses and updates. After the last window every
    other worker detaches (so that its counts reach the store) and worker 0 then
    reads the store's own totals (skipped updates, shmcache's ``stats()``) and looks
    up every stored key once, to prove none was lost during the phase.
    """
    llm = cfg.llm
    plan = mixed_plan(cfg, worker)
    # Worker 0 creates and fills the phase's fresh store before the other attaches:
    # warp-cache's shared backend can SIGBUS when two processes create its file at once.
    cache = open_cache(spec) if worker == 0 else None
    closed = False
    try:
        if cache is not None:
            _populate(cache, cfg)  # untimed: the store holds every entry, as after phase_write
        barrier.wait()
        if cache is None:
            cache = open_cache(spec)
        ops: list[Callable[[], Any]] = [
            functools.partial(cache.update, wl.prompt(i), llm, value_for(cfg, i))
            if upd
            else functools.partial(cache.lookup, wl.prompt(i), llm)
            for i, upd in plan
        ]
        skipped_before = skipped_so_far(cache)
        stats_before = _stats(cache)
        out = _run_windows(ops, barrier, cfg, is_update=[upd for _, upd in plan])
        if worker != 0:
            close_cache(cache)
            closed = True
        barrier.wait()
        if worker == 0:
            out["skipped"] = _delta(skipped_so_far(cache), skipped_before)
            stats_after = _stats(cache)
            if stats_before is not None and stats_after is not None:
                out["store_counts"] = {k: stats_after[k] - stats_before[k] for k in _STORE_COUNTERS}
            out["stats"] = stats_after
            out.update(_resident(cache, cfg))
    finally:
        if cache is not None and not closed:
            close_cache(cache)
    return out


def phase_reader(
    spec: PeerSpec, cfg: PhaseConfig, barrier: Any, worker: int, readers: Sequence[int]
) -> dict[str, Any]:
    """A reader process doing lookups of stored keys only (each counted: hit or miss).

    ``readers[k]`` is how many readers run in window ``k``; this worker runs when its
    number is below it. Alternating 1 and 2 keeps the two measurements close in time.
    """
    llm = cfg.llm
    cache = open_cache(spec)
    ids = wl.sample(cfg.entries, MIXED_CYCLE_OPS, cfg.seed * 17 + worker)
    ops = [functools.partial(cache.lookup, wl.prompt(i), llm) for i in ids]
    try:
        return _run_windows(ops, barrier, cfg, [worker < n for n in readers])
    finally:
        close_cache(cache)


def phase_inprocess(spec: PeerSpec, cfg: PhaseConfig) -> dict[str, Any]:
    """``InMemoryCache``: every step in one process (it cannot be shared)."""
    cache = open_cache(spec)
    chat = _time_updates(
        cache, range(cfg.entries), wl.prompt, functools.partial(value_for, cfg), cfg
    )
    plain = _time_updates(cache, range(cfg.plain_entries), wl.plain_prompt, wl.plain_value, cfg)
    hits, missing = _time_lookups(
        cache, [wl.prompt(i) for i in wl.sample(cfg.entries, cfg.sample, cfg.seed)], cfg
    )
    plain_n = min(cfg.sample, cfg.plain_entries)
    plain_hits, plain_missing = _time_lookups(
        cache, [wl.plain_prompt(i) for i in wl.sample(cfg.plain_entries, plain_n, cfg.seed)], cfg
    )
    misses, missed = _time_lookups(cache, [wl.missing_prompt(i) for i in range(cfg.sample)], cfg)
    out: dict[str, Any] = {
        "update_us": _median(chat),
        "update_plain_us": _median(plain),
        "hit_us": _median(hits),
        "hit_plain_us": _median(plain_hits),
        "hit_missing": missing + plain_missing,
        "miss_us": _median(misses),
        "false_hits": cfg.sample - missed,
        "counts": {
            "write": {"updates": cfg.entries + cfg.plain_entries, "skipped": None},
            "hit": _lookup_counts(cfg.sample, missing),
            "hit_plain": _lookup_counts(plain_n, plain_missing),
            "miss": _lookup_counts(cfg.sample, missed),
        },
    }
    out.update(check_fidelity(cache, cfg))
    out["rss_mb"] = peak_rss_mb()
    return out


def phase_pickle(cfg: PhaseConfig) -> dict[str, Any]:
    """Reference: ``pickle.loads``/``dumps`` of the very values the caches store."""
    chat_blob = pickle.dumps(value_for(cfg, 0), pickle.HIGHEST_PROTOCOL)
    plain_blob = pickle.dumps(wl.plain_value(0), pickle.HIGHEST_PROTOCOL)
    loads, dumps = pickle.loads, pickle.dumps
    proto = pickle.HIGHEST_PROTOCOL
    value = value_for(cfg, 0)

    def timed(fn: Callable[[], Any]) -> float | None:
        per_op = []
        for _ in range(max(1, cfg.sample // cfg.batch)):
            t0 = time.perf_counter_ns()
            for _ in range(cfg.batch):
                fn()
            per_op.append((time.perf_counter_ns() - t0) / cfg.batch / 1000)
        return _median(per_op)

    problem = compare(value, loads(chat_blob)) or compare(wl.plain_value(0), loads(plain_blob))
    return {
        "hit_us": timed(lambda: loads(chat_blob)),
        "hit_plain_us": timed(lambda: loads(plain_blob)),
        "update_us": timed(lambda: dumps(value, proto)),
        "fidelity_ok": problem is None,
        "fidelity_problem": problem,
        "fresh_objects": True,
        "value_pickle_bytes": len(chat_blob),
        "rss_mb": peak_rss_mb(),
    }

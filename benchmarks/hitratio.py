"""Hit ratio at equal bytes: shmcache against libCacheSim's policies, and entries per MiB.

Run from the repository root::

    python -m benchmarks.hitratio --quick        # ~1 minute: 100k requests per workload
    python -m benchmarks.hitratio                # 300k requests per workload, a few minutes
    python -m benchmarks.hitratio --workloads zipf0.8,short --out /tmp/hr

Method (also printed at the top of the report):

* **Traces** (``benchmarks/traces.py``): seeded synthetic LLM traffic, one trace per
  workload; a request names a prompt and carries the size of its value (the msgpack
  payload shmcache stores, fixed per prompt).
* **shmcache** replays each trace through a real :class:`SharedMemoryCache` (a segment
  in a fresh temporary directory under /dev/shm, ``coalesce=False``: a single process
  has no concurrent identical misses, and the leases only add time).  Each request is
  a ``lookup``; on a miss the "model" is called (counted) and the answer stored with
  ``update`` as a ``[Generation]`` whose payload has exactly the trace's size (text cut
  from an English-ish corpus, so a compressing cache sees realistic text).  Model
  calls = misses.  The segment's own ``stats()`` deltas must equal what the replay
  counted (hits, misses, updates = misses, skipped = 0) or the row is not published.
* **Memory**: ``size_bytes`` is the budget, 10 % of the distinct prompts' record bytes
  (at least shmcache's 1 MiB minimum).  libCacheSim's policies (default parameters)
  see the same request sequence with each object's size = the log bytes shmcache's
  record of that value takes (record header and alignment included, measured by
  storing each distinct value size once and reading ``stats().used_bytes``), and get
  two capacities, both reported: the segment's usable log bytes (same data space:
  compares policies) and the whole ``size_bytes`` (header and index counted as if they
  were data: compares systems, generous to the simulated policies, which keep their
  metadata for free).
* **Offline bound**: libCacheSim's Belady (evict the object re-requested furthest in
  the future) and BeladySize (size-aware sampling variant); with variable sizes neither
  is a strict optimum, but both are far below any online policy.
* **Entries per MiB**: each store at the same byte budget, filled with 3x more
  distinct entries than could fit; count the entries that still hit.  The peers store
  ``pickle`` of the generations under a 32-byte digest (as ``benchmarks/adapters.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import pickle
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from benchmarks import traces

MIB: Final = 1 << 20
LLM_STRING: Final = '{"model_name": "gpt-4o-mini", "temperature": 0.2}---[("stop", None)]'
DEFAULT_FRACTION: Final = 0.10

ONLINE_POLICIES: Final = ("LRU", "CLOCK", "SIEVE", "S3-FIFO", "ARC", "2Q", "W-TinyLFU")
"""The goal set of issue 10 (libCacheSim defaults)."""
REFERENCE_POLICIES: Final = ("FIFO",)
"""FIFO: what shmcache's format-1 log does, as a check of the replay."""
OFFLINE_POLICIES: Final = ("Belady", "BeladySize")
ALL_POLICIES: Final = ONLINE_POLICIES + REFERENCE_POLICIES + OFFLINE_POLICIES
_LCS_CLASS: Final = {
    "LRU": "LRU",
    "CLOCK": "Clock",
    "SIEVE": "Sieve",
    "S3-FIFO": "S3FIFO",
    "ARC": "ARC",
    "2Q": "TwoQ",
    "W-TinyLFU": "WTinyLFU",
    "FIFO": "FIFO",
    "Belady": "Belady",
    "BeladySize": "BeladySize",
}
BUDGETS: Final = ("log", "segment")
_BUDGET_TITLE: Final = {
    "log": "libCacheSim capacity = shmcache's usable log bytes (same data space)",
    "segment": "libCacheSim capacity = the whole size_bytes (header + index counted as data)",
}


@dataclass(frozen=True)
class Mode:
    """Sizes of one run."""

    requests: int
    objects: int
    entries_budget_bytes: int


FULL: Final = Mode(requests=300_000, objects=100_000, entries_budget_bytes=32 * MIB)
QUICK: Final = Mode(requests=100_000, objects=33_000, entries_budget_bytes=4 * MIB)


# -- values of an exact payload size --------------------------------------------------


@functools.cache
def text_chars_for_payload(payload_bytes: int) -> int:
    """Characters of ASCII text whose ``[Generation(text=...)]`` payload has this size.

    Found by encoding (so a codec change cannot silently change the sizes); when no
    length gives the size exactly (the msgpack string header grows at 32 and 256
    characters), the largest length below it.
    """
    from langchain_core.outputs import Generation

    from shmcache._codec import encode_generations

    def size(n: int) -> int:
        return len(encode_generations([Generation(text="a" * n)]))

    with uncompressed():  # a trace's sizes are payload bytes as they are
        n = max(1, payload_bytes - (size(1000) - 1000))
        while n > 1 and size(n) > payload_bytes:
            n -= 1
        while size(n + 1) <= payload_bytes:
            n += 1
    return n


@contextlib.contextmanager
def uncompressed() -> Iterator[None]:
    """Compression off inside (where the codec has a switch), as it was after."""
    switch = _compression_switch()
    if switch is None:
        yield
        return
    from shmcache import _compress  # type: ignore[attr-defined,unused-ignore]

    was = bool(_compress.is_enabled())
    switch(False)
    try:
        yield
    finally:
        switch(was)


def make_value(obj_id: int, payload_bytes: int) -> list[Any]:
    """The answer stored for ``obj_id``: distinct English-ish text of the given payload size."""
    from langchain_core.outputs import Generation

    return [Generation(text=traces.text_slice(obj_id, text_chars_for_payload(payload_bytes)))]


def prompt_of(obj_id: int) -> str:
    """The prompt of object ``obj_id`` (its length does not matter: keys are digests)."""
    return f'[{{"role": "user", "content": "question #{obj_id}"}}]'


# -- shmcache -------------------------------------------------------------------------


@contextlib.contextmanager
def _scratch_dir(prefix: str) -> Iterator[str]:
    root = "/dev/shm" if os.path.isdir("/dev/shm") else None
    path = tempfile.mkdtemp(prefix=prefix, dir=root)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _open_cache(directory: str, size_bytes: int) -> Any:
    from shmcache import SharedMemoryCache

    return SharedMemoryCache(
        f"hr-{uuid.uuid4().hex[:12]}",
        size_bytes=size_bytes,
        directory=directory,
        coalesce=False,
    )


def segment_layout(cache: Any) -> dict[str, int]:
    """size_bytes, usable log bytes and index slots of an open cache (private API)."""
    geometry = cache._open_arena().geometry
    # Format 3 splits the data space into a main and a small log: count both.
    data_bytes = getattr(geometry, "data_bytes", geometry.log_size)
    out = {"size_bytes": int(geometry.size_bytes), "log_bytes": int(data_bytes)}
    n_buckets = getattr(geometry, "n_buckets", None)
    from shmcache import _arena

    slots = getattr(_arena, "SLOTS_PER_BUCKET", None)
    if n_buckets is not None and slots is not None:
        out["index_slots"] = int(n_buckets) * int(slots)
    return out


def measure_record_bytes(payload_sizes: Sequence[int], *, sample: int = 64) -> dict[int, int]:
    """Log bytes shmcache takes for a value of each payload size, as ``stats()`` counts them.

    Values are stored under fresh keys in a probe segment and the growth of
    ``used_bytes`` is that record's size (header, alignment and any compression
    included).  A spread sample of the sizes is probed first; when every probe equals
    the arena's own ``record_bytes(payload)`` the formula is used for the rest (fast),
    otherwise every size is probed.
    """
    sizes = sorted(set(int(s) for s in payload_sizes))
    picks = sorted(set(sizes[:: max(1, len(sizes) // sample)] + sizes[-1:]))
    probed, formula = _probe_record_bytes(picks)
    if formula is not None and all(formula(s) == probed[s] for s in picks):
        return {s: formula(s) for s in sizes}
    return _probe_record_bytes(sizes)[0]


def _probe_record_bytes(
    sizes: Sequence[int],
) -> tuple[dict[int, int], Callable[[int], int] | None]:
    probe_bytes = 16 * MIB
    out: dict[int, int] = {}
    with _scratch_dir("shmcache-hr-probe-") as directory:
        cache = _open_cache(directory, probe_bytes)
        try:
            arena = cache._open_arena()
            record_bytes = getattr(arena, "record_bytes", None)
            formula = (
                None
                if record_bytes is None
                else functools.lru_cache(None)(lambda n: int(record_bytes(n)))
            )
            used = cache.stats().used_bytes
            for k, size in enumerate(sizes):
                if used > probe_bytes // 4:
                    cache.clear()  # no eviction may happen during the probe
                    used = cache.stats().used_bytes
                cache.update(prompt_of(-1 - k), LLM_STRING, make_value(k, size))
                now = cache.stats().used_bytes
                out[size] = now - used
                used = now
            stats = cache.stats()
            if stats.evictions or stats.skipped or stats.updates != len(sizes):
                raise RuntimeError(f"record-size probe lost entries: {stats}")
        finally:
            cache.close()
            cache.unlink()
    return out, formula


def replay_shmcache(trace: traces.Trace, size_bytes: int) -> dict[str, Any]:
    """Replay ``trace`` through a real SharedMemoryCache of ``size_bytes``."""
    ids = trace.obj_ids.tolist()
    sizes = trace.sizes.tolist()
    with _scratch_dir("shmcache-hr-") as directory:
        cache = _open_cache(directory, size_bytes)
        try:
            layout = segment_layout(cache)
            before = cache.stats()
            hits = misses = 0
            lookup, update = cache.lookup, cache.update
            started = time.perf_counter()
            for obj, size in zip(ids, sizes, strict=True):
                prompt = prompt_of(obj)
                if lookup(prompt, LLM_STRING) is None:
                    misses += 1  # the model is called
                    update(prompt, LLM_STRING, make_value(obj, size))
                else:
                    hits += 1
            seconds = time.perf_counter() - started
            after = cache.stats()
        finally:
            cache.close()
            cache.unlink()
    delta = {
        k: getattr(after, k) - getattr(before, k)
        for k in ("hits", "misses", "updates", "evictions", "skipped")
    }
    problems = []
    if hits + misses != trace.n_requests:
        problems.append(f"hits {hits} + misses {misses} != {trace.n_requests} requests")
    for name, counted in (("hits", hits), ("misses", misses), ("updates", misses)):
        if delta[name] != counted:
            problems.append(f"stats().{name} grew by {delta[name]}, the replay counted {counted}")
    if delta["skipped"]:
        problems.append(f"{delta['skipped']} updates skipped")
    return {
        **layout,
        "hits": hits,
        "misses": misses,
        "model_calls": misses,
        "stats_delta": delta,
        "end_entries": after.entries,
        "end_used_bytes": after.used_bytes,
        "seconds": seconds,
        "us_per_request": seconds / trace.n_requests * 1e6,
        "problems": problems,
    }


# -- libCacheSim ----------------------------------------------------------------------


def _oracle_file(trace: traces.Trace, object_sizes: np.ndarray, path: str) -> None:
    """Write the trace in libCacheSim's oracleGeneral binary format (with next access)."""
    n = trace.n_requests
    ids = trace.obj_ids
    order = np.lexsort((np.arange(n), ids))  # by object, then time
    nxt = np.full(n, -1, dtype=np.int64)
    same = ids[order[1:]] == ids[order[:-1]]
    nxt[order[:-1][same]] = order[1:][same]
    record = np.dtype([("t", "<u4"), ("id", "<u8"), ("size", "<u4"), ("next", "<i8")])
    out = np.zeros(n, dtype=record)
    out["t"] = np.arange(n)
    out["id"] = ids + 1  # libCacheSim treats object id 0 as no object
    out["size"] = object_sizes
    out["next"] = nxt
    out.tofile(path)


def simulate(
    trace: traces.Trace,
    object_sizes: np.ndarray,
    capacities: dict[str, int],
    policies: Sequence[str] = ALL_POLICIES,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Model calls of each libCacheSim policy at each capacity: ``{budget: {policy: row}}``."""
    import libcachesim as lcs  # type: ignore[import-untyped]

    out: dict[str, dict[str, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="hr-trace-") as tmp:
        path = os.path.join(tmp, "trace.oracleGeneral.bin")
        _oracle_file(trace, object_sizes, path)
        reader = lcs.TraceReader(path, lcs.TraceType.ORACLE_GENERAL_TRACE)
        n_req = reader.get_num_of_req()
        hashpower = max(16, len(trace.distinct[0]).bit_length() + 1)
        if n_req != trace.n_requests:
            raise RuntimeError(f"libCacheSim read {n_req} requests of {trace.n_requests}")
        for budget, capacity in capacities.items():
            rows: dict[str, dict[str, Any]] = {}
            for policy in policies:
                # hashpower only sizes libCacheSim's hash table (its default, 2**24
                # buckets, costs more to allocate than the simulation takes).
                cache = getattr(lcs, _LCS_CLASS[policy])(capacity, hashpower=hashpower)
                started = time.perf_counter()
                miss_ratio, _ = cache.process_trace(reader)
                misses = round(miss_ratio * n_req)
                rows[policy] = {
                    "model_calls": misses,
                    "hits": n_req - misses,
                    "seconds": time.perf_counter() - started,
                }
            out[budget] = rows
        # No reader.close(): libcachesim 0.3.5 frees the reader again when it is
        # collected (double free); the file goes with the temporary directory.
        del reader
    return out


# -- one workload ---------------------------------------------------------------------


def run_workload(
    trace: traces.Trace,
    fraction: float,
    object_size_mode: str = "record",
    policies: Sequence[str] = ALL_POLICIES,
) -> dict[str, Any]:
    """shmcache and every policy on one trace at equal bytes."""
    from shmcache import _arena

    min_size = int(getattr(_arena, "MIN_SIZE_BYTES", MIB))
    _, first = trace.distinct
    record_of = measure_record_bytes(np.unique(trace.sizes).tolist())
    record_sizes = np.vectorize(record_of.__getitem__, otypes=[np.int64])(trace.sizes)
    distinct_record_bytes = int(record_sizes[first].sum())
    size_bytes = max(min_size, round(fraction * distinct_record_bytes) // 8 * 8)
    shm = replay_shmcache(trace, size_bytes)
    compressed = None
    compress = _compression_switch()
    if compress is not None:  # the same replay with compression on, for its own column
        compress(True)
        try:
            compressed = replay_shmcache(trace, size_bytes)
        finally:
            compress(False)
    object_sizes = record_sizes if object_size_mode == "record" else trace.sizes
    capacities = {"log": shm["log_bytes"], "segment": shm["size_bytes"]}
    sim = simulate(trace, object_sizes, capacities, policies)
    calls = shm["model_calls"]
    verdicts: dict[str, Any] = {}
    for budget, rows in sim.items():
        for row in rows.values():
            row["ratio"] = row["model_calls"] / calls if calls else float("nan")
        online = {p: rows[p]["model_calls"] for p in ONLINE_POLICIES if p in rows}
        if online:
            best = min(online, key=online.__getitem__)
            verdicts[budget] = {
                "best_online": best,
                "best_online_calls": online[best],
                "best_online_ratio": online[best] / calls if calls else float("nan"),
                "shmcache_excess": calls / online[best] - 1 if online[best] else float("nan"),
                "shmcache_le_best_online": calls <= online[best],
            }
    return {
        "workload": trace.spec.name,
        "description": trace.spec.description,
        "goal": trace.spec.goal,
        "trace": trace.describe(),
        "record_bytes_mean": float(record_sizes[first].mean()),
        "distinct_record_bytes": distinct_record_bytes,
        "size_bytes": size_bytes,
        "fraction": size_bytes / distinct_record_bytes,
        "object_sizes": object_size_mode,
        "shmcache": shm,
        "shmcache_compressed": compressed,
        "policies": sim,
        "verdict": verdicts,
    }


def _compression_switch() -> Callable[[bool], None] | None:
    """``shmcache._compress.set_enabled`` where the codec compresses, else None."""
    try:
        from shmcache import _compress  # type: ignore[attr-defined,unused-ignore]
    except ImportError:
        return None
    switch = getattr(_compress, "set_enabled", None)
    return switch if callable(switch) else None


# -- entries per MiB ----------------------------------------------------------------------


def _digest(prompt: str) -> bytes:
    return hashlib.sha256(prompt.encode() + b"\0" + LLM_STRING.encode()).digest()


def _pickled(value: list[Any]) -> bytes:
    return pickle.dumps(list(value), pickle.HIGHEST_PROTOCOL)


ENTRY_KINDS: Final[dict[str, Callable[[int], list[Any]]]] = {
    "chat ~1.9 KB": lambda i: traces.chat_value(i, 0, prose=traces.text_slice(i, 1330 + i % 64)),
    "chat short": lambda i: traces.chat_value(i, 0, prose=traces.text_slice(i, 40 + i % 16)),
    "plain 450 B": lambda i: make_value(i, 440 + i % 16),
}
"""Value makers for the entries-per-MiB table (chat: an OpenAI-style ChatGeneration)."""


def _count_shmcache(budget: int, values: Callable[[int], list[Any]], n: int) -> dict[str, Any]:
    with _scratch_dir("shmcache-hr-entries-") as directory:
        cache = _open_cache(directory, budget)
        try:
            for i in range(n):
                cache.update(prompt_of(i), LLM_STRING, values(i))
            held = sum(cache.lookup(prompt_of(i), LLM_STRING) is not None for i in range(n))
            stats = cache.stats()
        finally:
            cache.close()
            cache.unlink()
    return {
        "entries": held,
        "bytes": budget,
        "stats_entries": stats.entries,
        "note": f"size_bytes={budget}",
    }


def _count_lmdb(budget: int, values: Callable[[int], list[Any]], n: int) -> dict[str, Any]:
    import lmdb

    with _scratch_dir("shmcache-hr-lmdb-") as directory:
        env = lmdb.open(directory, map_size=budget, sync=False, metasync=False)
        try:
            stored = 0
            for i in range(n):
                try:
                    with env.begin(write=True) as txn:
                        txn.put(_digest(prompt_of(i)), _pickled(values(i)))
                    stored += 1
                except lmdb.MapFullError:
                    break  # lmdb never evicts: a full map refuses writes
            with env.begin() as txn:
                held = sum(txn.get(_digest(prompt_of(i))) is not None for i in range(n))
            entries = env.stat()["entries"]
        finally:
            env.close()
    return {
        "entries": held,
        "bytes": budget,
        "stats_entries": entries,
        "note": "map_size; full map refuses writes (no eviction)",
    }


def _count_diskcache(budget: int, values: Callable[[int], list[Any]], n: int) -> dict[str, Any]:
    import diskcache  # type: ignore[import-untyped]

    with _scratch_dir("shmcache-hr-diskcache-") as directory:
        cache = diskcache.Cache(
            directory, size_limit=budget, eviction_policy="least-recently-stored"
        )
        try:
            for i in range(n):
                cache.set(_digest(prompt_of(i)), _pickled(values(i)))
            held = sum(cache.get(_digest(prompt_of(i))) is not None for i in range(n))
            volume = cache.volume()
        finally:
            cache.close()
        on_disk = sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())
    return {
        "entries": held,
        "bytes": budget,
        "stats_entries": held,
        "note": f"size_limit; volume() {volume / MIB:.1f} MiB, files {on_disk / MIB:.1f} MiB",
    }


def _count_warp(budget: int, values: Callable[[int], list[Any]], n: int) -> dict[str, Any]:
    from warp_cache._warp_cache_rs import SharedCachedFunction

    def never(*args: Any) -> Any:
        raise RuntimeError("never called")

    max_value = max(len(_pickled(values(i))) for i in range(min(n, ENTRY_VARIANTS))) + 64
    names: list[str] = []

    def make(entries: int) -> tuple[Any, int]:
        name = f"shmcache-hr-warp-{uuid.uuid4().hex[:12]}"
        names.append(name)
        fn = SharedCachedFunction(
            never, entries, max_key_size=128, max_value_size=max_value, shm_name=name
        )
        return fn, os.path.getsize(f"/dev/shm/{name}.data")

    try:
        _, small = make(1000)
        _, large = make(2000)
        per_entry = (large - small) / 1000
        fixed = small - 1000 * per_entry
        slots = int((budget - fixed) // per_entry)
        fn, size = make(slots)
        for i in range(n):
            fn.set(_pickled(values(i)), _digest(prompt_of(i)))
        held = sum(fn.get(_digest(prompt_of(i))) is not None for i in range(n))
        skips = int(fn.cache_info().oversize_skips)
    finally:
        for name in names:
            for suffix in (".data", ".lock"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"/dev/shm/{name}{suffix}")
    return {
        "entries": held,
        "bytes": size,
        "stats_entries": slots,
        "note": f"{slots} fixed slots of {per_entry:.0f} B (max_value_size {max_value})"
        + (f", {skips} oversize skips" if skips else ""),
    }


PEER_COUNTERS: Final = {
    "shmcache": _count_shmcache,
    "lmdb": _count_lmdb,
    "diskcache": _count_diskcache,
    "warp-cache": _count_warp,
}


ENTRY_VARIANTS: Final = 512
"""Distinct values per kind, cycled over the keys (building each costs ~0.2 ms)."""


def entries_per_mib(budget: int) -> dict[str, Any]:
    """Entries each store keeps at ``budget`` bytes, per value kind."""
    from shmcache._codec import encode_generations

    out: dict[str, Any] = {}
    for kind, make in ENTRY_KINDS.items():
        pool: list[list[Any]] = [make(i) for i in range(ENTRY_VARIANTS)]

        def values(i: int, pool: list[list[Any]] = pool) -> list[Any]:
            return pool[i % ENTRY_VARIANTS]

        payload = float(np.mean([len(encode_generations(v)) for v in pool]))
        pickled = float(np.mean([len(_pickled(v)) for v in pool]))
        n = int(3 * budget / payload)
        rows: dict[str, Any] = {}
        for peer, counter in PEER_COUNTERS.items():
            try:
                row = counter(budget, values, n)
            except ImportError as exc:
                rows[peer] = {"skipped": f"not installed ({exc})"}
                continue
            row["per_mib"] = row["entries"] / (row["bytes"] / MIB)
            rows[peer] = row
        out[kind] = {
            "msgpack_bytes": payload,
            "pickle_bytes": pickled,
            "inserted": n,
            "stores": rows,
        }
    return out


# -- report ---------------------------------------------------------------------------


def _fmt_ratio(x: float) -> str:
    return f"{x:.2f}"


def render(results: dict[str, Any]) -> str:
    """The markdown report."""
    lines = [f"# shmcache hit ratio at equal bytes ({results['mode']})", ""]
    env = results["environment"]
    lines += [
        f"shmcache {env['shmcache']} at {results.get('label') or env.get('commit', '?')} "
        f"(segment format {env['format_version']}; eviction: "
        f"{env['eviction']}), libcachesim {env['libcachesim']}, Python {env['python']}, "
        f"seed {results['seed']}, {results['requests']:,} requests per workload, catalogue "
        f"{results['objects']:,} prompts, budget {results['fraction']:.0%} of the distinct "
        f"prompts' record bytes; libCacheSim object sizes = {results['object_sizes']} bytes.",
        "",
        "Model calls = misses (each miss calls the model once, then stores its answer). "
        "Ratio = policy's model calls / shmcache's (below 1: the policy saves calls).",
        "",
    ]
    workloads = results["workloads"]
    lines += [
        "## Workloads",
        "",
        "| workload | distinct prompts | one-hit share | mean value B | mean record B "
        "| size_bytes | log bytes | index slots | shmcache µs/request |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for w in workloads:
        t, s = w["trace"], w["shmcache"]
        lines.append(
            f"| {w['workload']} | {t['distinct_objects']:,} | {t['one_hit_wonder_share']:.0%} "
            f"| {t['value_bytes_mean']:.0f} | {w['record_bytes_mean']:.0f} "
            f"| {s['size_bytes'] / MIB:.2f} MiB | {s['log_bytes'] / MIB:.2f} MiB "
            f"| {s.get('index_slots', 0):,} | {s['us_per_request']:.1f} |"
        )
    lines.append("")
    policies = [p for p in ALL_POLICIES if p in workloads[0]["policies"]["log"]]
    with_compressed = any(w.get("shmcache_compressed") for w in workloads)
    extra = " shmcache, compression on |" if with_compressed else ""
    lines += [
        "## Model calls (libCacheSim at the usable log bytes)",
        "",
        f"Compression: {results.get('compression', 'not recorded')}"
        + (
            " (libCacheSim's object sizes stay the uncompressed record bytes)."
            if with_compressed
            else "."
        ),
        "",
        "| workload | requests | shmcache |" + extra + " " + " | ".join(policies) + " |",
        "|---|---:|---:|" + ("---:|" if with_compressed else "") + "---:|" * len(policies),
    ]
    for w in workloads:
        rows = w["policies"]["log"]
        compressed = w.get("shmcache_compressed")
        cell = (
            f" {compressed['model_calls']:,} |" if compressed else " |"
        ) if with_compressed else ""
        lines.append(
            f"| {w['workload']} | {w['trace']['requests']:,} | "
            f"{w['shmcache']['model_calls']:,} |{cell} "
            + " | ".join(f"{rows[p]['model_calls']:,}" for p in policies)
            + " |"
        )
    lines.append("")
    if with_compressed:
        # The system as shipped (compression on) against the best online policy at
        # the same bytes, the policies keeping every entry at its uncompressed size.
        lines += [
            "## shmcache as shipped (compression on) against the best online policy",
            "",
            "Same data space; libCacheSim's objects keep their uncompressed record bytes "
            "(what a store that does not compress holds).",
            "",
            "| workload | shmcache, compression off | shmcache, compression on "
            "| best online | off vs best | on vs best |",
            "|---|---:|---:|---|---:|---:|",
        ]
        online = [p for p in policies if p in ONLINE_POLICIES]
        for w in workloads:
            compressed = w.get("shmcache_compressed")
            if not compressed:
                continue
            rows = w["policies"]["log"]
            best = min(online, key=lambda p: rows[p]["model_calls"])
            best_calls = rows[best]["model_calls"]
            off, on = w["shmcache"]["model_calls"], compressed["model_calls"]
            lines.append(
                f"| {w['workload']} | {off:,} | {on:,} | {best} {best_calls:,} "
                f"| {off / best_calls - 1:+.1%} | {on / best_calls - 1:+.1%} |"
            )
        lines.append("")
    for budget in BUDGETS:
        lines += [
            f"## Ratio to shmcache — {_BUDGET_TITLE[budget]}",
            "",
            "| workload | " + " | ".join(policies) + " | best online | shmcache ≤ best online |",
            "|---|" + "---:|" * len(policies) + "---|---|",
        ]
        for w in workloads:
            rows = w["policies"][budget]
            v = w["verdict"][budget]
            verdict = (
                "**yes**"
                if v["shmcache_le_best_online"]
                else f"no: +{v['shmcache_excess']:.1%} calls"
            )
            name = w["workload"] + ("" if w["goal"] else " (extra)")
            cells = " | ".join(_fmt_ratio(rows[p]["ratio"]) for p in policies)
            best = f"{v['best_online']} {_fmt_ratio(v['best_online_ratio'])}"
            lines.append(f"| {name} | {cells} | {best} | {verdict} |")
        lines.append("")
    bad = [
        (w["workload"], w["shmcache"]["problems"]) for w in workloads if w["shmcache"]["problems"]
    ]
    lines += ["## Counting checks", ""]
    if bad:
        lines += [f"- **{name}: not valid**: {'; '.join(p)}" for name, p in bad]
    else:
        lines.append(
            "Every replay: hits + misses = requests, and the segment's stats() deltas "
            "equal the replay's own counts (hits, misses, updates = misses, 0 skipped)."
        )
    lines.append("")
    entries = results.get("entries_per_mib")
    if entries:
        budget = results["entries_budget_bytes"]
        lines += [
            f"## Entries per MiB at {budget / MIB:.0f} MiB",
            "",
            "| value | msgpack B | pickle B | store | entries held | bytes | entries/MiB | note |",
            "|---|---:|---:|---|---:|---:|---:|---|",
        ]
        for kind, k in entries.items():
            for peer, row in k["stores"].items():
                if "skipped" in row:
                    lines.append(f"| {kind} | | | {peer} | skipped: {row['skipped']} | | | |")
                    continue
                lines.append(
                    f"| {kind} | {k['msgpack_bytes']:.0f} | {k['pickle_bytes']:.0f} | {peer} "
                    f"| {row['entries']:,} | {row['bytes'] / MIB:.2f} MiB | {row['per_mib']:.0f} "
                    f"| {row['note']} |"
                )
        lines.append("")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    """Grouped bars: each policy's model calls relative to shmcache, per workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = results["workloads"]
    policies = [
        p
        for p in ONLINE_POLICIES + REFERENCE_POLICIES + ("Belady",)
        if p in workloads[0]["policies"]["log"]
    ]
    x = np.arange(len(workloads))
    width = 0.8 / len(policies)
    fig, ax = plt.subplots(figsize=(12, 4.5))
    for k, policy in enumerate(policies):
        ax.bar(
            x + k * width - 0.4 + width / 2,
            [w["policies"]["log"][policy]["ratio"] for w in workloads],
            width,
            label=policy,
        )
    ax.axhline(1.0, color="black", linewidth=1)
    low = min(w["policies"]["log"][p]["ratio"] for w in workloads for p in policies)
    high = max(w["policies"]["log"][p]["ratio"] for w in workloads for p in policies)
    ax.set_ylim(max(0.0, low - 0.05), high + 0.12)
    ax.set_xticks(x, [w["workload"] for w in workloads])
    ax.set_ylabel("model calls / shmcache's")
    ax.set_title(
        f"Model calls relative to shmcache ({results['environment']['eviction']}), equal log bytes"
    )
    ax.legend(ncol=len(policies), fontsize=8, loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _commit(package_dir: Path) -> str:
    """The git commit of the measured shmcache (``+dirty`` with local changes), if known."""
    import subprocess

    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=package_dir,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "."],
            cwd=package_dir,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.strip() + ("+dirty" if dirty.strip() else "")


def _environment() -> dict[str, Any]:
    import platform
    from importlib import metadata

    import shmcache
    from shmcache import _arena

    doc = (_arena.__doc__ or "").upper()
    eviction = "S3-FIFO" if "S3-FIFO" in doc else ("CLOCK" if "CLOCK" in doc else "FIFO")
    return {
        "commit": _commit(Path(shmcache.__file__).resolve().parent),
        "shmcache": getattr(shmcache, "__version__", "?"),
        "format_version": getattr(_arena, "FORMAT_VERSION", "?"),
        "eviction": eviction,
        "libcachesim": metadata.version("libcachesim"),
        "python": platform.python_version(),
    }


def run(
    *,
    mode: Mode,
    mode_name: str,
    workloads: Sequence[str],
    seed: int,
    fraction: float,
    object_sizes: str,
    entries: bool,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the study and return the results (see :func:`render`)."""
    results: dict[str, Any] = {
        "mode": mode_name,
        "seed": seed,
        "requests": mode.requests,
        "objects": mode.objects,
        "fraction": fraction,
        "object_sizes": object_sizes,
        "environment": _environment(),
        "compression": "off for the comparison; a second replay with it on"
        if _compression_switch() is not None
        else "not available (no shmcache._compress.set_enabled)",
        "entries_budget_bytes": mode.entries_budget_bytes,
        "workloads": [],
    }
    compress = _compression_switch()
    if compress is not None:
        # The policy comparison sees the same object sizes as libCacheSim: stored as
        # they are.  Each workload is replayed once more with compression on.
        compress(False)
    for name in workloads:
        started = time.perf_counter()
        trace = traces.make_trace(name, mode.requests, mode.objects, seed)
        row = run_workload(trace, fraction, object_sizes)
        results["workloads"].append(row)
        v = row["verdict"]["log"]
        log(
            f"{name}: shmcache {row['shmcache']['model_calls']:,} calls, best online "
            f"{v['best_online']} {v['best_online_calls']:,} ({v['best_online_ratio']:.2f}x) "
            f"[{time.perf_counter() - started:.1f} s]"
        )
    if entries:
        started = time.perf_counter()
        results["entries_per_mib"] = entries_per_mib(mode.entries_budget_bytes)
        log(f"entries per MiB [{time.perf_counter() - started:.1f} s]")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.hitratio", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="100k requests per workload (~1 min)")
    parser.add_argument("--requests", type=int, help="override the trace length")
    parser.add_argument("--objects", type=int, help="override the catalogue size")
    parser.add_argument(
        "--workloads",
        default=",".join(w.name for w in traces.WORKLOADS),
        help="comma-separated subset of: " + ", ".join(w.name for w in traces.WORKLOADS),
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--fraction",
        type=float,
        default=DEFAULT_FRACTION,
        help="size_bytes as a share of the distinct prompts' record bytes",
    )
    parser.add_argument(
        "--object-sizes",
        choices=("record", "payload"),
        default="record",
        help="libCacheSim object size: shmcache's record bytes (default) or the raw payload bytes",
    )
    parser.add_argument("--no-entries", action="store_true", help="skip entries per MiB")
    parser.add_argument(
        "--label", help="names the measured code in the report (default: its git commit)"
    )
    parser.add_argument("--entries-budget-mib", type=float, help="entries-per-MiB budget")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).parent / "results",
        help="writes hitratio.md, hitratio.json and hitratio.png here",
    )
    args = parser.parse_args(argv)
    mode = QUICK if args.quick else FULL
    mode = Mode(
        requests=args.requests or mode.requests,
        objects=args.objects or mode.objects,
        entries_budget_bytes=int(args.entries_budget_mib * MIB)
        if args.entries_budget_mib
        else mode.entries_budget_bytes,
    )
    names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    unknown = sorted(set(names) - {w.name for w in traces.WORKLOADS})
    if unknown:
        parser.error(f"unknown workloads: {', '.join(unknown)}")
    started = time.perf_counter()
    results = run(
        mode=mode,
        mode_name="quick" if args.quick else "full",
        workloads=names,
        seed=args.seed,
        fraction=args.fraction,
        object_sizes=args.object_sizes,
        entries=not args.no_entries,
        log=lambda s: print(s, file=sys.stderr, flush=True),
    )
    results["seconds"] = time.perf_counter() - started
    results["label"] = args.label
    args.out.mkdir(parents=True, exist_ok=True)
    report = render(results)
    (args.out / "hitratio.md").write_text(report + "\n")
    (args.out / "hitratio.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
    with contextlib.suppress(ImportError):  # matplotlib is optional
        plot(results, args.out / "hitratio.png")
    print(report)
    print(
        f"\n({results['seconds']:.0f} s; wrote {args.out}/hitratio.md, .json, .png)",
        file=sys.stderr,
    )
    invalid = any(w["shmcache"]["problems"] for w in results["workloads"])
    return 1 if invalid else 0


if __name__ == "__main__":
    sys.exit(main())

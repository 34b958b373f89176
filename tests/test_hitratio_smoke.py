"""Smoke test of the hit-ratio and compression studies (``benchmarks/hitratio.py``,
``benchmarks/compression.py``) on tiny sizes.

Never asserts timings or hit ratios — only that both run end to end, write their
reports, and that every phase accounts for every request: shmcache's replay counts
hits + misses = requests and the segment's own ``stats()`` agree with it, every
simulated policy accounts for every request, no cache does better than the compulsory
misses, and every compressed payload comes back byte for byte (bounded).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from benchmarks import traces

TINY_REQUESTS = 3_000
TINY_OBJECTS = 1_000


def _scratch_leftovers() -> set[str]:
    if not os.path.isdir("/dev/shm"):
        return set()
    return {n for n in os.listdir("/dev/shm") if n.startswith(("shmcache-hr-", "shmcache-compr"))}


def test_traces_are_seeded_and_shaped() -> None:
    a = traces.make_trace("zipf0.8", 5_000, 1_000, seed=3)
    b = traces.make_trace("zipf0.8", 5_000, 1_000, seed=3)
    c = traces.make_trace("zipf0.8", 5_000, 1_000, seed=4)
    assert np.array_equal(a.obj_ids, b.obj_ids) and np.array_equal(a.sizes, b.sizes)
    assert not np.array_equal(a.obj_ids, c.obj_ids)
    # A prompt's value has one size, whatever request carries it.
    for trace in (a, traces.make_trace("zipf0.8-ohw", 5_000, 1_000)):
        per_object: dict[int, int] = {}
        for obj, size in zip(trace.obj_ids.tolist(), trace.sizes.tolist(), strict=True):
            assert per_object.setdefault(obj, size) == size
    ohw = traces.make_trace("zipf0.8-ohw", 10_000, 1_000)
    fresh = (ohw.obj_ids >= ohw.n_objects).mean()
    assert 0.45 < fresh < 0.55
    assert len(np.unique(ohw.obj_ids[ohw.obj_ids >= ohw.n_objects])) == (ohw.obj_ids >= 1_000).sum()
    short = traces.make_trace("short", 5_000, 1_000)
    assert short.sizes.min() >= 300 and short.sizes.max() <= 600
    shift = traces.make_trace("shift", 10_000, 1_000)

    def top(ids: np.ndarray) -> set[int]:
        objects, counts = np.unique(ids, return_counts=True)
        return set(objects[np.argsort(-counts)[:20]].tolist())

    assert len(top(shift.obj_ids[:5_000]) & top(shift.obj_ids[5_000:])) < 10
    assert traces.english_text(1, 500) == traces.english_text(1, 500)
    assert len(traces.english_text(2, 777)) == 777


def test_payload_sizes_are_exact() -> None:
    from benchmarks import hitratio
    from shmcache._codec import encode_generations

    with hitratio.uncompressed():  # trace sizes are payload bytes before compression
        for size in (300, 450, 600, 1_900, 9_000):
            assert len(encode_generations(hitratio.make_value(size, size))) == size


def test_hitratio_tiny_run_counts_every_request(tmp_path: Path) -> None:
    import libcachesim  # noqa: F401  (the [bench] extra, in [test]: a failure, never a skip)

    from benchmarks import hitratio

    before = _scratch_leftovers()
    code = hitratio.main(
        [
            "--requests",
            str(TINY_REQUESTS),
            "--objects",
            str(TINY_OBJECTS),
            "--entries-budget-mib",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    results = json.loads((tmp_path / "hitratio.json").read_text())
    report = (tmp_path / "hitratio.md").read_text()
    assert (tmp_path / "hitratio.png").stat().st_size > 0
    assert [w["workload"] for w in results["workloads"]] == [w.name for w in traces.WORKLOADS]
    for w in results["workloads"]:
        n = w["trace"]["requests"]
        compulsory = w["trace"]["distinct_objects"]
        shm = w["shmcache"]
        assert n == TINY_REQUESTS
        assert shm["problems"] == [], (w["workload"], shm["problems"])
        assert shm["hits"] + shm["misses"] == n
        assert shm["stats_delta"]["hits"] == shm["hits"]
        assert shm["stats_delta"]["misses"] == shm["misses"]
        assert shm["stats_delta"]["updates"] == shm["misses"] == shm["model_calls"]
        assert shm["stats_delta"]["skipped"] == 0
        assert shm["model_calls"] >= compulsory
        assert shm["size_bytes"] >= w["size_bytes"] and shm["log_bytes"] < shm["size_bytes"]
        assert w["workload"] in report
        for budget in hitratio.BUDGETS:
            rows = w["policies"][budget]
            assert set(rows) == set(hitratio.ALL_POLICIES)
            for policy, row in rows.items():
                assert row["hits"] + row["model_calls"] == n, (w["workload"], budget, policy)
                assert row["model_calls"] >= compulsory, (w["workload"], budget, policy)
            verdict = w["verdict"][budget]
            assert verdict["best_online"] in hitratio.ONLINE_POLICIES
            assert verdict["shmcache_le_best_online"] == (
                shm["model_calls"] <= verdict["best_online_calls"]
            )
    entries = results["entries_per_mib"]
    assert set(entries) == set(hitratio.ENTRY_KINDS)
    for kind in entries.values():
        for store, row in kind["stores"].items():
            if "skipped" in row:
                continue
            assert 0 < row["entries"] <= kind["inserted"], store
        shm_row = kind["stores"]["shmcache"]
        assert shm_row["entries"] == shm_row["stats_entries"]
    assert _scratch_leftovers() <= before


def test_compression_tiny_run_round_trips(tmp_path: Path) -> None:
    import zstandard  # the [bench] extra, in [test]: a failure, never a skip

    from benchmarks import compression

    results = compression.run(
        n_per_size=20, n_train_per_size=40, rounds=1, sizes=(307, 1024), log=lambda s: None
    )
    names = {"zlib-1", "zlib-6", "zstd-1", "zstd-3", "zstd-1+dict", "zstd-3+dict", "zlib-6+dict"}
    for row in results["rows"]:
        assert set(row["codecs"]) == names
        assert row["hit_us"] > 0
        assert abs(row["payload_bytes_mean"] - row["size"]) <= row["size"] * 0.1
        for c in row["codecs"].values():
            assert c["size_ratio"] > 0 and 0 < c["record_ratio"] <= 1
    report = compression.render(results)
    assert all(name in report for name in names)
    # Bounded decompression: a bomb is refused, not expanded.
    train = compression.training_sample(40, (307, 1024))
    bomb = bytes(1 << 20)
    for codec in compression.codecs(train):
        with pytest.raises((ValueError, zstandard.ZstdError)):
            codec.decompress(codec.compress(bomb), 4096)

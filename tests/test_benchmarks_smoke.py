"""Smoke test of the benchmark harness: ``python -m benchmarks --tiny`` end to end.

Never asserts timings — only that the run completes, writes its outputs, accounts
for every peer (measured, or skipped with a reason) and that shmcache's values come
back class-exact and fresh.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUN_TIMEOUT_S = 480


def _bench_leftovers() -> set[str]:
    """Shared-memory files/dirs that the harness creates (and must remove)."""
    if not os.path.isdir("/dev/shm"):
        return set()
    return {n for n in os.listdir("/dev/shm") if n.startswith("shmcache-bench-")}


def test_prompts_are_real_langchain_dumps() -> None:
    """The fast prompt template splices give exactly what ``dumps(messages)`` gives."""
    from langchain_core.load import dumps

    from benchmarks import workload

    for i in (0, 1, 2, 5, 11, 12, 4_321, 999_999, -1):
        assert workload.prompt(i) == dumps(workload.prompt_messages(i))
        assert 200 <= len(workload.prompt(i)) <= 600


LANGCHAIN_COMMUNITY_PEERS = ("sqlite", "redis")
"""langchain_community's own caches: importing it costs ~2-3 s per fresh process, so
they get a run of their own (each run stays well under a minute)."""


def _tiny_run(tmp_path: Path, peers: tuple[str, ...]) -> dict:
    """``python -m benchmarks --tiny --only PEERS``: outputs written, every peer accounted for.

    Returns the results JSON.
    """
    before = _bench_leftovers()
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--tiny", "--only", ",".join(peers),
         "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]

    markdown = (tmp_path / "results.md").read_text(encoding="utf-8")
    assert "| cache |" in markdown
    assert "## Targets" in markdown
    assert (tmp_path / "benchmark.png").stat().st_size > 0
    assert "| cache |" in proc.stdout  # the table is printed too

    results = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert "fatal" not in results
    assert results["machine"]["cpu_model"]
    assert set(results["peers"]) == set(peers)
    for peer in peers:
        res = results["peers"][peer]
        if "skipped" in res:
            assert res["skipped"].strip(), f"{peer} skipped without a reason"
            continue
        assert "error" not in res, f"{peer}: {res.get('detail') or res.get('error')}"
        assert "hit_us" in res, peer
        assert isinstance(res["hit_us"], float) or "hit_us" in res.get("invalid", {}), peer
        assert "fidelity_ok" in res, f"{peer}: fidelity check did not run"
        if peer == "pickle":
            continue
        counts = res["counts"]
        assert counts["hit"]["lookups"] == counts["hit"]["hits"] + counts["hit"]["misses"]
        if peer != "inmemory":  # every shared peer's mixed load counted what it did
            mixed = counts["mixed"]
            assert mixed["lookups"] > 0 and mixed["updates"] > 0, peer
            assert mixed["lookups"] == mixed["hits"] + mixed["misses"], peer
            assert mixed["resident_checked"] == 220, peer
            assert "mixed_bound_ops_s" in res, peer
    assert _bench_leftovers() <= before, "benchmark left files in /dev/shm"
    return results


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_tiny_run_measures_or_skips_every_peer(tmp_path: Path) -> None:
    """A ``--tiny`` run of every peer but langchain_community's: outputs and accounting."""
    from benchmarks.peers import PEER_IDS

    peers = tuple(p for p in PEER_IDS if p not in LANGCHAIN_COMMUNITY_PEERS)
    results = _tiny_run(tmp_path, peers)

    shm = results["peers"]["shmcache"]
    assert "skipped" not in shm, shm.get("skipped")
    assert shm["fidelity_ok"] is True, shm["fidelity_problem"]
    assert shm["fresh_objects"] is True
    assert shm["hit_missing"] == 0
    assert shm["false_hits"] == 0
    # The mixed phase's store holds every rewrite: stored keys stay resident (real hits).
    assert shm["counts"]["mixed"]["misses"] == 0
    assert shm["counts"]["mixed"]["resident_missing"] == 0
    assert shm["counts"]["mixed"]["skipped"] == 0
    assert shm["mixed_stats"]["evictions"] == 0
    assert results["entries_curve"] and results["size_curve"]
    assert {t["target"] for t in results["targets"]}  # ratios computed (values not judged)


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_tiny_run_of_langchain_community_caches(tmp_path: Path) -> None:
    """SQLiteCache and RedisCache (skipped with a reason where redis-server is missing)."""
    _tiny_run(tmp_path, LANGCHAIN_COMMUNITY_PEERS)


# --- Benchmark integrity: the checks that refuse to publish a contradicted figure. ---
# Synthetic numbers only: nothing here measures or asserts speed.


def test_throughput_bound_rejects_the_published_515k() -> None:
    """The old README figure: 515k ops/s from 2 processes at hit 8.95 µs, update 13.6 µs."""
    from benchmarks import integrity

    bound = integrity.max_ops_per_s(2, 2, hits=9_000, updates=1_000, hit_us=8.95, update_us=13.6)
    assert bound == pytest.approx(2e6 / (0.9 * 8.95 + 0.1 * 13.6))
    assert 210_000 < bound < 215_000
    reason = integrity.exceeds_bound(515_345, bound)
    assert reason is not None and "515,345" in reason
    # An honest figure, and one a little above the bound (noise, warm caches), pass.
    assert integrity.exceeds_bound(70_000, bound) is None
    assert integrity.exceeds_bound(bound * 1.2, bound) is None
    assert integrity.exceeds_bound(bound * 1.3, bound) is not None


def test_throughput_bound_counts_cores_misses_and_unknowns() -> None:
    from benchmarks import integrity

    four_on_two = integrity.max_ops_per_s(4, 2, hits=100, hit_us=10.0)
    assert four_on_two == pytest.approx(2 * 1e5)  # 4 processes cannot use more than 2 cores
    assert integrity.max_ops_per_s(4, None, hits=100, hit_us=10.0) == pytest.approx(4e5)
    # Counted misses are charged at the miss cost (the miss check rejects them anyway).
    mixed = integrity.max_ops_per_s(1, 1, hits=50, misses=50, hit_us=10.0, miss_us=2.0)
    assert mixed == pytest.approx(1e6 / 6.0)
    # Unknown miss cost: charged as a hit. Unknown update cost or empty mix: no bound.
    assert integrity.max_ops_per_s(1, 1, hits=1, misses=1, hit_us=10.0) == pytest.approx(1e5)
    assert integrity.max_ops_per_s(1, 1, hits=9, updates=1, hit_us=10.0) is None
    assert integrity.max_ops_per_s(1, 1, hits=0, hit_us=10.0) is None
    assert integrity.exceeds_bound(1e9, None) is None


def test_stored_key_misses_and_skips_beyond_tolerance_invalidate() -> None:
    from benchmarks import integrity

    assert integrity.stored_key_misses(10_000, 0) is None
    assert integrity.stored_key_misses(10_000, 10) is None  # 0.1 %: the tolerance
    why = integrity.stored_key_misses(10_000, 11)
    assert why is not None and "11 of 10,000" in why
    assert integrity.stored_key_misses(5_500, 5_311) is not None  # the FIFO case of issue 8
    assert integrity.stored_key_misses(100, -1) is not None  # inconsistent counts
    assert integrity.stored_key_misses(0, 0) is None
    assert integrity.stored_key_misses(100, None) is None
    assert integrity.skipped_updates(1_000, 0) is None
    assert integrity.skipped_updates(1_000, None) is None  # store has no skip path
    assert integrity.skipped_updates(1_000, 500) is not None


def _peer_record(**over: object) -> dict:
    res: dict = {
        "update_us": 13.6,
        "hit_us": 8.95,
        "hit_warm_us": 8.8,
        "hit_plain_us": 5.1,
        "miss_us": 1.39,
        "mixed_ops_s": 70_000.0,
        "counts": {
            "write": {"updates": 5_500, "skipped": 0},
            "hit": {"lookups": 10_000, "hits": 10_000, "misses": 0},
            "hit_plain": {"lookups": 500, "hits": 500, "misses": 0},
            "miss": {"lookups": 5_000, "hits": 0, "misses": 5_000},
            "mixed": {"lookups": 90_000, "hits": 90_000, "misses": 0, "updates": 10_000,
                      "skipped": 0, "resident_checked": 5_500, "resident_missing": 0},
        },
    }  # fmt: skip
    res.update(over)
    return res


def test_validate_peer_accepts_honest_and_rejects_contradicted_figures() -> None:
    from benchmarks import integrity

    assert integrity.validate_peer(_peer_record(), cpus=2) == {}

    # Issue 8: most "hits" of the mixed phase were misses, and the rate beat physics.
    bad = _peer_record(mixed_ops_s=515_345.0)
    bad["counts"]["mixed"].update(hits=20_000, misses=70_000, resident_missing=5_311)
    reasons = integrity.validate_peer(bad, cpus=2)
    assert set(reasons) == {"mixed_ops_s"}
    assert "missed" in reasons["mixed_ops_s"] and "after the phase" in reasons["mixed_ops_s"]

    # Physics alone: no miss counted, yet 2.4x what the per-op costs allow.
    assert (
        "per-op costs allow"
        in integrity.validate_peer(_peer_record(mixed_ops_s=515_345.0), cpus=2)["mixed_ops_s"]
    )

    # Latency figures: hits that missed, updates skipped, a "miss" that hit.
    lat = _peer_record()
    lat["counts"]["hit"]["misses"] = 900
    lat["counts"]["write"]["skipped"] = 5_500
    lat["counts"]["miss"]["hits"] = 3
    reasons = integrity.validate_peer(lat, cpus=2)
    assert {"hit_us", "hit_warm_us", "update_us", "miss_us"} <= set(reasons)
    assert "hit_plain_us" not in reasons and "mixed_ops_s" not in reasons


def test_unpublish_removes_the_figure_and_keeps_value_and_reason() -> None:
    from benchmarks import integrity

    res = _peer_record(mixed_ops_s=515_345.0)
    integrity.unpublish(res, integrity.validate_peer(res, cpus=2))
    assert res["mixed_ops_s"] is None
    assert res["invalid"]["mixed_ops_s"]["value"] == 515_345.0
    assert "per-op costs allow" in res["invalid"]["mixed_ops_s"]["reason"]
    assert res["hit_us"] == 8.95


def test_merge_rounds_unpublishes_a_figure_any_round_contradicts() -> None:
    from benchmarks import runner

    bad = _peer_record(mixed_ops_s=400_000.0)
    merged = runner.merge_rounds([_peer_record(), bad, _peer_record()], cpus=2)
    assert merged["mixed_ops_s"] is None  # the median (70k) would look fine; round 2 did not
    assert "round 2:" in merged["invalid"]["mixed_ops_s"]["reason"]
    assert merged["counts"]["mixed"]["lookups"] == 3 * 90_000  # counts are summed
    assert merged["mixed_bound_ops_s"] == pytest.approx(
        2e6 / (0.9 * 8.8 + 0.1 * 13.6)  # cheapest hit (2nd read) and the update cost
    )
    clean = runner.merge_rounds([_peer_record(), _peer_record()], cpus=2)
    assert "invalid" not in clean and clean["mixed_ops_s"] == 70_000.0
    # A failed round is left out, not judged.
    partial = runner.merge_rounds([{"error": "boom"}, _peer_record()], cpus=2)
    assert partial["rounds_failed"] == 1 and "invalid" not in partial


def test_bound_uses_the_cheapest_valid_cost_of_any_round() -> None:
    """Load that slowed one round's latency phase cannot fail a quieter round's rate."""
    from benchmarks import integrity, runner

    slow = _peer_record(hit_us=16.0, hit_warm_us=15.0, update_us=20.0, mixed_ops_s=60_000.0)
    quiet = _peer_record(mixed_ops_s=180_000.0)  # 0.84x of the bound at 8.8 / 13.6 µs
    assert integrity.validate_peer({**quiet, **integrity.best_costs([slow], 2)}, cpus=2)
    best = integrity.best_costs([slow, quiet], cpus=2)
    assert best == {"hit_us": 8.95, "hit_warm_us": 8.8, "miss_us": 1.39, "update_us": 13.6}
    # ... but a round whose "hits" missed does not lend its cheap cost to the bound.
    cheat = _peer_record(hit_us=1.0, hit_warm_us=1.0)
    cheat["counts"]["hit"]["misses"] = 9_000
    assert integrity.best_costs([slow, cheat], cpus=2)["hit_us"] == 16.0
    merged = runner.merge_rounds([slow, quiet, slow], cpus=2)
    assert "invalid" not in merged and merged["bound_costs_us"] == best


def test_report_says_which_figures_were_not_published() -> None:
    from benchmarks import integrity, report

    shm = _peer_record(mixed_ops_s=515_345.0)
    integrity.unpublish(shm, integrity.validate_peer(shm, cpus=2))
    lmdb = _peer_record(mixed_ops_s=216_812.0)
    assert integrity.validate_peer(lmdb, cpus=2) == {}
    results = {"peers": {"shmcache": shm, "lmdb-nosync": lmdb}}
    markdown = report.to_markdown(results)
    assert "515,345" not in markdown.split("## Figures not published")[0]
    assert "**not published** [1]" in markdown
    assert "1 figure(s) not published" in markdown
    assert "## Figures not published" in markdown and "per-op costs allow" in markdown
    mixed = next(t for t in report.targets(results) if "mixed" in t["target"])
    assert mixed["met"] is None and mixed["invalid"] and mixed["ratio"] is None


def test_readers_and_curve_points_are_checked_too() -> None:
    from benchmarks import integrity

    readers = {
        "readers_1_ops_s": 100_000.0,
        "readers_2_ops_s": 500_000.0,  # 2 readers at 9 µs cannot do 500k hits/s
        "scaling": 5.0,
        "counts": {
            "readers_1": {"lookups": 100_000, "hits": 100_000, "misses": 0},
            "readers_2": {"lookups": 500_000, "hits": 500_000, "misses": 0},
        },
    }
    reasons = integrity.validate_readers(readers, hit_us=9.0, cpus=2)
    assert set(reasons) == {"readers_2_ops_s", "scaling"}
    point = {"hit_us": 9.0, "hit_warm_us": 8.9, "miss_us": 1.4, "update_us": 14.0,
             "counts": {"hit": {"lookups": 2_000, "hits": 1_000, "misses": 1_000},
                        "write": {"updates": 1_000, "skipped": 0},
                        "update_more": {"updates": 1_000, "skipped": 0},
                        "miss": {"lookups": 1_000, "hits": 0, "misses": 1_000}}}  # fmt: skip
    assert set(integrity.validate_curve_point(point)) == {"hit_us", "hit_warm_us"}


def test_mixed_plan_counts_and_update_bound_are_consistent() -> None:
    """The cycle arithmetic that counts updates (and so misses) matches brute force."""
    import itertools

    from benchmarks import phases

    cfg = phases.PhaseConfig(
        entries=300, plain_entries=0, sample=10, batch=5, duration_s=0.1, windows=3,
        llm="llm", max_ops_per_window=1_000,
    )  # fmt: skip
    plan = phases.mixed_plan(cfg, 0)
    assert plan == phases.mixed_plan(cfg, 0)  # deterministic: parent and worker agree
    assert all(0 <= i < cfg.entries for i, _ in plan)
    flags = [upd for _, upd in plan]
    assert 0.05 < sum(flags) / len(flags) < 0.15
    prefix = list(itertools.accumulate(flags, initial=0))
    for start, stop in ((0, 0), (0, 2048), (5, 77), (2000, 4200), (3 * 2048 + 1, 9 * 2048 - 3)):
        brute = sum(flags[k % len(flags)] for k in range(start, stop))
        assert phases._updates_between(prefix, start, stop) == brute
    ops = cfg.windows * (cfg.max_ops_per_window + phases.WINDOW_STEP_OPS - 1)
    expected = sum(
        sum(u for _, u in itertools.islice(itertools.cycle(phases.mixed_plan(cfg, w)), ops))
        for w in (0, 1)
    )
    assert phases.mixed_updates_bound(cfg) == expected
    assert phases.mixed_updates_bound(
        phases.PhaseConfig(entries=10, plain_entries=0, sample=1, batch=1, duration_s=0.1,
                           llm="llm")
    ) is None  # fmt: skip


def test_shmcache_segment_is_sized_for_the_rewrites() -> None:
    from benchmarks.peers import MIB, Capacity, estimate_shm_size

    plain = estimate_shm_size(Capacity(entries=5_500, value_bytes=3_064), 1_600)
    with_rewrites = estimate_shm_size(
        Capacity(entries=5_500, value_bytes=3_064, rewrites=100_000), 1_600
    )
    assert with_rewrites - plain >= 100_000 * 1_600
    assert with_rewrites % MIB == 0


def test_bound_does_not_apply_to_a_phase_that_waits_on_a_server() -> None:
    """A Manager or Redis client sleeps through most of its latency: no CPU bound."""
    from benchmarks import integrity

    server = _peer_record(hit_us=62.0, hit_warm_us=62.0, update_us=70.0, mixed_ops_s=45_000.0)
    assert integrity.validate_peer(server, cpus=2)  # 1.4x "too fast" for a CPU-bound store
    server["mixed_waits_per_kop"] = 880.0
    assert integrity.mixed_bound(server, cpus=2) is None
    assert integrity.validate_peer(server, cpus=2) == {}
    server["counts"]["mixed"]["misses"] = 5_000  # ... but its counts are still checked
    assert "mixed_ops_s" in integrity.validate_peer(server, cpus=2)


# --- Spread over repeated runs (``--runs N``): each run's figures, ratios and noise. ---


def _run_record(**figures: float) -> dict:
    """One run's merged peers: shmcache, lmdb sync=False, warp-cache and pickle."""
    shm = _peer_record(**{k[4:]: v for k, v in figures.items() if k.startswith("shm_")})
    lmdb = _peer_record(update_us=20.0, hit_us=12.0, hit_plain_us=6.0, miss_us=2.5,
                        mixed_ops_s=100_000.0)  # fmt: skip
    warp = _peer_record(update_us=15.0, hit_us=16.0, hit_plain_us=7.0, miss_us=2.0,
                        mixed_ops_s=120_000.0)  # fmt: skip
    pkl = {"update_us": 10.0, "hit_us": 10.0, "hit_plain_us": 4.0}
    return {"peers": {"shmcache": shm, "lmdb-nosync": lmdb, "warp-cache": warp, "pickle": pkl}}


def test_spread_ratios_use_the_better_reference_and_withhold_contradicted_figures() -> None:
    from benchmarks import integrity, spread

    runs = [_run_record(shm_hit_us=11.0), _run_record(shm_hit_us=13.0),
            _run_record(shm_hit_us=12.0, shm_mixed_ops_s=515_345.0)]  # fmt: skip
    for r in runs:  # what merge_rounds does to each run's records
        for rec in r["peers"].values():
            if "counts" in rec:
                integrity.unpublish(rec, integrity.validate_peer(rec, cpus=2))
    out = spread.compute(runs)
    hit = out["columns"]["hit_us"]
    # Better of lmdb (12 µs) and warp (16 µs) is lmdb; the pickle ratio uses loads.
    assert hit["vs_best"]["ratios"] == pytest.approx([11 / 12, 13 / 12, 1.0])
    assert hit["vs_best"]["basis"][0] == "lmdb sync=False"
    assert hit["vs_best"]["verdict"].startswith("depends on the run")
    assert hit["vs_pickle"]["ratios"] == pytest.approx([1.1, 1.3, 1.2])
    assert hit["peers"]["shmcache"]["max_over_min"] == pytest.approx(13 / 11)
    assert hit["peers"]["shmcache"]["cv"] == pytest.approx(1 / 12)  # stdev 1, mean 12
    assert hit["peers"]["lmdb-nosync"]["max_over_min"] == pytest.approx(1.0)
    # Throughput: the better reference is the larger (warp, 120k).
    mixed = out["columns"]["mixed_ops_s"]
    assert mixed["vs_best"]["ratios"][0] == pytest.approx(70_000 / 120_000)
    # The 515k of run 3 beats its own per-op costs: withheld, no ratio, no noise part.
    assert mixed["peers"]["shmcache"]["values"][2] is None
    assert "per-op costs allow" in mixed["peers"]["shmcache"]["withheld"][2]
    assert mixed["vs_best"]["ratios"][2] is None
    assert mixed["peers"]["shmcache"]["max_over_min"] == pytest.approx(1.0)
    assert mixed["vs_best"]["verdict"] == "not met in any judged run (2 of 3)"
    assert "miss_us" in out["columns"] and "pickle" not in out["columns"]["miss_us"]["peers"]
    # A withheld reference makes "the better of" unknown: no ratio for that run.
    runs[1]["peers"]["warp-cache"]["invalid"] = {"update_us": {"value": 1.0, "reason": "x"}}
    runs[1]["peers"]["warp-cache"]["update_us"] = None
    upd = spread.compute(runs)["columns"]["update_us"]["vs_best"]
    assert upd["ratios"][1] is None and upd["ratios"][0] == pytest.approx(13.6 / 15.0)
    markdown = spread.to_markdown({"tier": {"name": "full", "rounds": 3}, "runs": runs},
                                  spread.compute(runs))  # fmt: skip
    assert "withheld [" in markdown and "## Withheld figures" in markdown
    assert "sources changed during these runs" not in markdown  # none recorded: no warning
    runs[0].update(code_start="aaaaaaaaaaaa", code_end="bbbbbbbbbbbb")
    changed = spread.to_markdown({"tier": {"name": "full"}, "runs": runs}, spread.compute(runs))
    assert "changed during the run" in changed and "sources changed during these runs" in changed
    tables = markdown.split("## Withheld figures")[0]  # the reason names the raw value
    assert "515,345" not in tables and "515.3k" not in tables


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_tiny_runs_write_the_spread(tmp_path: Path) -> None:
    """``--tiny --runs 2``: spread.md has each run's figures and ratios, and the noise."""
    peers = ("shmcache", "pickle", "lmdb-nosync", "warp-cache")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--tiny", "--runs", "2", "--only", ",".join(peers),
         "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert len(results["runs"]) == 2
    for run in results["runs"]:
        assert set(run["peers"]) == set(peers)
        assert "rounds" not in run["peers"]["shmcache"]  # the pooled record keeps them
    assert len(results["peers"]["shmcache"]["rounds"]) == 2  # pooled over both runs
    cols = results["spread"]["columns"]
    assert set(cols) == {"update_us", "hit_us", "hit_plain_us", "miss_us", "mixed_ops_s"}
    for key, col in cols.items():
        assert len(col["peers"]["shmcache"]["values"]) == 2, key
        assert len(col["vs_best"]["ratios"]) == 2, key
    markdown = (tmp_path / "spread.md").read_text(encoding="utf-8")
    assert "## Summary" in markdown and "| run 1 | run 2 |" in markdown
    assert "max/min" in markdown and "CV" in markdown
    assert "`python -m benchmarks --tiny --runs 2`" in markdown
    code = results["runs"][0]["code_start"]
    assert code and len(code) == 12  # the measured sources are identified per run
    assert "shmcache sources (sha256)" in markdown

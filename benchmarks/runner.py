"""Orchestration: run every selected peer through the same phases, then shmcache's curves.

``python -m benchmarks [--quick | --tiny] [--runs N] [--only a,b] [--out DIR]`` — see
``benchmarks/README.md`` for the method.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Final

from benchmarks import integrity, phases, report, spread
from benchmarks import workload as wl
from benchmarks.peers import (
    LMDB_FAST,
    PEER_IDS,
    SHMCACHE,
    Capacity,
    Skip,
    estimate_shm_size,
    prepared,
    server_peak_rss_mb,
    shm_root,
)
from benchmarks.procs import CTX, PhaseError, run_concurrent, run_fresh


@dataclass(frozen=True)
class Tier:
    """Sizes of one run mode (``full``, ``--quick``, ``--tiny``).

    Attributes:
        name: Mode name, recorded in the results.
        entries: Chat entries per peer in the side-by-side comparison.
        plain_entries: Plain-``Generation`` entries per peer.
        sample: Timed lookups per lookup phase.
        batch: Operations per timed batch.
        duration_s: Length of each throughput window (mixed load, readers).
        windows: Throughput windows per measurement; the median is reported.
        rounds: Times the side-by-side comparison is repeated (median per figure).
        scale_entries: Entry counts of shmcache's entries curve.
        value_sizes: Message text sizes (bytes) of shmcache's value-size curve.
        scale_sample: Timed operations per point of the curves.
        timeout_s: Upper bound for any single phase.
        mixed_max_ops: Most operations one mixed-load worker does per window (a
            window ends at that count or at ``duration_s``, whichever is first). It
            bounds the rewrites of the phase, so the store can be sized to keep every
            stored key resident (a log-structured store appends each rewrite).
    """

    name: str
    entries: int
    plain_entries: int
    sample: int
    batch: int
    duration_s: float
    windows: int
    rounds: int
    scale_entries: tuple[int, ...]
    value_sizes: tuple[int, ...]
    scale_sample: int
    timeout_s: float
    mixed_max_ops: int


TIERS: Final = {
    "full": Tier(
        "full", entries=5_000, plain_entries=500, sample=5_000, batch=50,
        duration_s=1.0, windows=5, rounds=3,
        scale_entries=(1_000, 5_000, 20_000, 100_000, 200_000, 1_000_000),
        value_sizes=(100, 1_000, 10_000, 100_000, 1_000_000),
        scale_sample=2_000, timeout_s=420.0, mixed_max_ops=150_000,
    ),
    "quick": Tier(
        "quick", entries=2_000, plain_entries=200, sample=2_000, batch=50,
        duration_s=0.5, windows=3, rounds=1,
        scale_entries=(1_000, 5_000, 200_000),
        value_sizes=(100, 1_000, 10_000, 100_000, 1_000_000),
        scale_sample=1_000, timeout_s=240.0, mixed_max_ops=75_000,
    ),
    "tiny": Tier(
        "tiny", entries=200, plain_entries=20, sample=200, batch=20,
        duration_s=0.1, windows=2, rounds=1,
        scale_entries=(500,), value_sizes=(10_000,),
        scale_sample=100, timeout_s=120.0, mixed_max_ops=15_000,
    ),
}  # fmt: skip


def log(msg: str) -> None:
    """Progress on stderr (stdout carries the final table)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _peer_config(tier: Tier) -> phases.PhaseConfig:
    return phases.PhaseConfig(
        entries=tier.entries,
        plain_entries=tier.plain_entries,
        sample=tier.sample,
        batch=tier.batch,
        duration_s=tier.duration_s,
        windows=tier.windows,
        max_ops_per_window=tier.mixed_max_ops,
    )


def _window_rate(workers: Sequence[dict[str, Any]]) -> tuple[float, list[float]]:
    """Median aggregate ops/s over the repeated windows of concurrent workers.

    For each window: all workers' ops divided by the union of their time spans.
    Returns the median and the per-window rates.
    """
    rates = []
    for window in zip(*(w["windows"] for w in workers), strict=True):
        concurrent = [w for w in window if w is not None]
        ops = sum(w["ops"] for w in concurrent)
        span_ns = max(w["end_ns"] for w in concurrent) - min(w["start_ns"] for w in concurrent)
        rates.append(ops / (span_ns / 1e9) if span_ns > 0 else 0.0)
    return statistics.median(rates), rates


def _cpu_share(workers: Sequence[dict[str, Any]]) -> float:
    """Median CPU time / wall time of the workers' windows (1.0 = a whole core each)."""
    shares = [
        w["cpu_ns"] / (w["end_ns"] - w["start_ns"])
        for worker in workers
        for w in worker["windows"]
        if w is not None and w["end_ns"] > w["start_ns"]
    ]
    return statistics.median(shares) if shares else 0.0


def usable_cpus() -> int | None:
    """CPUs this process may run on (what bounds the parallelism of a phase)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


def _window_counts(windows: Sequence[dict[str, Any] | None]) -> dict[str, int]:
    """Lookups, hits, misses and updates summed over a worker's windows."""
    keys = ("lookups", "hits", "misses", "updates")
    return {k: sum(w.get(k, 0) for w in windows if w is not None) for k in keys}


def _mixed_setup(
    peer_id: str, cfg: phases.PhaseConfig, cap: Capacity, per_entry: float | None
) -> tuple[phases.PhaseConfig, Capacity]:
    """Config and capacity of the mixed phase's own store: room for all its rewrites.

    shmcache's log appends every rewrite; a segment that cannot hold the phase's
    rewrites on top of the stored entries evicts stored keys during the phase (FIFO),
    and the "hits" become misses. The phase's operation budget bounds the rewrites;
    where ``/dev/shm`` has too little room for that, the budget is lowered instead.
    """
    rewrites = phases.mixed_updates_bound(cfg) or 0
    mixed_cap = replace(cap, rewrites=rewrites, shm_size_bytes=None)
    if peer_id != SHMCACHE:
        return cfg, mixed_cap
    try:
        st = os.statvfs(shm_root())
        room = st.f_bavail * st.f_frsize // 2
    except OSError:
        room = None
    while True:
        mixed_cap.shm_size_bytes = estimate_shm_size(mixed_cap, per_entry)
        budget = cfg.max_ops_per_window
        if room is None or mixed_cap.shm_size_bytes <= room or not budget or budget <= 1_000:
            return cfg, mixed_cap
        cfg = replace(cfg, max_ops_per_window=budget // 2)
        mixed_cap = replace(mixed_cap, rewrites=phases.mixed_updates_bound(cfg) or 0)


def _run_mixed(
    peer_id: str,
    cfg: phases.PhaseConfig,
    cap: Capacity,
    tmp_root: str,
    timeout: float,
    per_entry: float | None,
) -> dict[str, Any]:
    """The 2-process mixed load on a fresh store of its own, with every op counted."""
    mixed_cfg, mixed_cap = _mixed_setup(peer_id, cfg, cap, per_entry)
    with prepared(peer_id, mixed_cap, tmp_root) as spec:
        barrier = CTX.Barrier(2)
        workers = run_concurrent(
            phases.phase_mixed, [(spec, mixed_cfg, barrier, w) for w in (0, 1)], timeout=timeout
        )
        server_rss = server_peak_rss_mb(spec)
    res: dict[str, Any] = {}
    res["mixed_ops_s"], res["mixed_windows_ops_s"] = _window_rate(workers)
    res["mixed_cpu_share"] = _cpu_share(workers)
    ops = sum(w["ops"] for worker in workers for w in worker["windows"])
    waits = sum(w["voluntary_waits"] for worker in workers for w in worker["windows"])
    res["mixed_waits_per_kop"] = 1000 * waits / ops if ops else 0.0
    res["mixed_rss_mb"] = max(w["rss_mb"] for w in workers)
    res["mixed_server_rss_mb"] = server_rss
    res["mixed_max_ops_per_window"] = mixed_cfg.max_ops_per_window
    res["mixed_windows_at_budget"] = sum(
        bool(w and w.get("budget_reached")) for worker in workers for w in worker["windows"]
    )
    if spec.peer_id == SHMCACHE:
        res["mixed_size_bytes"] = spec.options["size"]
        res["mixed_stats"] = workers[0].get("stats")
        res["mixed_store_counts"] = workers[0].get("store_counts")
    per_worker = [_window_counts(worker["windows"]) for worker in workers]
    counts: dict[str, Any] = {k: sum(c[k] for c in per_worker) for k in per_worker[0]}
    counts["skipped"] = workers[0].get("skipped")
    counts["resident_checked"] = workers[0].get("resident_checked")
    counts["resident_missing"] = workers[0].get("resident_missing")
    res["mixed_counts_per_worker"] = per_worker
    res["counts"] = {"mixed": counts}
    return res


def measure_peer(
    peer_id: str, cfg: phases.PhaseConfig, cap: Capacity, tmp_root: str, timeout: float
) -> dict[str, Any]:
    """All phases of the side-by-side table for one peer, each figure checked.

    Write, hit, miss and fidelity share one store; the mixed load gets a fresh store
    of its own, populated with the same entries and sized for the phase's rewrites.
    Figures are checked (and withheld) when the rounds are merged, see
    :func:`merge_rounds`.
    """
    cpus = usable_cpus()
    with prepared(peer_id, cap, tmp_root) as spec:
        if spec.kind == "pickle":
            return dict(run_fresh(phases.phase_pickle, cfg, timeout=timeout))
        if spec.kind == "inprocess":
            res = dict(run_fresh(phases.phase_inprocess, spec, cfg, timeout=timeout))
            res["mixed_skipped"] = "in-process only: cannot be shared by two processes"
            return res
        res = {}
        counts: dict[str, Any] = {}
        rss: list[float] = []
        for name, func in (
            ("write", phases.phase_write),
            ("hit", phases.phase_hit),
            ("miss", phases.phase_miss),
            ("fidelity", phases.phase_fidelity),
        ):
            log(f"  {spec.peer_id}: {name}")
            out = run_fresh(func, spec, cfg, timeout=timeout)
            rss.append(out.pop("rss_mb"))
            counts.update(out.pop("counts", {}))
            res.update(out)
        res["server_rss_mb"] = server_peak_rss_mb(spec)
        if "server_version" in spec.options:
            res["server_version"] = spec.options["server_version"]
    log(f"  {peer_id}: mixed load, 2 processes (fresh store, every op counted)")
    mixed = _run_mixed(peer_id, cfg, cap, tmp_root, timeout, _bytes_per_entry(res.get("stats")))
    counts.update(mixed.pop("counts"))
    res.update(mixed)
    res["counts"] = counts
    res["rss_mb"] = max(rss)
    if res.get("mixed_server_rss_mb") and res.get("server_rss_mb"):
        res["server_rss_mb"] = max(res["server_rss_mb"], res["mixed_server_rss_mb"])
    for key, reason in integrity.validate_peer(res, cpus).items():
        log(f"  {peer_id}: {key} fails its check in this round: {reason}")
    return res


def _capacity(cfg: phases.PhaseConfig, extra: int = 0) -> Capacity:
    import pickle

    value = phases.value_for(cfg, 0)
    value_bytes = max(
        len(pickle.dumps(value, pickle.HIGHEST_PROTOCOL)),
        len(pickle.dumps(wl.plain_value(0), pickle.HIGHEST_PROTOCOL)),
    )
    return Capacity(entries=cfg.entries + cfg.plain_entries + extra, value_bytes=value_bytes)


def _run_peer_once(peer_id: str, tier: Tier, tmp_root: str) -> dict[str, Any]:
    cfg = _peer_config(tier)
    load = os.getloadavg()[0]
    try:
        res = measure_peer(peer_id, cfg, _capacity(cfg), tmp_root, tier.timeout_s)
    except Skip as exc:
        log(f"  skipped: {exc}")
        return {"skipped": str(exc)}
    except (PhaseError, OSError, ValueError, RuntimeError) as exc:
        log(f"  error: {exc}")
        return {"error": str(exc).strip().splitlines()[-1], "detail": str(exc)}
    res["loadavg_1min_at_start"] = load
    return res


def sum_counts(records: Sequence[Any]) -> Any:
    """Sum nested count dicts leaf by leaf (``None`` where a round could not count)."""
    if all(isinstance(r, dict) for r in records):
        keys = dict.fromkeys(k for r in records for k in r)
        return {k: sum_counts([r.get(k) for r in records]) for k in keys}
    if all(isinstance(r, int) and not isinstance(r, bool) for r in records):
        return sum(records)
    return None


def merge_rounds(rounds: Sequence[dict[str, Any]], cpus: int | None = None) -> dict[str, Any]:
    """One record from several rounds: median of each number, all() of each flag.

    Counts (``counts``) are summed over the rounds. A peer skipped or failing in every
    round keeps the first round's reason; rounds that failed are otherwise left out
    (and counted in ``rounds_failed``). Figures that any round, or the merged record,
    contradicts are not published (``invalid``, see :mod:`benchmarks.integrity`);
    throughputs are bounded with the cheapest per-op costs any round measured
    (``bound_costs_us``).
    """
    good = [r for r in rounds if "skipped" not in r and "error" not in r]
    if not good:
        return dict(rounds[0])
    merged: dict[str, Any] = {}
    for key in good[0]:
        values = [r[key] for r in good if key in r]
        if key == "counts":
            merged[key] = sum_counts(values)
        elif all(isinstance(v, bool) for v in values):
            merged[key] = all(values)
        elif all(isinstance(v, (int, float)) for v in values):
            merged[key] = statistics.median(values)
        else:
            merged[key] = next((v for v in values if v), values[0])
    best = integrity.best_costs(good, cpus)
    merged["bound_costs_us"] = best
    if "mixed_ops_s" in merged:
        merged["mixed_bound_ops_s"] = integrity.mixed_bound(merged, cpus, best)
    reasons = dict(integrity.validate_peer(merged, cpus, best))
    for n, r in enumerate(rounds, 1):
        if "skipped" in r or "error" in r:
            continue
        for key, why in integrity.validate_peer(r, cpus, best).items():
            why = f"round {n}: {why}" if len(rounds) > 1 else why
            if why not in reasons.get(key, ""):
                reasons[key] = f"{reasons[key]}; {why}" if key in reasons else why
    integrity.unpublish(merged, reasons)
    if len(rounds) > 1:
        merged["rounds"] = list(rounds)
    merged["rounds_failed"] = len(rounds) - len(good)
    return merged


def measure_rounds(
    tier: Tier, selected: Sequence[str], tmp_root: str, run: str = ""
) -> dict[str, list[dict[str, Any]]]:
    """Every selected peer measured ``tier.rounds`` times, round after round (raw rounds).

    Args:
        run: Prefix of the progress lines (``"run 2/3, "`` with ``--runs``).
    """
    rounds: dict[str, list[dict[str, Any]]] = {p: [] for p in selected}
    for n in range(tier.rounds):
        for peer_id in selected:
            if rounds[peer_id] and "skipped" in rounds[peer_id][0]:
                continue  # the reason will not change
            log(f"peer {peer_id} ({run}round {n + 1}/{tier.rounds})")
            rounds[peer_id].append(_run_peer_once(peer_id, tier, tmp_root))
    return rounds


def merge_peers(rounds: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """One checked record per peer from its raw rounds (:func:`merge_rounds`)."""
    cpus = usable_cpus()
    merged = {p: merge_rounds(r, cpus) for p, r in rounds.items()}
    for p, res in merged.items():
        for key, item in (res.get("invalid") or {}).items():
            log(f"{p}: {key} NOT PUBLISHED: {item['reason']}")
    return merged


def run_peers(tier: Tier, selected: Sequence[str], tmp_root: str) -> dict[str, Any]:
    """The side-by-side comparison: one record per peer (measured, skipped or error).

    The whole list is measured ``tier.rounds`` times, round after round, so that a
    burst of load from elsewhere on the host hits one round of a peer, not all of
    them; each figure is the median over rounds.
    """
    return merge_peers(measure_rounds(tier, selected, tmp_root))


def code_digest() -> str | None:
    """Short sha256 of the measured library's sources (``shmcache/*.py``), or None.

    Recorded at the start and end of each run of ``--runs``: a figure measured while
    someone edits the library (each phase imports it afresh) is not the same code's.
    """
    import hashlib

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "shmcache")
    try:
        names = sorted(n for n in os.listdir(root) if n.endswith(".py"))
        h = hashlib.sha256()
        for name in names:
            with open(os.path.join(root, name), "rb") as fh:
                h.update(name.encode() + b"\0" + fh.read() + b"\0")
    except OSError:
        return None
    return h.hexdigest()[:12]


def run_repeated(
    tier: Tier, selected: Sequence[str], tmp_root: str, runs: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``runs`` whole side-by-side comparisons, one after the other (``--runs``).

    Returns:
        The pooled record per peer (median over the rounds of every run; a figure that
        any round of any run contradicts is withheld) and, per run, that run's own
        checked records (``peers``, without the raw rounds, which the pooled record
        keeps), elapsed time and load average: the input of :mod:`benchmarks.spread`.
    """
    pooled: dict[str, list[dict[str, Any]]] = {p: [] for p in selected}
    per_run: list[dict[str, Any]] = []
    for k in range(runs):
        started, load, code = time.perf_counter(), os.getloadavg(), code_digest()
        rounds = measure_rounds(tier, selected, tmp_root, run=f"run {k + 1}/{runs}, ")
        for p, r in rounds.items():
            pooled[p] += r
        merged = merge_peers(rounds)
        if runs > 1:  # the pooled record keeps every raw round
            merged = {p: {k: v for k, v in rec.items() if k != "rounds"}
                      for p, rec in merged.items()}  # fmt: skip
        per_run.append({
            "run": k + 1, "peers": merged, "elapsed_s": time.perf_counter() - started,
            "loadavg_start": load, "loadavg_end": os.getloadavg(),
            "code_start": code, "code_end": code_digest(),
        })  # fmt: skip
    return (merge_peers(pooled) if runs > 1 else per_run[0]["peers"]), per_run


def _bytes_per_entry(stats: dict[str, int] | None) -> float | None:
    if not stats or not stats.get("entries") or not stats.get("used_bytes"):
        return None
    return stats["used_bytes"] / stats["entries"]


def _curve_point(
    cfg: phases.PhaseConfig, tier: Tier, tmp_root: str, per_entry: float | None
) -> dict[str, Any]:
    """Populate a fresh shmcache with ``cfg`` and time hit / miss / update on it."""
    cap = _capacity(cfg, extra=cfg.sample)
    cap.shm_size_bytes = estimate_shm_size(cap, per_entry)
    with prepared(SHMCACHE, cap, tmp_root) as spec:
        point: dict[str, Any] = {"size_bytes": spec.options["size"]}
        write = run_fresh(phases.phase_write, spec, cfg, timeout=tier.timeout_s)
        point["populate_s"] = write["populate_s"]
        point["stats_after_write"] = write["stats"]
        counts: dict[str, Any] = dict(write.get("counts") or {})
        for func in (phases.phase_hit, phases.phase_miss, phases.phase_update_more):
            out = run_fresh(func, spec, cfg, timeout=tier.timeout_s)
            out.pop("rss_mb", None)
            if "stats" in out:
                point["stats_after_update"] = out.pop("stats")
            counts.update(out.pop("counts", {}))
            point.update(out)
    point["counts"] = counts
    reasons = integrity.validate_curve_point(point)
    for key, reason in reasons.items():
        log(f"  curve point: {key} NOT PUBLISHED: {reason}")
    return integrity.unpublish(point, reasons)


def run_entries_curve(tier: Tier, tmp_root: str, per_entry: float | None) -> list[dict[str, Any]]:
    """shmcache hit/miss/update µs as the number of stored entries grows."""
    points = []
    for n in tier.scale_entries:
        log(f"shmcache entries curve: {n} entries")
        cfg = phases.PhaseConfig(
            entries=n, plain_entries=0, sample=min(tier.scale_sample, n), batch=tier.batch,
            duration_s=tier.duration_s,
        )  # fmt: skip
        point = _curve_point_or_error(cfg, tier, tmp_root, per_entry)
        point["entries"] = n
        points.append(point)
        per_entry = per_entry or _bytes_per_entry(point.get("stats_after_write"))
    return points


def _curve_point_or_error(
    cfg: phases.PhaseConfig, tier: Tier, tmp_root: str, per_entry: float | None
) -> dict[str, Any]:
    """:func:`_curve_point`, or a point that records why it failed (the run goes on)."""
    try:
        return _curve_point(cfg, tier, tmp_root, per_entry)
    except (PhaseError, OSError) as exc:
        log(f"  error: {exc}")
        return {"error": str(exc).strip().splitlines()[-1], "detail": str(exc)}


def run_size_curve(tier: Tier, tmp_root: str) -> list[dict[str, Any]]:
    """shmcache hit/miss/update µs as the value grows from 100 B to 1 MB of text."""
    import pickle

    points = []
    for size in tier.value_sizes:
        log(f"shmcache value-size curve: {size} B")
        n = max(16, min(1_000, (32 * 1024 * 1024) // size))
        cfg = phases.PhaseConfig(
            entries=n, plain_entries=0, sample=max(50, min(tier.scale_sample, 20_000_000 // size)),
            batch=max(5, min(tier.batch, 5_000_000 // size)), duration_s=tier.duration_s,
            value_bytes=size,
        )  # fmt: skip
        cfg = replace(cfg, sample=min(cfg.sample, n))
        point = _curve_point_or_error(cfg, tier, tmp_root, None)
        point["value_bytes"] = size
        point["pickle_bytes"] = len(pickle.dumps(phases.value_for(cfg, 0), pickle.HIGHEST_PROTOCOL))
        point["entries"] = n
        points.append(point)
    return points


def run_readers(tier: Tier, peer_id: str, tmp_root: str) -> dict[str, Any]:
    """Aggregate hit throughput of 1 and 2 concurrent reader processes.

    The two reader processes alternate windows with one and with both of them
    running, so each 2-reader window is compared with the 1-reader window just before
    it (load from elsewhere on the host drifts over seconds); the scaling is the
    median of those pairwise ratios.
    """
    cfg = replace(_peer_config(tier), plain_entries=0, max_ops_per_window=None)
    log(f"{peer_id}: reader scaling")
    schedule = [1, 2] * tier.windows
    with prepared(peer_id, _capacity(cfg), tmp_root) as spec:
        run_fresh(phases.phase_write, spec, cfg, timeout=tier.timeout_s)
        barrier = CTX.Barrier(2)
        workers = run_concurrent(
            phases.phase_reader,
            [(spec, cfg, barrier, w, schedule) for w in range(2)],
            timeout=tier.timeout_s,
        )
    rates = [_window_rate([{"windows": [w["windows"][k]]} for w in workers])[0]
             for k in range(len(schedule))]  # fmt: skip
    one = [r for r, n in zip(rates, schedule, strict=True) if n == 1]
    two = [r for r, n in zip(rates, schedule, strict=True) if n == 2]
    two_reader_windows = [
        {"windows": [w["windows"][k] for k, n in enumerate(schedule) if n == 2]} for w in workers
    ]
    counts = {
        f"readers_{n}": _window_counts(
            [w["windows"][k] for w in workers for k, m in enumerate(schedule) if m == n]
        )
        for n in (1, 2)
    }
    return {
        "cpu_share_2_readers": _cpu_share(two_reader_windows),
        "readers_1_ops_s": statistics.median(one),
        "readers_2_ops_s": statistics.median(two),
        "readers_1_windows_ops_s": one,
        "readers_2_windows_ops_s": two,
        "scaling": statistics.median(b / a for a, b in zip(one, two, strict=True) if a),
        "counts": counts,
    }


def check_readers(readers: dict[str, Any], peer: dict[str, Any]) -> dict[str, Any]:
    """Unpublish reader figures that the counts or the peer's own hit cost contradict.

    The bound uses the cheapest hit the same peer measured in any round of this run
    (first or second read), leaving out hit figures that their own counts invalidate.
    """
    cpus = usable_cpus()
    best = peer.get("bound_costs_us") or integrity.best_costs(peer.get("rounds") or [peer], cpus)
    costs = [best.get("hit_us"), best.get("hit_warm_us")]
    hit_us = min((c for c in costs if isinstance(c, (int, float)) and c > 0), default=None)
    reasons = integrity.validate_readers(readers, hit_us, cpus)
    for key, reason in reasons.items():
        log(f"  readers: {key} NOT PUBLISHED: {reason}")
    return integrity.unpublish(readers, reasons)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line interface of ``python -m benchmarks``."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="shmcache side by side with other LangChain caches and stores.",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="smaller sizes (~2-3 minutes)")
    mode.add_argument("--tiny", action="store_true", help="seconds; for the CI smoke test")
    parser.add_argument(
        "--only",
        metavar="NAME,...",
        help=f"comma-separated peers to run (default: all): {', '.join(PEER_IDS)}",
    )
    parser.add_argument(
        "--runs",
        type=int,
        default=1,
        metavar="N",
        help="measure the side-by-side comparison N times and write spread.md: each "
        "run's figures and ratios per column, and the run-to-run noise (default: 1)",
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
        help="where results.md, results.json and benchmark.png go (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.only:
        wanted = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = [name for name in wanted if name not in PEER_IDS]
        if unknown:
            parser.error(f"unknown peer(s) {', '.join(unknown)}; choose from {', '.join(PEER_IDS)}")
        args.selected = [p for p in PEER_IDS if p in wanted]
    else:
        args.selected = list(PEER_IDS)
    return args


def _shmcache_importable() -> bool:
    try:
        import shmcache  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print the Markdown table and write results to ``--out``."""
    args = parse_args(argv)
    tier = TIERS["tiny" if args.tiny else "quick" if args.quick else "full"]
    started = time.perf_counter()
    results: dict[str, Any] = {
        "tier": asdict(tier),
        "machine": report.describe_machine(),
        "workload": wl.describe(),
        "selected": args.selected,
    }
    tmp_root = tempfile.mkdtemp(prefix="shmcache-bench-")
    try:
        results["baseline_rss_mb"] = run_fresh(phases.phase_baseline)["rss_mb"]
        results["peers"], runs = run_repeated(tier, args.selected, tmp_root, args.runs)
        if args.runs > 1:
            results["runs"] = runs
        shm = results["peers"].get(SHMCACHE, {})
        if SHMCACHE in args.selected and _shmcache_importable() and "error" not in shm:
            per_entry = _bytes_per_entry(shm.get("stats"))
            results["entries_curve"] = run_entries_curve(tier, tmp_root, per_entry)
            results["size_curve"] = run_size_curve(tier, tmp_root)
        results["readers"] = {}
        for peer_id in (SHMCACHE, LMDB_FAST):
            if peer_id in args.selected and "hit_us" in results["peers"].get(peer_id, {}):
                try:
                    results["readers"][peer_id] = check_readers(
                        run_readers(tier, peer_id, tmp_root), results["peers"][peer_id]
                    )
                except (PhaseError, Skip, OSError) as exc:
                    results["readers"][peer_id] = {"error": str(exc).strip().splitlines()[-1]}
    except Exception:
        results["fatal"] = traceback.format_exc()
        log(results["fatal"])
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    results["elapsed_s"] = time.perf_counter() - started
    results["machine"]["loadavg_end"] = os.getloadavg()
    if results.get("runs"):
        spread_md = spread.write(results, args.out)
    markdown = report.write(results, args.out)
    print(markdown)
    if results.get("runs"):
        print(spread_md)
    log(f"done in {results['elapsed_s']:.0f} s; results in {args.out}")
    return 1 if "fatal" in results else 0

"""Turn raw results into ``results.md`` (+ stdout), ``results.json`` and ``benchmark.png``."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from typing import Any, Final

from benchmarks import integrity
from benchmarks.peers import LABELS, LMDB_FAST, NOTES, PEER_IDS, PICKLE, SHMCACHE, WARP

PACKAGES: Final = (
    "shmcache",
    "langchain-core",
    "langchain-community",
    "msgpack",
    "pydantic",
    "lmdb",
    "warp-cache",
    "diskcache",
    "redis",
    "SQLAlchemy",
    "matplotlib",
)

COLUMNS: Final = (
    ("update_us", "update µs", False),
    ("hit_us", "hit µs", False),
    ("hit_plain_us", "hit µs (plain Generation)", False),
    ("miss_us", "miss µs", False),
    ("mixed_ops_s", "2-proc mixed ops/s", True),
    ("rss_mb", "peak RSS MB", False),
)
"""(result key, header, higher-is-better) of the side-by-side table."""

RATIO_PEERS: Final = (LMDB_FAST, WARP, PICKLE)

X: Final = "\N{MULTIPLICATION SIGN}"
"""The times sign used in ratios."""


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gb() -> float | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "not installed"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _redis_server_version() -> str | None:
    try:
        out = subprocess.run(
            ["redis-server", "--version"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    parts = [p for p in out.stdout.split() if p.startswith("v=")]
    return parts[0][2:] if parts else None


def describe_machine() -> dict[str, Any]:
    """CPU, cores, memory, OS, Python and package versions, load at the start."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        "mem_total_gb": _mem_total_gb(),
        "os": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "packages": {pkg: _version(pkg) for pkg in PACKAGES},
        "redis_server": _redis_server_version(),
        "git_commit": _git_commit(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "loadavg_start": os.getloadavg(),
    }


def fmt(value: Any, key: str = "") -> str:
    """Human formatting: µs with 1 or 2 decimals, ops/s with separators, MB rounded."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        if key.endswith("ops_s"):
            return f"{value:,.0f}"
        if key.endswith("rss_mb"):
            return f"{value:.0f}"
        if abs(value) < 10:
            return f"{value:.2f}"
        if abs(value) < 1000:
            return f"{value:.1f}"
        return f"{value:,.0f}"
    return str(value)


def _ratio(a: Any, b: Any) -> float | None:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
        return a / b
    return None


def _fidelity_cell(res: dict[str, Any]) -> str:
    if "fidelity_ok" not in res:
        return "—"
    if not res["fidelity_ok"]:
        return f"FAIL: {res.get('fidelity_problem')}"
    return "ok" if res.get("fresh_objects") else "ok (same objects, not fresh)"


def _is_invalid(record: dict[str, Any], key: str) -> bool:
    return key in (record.get("invalid") or {})


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The team's performance targets with this run's ratios (``met`` None = unmeasured).

    A target built on a figure that was not published (see ``invalid``) is not judged:
    ``met`` is None and ``invalid`` is True.
    """
    peers = results.get("peers", {})
    shm, lmdb, pkl = peers.get(SHMCACHE, {}), peers.get(LMDB_FAST, {}), peers.get(PICKLE, {})
    rows: list[dict[str, Any]] = []

    def add(
        name: str,
        ratio: float | None,
        limit: float,
        at_most: bool,
        basis: str,
        *inputs: tuple[dict[str, Any], str],
    ) -> None:
        invalid = any(_is_invalid(rec, key) for rec, key in inputs)
        met = None if ratio is None or invalid else (ratio <= limit if at_most else ratio >= limit)
        rows.append(
            {"target": name, "ratio": None if invalid else ratio,
             "limit": f"{'≤' if at_most else '≥'} {limit}{X}", "met": met, "basis": basis,
             "invalid": invalid}
        )  # fmt: skip

    for name, other, key, limit, at_most, unit in (
        ("cross-process hit vs lmdb sync=False", lmdb, "hit_us", 1.2, True, "µs"),
        ("cross-process hit vs pickle.loads", pkl, "hit_us", 1.3, True, "µs"),
        ("miss vs lmdb sync=False", lmdb, "miss_us", 1.5, True, "µs"),
        ("update vs lmdb sync=False", lmdb, "update_us", 1.0, True, "µs"),
        ("2-process mixed ops/s vs lmdb sync=False", lmdb, "mixed_ops_s", 1.0, False, "ops/s"),
    ):
        add(
            name,
            _ratio(shm.get(key), other.get(key)),
            limit,
            at_most,
            f"{fmt(shm.get(key), key)} / {fmt(other.get(key), key)} {unit}",
            (shm, key),
            (other, key),
        )
    curve = {p["entries"]: p for p in results.get("entries_curve", []) if "hit_us" in p}
    big, small = curve.get(200_000, {}), curve.get(5_000, {})
    add(
        "hit at 200k entries vs at 5k",
        _ratio(big.get("hit_us"), small.get("hit_us")),
        1.3,
        True,
        f"{fmt(big.get('hit_us'))} / {fmt(small.get('hit_us'))} µs (second read of the same "
        f"keys: {fmt(big.get('hit_warm_us'))} / {fmt(small.get('hit_warm_us'))} µs)",
        (big, "hit_us"),
        (small, "hit_us"),
    )
    readers = results.get("readers", {}).get(SHMCACHE, {})
    add(
        "2 reader processes vs 1 (aggregate hits/s)",
        readers.get("scaling"),
        1.6,
        False,
        f"{fmt(readers.get('readers_2_ops_s'), 'ops_s')} / "
        f"{fmt(readers.get('readers_1_ops_s'), 'ops_s')} ops/s",
        (readers, "scaling"),
    )
    return rows


def unpublished(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every figure the run refused to publish: where, which, the raw value and why.

    Order: side-by-side peers (table order), reader scaling, entries curve, size curve.
    """
    found: list[dict[str, Any]] = []

    def scan(where: str, record: dict[str, Any]) -> None:
        for key, item in (record.get("invalid") or {}).items():
            found.append(
                {"where": where, "key": key, "value": item.get("value"),
                 "reason": item.get("reason"), "_record": id(record)}
            )  # fmt: skip

    peers = results.get("peers", {})
    for pid in PEER_IDS:
        if pid in peers:
            scan(LABELS[pid], peers[pid])
    for pid, r in (results.get("readers") or {}).items():
        scan(f"{LABELS[pid]} reader scaling", r)
    for p in results.get("entries_curve") or []:
        scan(f"shmcache entries curve, {p.get('entries', '?'):,} entries", p)
    for p in results.get("size_curve") or []:
        scan(f"shmcache value-size curve, {p.get('value_bytes', '?'):,} B", p)
    return found


class _Notes:
    """Numbers the unpublished figures so that table cells can point at their reason."""

    def __init__(self, results: dict[str, Any]) -> None:
        self.items = unpublished(results)
        self._index = {(it["_record"], it["key"]): n for n, it in enumerate(self.items, 1)}

    def cell(self, record: dict[str, Any], key: str, fmt_key: str | None = None) -> str:
        """The formatted figure, or ``not published [n]`` when the run contradicted it."""
        n = self._index.get((id(record), key))
        if n is not None:
            return f"**not published** [{n}]"
        return fmt(record.get(key), key if fmt_key is None else fmt_key)

    def markdown(self) -> list[str]:
        """The section listing every unpublished figure with its raw value and reason."""
        if not self.items:
            return []
        out = [
            "",
            "## Figures not published",
            "",
            "The run's own counts or per-op costs contradict these figures (a lookup of a "
            "stored key that missed, an update that was skipped, or more ops/s than the "
            "per-op costs allow), so the tables show no number for them "
            "(`benchmarks/integrity.py`; raw values in `results.json` under `invalid`).",
            "",
        ]
        for n, it in enumerate(self.items, 1):
            out.append(
                f"{n}. {it['where']}, `{it['key']}` (measured {fmt(it['value'], it['key'])}): "
                f"{it['reason']}"
            )
        return out


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return lines


def _peer_rows(results: dict[str, Any], notes: _Notes) -> list[list[str]]:
    peers = results.get("peers", {})
    rows = []
    for pid in PEER_IDS:
        if pid not in peers:
            continue
        res = peers[pid]
        label = f"**{LABELS[pid]}**" if pid == SHMCACHE else LABELS[pid]
        if res.get("rounds_failed"):
            label += f" ({res['rounds_failed']} round(s) failed, see JSON)"
        if "skipped" in res or "error" in res:
            why = f"skipped: {res['skipped']}" if "skipped" in res else f"error: {res['error']}"
            rows.append([label, why] + [""] * len(COLUMNS))
            continue
        cells = [label]
        for key, _, _ in COLUMNS:
            if key == "rss_mb" and res.get("server_rss_mb"):
                cells.append(f"{fmt(res.get(key), key)} (+{res['server_rss_mb']:.0f} server)")
            elif key == "mixed_ops_s" and res.get("mixed_skipped"):
                cells.append("n/a")
            else:
                cells.append(notes.cell(res, key))
        cells.append(_fidelity_cell(res))
        rows.append(cells)
    shm = peers.get(SHMCACHE, {})
    if "hit_us" in shm:
        for pid in RATIO_PEERS:
            other = peers.get(pid, {})
            if "hit_us" not in other:
                continue
            cells = [f"*shmcache ÷ {LABELS[pid]}*"]
            for key, _, _ in COLUMNS:
                r = _ratio(shm.get(key), other.get(key))
                if _is_invalid(shm, key) or _is_invalid(other, key):
                    cells.append("not published")
                else:
                    cells.append("—" if r is None else f"{r:.2f}{X}")
            rows.append([*cells, ""])
    return rows


def to_markdown(results: dict[str, Any]) -> str:
    """The whole report as Markdown."""
    m = results.get("machine", {})
    tier = results.get("tier", {})
    w = results.get("workload", {})
    out = [
        "# shmcache benchmark results",
        "",
        f"Mode `{tier.get('name')}`, {m.get('date_utc')}, run took "
        f"{results.get('elapsed_s', 0):.0f} s. Reproduce: `python -m benchmarks"
        f"{'' if tier.get('name') == 'full' else ' --' + str(tier.get('name'))}"
        f"{' --runs ' + str(len(results['runs'])) if results.get('runs') else ''}`"
        " (method: `benchmarks/README.md`).",
        "",
        f"**Machine:** {m.get('cpu_model')}, {m.get('cpu_count')} CPUs "
        f"({m.get('usable_cpus')} usable), {m.get('mem_total_gb')} GB RAM, {m.get('os')}, "
        f"{m.get('python')}; load average at start/end "
        f"{_load(m.get('loadavg_start'))} / {_load(m.get('loadavg_end'))}.",
        "",
        "**Packages:** "
        + ", ".join(f"{k} {v}" for k, v in m.get("packages", {}).items())
        + (f", redis-server {m['redis_server']}" if m.get("redis_server") else "")
        + (f"; repo at `{m['git_commit']}`" if m.get("git_commit") else "")
        + ".",
        "",
        f"**Workload:** {tier.get('entries')} chat entries + {tier.get('plain_entries')} plain "
        f"entries per peer; prompts {w.get('prompt_chars_min')} to {w.get('prompt_chars_max')} "
        f"chars (`langchain_core.load.dumps` of messages), llm_string "
        f"{w.get('llm_string_chars')} chars; value = `[ChatGeneration(AIMessage)]`, 1 KB text, "
        f"1 tool call, usage_metadata with token details ({w.get('chat_value_pickle_bytes')} B "
        f"pickled); plain variant `[Generation]` ({w.get('plain_value_pickle_bytes')} B pickled). "
        f"Medians over batches of {tier.get('batch')} ops; {tier.get('sample')} timed lookups "
        f"per phase; mixed load: median of {tier.get('windows')} windows of "
        f"{tier.get('duration_s')} s; each side-by-side figure is the median of "
        f"{_rounds_text(results)} over all peers. Baseline worker RSS (LangChain "
        f"imported, nothing cached): {fmt(results.get('baseline_rss_mb'), 'rss_mb')} MB.",
        "",
        "## Side by side",
        "",
        "Each phase runs in fresh `spawn` processes; *hit* is read by a process other than "
        "the writer (except the in-process floor). Lower µs is better; higher ops/s is better. "
        "Ratio rows: shmcache's figure divided by the peer's, per column.",
        "",
    ]
    notes = _Notes(results)
    if notes.items:
        out[-1:-1] = [
            f"**{len(notes.items)} figure(s) not published**: this run's own counts or per-op "
            "costs contradict them (see *Figures not published* at the end).",
            "",
        ]
    header = ["cache", *(h for _, h, _ in COLUMNS), "fidelity"]
    out += _table(header, _peer_rows(results, notes))
    diag = [
        f"{LABELS[pid]} {res['mixed_cpu_share']:.0%} / {res.get('mixed_waits_per_kop', 0):.1f}"
        for pid, res in results.get("peers", {}).items()
        if isinstance(res.get("mixed_cpu_share"), float)
    ]
    if diag:
        out += [
            "",
            "Mixed load, CPU share of each process / voluntary sleeps per 1,000 ops: "
            + "; ".join(diag)
            + ". A CPU share well below 100% with few sleeps means other programs held a "
            "core; many sleeps mean waiting (lock back-off, a server, I/O).",
        ]
    out += _mixed_counts_markdown(results, notes)
    out += ["", "## Targets", ""]
    rows = []
    for t in targets(results):
        verdict = "not measured" if t["met"] is None else ("**met**" if t["met"] else "NOT met")
        if t.get("invalid"):
            verdict = "not judged (figure not published)"
        ratio = "—" if t["ratio"] is None else f"{t['ratio']:.2f}{X}"
        rows.append([t["target"], t["basis"], ratio, t["limit"], verdict])
    out += _table(["target", "measured", "ratio", "limit", "verdict"], rows)
    out += _curves_markdown(results, notes)
    out += ["", "## Peer setup", ""]
    for pid in PEER_IDS:
        if pid in results.get("peers", {}):
            out.append(f"- **{LABELS[pid]}** — {NOTES[pid]}")
    out += notes.markdown()
    out.append("")
    return "\n".join(out)


def _rounds_text(results: dict[str, Any]) -> str:
    rounds = (results.get("tier") or {}).get("rounds")
    runs = results.get("runs")
    if runs and isinstance(rounds, int):
        return (f"{rounds * len(runs)} rounds ({len(runs)} runs of {rounds}; each run's own "
                "figures, ratios and noise: `spread.md`)")  # fmt: skip
    return f"{rounds} round(s)"


def _count(value: Any) -> str:
    return "—" if value is None else f"{value:,}"


def _mixed_counts_markdown(results: dict[str, Any], notes: _Notes) -> list[str]:
    """What each peer's mixed load did, and the most its own per-op costs allow."""
    rows = []
    for pid in PEER_IDS:
        res = results.get("peers", {}).get(pid, {})
        c = (res.get("counts") or {}).get("mixed")
        if not c:
            continue
        lost = c.get("resident_missing")
        rows.append([
            LABELS[pid], _count(c.get("lookups")), _count(c.get("hits")),
            _count(c.get("misses")), _count(c.get("updates")), _count(c.get("skipped")),
            "—" if lost is None else f"{lost:,} of {c.get('resident_checked') or 0:,}",
            "n/a (waits on a server or fsync)" if integrity.waits_on_others(res)
            else fmt(res.get("mixed_bound_ops_s"), "ops_s"),
            notes.cell(res, "mixed_ops_s"),
        ])  # fmt: skip
    if not rows:
        return []
    out = ["", "### Mixed load: what each peer did", ""]
    out += _table(
        ["cache", "lookups", "hits", "misses", "updates", "skipped", "stored keys lost",
         "most ops/s its costs allow", "measured ops/s"],
        rows,
    )  # fmt: skip
    budget = next(
        (r.get("mixed_max_ops_per_window") for r in results.get("peers", {}).values()
         if r.get("mixed_max_ops_per_window")), None,
    )  # fmt: skip
    at_budget = sum(int(r.get("mixed_windows_at_budget") or 0)
                    for r in results.get("peers", {}).values())  # fmt: skip
    out += [
        "",
        "Counts are summed over both processes and all rounds. Every lookup is of a stored "
        "key, so every *miss* is a stored key the store lost or could not read; *skipped* "
        "are updates the store reports as not stored (— : the store has no skip path, a "
        "failed update raises); *stored keys lost*: every stored key looked up once after "
        "the phase. *Most ops/s its costs allow*: 2 processes (at most one per usable CPU) "
        f"{X} 1 / (mean cost of the phase's counted mix at this peer's cheapest hit, miss and "
        f"update µs of any round of this run; n/a where more than "
        f"{integrity.WAITING_SLEEPS_PER_KOP:.0f} of 1,000 ops sleep: a client of a server "
        "or of fsync does not occupy its CPU for the latency it measured alone). A figure "
        f"above that {X} "
        f"{integrity.THROUGHPUT_MARGIN}, or with more than {integrity.MISS_TOLERANCE:.1%} "
        "misses or skips, is not published. The phase runs on a fresh store of its own, "
        "populated with the same entries and sized to hold every rewrite of the phase, so "
        "nothing stored is evicted"
        + (f" (each window also ends after {budget:,} operations per process" if budget else "")
        + (f"; {at_budget} window(s) did)" if budget and at_budget else ")" if budget else "")
        + ".",
    ]
    return out


def _load(value: Any) -> str:
    if not value:
        return "?"
    return "/".join(f"{x:.2f}" for x in value)


def _curves_markdown(results: dict[str, Any], notes: _Notes) -> list[str]:
    out: list[str] = []
    entries = results.get("entries_curve") or []
    if entries:
        out += ["", "## shmcache: entries curve", ""]
        rows = []
        for p in entries:
            st = p.get("stats_after_write") or {}
            if "error" in p:
                rows.append([f"{p['entries']:,}", f"error: {p['error']}", *[""] * 6])
                continue
            rows.append([
                f"{p['entries']:,}", f"{p.get('size_bytes', 0) / 2**20:,.0f}",
                f"{st.get('entries', '?'):,}" if isinstance(st.get("entries"), int) else "?",
                str(st.get("evictions", "?")), notes.cell(p, "hit_us"),
                notes.cell(p, "hit_warm_us"), notes.cell(p, "miss_us"), notes.cell(p, "update_us"),
            ])  # fmt: skip
        header = ["entries", "size_bytes MiB", "stored", "evictions", "hit µs",
                  "hit µs (2nd read)", "miss µs", "update µs"]  # fmt: skip
        out += _table(header, rows)
        out += [
            "",
            "*hit µs* is a fresh process's first read of each key (page faults of the "
            "mapping included); *2nd read* repeats the same keys in that process.",
        ]
    sizes = results.get("size_curve") or []
    if sizes:
        out += ["", "## shmcache: value-size curve", ""]
        rows = []
        for p in sizes:
            if "error" in p:
                rows.append([f"{p['value_bytes']:,}", f"error: {p['error']}", "", "", "", ""])
                continue
            missing = p.get("hit_missing") or 0
            hit = notes.cell(p, "hit_us") + (f" ({missing} not found)" if missing else "")
            rows.append([
                f"{p['value_bytes']:,}", f"{p.get('pickle_bytes', 0):,}", str(p.get("entries")),
                hit, notes.cell(p, "miss_us"), notes.cell(p, "update_us"),
            ])  # fmt: skip
        out += _table(
            ["text bytes", "pickled bytes", "entries", "hit µs", "miss µs", "update µs"], rows
        )
    readers = results.get("readers") or {}
    if readers:
        out += ["", "## Reader scaling (aggregate hits/s)", ""]
        rows = []
        for pid, r in readers.items():
            if "error" in r:
                rows.append([LABELS[pid], f"error: {r['error']}", "", ""])
                continue
            share = r.get("cpu_share_2_readers")
            scaling = notes.cell(r, "scaling")
            rows.append([
                LABELS[pid], notes.cell(r, "readers_1_ops_s"), notes.cell(r, "readers_2_ops_s"),
                scaling if "not published" in scaling else f"{r.get('scaling') or 0:.2f}{X}",
                "—" if share is None else f"{share:.0%}",
            ])  # fmt: skip
        out += _table(
            ["cache", "1 reader", "2 readers", "scaling", "CPU per reader (2 readers)"], rows
        )
        out += [
            "",
            "*CPU per reader*: CPU time each reader got during the 2-reader windows, as a "
            "share of wall time. Well below 100% means other programs held a core, and "
            "the scaling then measures the host, not the cache.",
        ]
    return out


def _num(value: Any) -> float:
    """A plottable number: unpublished or missing figures become NaN (a gap)."""
    return float(value) if isinstance(value, (int, float)) else float("nan")


def plot(results: dict[str, Any], path: str) -> None:
    """Four panels: per-peer latencies, mixed throughput, entries curve, size curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    peers = results.get("peers", {})
    measured = [p for p in PEER_IDS if "hit_us" in peers.get(p, {})]
    labels = [LABELS[p] for p in measured]

    ax = axes[0][0]
    ys = range(len(measured))
    height = 0.27
    for k, (key, name) in enumerate((("hit_us", "hit"), ("miss_us", "miss"),
                                     ("update_us", "update"))):  # fmt: skip
        vals = [peers[p].get(key) or 0 for p in measured]
        ax.barh([y + (k - 1) * height for y in ys], vals, height=height, label=name)
    ax.set_yticks(list(ys), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("µs per operation (log; lower is better)")
    ax.set_title("Per-operation latency, cross-process")
    ax.legend(fontsize=8)

    ax = axes[0][1]
    mixed = [p for p in measured if peers[p].get("mixed_ops_s")]
    ax.barh([LABELS[p] for p in mixed], [peers[p]["mixed_ops_s"] for p in mixed],
            color=["tab:red" if p == SHMCACHE else "tab:gray" for p in mixed])  # fmt: skip
    ax.invert_yaxis()
    if mixed:
        ax.set_xscale("log")
    ax.tick_params(axis="y", labelsize=8)
    ax.set_xlabel("ops/s, 2 processes, 90% lookup / 10% update (log; higher is better)")
    ax.set_title("Mixed load (published figures only)")

    ax = axes[1][0]
    curve = [p for p in results.get("entries_curve") or [] if "hit_us" in p]
    if curve:
        for key, name, style in (
            ("hit_us", "hit (fresh process)", "C0o-"),
            ("hit_warm_us", "hit (2nd read)", "C0o--"),
            ("miss_us", "miss", "C1o-"),
            ("update_us", "update", "C2o-"),
        ):
            ax.plot([p["entries"] for p in curve], [_num(p.get(key)) for p in curve], style,
                    label=name)  # fmt: skip
        ax.set_xscale("log")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    ax.set_xlabel("entries stored")
    ax.set_ylabel("µs")
    ax.set_title("shmcache vs number of entries")

    ax = axes[1][1]
    curve = [p for p in results.get("size_curve") or [] if "hit_us" in p]
    if curve:
        for key, name in (("hit_us", "hit"), ("miss_us", "miss"), ("update_us", "update")):
            ax.plot([p["value_bytes"] for p in curve], [_num(p.get(key)) for p in curve], "o-",
                    label=name)  # fmt: skip
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    ax.set_xlabel("message text bytes")
    ax.set_ylabel("µs (log)")
    ax.set_title("shmcache vs value size")

    m = results.get("machine", {})
    fig.suptitle(
        f"shmcache benchmark ({results.get('tier', {}).get('name')}) — {m.get('cpu_model')}, "
        f"{m.get('usable_cpus')} CPUs, {m.get('python')}",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict[str, Any], out_dir: str) -> str:
    """Write results.md, results.json and benchmark.png into ``out_dir``; return the Markdown."""
    os.makedirs(out_dir, exist_ok=True)
    results["targets"] = targets(results)
    markdown = to_markdown(results)
    with open(os.path.join(out_dir, "results.md"), "w", encoding="utf-8") as fh:
        fh.write(markdown)
    with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=2, default=str)
    try:
        plot(results, os.path.join(out_dir, "benchmark.png"))
    except Exception as exc:  # a plotting problem must not lose the measurements
        print(f"plot failed: {exc!r}", file=sys.stderr)
    return markdown

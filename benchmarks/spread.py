"""Run-to-run spread of the side-by-side comparison: ``python -m benchmarks --runs N``.

One benchmark run on a shared 2-core host can move a figure by tens of percent, so a
ratio measured once says little about a 5% gap. With ``--runs N`` the runner measures
the whole side-by-side comparison N times (each run: ``tier.rounds`` rounds, median per
figure, checked by :mod:`benchmarks.integrity` exactly as a single run is), and this
module turns the N per-run records into ``spread.md``:

* per column (update µs, hit µs, plain-hit µs, miss µs, mixed ops/s): every run's value
  for shmcache and each peer — a figure that its run withheld (its phase did not count
  what it claims, or it beats the run's own per-op costs) is shown as *withheld*, never
  as a number, and takes no part in a ratio or a noise figure;
* every run's ratio of shmcache to the better of lmdb sync=False and warp-cache (the
  smaller latency, the larger throughput), and for the hit columns to ``pickle.loads``
  of the same value, with the issue's limits (≤ 1.0x / ≥ 1.0x, hit ≤ 1.3x pickle);
* noise figures: each peer's max/min of the same figure across runs and its
  coefficient of variation (sample stdev / mean), and the max/min of each ratio.

A ratio whose runs disagree on the verdict is reported as *depends on the run*: the
gap is within the host's noise and one run cannot decide it.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Mapping, Sequence
from typing import Any, Final

from benchmarks.peers import LABELS, LMDB_FAST, PEER_IDS, PICKLE, SHMCACHE, WARP

SPREAD_COLUMNS: Final = (
    ("update_us", "update µs", False),
    ("hit_us", "hit µs", False),
    ("hit_plain_us", "hit µs, plain Generation", False),
    ("miss_us", "miss µs", False),
    ("mixed_ops_s", "2-process mixed ops/s", True),
)
"""(result key, title, higher-is-better) of the columns whose spread is reported."""

REFERENCES: Final = (LMDB_FAST, WARP)
"""shmcache is compared with the better of these per column (issue 13)."""

LIMIT_VS_BEST: Final = 1.0
"""Goal: latency ≤ 1.0x the better reference, throughput ≥ 1.0x."""

LIMIT_VS_PICKLE: Final = 1.3
"""Goal: hit ≤ 1.3x ``pickle.loads`` of the same value."""

PICKLE_COLUMNS: Final = ("hit_us", "hit_plain_us")
"""Columns also compared with ``pickle.loads`` (the floor of returning fresh objects)."""

X: Final = "\N{MULTIPLICATION SIGN}"


def published(record: Mapping[str, Any] | None, key: str) -> float | None:
    """The figure if its run published it (measured, and not withheld), else ``None``."""
    if not record or "skipped" in record or "error" in record:
        return None
    if key in (record.get("invalid") or {}):
        return None
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        return None
    return float(value)


def withheld_reason(record: Mapping[str, Any] | None, key: str) -> str | None:
    """Why the run withheld this figure, or ``None`` when it did not."""
    item = ((record or {}).get("invalid") or {}).get(key)
    return None if item is None else str(item.get("reason"))


def noise(values: Sequence[float]) -> dict[str, float | None]:
    """Max/min (≥ 1) and coefficient of variation of one figure across runs."""
    vals = [v for v in values if v > 0]
    if len(vals) < 2:
        return {"max_over_min": None, "cv": None}
    mean = statistics.fmean(vals)
    return {"max_over_min": max(vals) / min(vals), "cv": statistics.stdev(vals) / mean}


def _best_reference(
    peers: Mapping[str, Mapping[str, Any]], key: str, higher: bool
) -> tuple[float | None, str | None, str | None]:
    """(value, peer id, why not) of the better reference of one run.

    A reference that was selected and measured but whose figure the run withheld makes
    the "better of" unknown (the withheld one might be the better): no ratio. A
    reference that was not selected, or skipped, is left out of the comparison.
    """
    found: list[tuple[float, str]] = []
    for pid in REFERENCES:
        rec = peers.get(pid)
        if rec is None or "skipped" in rec or "error" in rec:
            continue
        value = published(rec, key)
        if value is None:
            return None, None, f"{LABELS[pid]} withheld"
        found.append((value, pid))
    if not found:
        return None, None, "no reference measured"
    value, pid = (max if higher else min)(found)
    return value, pid, None


def _met(ratio: float | None, limit: float, higher: bool) -> bool | None:
    if ratio is None:
        return None
    return ratio >= limit if higher else ratio <= limit


def _verdict(mets: Sequence[bool | None]) -> str:
    judged = [m for m in mets if m is not None]
    if not judged:
        return "not judged"
    n = len(mets)
    if all(judged) and len(judged) == n:
        return f"met in all {n} runs"
    if not any(judged):
        return f"not met in any judged run ({len(judged)} of {n})"
    return f"depends on the run: met in {sum(judged)} of {len(judged)} judged runs"


def compute(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per column: per-run values, ratios, verdicts and noise figures.

    Args:
        runs: One entry per run, each with ``peers`` (peer id → merged record of that
            run, as :func:`benchmarks.runner.merge_rounds` returns it).

    Returns:
        ``{"runs": N, "columns": {key: {...}}}``; every number is ``None`` where the
        run did not publish it.
    """
    peer_ids = [p for p in PEER_IDS if any(p in (r.get("peers") or {}) for r in runs)]
    out: dict[str, Any] = {"runs": len(runs), "peers": peer_ids, "columns": {}}
    for key, title, higher in SPREAD_COLUMNS:
        col: dict[str, Any] = {"title": title, "higher_is_better": higher, "peers": {}}
        for pid in peer_ids:
            recs = [(r.get("peers") or {}).get(pid) for r in runs]
            if all(rec is None or "skipped" in rec or "error" in rec for rec in recs):
                continue
            if all(rec is None or (rec.get(key) is None and key not in (rec.get("invalid") or {}))
                   for rec in recs):  # fmt: skip
                continue  # the peer has no such figure (pickle: miss, mixed)
            values = [published(rec, key) for rec in recs]
            col["peers"][pid] = {
                "values": values,
                "withheld": [withheld_reason(rec, key) for rec in recs],
                "median": statistics.median([v for v in values if v]) if any(values) else None,
                **noise([v for v in values if v]),
            }
        ratios: list[float | None] = []
        basis: list[str | None] = []
        for r in runs:
            peers = r.get("peers") or {}
            shm = published(peers.get(SHMCACHE), key)
            ref, ref_pid, why = _best_reference(peers, key, higher)
            if shm is None:
                why = why or "shmcache withheld"
            ratios.append(None if shm is None or ref is None else shm / ref)
            basis.append(LABELS[ref_pid] if ref_pid and shm is not None else why)
        col["vs_best"] = {
            "ratios": ratios, "basis": basis, "limit": LIMIT_VS_BEST,
            "met": [_met(x, LIMIT_VS_BEST, higher) for x in ratios],
            **noise([x for x in ratios if x]),
        }  # fmt: skip
        col["vs_best"]["verdict"] = _verdict(col["vs_best"]["met"])
        if key in PICKLE_COLUMNS:
            p_ratios = []
            for r in runs:
                peers = r.get("peers") or {}
                shm, pkl = published(peers.get(SHMCACHE), key), published(peers.get(PICKLE), key)
                p_ratios.append(None if shm is None or pkl is None else shm / pkl)
            col["vs_pickle"] = {
                "ratios": p_ratios, "limit": LIMIT_VS_PICKLE,
                "met": [_met(x, LIMIT_VS_PICKLE, False) for x in p_ratios],
                **noise([x for x in p_ratios if x]),
            }  # fmt: skip
            col["vs_pickle"]["verdict"] = _verdict(col["vs_pickle"]["met"])
        out["columns"][key] = col
    return out


def _fmt_value(value: float | None, key: str) -> str:
    if value is None:
        return "—"
    if key.endswith("ops_s"):
        return f"{value / 1000:,.1f}k"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def _fmt_ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}{X}"


def _fmt_spread(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}{X}"


def _fmt_cv(value: float | None) -> str:
    return "—" if value is None else f"{value:.1%}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines


def to_markdown(results: Mapping[str, Any], spread: Mapping[str, Any]) -> str:
    """``spread.md``: summary, then one table per column, then the withheld figures."""
    m = results.get("machine") or {}
    tier = results.get("tier") or {}
    runs = results.get("runs") or []
    n = spread.get("runs", len(runs))
    mode = tier.get("name")
    flag = "" if mode == "full" else f" --{mode}"
    out = [
        f"# shmcache benchmark spread: {n} `{mode}` runs",
        "",
        f"`python -m benchmarks{flag} --runs {n}`, {m.get('date_utc')}, "
        f"{results.get('elapsed_s', 0):.0f} s in all. Each run is the whole side-by-side "
        f"comparison ({tier.get('rounds')} round(s) over all peers, median per figure, every "
        "figure checked by `benchmarks/integrity.py`); the runs follow one another in one "
        "process tree. Method: `benchmarks/README.md`.",
        "",
        f"**Machine:** {m.get('cpu_model')}, {m.get('cpu_count')} CPUs "
        f"({m.get('usable_cpus')} usable), {m.get('os')}, {m.get('python')}"
        + (f"; repo at `{m['git_commit']}`" if m.get("git_commit") else "")
        + ". Shared host: other programs' load lands in some runs and not others, which is "
        "what the noise figures measure.",
        "",
    ]
    rows = []
    for k, r in enumerate(runs, 1):
        la = r.get("loadavg_start") or ()
        lb = r.get("loadavg_end") or ()
        code = r.get("code_start") or "—"
        if r.get("code_end") != r.get("code_start"):
            code = f"{code} → {r.get('code_end') or '—'} (**changed during the run**)"
        rows.append([
            str(k), f"{r.get('elapsed_s', 0):.0f}",
            f"{la[0]:.2f}" if la else "—", f"{lb[0]:.2f}" if lb else "—", code,
        ])  # fmt: skip
    out += _table(["run", "seconds", "load avg (1 min) at start", "at end",
                   "shmcache sources (sha256)"], rows)  # fmt: skip
    codes = {c for r in runs for c in (r.get("code_start"), r.get("code_end"))}
    if len(codes) > 1:
        out += ["", "**Warning: the shmcache sources changed during these runs** (each phase "
                "imports the library afresh): the runs did not all measure the same code, so "
                "their spread mixes code changes with noise. Re-run on a quiet tree."]  # fmt: skip
    run_hdr = [f"run {k}" for k in range(1, n + 1)]

    out += [
        "",
        "## Summary",
        "",
        "Ratio = shmcache ÷ the better of lmdb sync=False and warp-cache in the same run "
        "(lower latency, higher throughput); *vs pickle* = shmcache's hit ÷ `pickle.loads` "
        "of the same value. *noise* = max/min of the same peer's figure across runs "
        f"(1.00{X} = identical); *ratio max/min* = the same for the ratio. A verdict that "
        "depends on the run means the gap is smaller than the host's noise.",
        "",
    ]
    rows = []
    cols = spread.get("columns") or {}
    for col in cols.values():
        peers = col["peers"]
        for name, cmp in (("better of lmdb/warp", col["vs_best"]),
                          ("pickle.loads", col.get("vs_pickle"))):  # fmt: skip
            if cmp is None:
                continue
            lim = ("≥ " if col["higher_is_better"] else "≤ ") + f"{cmp['limit']}{X}"
            rows.append([
                col["title"], f"vs {name} ({lim})",
                " / ".join(_fmt_ratio(x) for x in cmp["ratios"]),
                _fmt_spread(cmp["max_over_min"]),
                _fmt_spread((peers.get(SHMCACHE) or {}).get("max_over_min")),
                _fmt_spread(max((peers.get(p) or {}).get("max_over_min") or 0
                                for p in (*REFERENCES, PICKLE)) or None),
                cmp["verdict"],
            ])  # fmt: skip
    out += _table(
        ["column", "ratio", "per run", "ratio max/min", "noise: shmcache",
         "noise: worst of lmdb/warp/pickle", "verdict"],
        rows,
    )  # fmt: skip

    notes: list[str] = []
    for key, col in cols.items():
        unit = "ops/s, higher is better" if col["higher_is_better"] else "µs, lower is better"
        out += ["", f"## {col['title']} ({unit})", ""]
        rows = []
        for pid, p in col["peers"].items():
            cells = [f"**{LABELS[pid]}**" if pid == SHMCACHE else LABELS[pid]]
            for k, (v, why) in enumerate(zip(p["values"], p["withheld"], strict=True), 1):
                if why:
                    notes.append(f"{LABELS[pid]}, {col['title']}, run {k}: {why}")
                    cells.append(f"withheld [{len(notes)}]")
                else:
                    cells.append(_fmt_value(v, key))
            cells += [_fmt_value(p["median"], key), _fmt_spread(p["max_over_min"]),
                      _fmt_cv(p["cv"])]  # fmt: skip
            rows.append(cells)
        for name, cmp in (("*shmcache ÷ better of lmdb sync=False, warp-cache*", col["vs_best"]),
                          ("*shmcache ÷ pickle.loads*", col.get("vs_pickle"))):  # fmt: skip
            if cmp is None:
                continue
            pub = [x for x in cmp["ratios"] if x]
            rows.append([name, *(_fmt_ratio(x) for x in cmp["ratios"]),
                         _fmt_ratio(statistics.median(pub) if pub else None),
                         _fmt_spread(cmp["max_over_min"]), _fmt_cv(cmp["cv"])])  # fmt: skip
        out += _table(["cache", *run_hdr, "median", "max/min", "CV"], rows)
        basis = col["vs_best"]["basis"]
        out += ["", "Better reference per run: " + "; ".join(
            f"run {k}: {b or '—'}" for k, b in enumerate(basis, 1)) + "."]  # fmt: skip
    skipped = []
    for pid in spread.get("peers") or []:
        recs = [(r.get("peers") or {}).get(pid) or {} for r in runs]
        why = next((rec.get("skipped") or rec.get("error") for rec in recs
                    if "skipped" in rec or "error" in rec), None)  # fmt: skip
        if why:
            bad = sum("skipped" in rec or "error" in rec for rec in recs)
            skipped.append(f"{LABELS[pid]} ({bad} of {len(recs)} runs): {why}")
    if skipped:
        out += ["", "Not measured: " + "; ".join(skipped) + "."]
    if not notes:
        out += ["", "No figure of these columns was withheld in any run: every phase counted "
                "what it did (`benchmarks/integrity.py`)."]  # fmt: skip
    if notes:
        out += ["", "## Withheld figures", "",
                "Each run's own counts or per-op costs contradict these figures "
                "(`benchmarks/integrity.py`); they take no part in a ratio or a noise figure.",
                ""]  # fmt: skip
        out += [f"{k}. {why}" for k, why in enumerate(notes, 1)]
    out.append("")
    return "\n".join(out)


def write(results: dict[str, Any], out_dir: str) -> str:
    """Compute the spread of ``results["runs"]``, store it in ``results``, write spread.md."""
    spread = compute(results.get("runs") or [])
    results["spread"] = spread
    markdown = to_markdown(results, spread)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "spread.md"), "w", encoding="utf-8") as fh:
        fh.write(markdown)
    return markdown

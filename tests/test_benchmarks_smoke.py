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


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_tiny_run_measures_or_skips_every_peer(tmp_path: Path) -> None:
    """A ``--tiny`` run writes the table, JSON and plot and accounts for every peer."""
    from benchmarks.peers import PEER_IDS

    before = _bench_leftovers()
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--tiny", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    markdown = (tmp_path / "results.md").read_text(encoding="utf-8")
    assert "| cache |" in markdown
    assert "## Targets" in markdown
    assert (tmp_path / "benchmark.png").stat().st_size > 0
    assert "| cache |" in proc.stdout  # the table is printed too

    results = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert "fatal" not in results
    assert results["machine"]["cpu_model"]
    for peer in PEER_IDS:
        res = results["peers"][peer]
        if "skipped" in res:
            assert res["skipped"].strip(), f"{peer} skipped without a reason"
            continue
        assert "error" not in res, f"{peer}: {res.get('detail') or res.get('error')}"
        assert isinstance(res["hit_us"], float), peer
        assert "fidelity_ok" in res, f"{peer}: fidelity check did not run"

    shm = results["peers"]["shmcache"]
    assert "skipped" not in shm, shm.get("skipped")
    assert shm["fidelity_ok"] is True, shm["fidelity_problem"]
    assert shm["fresh_objects"] is True
    assert shm["hit_missing"] == 0
    assert shm["false_hits"] == 0
    assert results["entries_curve"] and results["size_curve"]
    assert {t["target"] for t in results["targets"]}  # ratios computed (values not judged)

    assert _bench_leftovers() <= before, "benchmark left files in /dev/shm"

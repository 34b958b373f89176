"""Dropped instances (issue 8, defect 3): the documented spawn pattern — a cache
passed as a task argument pickles by name — makes a new instance per task.  Each
dropped instance must give back its fds and its counter slot, and unpickling where
that cache is already open reuses the open instance.
"""

from __future__ import annotations

import multiprocessing
import pickle
import subprocess
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from _robust_helpers import (
    LLM,
    child_env,
    helper_command,
    kill_process_group,
    lower_fd_limit,
    open_fds,
    parse_result,
    pool_task,
    read_line,
    run_helper,
)
from _samples import CacheFactory
from langchain_core.outputs import Generation

FD_LIMIT = 256
TASKS = 1000
KEYS = 50


@pytest.mark.timeout(90)
def test_spawn_pool_with_low_fd_limit_survives_a_thousand_pickled_caches(
    make_cache: CacheFactory,
) -> None:
    """2 spawn workers with RLIMIT_NOFILE lowered to 256 run 1,000 tasks that each
    get the cache pickled: no BrokenProcessPool (EMFILE), every value read is right,
    and a worker's open fds stay flat from its first task to its last."""
    cache = make_cache("dropped")
    results: list[dict[str, Any]] = []
    failures: list[str] = []
    with ProcessPoolExecutor(
        max_workers=2, mp_context=multiprocessing.get_context("spawn"),
        initializer=lower_fd_limit, initargs=(FD_LIMIT,),
    ) as pool:
        # One submit per task: each task unpickles its own instance.
        futures = [pool.submit(pool_task, cache, task, KEYS) for task in range(TASKS)]
        for future in futures:
            try:
                results.append(future.result(timeout=60))
            except Exception as exc:  # EMFILE in a task, or BrokenProcessPool
                failures.append(f"{type(exc).__name__}: {exc}")
    assert failures == [], (
        f"{len(failures)} of {TASKS} tasks failed after {len(results)} succeeded; "
        f"kinds {sorted({f.split(':')[0] for f in failures})}; first: {failures[0]}"
    )
    assert [r["task"] for r in results] == list(range(TASKS))
    assert [r["problem"] for r in results if r["problem"]] == []
    fds: dict[int, list[int]] = defaultdict(list)
    for r in results:
        fds[r["pid"]].append(r["fds"])
    growth = {pid: (seen[0], seen[-1], max(seen)) for pid, seen in fds.items()}
    print(f"fds per worker (first task, last task, peak): {growth}")
    for first, last, _ in growth.values():
        assert last - first <= 4, growth
    stats = cache.stats()
    assert stats.hits + stats.misses == TASKS


@pytest.mark.timeout(60)
def test_four_hundred_dropped_instances_release_their_fds(make_cache: CacheFactory) -> None:
    """In a fresh process where the cache is not open, 400 unpickled instances used
    once and dropped leave at most a few more fds open than before."""
    cache = make_cache("dropped")
    result, _ = run_helper("drop_instances", pickle.dumps(cache).hex(), 5, 400)
    print(f"fds before {result['before']}, peak {result['peak']}, after {result['after']} "
          f"({result['dropped']} dropped instances)")
    assert result["after"] - result["before"] <= 4, result
    assert result["peak"] - result["before"] <= 32, result


@pytest.mark.timeout(60)
def test_dropped_instances_do_not_use_up_counter_slots(
    make_cache: CacheFactory, cache_dir: Path
) -> None:
    """A process that dropped 300 instances (and is still running) still stores its
    updates, and another process's hits are counted exactly even though it ends
    with ``os._exit`` — it got a counter slot, so none were left taken."""
    cache = make_cache("slots")
    cache.update("hot", LLM, [Generation(text="hot value")])
    dropper = subprocess.Popen(
        helper_command("drop_then_update_and_wait", pickle.dumps(cache).hex(), 300),
        env=child_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, bufsize=0, start_new_session=True,
    )
    try:
        assert dropper.stdout is not None and dropper.stdin is not None
        dropped = parse_result(read_line(dropper.stdout, 60).decode())
        before = cache.stats()
        counted, _ = run_helper("hit_and_vanish", "slots", str(cache_dir), "hot", 50)
        after = cache.stats()
        dropper.stdin.write(b"exit\n")
        dropper.stdin.close()
        assert dropper.wait(timeout=30) == 0
    finally:
        kill_process_group(dropper)
    hits = after.hits - before.hits
    print(f"after 300 dropped instances: update skipped {dropped['skipped']}, stored "
          f"{dropped['found']}; another process's hits: {counted['hits']} done, {hits} counted")
    assert dropped == {"skipped": 0, "updates": 1, "found": True}
    assert counted["hits"] == 50
    assert hits == 50


def test_unpickling_where_the_cache_is_open_reuses_it(make_cache: CacheFactory) -> None:
    """``pickle.loads(pickle.dumps(cache))`` in the process that has it open returns
    that very instance, and opens no fd."""
    cache = make_cache("reuse")
    cache.update("p", LLM, [Generation(text="v")])
    before = open_fds()
    again = pickle.loads(pickle.dumps(cache))
    opened = open_fds() - before
    assert again is cache
    assert opened == 0
    assert again.lookup("p", LLM) == [Generation(text="v")]

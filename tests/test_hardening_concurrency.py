"""Threads and processes together: 8 threads in each of 2 processes run mixed calls on
one cache; every value read is checked against the values written for its key."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from _hardening_helpers import (
    Children,
    Verifier,
    generations,
    prompt_of,
    read_json_from,
    write_json_to,
)
from langchain_core.outputs import Generation

from shmcache import SharedMemoryCache

LLM = "llm"
SCRATCH = "scratch llm"
PROCESSES = 2
THREADS = 8
KEYS = 320
SECONDS = float(os.environ.get("SHMCACHE_HARDENING_THREAD_SECONDS", "5"))


def _scratch_value(thread_id: int, seq: int) -> list[Generation]:
    return [Generation(text=f"scratch {thread_id} {seq}")]


def _thread(cache: SharedMemoryCache, thread_id: int, deadline: float, out: dict[str, Any]) -> None:
    """Mixed calls until ``deadline``; this thread alone writes keys ``k`` with
    ``k % (PROCESSES*THREADS) == thread_id``, with growing stamps."""
    rng = random.Random(thread_id * 7919 + os.getpid())
    verifier = Verifier()
    loop = asyncio.new_event_loop()
    own = list(range(thread_id, KEYS, PROCESSES * THREADS))
    ops = seq = 0
    try:
        while time.monotonic() < deadline:
            ops += 1
            r = rng.random()
            if r < 0.40:
                key = rng.randrange(KEYS)
                verifier.check(key, cache.lookup(prompt_of(key), LLM))
            elif r < 0.55:
                key = rng.randrange(KEYS)
                verifier.check(key, loop.run_until_complete(cache.alookup(prompt_of(key), LLM)))
            elif r < 0.92:
                key = rng.choice(own)
                value = generations(key, thread_id, time.monotonic_ns(), max_len=3000)
                skipped = cache.stats().skipped
                if r < 0.80:
                    cache.update(prompt_of(key), LLM, value)
                else:
                    loop.run_until_complete(cache.aupdate(prompt_of(key), LLM, value))
                got = cache.lookup(prompt_of(key), LLM)
                # Read-your-write: this value (or a miss if already evicted), never an
                # older one, unless the update was skipped for a lock timeout.
                if got not in (None, value) and cache.stats().skipped == skipped:
                    verifier.wrong.append(f"key {key}: own write not read back")
                verifier.check(key, got)
            else:
                seq += 1
                prompt = f"scratch {thread_id}"
                cache.update(prompt, SCRATCH, _scratch_value(thread_id, seq))
                got = cache.lookup(prompt, SCRATCH)
                if got is not None and not (
                    len(got) == 1 and got[0].text.startswith(f"scratch {thread_id} ")
                ):
                    verifier.wrong.append(f"scratch {thread_id}: {got!r:.80}")
                if rng.random() < 0.3:
                    cache.clear(llm_string=SCRATCH)
    except BaseException as exc:  # reported, not lost with the thread
        verifier.wrong.append(f"thread {thread_id} raised {type(exc).__name__}: {exc}")
    finally:
        loop.close()
    out[str(thread_id)] = {**verifier.summary(), "ops": ops}


def _process(cache: SharedMemoryCache, index: int, start_at: float, result_fd: int) -> int:
    logging.disable(logging.WARNING)
    results: dict[str, Any] = {}
    deadline = start_at + SECONDS
    threads = [
        threading.Thread(target=_thread, args=(cache, index * THREADS + t, deadline, results))
        for t in range(THREADS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(SECONDS + 60)
    alive = sum(thread.is_alive() for thread in threads)
    write_json_to(result_fd, {"threads": results, "hung": alive})
    return 0


@pytest.mark.timeout(SECONDS + 120)
def test_threads_and_processes_never_read_a_wrong_value(tmp_path: Path) -> None:
    # Random lookups of keys nobody stores yet are peeks: coalesce=False, as the contract
    # says for peeking code (coalescing under load is tested in test_coalesce*.py).
    cache = SharedMemoryCache(
        "mixed", directory=tmp_path, size_bytes=2 << 20, lock_timeout=5.0, coalesce=False
    )
    try:
        with Children() as children:
            pipes = []
            start_at = time.monotonic() + 0.2
            for index in range(PROCESSES):
                read_fd, write_fd = os.pipe()
                children.spawn(lambda i=index, w=write_fd: _process(cache, i, start_at, w))
                os.close(write_fd)
                pipes.append(read_fd)
            reports = []
            for read_fd in pipes:
                try:
                    reports.append(read_json_from(read_fd, SECONDS + 90))
                finally:
                    os.close(read_fd)
            for pid in list(children.pids):
                assert children.wait(pid, 30) == 0
        threads = [t for report in reports for t in report["threads"].values()]
        assert [r["hung"] for r in reports] == [0] * PROCESSES
        assert len(threads) == PROCESSES * THREADS
        wrong = [e for t in threads for e in t["examples"]]
        verified = sum(t["verified"] for t in threads)
        ops = sum(t["ops"] for t in threads)
        print(
            f"\n{PROCESSES} processes x {THREADS} threads, {SECONDS:.0f} s: {ops} calls, "
            f"{verified} values verified, {sum(t['misses'] for t in threads)} misses, "
            f"wrong values: {sum(t['wrong'] for t in threads)}"
        )
        assert sum(t["wrong"] for t in threads) == 0, wrong
        assert verified > 1000
        final = Verifier()
        for key in range(KEYS):
            final.check(key, cache.lookup(prompt_of(key), LLM))
        assert final.wrong == []
        assert cache.check() == []
    finally:
        cache.close()
        cache.unlink()

"""A writer frozen while holding the lock (SIGSTOP mid-write) never stalls anyone else
for longer than ``lock_timeout``, and carries on correctly when resumed."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from _hardening_helpers import (
    BUSY_WORD_BYTE,
    Children,
    kill_at_step,
    read_json_from,
    same_bucket_prompts,
    wait_stopped,
    word,
    write_json_to,
)
from langchain_core.outputs import Generation

import shmcache._arena
from shmcache import LockTimeoutError, SharedMemoryCache

LLM = "llm"
LOCK_TIMEOUT_S = 0.3
# A liveness bound, not a benchmark.
BOUND_S = LOCK_TIMEOUT_S + 3.0
FROZEN_PROMPT = "written by the frozen writer"
FROZEN_VALUE = [Generation(text="the frozen writer's value")]

Timings = dict[str, list[Any]]  # op -> [seconds, ok, detail]


def _value(prompt: str) -> list[Generation]:
    return [Generation(text=f"value of {prompt}")]


async def _ticking(coro: Awaitable[Any]) -> tuple[Any, int]:
    """Await ``coro`` while a ticker counts how often the event loop got to run."""
    ticks = 0
    done = False

    async def tick() -> None:
        nonlocal ticks
        while not done:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.ensure_future(tick())
    try:
        return await coro, ticks
    finally:
        done = True
        await ticker


def _ops_while_frozen(cache: SharedMemoryCache, directory: Path, same_bucket: str) -> Timings:
    """Run every kind of call against a cache whose lock a frozen writer holds.

    Each returns within the bound: lookups hit lock-free or miss after the lock wait,
    updates are skipped (counted in ``skipped``), clear/check raise LockTimeoutError,
    async calls leave the event loop running while they wait.
    """
    results: Timings = {}

    def timed(name: str, op: Callable[[], tuple[bool, str]]) -> None:
        started = time.monotonic()
        ok, detail = op()
        results[name] = [time.monotonic() - started, ok, detail]

    def lookup_elsewhere() -> tuple[bool, str]:
        got = cache.lookup("p3", LLM)
        return got == _value("p3"), repr(got)[:60]

    def lookup_same_bucket() -> tuple[bool, str]:
        got = cache.lookup(same_bucket, LLM)
        return got in (None, _value(same_bucket)), "miss" if got is None else "hit"

    def skipped_update(prompt: str, run: Callable[[], None]) -> tuple[bool, str]:
        before = cache.stats().skipped
        run()
        skipped = cache.stats().skipped - before
        # >= 1: another process skipping at the same time shows here at once too.
        return skipped >= 1 and cache.lookup(prompt, LLM) is None, f"skipped {skipped}"

    def update() -> tuple[bool, str]:
        return skipped_update("new 1", lambda: cache.update("new 1", LLM, _value("new 1")))

    def aupdate() -> tuple[bool, str]:
        before = cache.stats().skipped
        _, ticks = asyncio.run(_ticking(cache.aupdate("new 2", LLM, _value("new 2"))))
        skipped = cache.stats().skipped - before
        return skipped >= 1 and ticks >= 3, f"skipped {skipped}, loop ticked {ticks}"

    def alookup() -> tuple[bool, str]:
        started = time.monotonic()
        got, ticks = asyncio.run(_ticking(cache.alookup(same_bucket, LLM)))
        waited = time.monotonic() - started >= LOCK_TIMEOUT_S * 0.8
        ok = got in (None, _value(same_bucket)) and (ticks >= 3 or not waited)
        return ok, f"{'miss' if got is None else 'hit'}, loop ticked {ticks}"

    def raises_timeout(op: Callable[[], object]) -> tuple[bool, str]:
        try:
            op()
        except LockTimeoutError as exc:
            return "lock_timeout" in str(exc), "LockTimeoutError"
        return False, "did not raise"

    def open_use_close() -> tuple[bool, str]:
        with SharedMemoryCache(
            "frozen", directory=directory, lock_timeout=LOCK_TIMEOUT_S
        ) as other:
            got = other.lookup("p5", LLM)
        return got == _value("p5"), "opened, read, closed"

    timed("lookup (lock-free hit)", lookup_elsewhere)
    timed("lookup (frozen bucket)", lookup_same_bucket)
    timed("update", update)
    timed("aupdate", aupdate)
    timed("alookup (frozen bucket)", alookup)
    timed("clear", lambda: raises_timeout(cache.clear))
    timed("check", lambda: raises_timeout(cache.check))
    timed("open, lookup, close", open_use_close)
    return results


@pytest.mark.timeout(90)
@pytest.mark.parametrize("step", [3, 6], ids=["mid-record", "mid-index"])
def test_frozen_writer_stalls_nobody(tmp_path: Path, step: int) -> None:
    """Step 3: frozen after writing a record header; step 6: frozen with its index
    bucket odd (readers of that bucket must fall back to the lock and give up)."""
    cache = SharedMemoryCache(
        "frozen", directory=tmp_path, size_bytes=1 << 20, lock_timeout=LOCK_TIMEOUT_S
    )
    try:
        for i in range(10):
            cache.update(f"p{i}", LLM, _value(f"p{i}"))
        n_buckets = cache._arena.geometry.n_buckets
        (same_bucket,) = same_bucket_prompts(FROZEN_PROMPT, LLM, n_buckets, 1)
        cache.update(same_bucket, LLM, _value(same_bucket))
        skipped_before = cache.stats().skipped
        with Children() as children:

            def frozen_writer() -> int:
                shmcache._arena.step_hook = kill_at_step(step, signal.SIGSTOP)
                cache.update(FROZEN_PROMPT, LLM, FROZEN_VALUE)
                shmcache._arena.step_hook = None
                return 0 if cache.lookup(FROZEN_PROMPT, LLM) == FROZEN_VALUE else 4

            frozen = children.spawn(frozen_writer)
            wait_stopped(frozen, 10.0)
            assert word(cache.path, BUSY_WORD_BYTE) == frozen  # frozen mid-write

            read_fd, write_fd = os.pipe()

            def other_process() -> int:
                os.close(read_fd)
                logging.disable(logging.WARNING)
                write_json_to(write_fd, _ops_while_frozen(cache, tmp_path, same_bucket))
                return 0

            other = children.spawn(other_process)
            os.close(write_fd)
            try:
                here = _ops_while_frozen(cache, tmp_path, same_bucket)  # at the same time
                there = read_json_from(read_fd, 60.0)
            finally:
                os.close(read_fd)
            assert children.wait(other, 30.0) == 0
            for where, results in (("this process", here), ("another process", there)):
                for op, (took, ok, detail) in results.items():
                    assert ok, f"{where}: {op}: {detail}"
                    assert took < BOUND_S, f"{where}: {op} took {took:.2f} s"
            slowest = max(took for r in (here, there) for took, _, _ in r.values())
            print(f"\nfrozen at step {step}: 2 x {len(here)} calls, slowest {slowest:.2f} s")
            if step == 6:  # the frozen bucket could only be read under the lock
                assert here["lookup (frozen bucket)"][2] == "miss"
                assert there["lookup (frozen bucket)"][2] == "miss"

            os.kill(frozen, signal.SIGCONT)
            assert children.wait(frozen, 30.0) == 0  # its update landed and read back
        assert cache.lookup(FROZEN_PROMPT, LLM) == FROZEN_VALUE
        assert cache.lookup(same_bucket, LLM) == _value(same_bucket)
        assert cache.check() == []
        assert word(cache.path, BUSY_WORD_BYTE) == 0
        assert cache.stats().skipped >= skipped_before + 2  # this process's two skips
    finally:
        cache.close()
        cache.unlink()

"""Request coalescing across real processes (issue 9, DESIGN §1 "Coalescing").

* A burst of 8 ``spawn`` processes on one cold prompt, released together by a
  barrier: one model call, 7 coalesced hits.
* The computing caller is another process that is SIGKILLed (taken over within
  about a second), SIGSTOPped (waited for at most ``coalesce_timeout``), or lives on
  after its model call failed, was cancelled, or it gave its lease up some other way
  (released at once: one later successful call serves every waiter).

Children are forked (cheap) except in the burst; every child is killed and reaped in
``finally`` (``Children``).  No sleep synchronises: pipes carry "I am computing" and
"go"; the waiters are known to wait through ``instrument_waits``; polls are bounded.
Takeover times are printed (``-s``) and asserted only as generous upper bounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from _hardening_helpers import Children, wait_stopped
from _samples import CacheFactory
from coalesce_apps.coalesce_support import (
    BurstChatModel,
    WaitCounter,
    burst_child,
    cache_key,
    count_lines,
    expected_answer,
    instrument_waits,
    poll_until,
    read_lines,
    receive,
    send,
)
from langchain_core.globals import get_llm_cache, set_llm_cache
from langchain_core.outputs import Generation

from shmcache import SharedMemoryCache

LLM = "llm"
BURST = 8
WAITERS = 3
LONG_TIMEOUT_S = 20.0
# "Within about a second" / "at once", as a generous upper bound.
TAKEOVER_BOUND_S = 5.0
DEADLINE_S = 30.0


@pytest.fixture(autouse=True)
def _restore_global_llm_cache() -> Iterator[None]:
    previous = get_llm_cache()
    try:
        yield
    finally:
        set_llm_cache(previous)


class Pipe:
    """A one-way pipe between the test and a forked child (both ends closed after)."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()

    def close(self) -> None:
        for fd in (self.r, self.w):
            with contextlib.suppress(OSError):
                os.close(fd)


@contextlib.contextmanager
def pipes(n: int) -> Iterator[list[Pipe]]:
    made = [Pipe() for _ in range(n)]
    try:
        yield made
    finally:
        for pipe in made:
            pipe.close()


def _start_waiters(
    pool: ThreadPoolExecutor, model: BurstChatModel, prompt: str, n: int
) -> list[Future[Any]]:
    return [pool.submit(model.invoke, prompt) for _ in range(n)]


def _hold_takeover_until_the_others_wait(
    model: BurstChatModel, waits: WaitCounter, waiters: int
) -> None:
    """The waiter that takes over answers only once the other ``waiters - 1`` wait for
    *it* (each waited once for the first holder, then once for the new one), so every
    one of them is served by a coalesced wait — whatever the timing."""
    model.with_hooks(
        lambda _: poll_until(
            lambda: waits.count >= 2 * waiters - 1, DEADLINE_S, "the others to wait again"
        )
    )


def _calls_by(calls_file: Path, pid: int) -> list[dict[str, Any]]:
    return [line for line in read_lines(calls_file) if line["pid"] == pid]


# -- a burst of spawned processes -------------------------------------------------------


@pytest.mark.timeout(90)
def test_burst_of_spawned_processes_makes_one_model_call(
    make_cache: CacheFactory, cache_dir: Path, tmp_path: Path
) -> None:
    """8 spawn processes, each with its own interpreter, open the cache and meet at a
    barrier, then ``invoke`` one cold prompt at once: one model call on the host,
    every process gets the right answer, 7 lookups are coalesced."""
    cache = make_cache("burst", coalesce_timeout=DEADLINE_S)
    start = cache.stats()
    calls, waits = tmp_path / "calls.jsonl", tmp_path / "waits.jsonl"
    prompt = "one cold prompt for eight processes"
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(BURST)
    ends = [ctx.Pipe(duplex=False) for _ in range(BURST)]
    processes = [
        ctx.Process(
            target=burst_child,
            args=("burst", str(cache_dir), str(calls), str(waits), BURST - 1, prompt,
                  barrier, send_end),
        )
        for _, send_end in ends
    ]
    results: list[tuple[int, str]] = []
    try:
        for process in processes:
            process.start()
        for _, send_end in ends:
            send_end.close()
        deadline = time.monotonic() + 75
        for receive_end, _ in ends:
            if not receive_end.poll(max(0.0, deadline - time.monotonic())):
                pytest.fail(f"a burst child gave no answer; calls: {read_lines(calls)}")
            results.append(receive_end.recv())
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
            assert process.exitcode == 0, f"pid {process.pid} exited {process.exitcode}"
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join(10)
        for receive_end, _ in ends:
            receive_end.close()

    assert [answer for _, answer in results] == [expected_answer(prompt)] * BURST
    assert len({pid for pid, _ in results}) == BURST
    assert count_lines(calls) == 1, read_lines(calls)
    stats = cache.stats()
    assert stats.coalesced - start.coalesced == BURST - 1
    assert (stats.misses - start.misses, stats.hits - start.hits) == (1, BURST - 1)
    assert stats.coalesce_timeouts == start.coalesce_timeouts
    assert stats.uncoalesced == start.uncoalesced


# -- a computing caller that dies or stops -----------------------------------------------


def _blocking_child(
    cache: SharedMemoryCache,
    model: BurstChatModel,
    prompt: str,
    out: Pipe,
    then: Callable[[], object],
) -> Callable[[], int]:
    """A forked child that becomes the computing caller, says so, then runs ``then``
    inside its model call."""

    def child() -> int:
        set_llm_cache(cache)

        def hold(_: str) -> None:
            send(out.w, f"computing {time.monotonic()!r}")
            then()

        answer = model.model_copy().with_hooks(hold).invoke(prompt)
        return 0 if answer.content == expected_answer(prompt) else 4

    return child


@pytest.mark.timeout(60)
def test_killed_computing_caller_is_taken_over_within_a_second(
    make_cache: CacheFactory, tmp_path: Path
) -> None:
    """The computing caller is SIGKILLed in its model call: exactly one of 3 waiting
    callers takes over within about a second (far below ``coalesce_timeout``) and
    its one model call serves the other two."""
    cache = make_cache("killed", coalesce_timeout=LONG_TIMEOUT_S)
    calls = tmp_path / "calls.jsonl"
    model = BurstChatModel(calls_file=str(calls))
    prompt = "the computing caller dies"
    with pipes(2) as (out, block), Children() as children:
        pid = children.spawn(
            _blocking_child(cache, model, prompt, out, lambda: receive(block.r, 60))
        )
        assert receive(out.r, DEADLINE_S).startswith("computing")
        set_llm_cache(cache)
        waits = instrument_waits(cache)
        _hold_takeover_until_the_others_wait(model, waits, WAITERS)
        with ThreadPoolExecutor(WAITERS) as pool:
            futures = _start_waiters(pool, model, prompt, WAITERS)
            poll_until(lambda: waits.count >= WAITERS, DEADLINE_S, "3 callers to wait")
            killed_at = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            answers = [f.result(timeout=DEADLINE_S) for f in futures]
            served_at = time.monotonic()
        assert children.wait(pid, DEADLINE_S) == -signal.SIGKILL

    takeover = _calls_by(calls, os.getpid())
    assert len(takeover) == 1, read_lines(calls)
    took = takeover[0]["t"] - killed_at
    print(f"\nkilled computing caller: taken over {took * 1000:.0f} ms after SIGKILL, "
          f"all {WAITERS} waiters served {(served_at - killed_at) * 1000:.0f} ms after")
    assert took < TAKEOVER_BOUND_S
    assert [a.content for a in answers] == [expected_answer(prompt)] * WAITERS
    stats = cache.stats()
    assert (stats.coalesced, stats.coalesce_timeouts) == (WAITERS - 1, 0)


@pytest.mark.timeout(60)
def test_stopped_computing_caller_is_waited_for_at_most_coalesce_timeout(
    make_cache: CacheFactory, tmp_path: Path
) -> None:
    """The computing caller is SIGSTOPped in its model call (alive, but frozen): its
    waiters wait no longer than ``coalesce_timeout``; then exactly one takes over
    (counted in ``coalesce_timeouts``) and serves the other.  Resumed, the stale
    holder's late update harms nothing."""
    timeout = 1.5
    cache = make_cache("stopped", coalesce_timeout=timeout)
    calls = tmp_path / "calls.jsonl"
    model = BurstChatModel(calls_file=str(calls))
    prompt = "the computing caller freezes"
    waiters = 2
    with pipes(1) as (out,), Children() as children:
        pid = children.spawn(
            _blocking_child(cache, model, prompt, out, lambda: os.kill(os.getpid(), signal.SIGSTOP))
        )
        # The child's CLOCK_MONOTONIC when it computes: just after it took the lease.
        computing_at = float(receive(out.r, DEADLINE_S).split()[1])
        wait_stopped(pid, DEADLINE_S)
        set_llm_cache(cache)
        waits = instrument_waits(cache)
        _hold_takeover_until_the_others_wait(model, waits, waiters)
        started = time.monotonic()
        with ThreadPoolExecutor(waiters) as pool:
            futures = _start_waiters(pool, model, prompt, waiters)
            poll_until(lambda: waits.count >= waiters, DEADLINE_S, "2 callers to wait")
            answers = [f.result(timeout=DEADLINE_S) for f in futures]
        os.kill(pid, signal.SIGCONT)
        assert children.wait(pid, DEADLINE_S) == 0  # its late update is harmless

    takeover = _calls_by(calls, os.getpid())
    assert len(takeover) == 1, read_lines(calls)
    held = takeover[0]["t"] - computing_at
    waited = takeover[0]["t"] - started
    print(f"\nstopped computing caller (coalesce_timeout={timeout} s): taken over "
          f"{held:.2f} s after it took the lease; the waiters waited {waited:.2f} s")
    # The lease was taken just before computing_at: it lapses no earlier than this.
    assert held >= timeout - 0.1
    assert waited < timeout + 3.0
    assert [a.content for a in answers] == [expected_answer(prompt)] * waiters
    stats = cache.stats()
    assert stats.coalesce_timeouts == 1
    assert stats.coalesced == waiters - 1
    found = cache.lookup(*cache_key(model, prompt))
    assert found is not None and found[0].text == expected_answer(prompt)
    assert cache.check() == []


# -- a computing caller that lives on -------------------------------------------------------


def _lives_on(
    cache: SharedMemoryCache, prompt: str, way: str, model: BurstChatModel, out: Pipe, cmd: Pipe
) -> Callable[[], int]:
    """A forked child that becomes the computing caller, tells the test, waits for
    "go", then gives its lease up ``way`` — and lives on until told "exit"."""

    def say_computing() -> None:
        send(out.w, "computing")
        assert receive(cmd.r, DEADLINE_S) == "go"

    def model_fails(_: str) -> None:
        say_computing()
        raise RuntimeError("the provider is down")

    async def amodel_fails(_: str) -> None:
        say_computing()
        raise RuntimeError("the provider is down (async)")

    def finish(outcome: str) -> int:
        # Report, then live on (this thread, and for async ways the very task that
        # took the lease, stay alive) until told to exit.
        send(out.w, outcome)
        return 0 if receive(cmd.r, 2 * DEADLINE_S) == "exit" else 5

    async def afail() -> int:
        try:
            await model.model_copy().with_hooks(ahook=amodel_fails).ainvoke(prompt)
        except RuntimeError:
            return finish("raised")  # blocks this task: it has not ended
        return finish("did not raise")

    def child() -> int:
        set_llm_cache(cache)
        if way == "invoke raises":
            try:
                model.model_copy().with_hooks(model_fails).invoke(prompt)
            except RuntimeError:
                return finish("raised")
            return finish("did not raise")
        if way == "ainvoke raises":
            return asyncio.run(afail())
        if way == "ainvoke cancelled":
            return asyncio.run(_cancelled_ainvoke(model, prompt, say_computing, finish))
        # Looked up as model.invoke(prompt) would, then no model call.
        key, llm_string = cache_key(model, prompt)
        if cache.lookup(key, llm_string) is not None:
            return 4
        say_computing()
        if way == "release_leases()":
            cache.release_leases()
        elif way == "close()":
            cache.close()
        elif way == "skipped update":  # larger than the whole segment
            cache.update(key, llm_string, [Generation(text="x" * (2 << 20))])
        return finish("done")

    return child


async def _cancelled_ainvoke(
    model: BurstChatModel,
    prompt: str,
    say_computing: Callable[[], None],
    finish: Callable[[str], int],
) -> int:
    """Cancel an ``ainvoke`` parked in its model call; this task (and loop) live on."""
    computing = asyncio.Event()

    async def forever(_: str) -> None:
        computing.set()
        await asyncio.Event().wait()  # a model call that never answers

    task = asyncio.create_task(model.model_copy().with_hooks(ahook=forever).ainvoke(prompt))
    await asyncio.wait_for(computing.wait(), DEADLINE_S)
    say_computing()  # blocks this loop until "go": the task is parked in the model
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        return finish("cancelled")  # blocks this loop: it has not ended
    return finish("not cancelled")


LIVING_WAYS = {
    "invoke raises": "raised",
    "ainvoke raises": "raised",
    "ainvoke cancelled": "cancelled",
    "release_leases()": "done",
    "close()": "done",
    "skipped update": "done",
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("way", list(LIVING_WAYS))
def test_living_computing_caller_frees_its_waiters_at_once(
    make_cache: CacheFactory, tmp_path: Path, way: str
) -> None:
    """The computing caller's model call fails (``on_llm_error``, sync or async), its
    ``ainvoke`` is cancelled, it calls ``release_leases()``, closes the cache, or its
    update is skipped — and its process lives on.  Its 3 waiters go on within about a
    second (``coalesce_timeout`` is 20 s and the process is alive): exactly one later
    successful model call serves all of them."""
    cache = make_cache("liveson", coalesce_timeout=LONG_TIMEOUT_S)
    calls = tmp_path / "calls.jsonl"
    model = BurstChatModel(calls_file=str(calls))
    prompt = f"the computing caller gives up: {way}"
    with pipes(2) as (out, cmd), Children() as children:
        pid = children.spawn(_lives_on(cache, prompt, way, model, out, cmd))
        assert receive(out.r, DEADLINE_S) == "computing"
        set_llm_cache(cache)
        waits = instrument_waits(cache)
        _hold_takeover_until_the_others_wait(model, waits, WAITERS)
        with ThreadPoolExecutor(WAITERS) as pool:
            futures = _start_waiters(pool, model, prompt, WAITERS)
            poll_until(lambda: waits.count >= WAITERS, DEADLINE_S, "3 callers to wait")
            released_at = time.monotonic()
            send(cmd.w, "go")
            answers = [f.result(timeout=DEADLINE_S) for f in futures]
            served_at = time.monotonic()
        assert receive(out.r, DEADLINE_S) == LIVING_WAYS[way]
        alive = children.poll(pid) is None
        send(cmd.w, "exit")
        assert children.wait(pid, DEADLINE_S) == 0

    assert alive, "the computing caller died: its waiters were freed by its death"
    takeover = _calls_by(calls, os.getpid())
    assert len(takeover) == 1, read_lines(calls)
    took = takeover[0]["t"] - released_at
    print(f"\n{way}: taken over {took * 1000:.0f} ms after, all {WAITERS} waiters "
          f"served {(served_at - released_at) * 1000:.0f} ms after")
    assert took < TAKEOVER_BOUND_S
    assert served_at - released_at < TAKEOVER_BOUND_S
    assert [a.content for a in answers] == [expected_answer(prompt)] * WAITERS
    stats = cache.stats()
    assert (stats.coalesced, stats.coalesce_timeouts) == (WAITERS - 1, 0)
    assert cache.check() == []

"""Request coalescing in one process and its forked children (issue 9, DESIGN §1).

Threads (``batch``) and asyncio tasks (``abatch``) that miss the same key at once
cost one model call; a caller never waits for itself (``generate([p, p])``, a
retry); a caller that only peeks frees its waiters at its next update;
``coalesce=False`` keeps independent misses; the event loop never stalls while
``alookup`` waits; a failed ``BaseLLM`` call frees its waiters while its thread or
task lives on; a full lease window goes uncoalesced, never blocked; no wait outlasts
the waiter's ``coalesce_timeout`` (another process's longer one, a damaged deadline);
``close()`` during a wait ends it cleanly; a lease holder SIGKILLed at each step of
taking and releasing a lease leaves nothing that blocks; damaged lease entries are
reported by ``check()``; bad arguments are refused; pickles carry the settings.

No sleep synchronises anything: the computing caller's model call is held until
the test *knows* the others wait (``instrument_waits``), by events, barriers and
pipes; polls are bounded by deadlines.  Time bounds are generous upper bounds that
express the contract ("at once" is asserted as < 5 s while ``coalesce_timeout`` is
20 s), never speed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import pickle
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

import pytest
from _hardening_helpers import Children, cli, kill_at_step, poke, word
from _samples import CacheFactory
from coalesce_apps.coalesce_support import (
    BurstChatModel,
    apoll_until,
    count_lines,
    expected_answer,
    instrument_waits,
    poll_until,
    receive,
    send,
)
from langchain_core.globals import get_llm_cache, set_llm_cache
from langchain_core.language_models import FakeListLLM
from langchain_core.outputs import Generation
from pydantic import PrivateAttr

import shmcache._arena
from shmcache import CacheClosedError, ShmCacheError
from shmcache._keys import key_digest, split_digest
from shmcache._leases import LEASE_ENTRIES, WINDOW, LeaseTable

N = 8
LLM = "llm"
# Long enough that reaching it means the behaviour under test did not happen.
LONG_TIMEOUT_S = 20.0
# "At once" / "not for itself": far below LONG_TIMEOUT_S, far above any real latency.
PROMPT_BOUND_S = 5.0
DEADLINE_S = 30.0


@pytest.fixture(autouse=True)
def _restore_global_llm_cache() -> Iterator[None]:
    previous = get_llm_cache()
    try:
        yield
    finally:
        set_llm_cache(previous)


def _model(tmp_path: Path) -> tuple[BurstChatModel, Path]:
    calls = tmp_path / "calls.jsonl"
    return BurstChatModel(calls_file=str(calls)), calls


def _value(text: str) -> list[Generation]:
    return [Generation(text=text)]


def _bounded(future: Future[Any], bound_s: float, what: str) -> Any:
    """The future's result; a clear failure if it takes longer than ``bound_s``."""
    try:
        return future.result(timeout=bound_s)
    except FutureTimeout:
        pytest.fail(f"{what} still waited after {bound_s} s")


# -- threads and tasks of one process --------------------------------------------------


def test_batch_of_threads_makes_one_model_call(make_cache: CacheFactory, tmp_path: Path) -> None:
    """``model.batch([p] * 8)`` on 8 threads: one model call, 7 coalesced hits."""
    cache = make_cache("threads", coalesce_timeout=LONG_TIMEOUT_S)
    set_llm_cache(cache)
    waits = instrument_waits(cache)
    model, calls = _model(tmp_path)
    # The computing caller answers only once the 7 others are known to wait.
    model.with_hooks(lambda _: poll_until(lambda: waits.count >= N - 1, DEADLINE_S, "7 waits"))
    prompt = "why coalesce threads?"

    answers = model.batch([prompt] * N, config={"max_concurrency": N})

    assert [a.content for a in answers] == [expected_answer(prompt)] * N
    assert count_lines(calls) == 1
    stats = cache.stats()
    assert (stats.misses, stats.hits, stats.coalesced) == (1, N - 1, N - 1)
    assert (stats.coalesce_timeouts, stats.uncoalesced) == (0, 0)
    # `shmcache stats` shows the new counters.
    shown = cli("stats", "threads", "--directory", str(Path(cache.path).parent), "--json")
    assert shown.returncode == 0, shown.stderr
    counters = json.loads(shown.stdout)
    assert (counters["coalesced"], counters["coalesce_timeouts"], counters["uncoalesced"]) == (
        N - 1, 0, 0)


async def test_abatch_of_tasks_makes_one_model_call(
    make_cache: CacheFactory, tmp_path: Path
) -> None:
    """``await model.abatch([p] * 8)``: one model call, 7 coalesced hits."""
    cache = make_cache("tasks", coalesce_timeout=LONG_TIMEOUT_S)
    set_llm_cache(cache)
    waits = instrument_waits(cache)
    model, calls = _model(tmp_path)

    async def hold(_: str) -> None:
        await apoll_until(lambda: waits.count >= N - 1, DEADLINE_S, "7 waits")

    model.with_hooks(ahook=hold)
    prompt = "why coalesce tasks?"

    answers = await asyncio.wait_for(model.abatch([prompt] * N), DEADLINE_S)

    assert [a.content for a in answers] == [expected_answer(prompt)] * N
    assert count_lines(calls) == 1
    stats = cache.stats()
    assert (stats.misses, stats.hits, stats.coalesced) == (1, N - 1, N - 1)
    assert (stats.coalesce_timeouts, stats.uncoalesced) == (0, 0)


def test_generate_same_prompt_twice_does_not_wait_for_itself(make_cache: CacheFactory) -> None:
    """``BaseLLM.generate([p, p])`` looks both prompts up before calling the model:
    the second lookup is the caller's own lease, so it must not wait for it."""
    cache = make_cache("generate", coalesce_timeout=LONG_TIMEOUT_S)
    set_llm_cache(cache)
    # LangChain sends both (missing) prompts to the model in one call; a third real
    # call would answer "third".
    llm = FakeListLLM(responses=["first", "second", "third"])

    started = time.monotonic()
    result = llm.generate(["same prompt", "same prompt"])
    took = time.monotonic() - started

    assert took < PROMPT_BOUND_S, f"generate([p, p]) took {took:.1f} s: it waited for itself"
    assert [g[0].text for g in result.generations] == ["first", "second"]
    assert cache.stats().coalesce_timeouts == 0
    # Stored (the last update wins), and no lease is left: another thread hits at once.
    with ThreadPoolExecutor(1) as pool:
        again = pool.submit(llm.generate, ["same prompt"]).result(timeout=PROMPT_BOUND_S)
    assert again.generations[0][0].text == "second"


async def test_agenerate_same_prompt_twice_does_not_wait_for_itself(
    make_cache: CacheFactory,
) -> None:
    """The async twin: ``agenerate([p, p])`` in one task does not wait for itself."""
    cache = make_cache("agenerate", coalesce_timeout=LONG_TIMEOUT_S)
    set_llm_cache(cache)
    llm = FakeListLLM(responses=["first", "second"])

    started = time.monotonic()
    result = await asyncio.wait_for(llm.agenerate(["p async", "p async"]), DEADLINE_S)
    took = time.monotonic() - started

    assert took < PROMPT_BOUND_S, f"agenerate([p, p]) took {took:.1f} s: it waited for itself"
    assert [g[0].text for g in result.generations] == ["first", "second"]
    assert cache.stats().coalesce_timeouts == 0


def test_retry_keeps_its_lease_and_others_still_wait(make_cache: CacheFactory) -> None:
    """A caller that looks its key up again (a retry) gets None at once and keeps the
    lease: another thread still waits, and gets the value the retrier stores."""
    cache = make_cache("retry", coalesce_timeout=LONG_TIMEOUT_S)
    waits = instrument_waits(cache)
    assert cache.lookup("k", LLM) is None  # this thread computes
    started = time.monotonic()
    assert cache.lookup("k", LLM) is None  # the retry: no wait for itself
    assert time.monotonic() - started < PROMPT_BOUND_S
    with ThreadPoolExecutor(1) as pool:
        waiter = pool.submit(cache.lookup, "k", LLM)
        poll_until(lambda: waits.count >= 1, DEADLINE_S, "the other thread to wait")
        assert not waiter.done()
        cache.update("k", LLM, _value("computed once"))
        assert waiter.result(timeout=PROMPT_BOUND_S) == _value("computed once")
    stats = cache.stats()
    assert (stats.coalesced, stats.coalesce_timeouts) == (1, 0)


def test_peeking_caller_frees_its_waiters_at_its_next_update(make_cache: CacheFactory) -> None:
    """A caller that only peeks (lookup, no update) and then updates another key ends
    its lease: exactly one waiter becomes the computing caller (its lookup returns
    None) and the next one waits for *it*."""
    cache = make_cache("peek", coalesce_timeout=LONG_TIMEOUT_S)
    waits = instrument_waits(cache)
    may_update = threading.Event()
    returned_at: list[float] = []

    def first_waiter() -> list[Generation] | None:
        found = cache.lookup("peeked", LLM)
        returned_at.append(time.monotonic())
        if found is None:  # it computes now: store once told to
            assert may_update.wait(DEADLINE_S)
            cache.update("peeked", LLM, _value("computed by the waiter"))
        return found

    with ThreadPoolExecutor(2) as pool:
        assert cache.lookup("peeked", LLM) is None  # the peek: this thread holds the lease
        first = pool.submit(first_waiter)
        poll_until(lambda: waits.count >= 1, DEADLINE_S, "the first waiter to wait")
        updated_at = time.monotonic()
        cache.update("other key", LLM, _value("other"))  # ends the peek's lease
        poll_until(lambda: bool(returned_at), PROMPT_BOUND_S, "the waiter to take over")
        assert returned_at[0] - updated_at < PROMPT_BOUND_S
        # The waiter computes now; a later lookup waits for it, not for the peek.
        second = pool.submit(cache.lookup, "peeked", LLM)
        poll_until(lambda: waits.count >= 2, DEADLINE_S, "the second waiter to wait")
        assert not second.done()
        may_update.set()
        assert first.result(timeout=DEADLINE_S) is None
        assert second.result(timeout=PROMPT_BOUND_S) == _value("computed by the waiter")
    assert cache.lookup("other key", LLM) == _value("other")
    assert cache.stats().coalesce_timeouts == 0


def test_coalesce_false_keeps_independent_misses(
    make_cache: CacheFactory, tmp_path: Path
) -> None:
    """``coalesce=False``: 8 concurrent identical misses each call the model (all 8
    are inside the model at once: a barrier of 8 in the call proves it)."""
    cache = make_cache("nocoalesce", coalesce=False)
    assert cache.coalesce is False
    set_llm_cache(cache)
    model, calls = _model(tmp_path)
    inside = threading.Barrier(N, timeout=DEADLINE_S)

    def all_inside(_: str) -> None:
        inside.wait()

    model.with_hooks(all_inside)
    prompt = "independent misses"

    answers = model.batch([prompt] * N, config={"max_concurrency": N})

    assert [a.content for a in answers] == [expected_answer(prompt)] * N
    assert count_lines(calls) == N
    stats = cache.stats()
    assert (stats.misses, stats.coalesced, stats.coalesce_timeouts) == (N, 0, 0)


def test_event_loop_never_stalls_while_alookup_waits(
    make_cache: CacheFactory, tmp_path: Path
) -> None:
    """8 ``abatch`` lookups wait for a slow computing caller in another process while
    a ticker task ticks every 10 ms: no gap between ticks reaches 0.5 s."""
    cache = make_cache("loop", coalesce_timeout=LONG_TIMEOUT_S)
    model, calls = _model(tmp_path)
    prompt = "keep the loop free"
    to_child_r, to_child_w = os.pipe()
    from_child_r, from_child_w = os.pipe()

    def computing_child() -> int:
        set_llm_cache(cache)

        def hold(_: str) -> None:
            send(from_child_w, "computing")
            assert receive(to_child_r, DEADLINE_S) == "go"

        answer = model.model_copy().with_hooks(hold).invoke(prompt)
        return 0 if answer.content == expected_answer(prompt) else 4

    async def waiters() -> tuple[list[Any], list[float]]:
        set_llm_cache(cache)
        waits = instrument_waits(cache)
        gaps: list[float] = []
        stop = asyncio.Event()

        async def ticker() -> None:
            last = time.monotonic()
            while not stop.is_set():
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        ticking = asyncio.create_task(ticker())
        batch = asyncio.create_task(model.abatch([prompt] * N))
        await apoll_until(lambda: waits.count >= N, DEADLINE_S, "8 alookups to wait")
        # Keep them waiting for about half a second of ticks, then release the child.
        await apoll_until(lambda: len(gaps) >= 50, DEADLINE_S, "50 ticks")
        send(to_child_w, "go")
        answers = await asyncio.wait_for(batch, DEADLINE_S)
        stop.set()
        await ticking
        return answers, gaps

    with Children() as children:
        pid = children.spawn(computing_child)
        assert receive(from_child_r, DEADLINE_S) == "computing"
        answers, gaps = asyncio.run(waiters())
        assert children.wait(pid, DEADLINE_S) == 0
    for fd in (to_child_r, to_child_w, from_child_r, from_child_w):
        os.close(fd)
    assert max(gaps) < 0.5, f"the loop stalled for {max(gaps):.3f} s"
    assert [a.content for a in answers] == [expected_answer(prompt)] * N
    assert count_lines(calls) == 1
    assert cache.stats().coalesced == N


# -- BaseLLM failures, the lease table, bounds on every wait -----------------------------


class GatedLLM(FakeListLLM):
    """A FakeListLLM whose first real call waits for a gate, then raises; later
    calls answer "served".  ``entered`` is set when the first call starts."""

    _entered: Any = PrivateAttr(default=None)
    _gate: Any = PrivateAttr(default=None)
    _failed_once: bool = PrivateAttr(default=False)

    def gated(self, entered: Any, gate: Any) -> GatedLLM:
        self._entered, self._gate = entered, gate
        return self

    def _call(self, prompt: str, stop: Any = None, run_manager: Any = None, **kw: Any) -> str:
        if not self._failed_once:
            self._failed_once = True
            self._entered.set()
            assert self._gate.wait(DEADLINE_S)
            raise RuntimeError("the provider is down")
        return "served"

    async def _acall(self, prompt: str, stop: Any = None, run_manager: Any = None,
                     **kw: Any) -> str:
        if not self._failed_once:
            self._failed_once = True
            self._entered.set()
            await asyncio.wait_for(self._gate.wait(), DEADLINE_S)
            raise RuntimeError("the provider is down (async)")
        return "served"


def test_failed_base_llm_invoke_frees_waiters_while_its_thread_lives_on(
    make_cache: CacheFactory,
) -> None:
    """``BaseLLM.invoke`` whose model call raises (LangChain reports ``on_llm_error``)
    in a thread that goes on living: the waiting thread goes on at once."""
    cache = make_cache("llmfail", coalesce_timeout=LONG_TIMEOUT_S)
    set_llm_cache(cache)
    waits = instrument_waits(cache)
    entered, gate, live_on = threading.Event(), threading.Event(), threading.Event()
    llm = GatedLLM(responses=["unused"]).gated(entered, gate)

    def failing_caller() -> str:
        try:
            llm.invoke("a prompt")
        except RuntimeError:
            assert live_on.wait(DEADLINE_S)  # this thread lives on after the failure
            return "raised"
        return "did not raise"

    with ThreadPoolExecutor(2) as pool:
        holder = pool.submit(failing_caller)
        assert entered.wait(DEADLINE_S)
        waiter = pool.submit(llm.invoke, "a prompt")
        poll_until(lambda: waits.count >= 1, DEADLINE_S, "the waiter to wait")
        failed_at = time.monotonic()
        gate.set()
        try:
            assert waiter.result(timeout=LONG_TIMEOUT_S + 5) == "served"
            took = time.monotonic() - failed_at
        finally:
            live_on.set()
        assert holder.result(timeout=DEADLINE_S) == "raised"
    assert took < PROMPT_BOUND_S, f"the waiter waited {took:.1f} s after the failure"
    assert cache.stats().coalesce_timeouts == 0


async def test_failed_base_llm_ainvoke_frees_waiters_while_its_task_lives_on(
    make_cache: CacheFactory,
) -> None:
    """``await BaseLLM.ainvoke`` whose model call raises, in a task that catches the
    error and goes on (a server's request loop, a worker task): LangChain reports
    ``on_llm_error``, so the waiting task must go on at once — not after
    ``coalesce_timeout``."""
    cache = make_cache("allmfail", coalesce_timeout=10.0)  # a lapse: 10 s, not 5
    set_llm_cache(cache)
    waits = instrument_waits(cache)
    entered, gate, live_on = asyncio.Event(), asyncio.Event(), asyncio.Event()
    llm = GatedLLM(responses=["unused"]).gated(entered, gate)

    async def failing_caller() -> str:
        try:
            await llm.ainvoke("an async prompt")
        except RuntimeError:
            await live_on.wait()  # this very task lives on after the failure
            return "raised"
        return "did not raise"

    holder = asyncio.create_task(failing_caller())
    try:
        await asyncio.wait_for(entered.wait(), DEADLINE_S)
        waiter = asyncio.create_task(llm.ainvoke("an async prompt"))
        await apoll_until(lambda: waits.count >= 1, DEADLINE_S, "the waiter to wait")
        failed_at = time.monotonic()
        gate.set()
        assert await asyncio.wait_for(waiter, DEADLINE_S) == "served"
        took = time.monotonic() - failed_at
    finally:
        live_on.set()
    assert await asyncio.wait_for(holder, DEADLINE_S) == "raised"
    assert took < PROMPT_BOUND_S, (
        f"the waiter waited {took:.1f} s after the failure "
        f"(coalesce_timeouts={cache.stats().coalesce_timeouts})"
    )
    assert cache.stats().coalesce_timeouts == 0


def test_full_lease_window_goes_uncoalesced_never_blocked(make_cache: CacheFactory) -> None:
    """One caller peeks at ever more keys, holding a lease on each, until some key's
    lease window is full: that key goes uncoalesced (counted), and another caller's
    lookup of it is not blocked.  The peeker's next update frees every lease."""
    cache = make_cache("fulltable", coalesce_timeout=LONG_TIMEOUT_S)
    waits = instrument_waits(cache)
    keys: list[str] = []
    while cache.stats().uncoalesced == 0:
        assert len(keys) <= LEASE_ENTRIES, "no key ever went uncoalesced"
        keys.append(f"peeked {len(keys)}")
        assert cache.lookup(keys[-1], LLM) is None
    full = keys[-1]
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(cache.lookup, full, LLM).result(timeout=PROMPT_BOUND_S) is None
        assert waits.count == 0
        assert cache.stats().uncoalesced == 2
        cache.update("something else", LLM, _value("v"))  # ends every lease of this caller
        # Another thread now computes the first key at once (nobody holds it).
        assert pool.submit(cache.lookup, keys[0], LLM).result(timeout=PROMPT_BOUND_S) is None
    assert waits.count == 0
    assert cache.check() == []


def test_lookup_waits_at_most_its_own_coalesce_timeout(make_cache: CacheFactory) -> None:
    """``coalesce_timeout`` is "the longest a lookup waits for one computing caller":
    a lookup opened with 1.5 s does not wait 20 s because the computing caller (another
    process) opened the cache with 20 s."""
    holder_cache = make_cache("mixed", coalesce_timeout=LONG_TIMEOUT_S)
    waiter_cache = make_cache("mixed", coalesce_timeout=1.5)
    with Children() as children:
        out_r, out_w = os.pipe()
        block_r, block_w = os.pipe()

        def holder() -> int:
            assert holder_cache.lookup("k", LLM) is None
            send(out_w, "computing")
            receive(block_r, DEADLINE_S)  # a slow model call, until killed
            return 0

        pid = children.spawn(holder)
        try:
            assert receive(out_r, DEADLINE_S) == "computing"
            with ThreadPoolExecutor(1) as pool:
                started = time.monotonic()
                waiter = pool.submit(waiter_cache.lookup, "k", LLM)
                try:
                    found = _bounded(waiter, 1.5 + 3.0, "a lookup with coalesce_timeout=1.5")
                finally:
                    children.kill(pid)  # ends any longer wait: the holder is dead
                took = time.monotonic() - started
        finally:
            for fd in (out_r, out_w, block_r, block_w):
                os.close(fd)
    assert found is None
    assert took < 1.5 + 3.0


def test_same_thread_never_waits_for_its_lease_through_another_instance(
    make_cache: CacheFactory,
) -> None:
    """"The same caller (same thread, or same asyncio task) never waits for its own
    lease" — also when the process opened the same cache twice (e.g. the global LLM
    cache and a model's ``cache=``).  A self-wait would last ``coalesce_timeout``
    (3 s here); a lookup that does not wait takes microseconds."""
    first = make_cache("twice", coalesce_timeout=3.0)
    second = make_cache("twice", coalesce_timeout=3.0)
    assert first.lookup("k", LLM) is None  # this thread holds the lease
    started = time.monotonic()
    assert second.lookup("k", LLM) is None
    took = time.monotonic() - started
    assert took < 1.5, f"the thread waited {took:.1f} s for its own lease"
    assert second.stats().coalesce_timeouts == 0


def test_close_from_another_thread_ends_a_waiting_lookup(make_cache: CacheFactory) -> None:
    """A lookup waiting for another process's computing caller while another thread
    closes the cache ends at once, with ``CacheClosedError`` (or a miss) — not with an
    error from a closed mapping."""
    cache = make_cache("closing", coalesce_timeout=LONG_TIMEOUT_S)
    waits = instrument_waits(cache)
    with Children() as children:
        out_r, out_w = os.pipe()
        block_r, block_w = os.pipe()

        def holder() -> int:
            assert cache.lookup("k", LLM) is None
            send(out_w, "computing")
            receive(block_r, DEADLINE_S)
            return 0

        pid = children.spawn(holder)
        try:
            assert receive(out_r, DEADLINE_S) == "computing"
            with ThreadPoolExecutor(1) as pool:
                waiter = pool.submit(cache.lookup, "k", LLM)
                poll_until(lambda: waits.count >= 1, DEADLINE_S, "the lookup to wait")
                cache.close()
                try:
                    outcome: object = waiter.result(timeout=PROMPT_BOUND_S)
                except CacheClosedError:
                    outcome = "CacheClosedError"
                except Exception as exc:
                    outcome = exc
        finally:
            children.kill(pid)
            for fd in (out_r, out_w, block_r, block_w):
                os.close(fd)
    assert outcome in (None, "CacheClosedError"), f"the waiting lookup ended with {outcome!r}"


@pytest.mark.parametrize("timeout", [1e11, 1e300])
def test_huge_coalesce_timeout_is_refused_or_works(
    make_cache: CacheFactory, timeout: float
) -> None:
    """A finite ``coalesce_timeout`` is accepted (DESIGN: "finite, > 0"), however large:
    then lookups and updates work; or, if there is an upper limit, opening refuses it
    with ``ValueError``/``ShmCacheError`` — never an arithmetic error at opening, never
    an exception out of every missing lookup."""
    try:
        cache = make_cache("huge", coalesce_timeout=timeout)
    except ValueError as exc:
        assert isinstance(exc, ShmCacheError)
        return
    assert cache.lookup("k", LLM) is None
    cache.update("k", LLM, _value("v"))
    assert cache.lookup("k", LLM) == _value("v")
    assert cache.check() == []


# -- damaged lease entries ----------------------------------------------------------------

_LEASE_ENTRY_BYTES = 32
_U64_MAX = (1 << 64) - 1


def _tag(prompt: str) -> int:
    return split_digest(key_digest(prompt, LLM))[0]


def _lease_offset(index: int) -> int:
    return shmcache._arena.LEASE_TABLE_BYTE + (index % LEASE_ENTRIES) * _LEASE_ENTRY_BYTES


def _find_lease(path: str, prompt: str) -> int:
    """The byte offset of ``prompt``'s lease entry in the segment file."""
    tag = _tag(prompt)
    for index in range(LEASE_ENTRIES):
        if word(path, _lease_offset(index)) == tag:
            return _lease_offset(index)
    raise AssertionError(f"no lease entry for {prompt!r}")


def _words(*values: int) -> bytes:
    return b"".join(v.to_bytes(8, "little") for v in values)


def test_impossible_lease_entries_are_reported_and_never_block(make_cache: CacheFactory) -> None:
    """Lease entries no writer could leave — an even key tag, an owner slot outside
    the table (with a deadline in the far future) — are reported by ``check()``, and
    a lookup of the key such an entry names is not blocked."""
    cache = make_cache("hostile", coalesce_timeout=LONG_TIMEOUT_S)
    victim = "named by a damaged lease"
    tag = _tag(victim)
    start = (tag >> 1) % (LEASE_ENTRIES - WINDOW + 1)  # the key's lease window
    poke(cache.path, _lease_offset(start), _words(tag, (600 + 1) << 32, _U64_MAX, 1))
    poke(cache.path, _lease_offset(start + 40), _words(2, 1 << 32, _U64_MAX, 1))
    problems = cache.check()
    assert any("slot 600" in p for p in problems), problems
    assert any("impossible key tag" in p for p in problems), problems
    with ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        assert pool.submit(cache.lookup, victim, LLM).result(timeout=PROMPT_BOUND_S) is None
        assert time.monotonic() - started < PROMPT_BOUND_S
    cache.update(victim, LLM, _value("stored"))
    assert cache.lookup(victim, LLM) == _value("stored")


def test_damaged_deadline_of_a_live_holder_blocks_no_longer_than_coalesce_timeout(
    make_cache: CacheFactory,
) -> None:
    """A live computing caller's lease whose deadline word was damaged to the far
    future: "no wait for one computing caller lasts longer than coalesce_timeout"."""
    timeout = 1.5
    cache = make_cache("deadline", coalesce_timeout=timeout)
    with Children() as children:
        out_r, out_w = os.pipe()
        block_r, block_w = os.pipe()

        def holder() -> int:
            assert cache.lookup("k", LLM) is None
            send(out_w, "computing")
            receive(block_r, DEADLINE_S)
            return 0

        pid = children.spawn(holder)
        try:
            assert receive(out_r, DEADLINE_S) == "computing"
            poke(cache.path, _find_lease(cache.path, "k") + 16, _words(_U64_MAX))
            with ThreadPoolExecutor(1) as pool:
                started = time.monotonic()
                waiter = pool.submit(cache.lookup, "k", LLM)
                try:
                    found = _bounded(waiter, timeout + 3.0, "a lookup of the damaged lease")
                finally:
                    children.kill(pid)  # ends any longer wait: the holder is dead
                took = time.monotonic() - started
        finally:
            for fd in (out_r, out_w, block_r, block_w):
                os.close(fd)
    assert found is None
    assert took < timeout + 3.0


# -- a lease holder killed at each lease step ----------------------------------------------

# scenario -> (what the dying child does, the step it dies at)
LEASE_CRASHES = {
    "take: entry written, key tag not yet published": ("take", 11),
    "take: lease published": ("take", 12),
    "takeover of a dead holder's lease": ("takeover", 12),
    "release at its update": ("release-update", 13),
    "release at an update of another key": ("release-other", 13),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("scenario", list(LEASE_CRASHES))
def test_lease_holder_killed_at_lease_step(make_cache: CacheFactory, scenario: str) -> None:
    """SIGKILL at a step of taking or releasing a lease: the next lookup of the key is
    not blocked (far less than ``coalesce_timeout``), ``check()`` is clean, and the
    key can be stored and read again."""
    action, step = LEASE_CRASHES[scenario]
    cache = make_cache("leasecrash", coalesce_timeout=LONG_TIMEOUT_S)
    key, other = "crashed key", "other key"

    def dying_child(kill_step: int) -> int:
        logging.disable(logging.WARNING)
        if action.startswith("release"):
            if cache.lookup(key, LLM) is not None:
                return 4
            shmcache._arena.step_hook = kill_at_step(kill_step)
            target = key if action == "release-update" else other
            cache.update(target, LLM, _value(f"{target} by the dying child"))
        else:
            shmcache._arena.step_hook = kill_at_step(kill_step)
            cache.lookup(key, LLM)
        return 3  # not reached: the hook kills the process

    with Children() as children:
        if action == "takeover":
            # A first holder dies holding a published lease; the second dies taking it over.
            first = children.spawn(lambda: dying_child(12))
            assert children.wait(first, DEADLINE_S) == -signal.SIGKILL
        pid = children.spawn(lambda: dying_child(step))
        assert children.wait(pid, DEADLINE_S) == -signal.SIGKILL

    started = time.monotonic()
    found = cache.lookup(key, LLM)
    took = time.monotonic() - started
    assert took < PROMPT_BOUND_S, f"the next lookup waited {took:.1f} s for a dead holder"
    if action == "release-update":
        assert found == _value(f"{key} by the dying child")  # stored before the release
    else:
        assert found is None  # this caller computes now
    if action == "release-other":
        assert cache.lookup(other, LLM) == _value(f"{other} by the dying child")
    assert cache.check() == []
    cache.update(key, LLM, _value("stored after the crash"))
    assert cache.lookup(key, LLM) == _value("stored after the crash")
    # And a lookup from another thread of a fresh key is neither blocked nor coalesced.
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(cache.lookup, "fresh", LLM).result(timeout=PROMPT_BOUND_S) is None
    stats = cache.stats()
    assert (stats.coalesce_timeouts, stats.uncoalesced) == (0, 0)
    assert cache.check() == []


# -- arguments and pickling ---------------------------------------------------------------


def test_defaults(make_cache: CacheFactory) -> None:
    cache = make_cache("defaults")
    assert (cache.coalesce, cache.coalesce_timeout) == (True, 30.0)


@pytest.mark.parametrize("bad", [1, 0, "yes", None, 1.0])
def test_coalesce_must_be_a_bool(make_cache: CacheFactory, bad: object) -> None:
    with pytest.raises(TypeError, match="coalesce"):
        make_cache("badcoalesce", coalesce=bad)


@pytest.mark.parametrize("bad", [0, 0.0, -1, -0.5, math.inf, -math.inf, math.nan])
def test_coalesce_timeout_out_of_range(make_cache: CacheFactory, bad: float) -> None:
    with pytest.raises(ValueError, match="coalesce_timeout") as caught:
        make_cache("badtimeout", coalesce_timeout=bad)
    assert isinstance(caught.value, ShmCacheError)


@pytest.mark.parametrize("bad", ["1", None, [1.0], b"1"])
def test_coalesce_timeout_must_be_a_number(make_cache: CacheFactory, bad: object) -> None:
    with pytest.raises(TypeError, match="coalesce_timeout"):
        make_cache("badtimeout", coalesce_timeout=bad)


@pytest.mark.parametrize(("coalesce", "timeout"), [(False, 2.5), (True, 7)])
def test_pickle_carries_coalesce_settings(
    make_cache: CacheFactory, coalesce: bool, timeout: float
) -> None:
    """The settings travel in the pickle itself: unpickled after the original is
    closed (so nothing open in this process can be reused), they are the same."""
    cache = make_cache("pickled", coalesce=coalesce, coalesce_timeout=timeout)
    data = pickle.dumps(cache)
    cache.close()
    copy = pickle.loads(data)
    try:
        assert (copy.coalesce, copy.coalesce_timeout) == (coalesce, float(timeout))
    finally:
        copy.close()
    # Unpickled while the original is open: the same settings too.
    again = make_cache("pickled", coalesce=coalesce, coalesce_timeout=timeout)
    clone = pickle.loads(pickle.dumps(again))
    try:
        assert (clone.coalesce, clone.coalesce_timeout) == (coalesce, float(timeout))
    finally:
        if clone is not again:
            clone.close()


@pytest.mark.timeout(60)
def test_leases_a_dead_process_left_are_reused(make_cache: CacheFactory) -> None:
    """A process that missed thousands of keys and died without updating them leaves
    every lease window full; the next process's misses still coalesce (they reuse
    the dead owner's entries) instead of going uncoalesced for good."""
    cache = make_cache("leftovers")
    with Children() as children:

        def leaver() -> int:
            # More misses than the table has entries: every window fills up.
            for i in range(3 * LEASE_ENTRIES):
                cache.lookup(f"left behind {i}", LLM)
            return 0  # os._exit: no close(), no release; the kernel drops its locks

        pid = children.spawn(leaver)
        assert children.wait(pid, DEADLINE_S) == 0
    table = LeaseTable(cache._arena_words)
    taken = [lease for i in range(LEASE_ENTRIES) if (lease := table.read(i)) and lease.tag]
    assert len(taken) > 0.95 * LEASE_ENTRIES  # the windows are (nearly all) full
    before = cache.stats()
    for i in range(200):
        assert cache.lookup(f"new {i}", LLM) is None
        cache.update(f"new {i}", LLM, [Generation(text=f"answer {i}")])
    after = cache.stats()
    assert after.uncoalesced - before.uncoalesced == 0
    assert after.misses - before.misses == 200

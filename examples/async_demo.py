#!/usr/bin/env python
"""Async demo: concurrent ``ainvoke`` calls through the shared cache, loop kept free.

A heartbeat task ticks every few milliseconds and records the longest gap between
two ticks while the requests run. Model calls are awaited and cache look-ups never
park the loop, so that gap stays a few milliseconds even though every model call
takes ``--delay`` seconds.

    python examples/async_demo.py          # 10 distinct prompts, then each 5 times more
    python examples/async_demo.py --keep   # keep the segment: run it again and even
    python examples/async_demo.py          # the first round comes from the cache

Any other process that opens the same cache name (and directory) reads the same
entries: ``tests/test_examples.py`` runs two such asyncio processes at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import Sequence

from fake_model import SlowEchoChatModel, expected_answer
from langchain_core.globals import set_llm_cache
from langchain_core.language_models import BaseChatModel

from shmcache import SharedMemoryCache


class Heartbeat:
    """Measure event-loop stalls: the longest time between two ticks of a timer task.

    Use as ``async with Heartbeat() as hb: ...`` and read ``hb.max_gap_s`` and
    ``hb.ticks`` afterwards.
    """

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.max_gap_s = 0.0
        self.ticks = 0
        self._last = 0.0
        self._task: asyncio.Task[None] | None = None

    def _beat(self) -> None:
        now = time.monotonic()
        self.max_gap_s = max(self.max_gap_s, now - self._last)
        self._last = now

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self._beat()
            self.ticks += 1

    async def __aenter__(self) -> Heartbeat:
        self._last = time.monotonic()
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        # The stretch since the last tick counts too: work shorter than one
        # interval, or a stall at the very end, would otherwise go unseen.
        self._beat()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


@dataclasses.dataclass(frozen=True)
class RoundResult:
    """One round of concurrent requests, as measured inside the process."""

    answers: list[str]
    started: float  # time.monotonic(), comparable across processes on one host
    seconds: float
    max_gap_s: float
    ticks: int


async def ask_round(model: BaseChatModel, prompts: Sequence[str]) -> RoundResult:
    """Send all ``prompts`` at once with ``ainvoke`` while a heartbeat watches the loop.

    Returns:
        The answers in prompt order, and the heartbeat's figures.
    """
    async with Heartbeat() as hb:
        started = time.monotonic()
        messages = await asyncio.gather(*(model.ainvoke(p) for p in prompts))
        seconds = time.monotonic() - started
    return RoundResult(
        answers=[m.text for m in messages],
        started=started,
        seconds=seconds,
        max_gap_s=hb.max_gap_s,
        ticks=hb.ticks,
    )


def _round_summary(r: RoundResult) -> dict[str, float]:
    return {"seconds": r.seconds, "max_gap_s": r.max_gap_s, "ticks": r.ticks}


async def _demo(distinct: int, repeat: int, delay_s: float) -> tuple[RoundResult, RoundResult, int]:
    """Ask each distinct prompt once, then all of them ``repeat`` times, all at once."""
    model = SlowEchoChatModel(delay_s=delay_s)
    unique = [f"Async question {i}: what does await do?" for i in range(distinct)]
    # Two rounds: the loop is watched while model calls are in flight, then on hits.
    # (Concurrent identical misses would cost one call anyway: they coalesce.)
    first = await ask_round(model, unique)
    repeated = unique * repeat
    repeats = await ask_round(model, repeated)
    pairs = zip(unique + repeated, first.answers + repeats.answers, strict=True)
    return first, repeats, sum(a != expected_answer(p) for p, a in pairs)


def main(argv: Sequence[str] | None = None) -> int:
    """Run two rounds (distinct prompts, then repeats) and print what the loop saw."""
    p = argparse.ArgumentParser(description="Concurrent ainvoke calls through shmcache.")
    p.add_argument("--distinct", type=int, default=10, help="different prompts (default 10)")
    p.add_argument("--repeat", type=int, default=5, help="times each is asked again (default 5)")
    p.add_argument("--delay", type=float, default=0.2, help="seconds per model call")
    p.add_argument("--name", default="async-demo", help="cache name (default async-demo)")
    p.add_argument("--directory", default=None, help="segment directory (default shmcache's)")
    p.add_argument("--keep", action="store_true", help="keep the segment at the end")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    args = p.parse_args(argv)

    cache = SharedMemoryCache(args.name, directory=args.directory)
    set_llm_cache(cache)
    try:
        first, repeats, wrong = asyncio.run(_demo(args.distinct, args.repeat, args.delay))
        stats = dataclasses.asdict(cache.stats())
    finally:
        set_llm_cache(None)
        if not args.keep:
            cache.unlink()
        cache.close()

    if args.json:
        rounds = {"first_round": _round_summary(first), "repeat_round": _round_summary(repeats)}
        print(json.dumps({**rounds, "wrong_answers": wrong, "stats": stats}))
    else:
        for name, r in (("first round", first), ("repeat round", repeats)):
            print(
                f"{name:<13} {len(r.answers):>4} requests in {r.seconds:6.3f} s; longest "
                f"event-loop stall {r.max_gap_s * 1000:5.1f} ms over {r.ticks} heartbeats"
            )
        print("cache.stats() ", ", ".join(f"{k}={v}" for k, v in stats.items()))
        if wrong:
            print(f"WRONG ANSWERS  {wrong}")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Batch job demo: a multiprocessing pool answering prompts through one shared cache.

The job asks ``--prompts`` questions drawn from ``--distinct`` different ones,
spread over a pool of ``--workers`` processes. It runs twice -- first without a
cache, then with a ``SharedMemoryCache`` that all pool workers attach to -- and
prints how many model calls each run made and how long it took.

    python examples/batch.py                      # defaults, about 6 s
    python examples/batch.py --workers 8 --prompts 400 --distinct 20 --delay 0.1
    python examples/batch.py --json               # summary as one JSON line

The requests go out in random (``--seed``) order, all in one go: a prompt's first
occurrence is often in flight in one worker while its repeats reach the others.
Those repeats do not call the model again: the cache coalesces concurrent identical
misses (``coalesce=True``, the default), so the first miss calls the model and the
other workers wait for its answer (``stats().coalesced``). Model calls equal the
number of distinct prompts, whatever the order.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import multiprocessing
import multiprocessing.util
import random
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

from fake_model import SlowEchoChatModel, count_calls, expected_answer
from langchain_core.globals import set_llm_cache

from shmcache import SharedMemoryCache

# --- worker side -------------------------------------------------------------

_model: SlowEchoChatModel | None = None

# The longest the pool's start-up may take (the workers meet at a barrier).
STARTUP_TIMEOUT_S = 60.0


def _init_worker(
    cache: SharedMemoryCache | None,
    delay_s: float,
    calls_file: str,
    ready: threading.Barrier,
) -> None:
    """Pool initializer: install the cache (or none) and build this worker's model.

    ``cache`` arrives inherited (``fork``) or pickled by name (``spawn``,
    ``forkserver``); either way it attaches to the same segment as the parent's.
    Every worker then waits at ``ready`` for the others and the parent, so the
    first requests really go out at once and start-up is not timed.
    """
    global _model
    set_llm_cache(cache)
    if cache is not None:
        # Pool workers leave through os._exit(), which skips atexit; a
        # multiprocessing finalizer still runs, so the worker detaches cleanly
        # and frees its counter slot (its counts are already in the segment).
        multiprocessing.util.Finalize(None, cache.close, exitpriority=10)
    _model = SlowEchoChatModel(delay_s=delay_s, calls_file=calls_file)
    # A worker the pool starts in place of a dead one finds the barrier broken.
    with contextlib.suppress(threading.BrokenBarrierError):
        ready.wait(STARTUP_TIMEOUT_S)


def _ask(prompt: str) -> tuple[str, str]:
    """Answer one prompt in a pool worker; returns ``(prompt, answer)``."""
    if _model is None:
        raise RuntimeError("the pool initializer did not run")
    return prompt, _model.invoke(prompt).text


# --- parent side -------------------------------------------------------------


class Progress:
    """A plain-text progress bar: redrawn in place on a terminal, one line per 10% otherwise."""

    WIDTH = 30

    def __init__(self, label: str, total: int, stream: TextIO = sys.stderr) -> None:
        self.label, self.total, self.stream = label, total, stream
        self.done = 0
        self.started = time.monotonic()
        self._tty = stream.isatty()
        self._last_draw = 0.0
        self._last_decile = -1

    def advance(self, n: int = 1) -> None:
        """Count ``n`` more finished requests and redraw if it is time to."""
        self.done += n
        if self._tty:
            now = time.monotonic()
            # Redraw at most 20 times a second: a terminal is slower than the pool.
            if now - self._last_draw >= 0.05 or self.done == self.total:
                self._last_draw = now
                self._draw("\r")
        else:
            decile = self.done * 10 // max(self.total, 1)
            if decile != self._last_decile:
                self._last_decile = decile
                self._draw("", end="\n")

    def finish(self) -> None:
        """End the bar's line."""
        if self._tty:
            self._draw("\r", end="\n")

    def _draw(self, prefix: str, end: str = "") -> None:
        filled = self.WIDTH * self.done // max(self.total, 1)
        bar = "#" * filled + "." * (self.WIDTH - filled)
        elapsed = time.monotonic() - self.started
        self.stream.write(
            f"{prefix}{self.label:<14} [{bar}] {self.done:>{len(str(self.total))}}/{self.total}"
            f"  {elapsed:5.1f} s{end}"
        )
        self.stream.flush()


@dataclasses.dataclass(frozen=True)
class RunResult:
    """Outcome of one pass over the batch."""

    seconds: float
    model_calls: int
    wrong_answers: int


def make_prompts(total: int, distinct: int, seed: int) -> list[str]:
    """Build the batch: ``total`` requests drawn from ``distinct`` prompts.

    Returns:
        Each distinct prompt at least once, ``total`` requests in all, shuffled
        with ``seed``: first occurrences and repeats mixed, no waves.
    """
    rng = random.Random(seed)
    topics = ["shared memory", "pre-fork servers", "LRU eviction", "event loops", "mmap"]
    unique = [
        f"Question {i}: explain {topics[i % len(topics)]} in one sentence." for i in range(distinct)
    ]
    prompts = unique + [rng.choice(unique) for _ in range(total - distinct)]
    rng.shuffle(prompts)
    return prompts


def run_batch(
    prompts: Sequence[str],
    *,
    workers: int,
    delay_s: float,
    cache: SharedMemoryCache | None,
    label: str,
) -> RunResult:
    """Send ``prompts``, in order and all at once, through a fresh pool; count model calls."""
    wrong = 0
    with tempfile.TemporaryDirectory(prefix="shmcache-batch-") as tmp:
        calls_file = str(Path(tmp) / "model-calls.log")
        ready = multiprocessing.Barrier(workers + 1)
        pool = multiprocessing.Pool(workers, _init_worker, (cache, delay_s, calls_file, ready))
        try:
            ready.wait(STARTUP_TIMEOUT_S)  # every worker is up: start the clock
            ready.abort()  # a replacement worker must not wait for anyone
            progress = Progress(label, len(prompts))
            started = time.monotonic()
            # chunksize=1: each free worker takes the next request in the list.
            for prompt, answer in pool.imap_unordered(_ask, prompts):
                wrong += answer != expected_answer(prompt)
                progress.advance()
        except BaseException:
            pool.terminate()
            raise
        # close+join, not terminate: the workers exit normally and detach.
        pool.close()
        pool.join()
        seconds = time.monotonic() - started
        progress.finish()
        return RunResult(seconds, count_calls(calls_file), wrong)


def _stats_dict(cache: SharedMemoryCache) -> dict[str, Any]:
    return dataclasses.asdict(cache.stats())


def _format_summary(summary: dict[str, Any]) -> Iterable[str]:
    plain, cached = summary["uncached"], summary["cached"]
    st = summary["stats"]
    yield ""
    yield (
        f"requests        {summary['requests']} ({summary['distinct']} distinct prompts in random "
        f"order, seed {summary['seed']}, {summary['workers']} workers, "
        f"model delay {summary['delay_s']:.2f} s)"
    )
    yield f"without cache   {plain['model_calls']:>5} model calls  {plain['seconds']:6.2f} s"
    yield (
        f"with shmcache   {cached['model_calls']:>5} model calls  {cached['seconds']:6.2f} s"
        f"   {summary['cache_hits']} cache hits, {summary['speedup']:.1f}x faster"
    )
    yield (
        f"coalesced       {summary['coalesced']:>5} of the hits waited for that prompt's model "
        "call in another worker"
    )
    if summary["wrong_answers"]:
        yield f"WRONG ANSWERS   {summary['wrong_answers']}"
    yield "cache.stats()   " + ", ".join(f"{k}={v}" for k, v in st.items())
    kept = "kept" if summary["kept"] else "removed; pass --keep to keep it"
    yield f"segment         {summary['segment']} ({kept})"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(
        description="Run a batch of prompts over a process pool, without and with shmcache.",
    )
    p.add_argument("--workers", type=int, default=4, help="pool processes (default 4)")
    p.add_argument("--prompts", type=int, default=100, help="requests in total (default 100)")
    p.add_argument("--distinct", type=int, default=10, help="different prompts (default 10)")
    p.add_argument("--delay", type=float, default=0.2, help="seconds per model call (default 0.2)")
    p.add_argument("--name", default="batch-demo", help="cache name (default batch-demo)")
    p.add_argument("--directory", default=None, help="segment directory (default shmcache's)")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    p.add_argument("--keep", action="store_true", help="keep the segment at the end")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error("--workers must be at least 1")
    if not 1 <= args.distinct <= args.prompts:
        p.error("need 1 <= --distinct <= --prompts")
    if args.delay < 0:
        p.error("--delay must be >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the batch without, then with the cache, and print the summary."""
    args = parse_args(argv)
    prompts = make_prompts(args.prompts, args.distinct, args.seed)
    common = {"workers": args.workers, "delay_s": args.delay}

    plain = run_batch(prompts, cache=None, label="without cache", **common)
    cache = SharedMemoryCache(args.name, directory=args.directory)
    try:
        before = cache.stats()
        cached = run_batch(prompts, cache=cache, label="with shmcache", **common)
        # The pool workers closed their handles, so their counts are in.
        after = _stats_dict(cache)
        summary: dict[str, Any] = {
            "requests": args.prompts,
            "distinct": args.distinct,
            "seed": args.seed,
            "workers": args.workers,
            "delay_s": args.delay,
            "uncached": dataclasses.asdict(plain),
            "cached": dataclasses.asdict(cached),
            "model_calls": cached.model_calls,
            "cache_hits": after["hits"] - before.hits,
            "coalesced": after["coalesced"] - before.coalesced,
            "wrong_answers": plain.wrong_answers + cached.wrong_answers,
            "speedup": plain.seconds / max(cached.seconds, 1e-9),
            "stats": after,
            "segment": str(cache.path),
            "kept": args.keep,
        }
    finally:
        if not args.keep:
            cache.unlink()
        cache.close()

    if args.json:
        print(json.dumps(summary))
    else:
        print("\n".join(_format_summary(summary)))
    return 1 if summary["wrong_answers"] else 0


if __name__ == "__main__":
    sys.exit(main())

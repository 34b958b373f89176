"""Child program of test_robustness_interrupts: a REPL-like loop of cache calls that
keeps going after every interrupt, then checks that the cache still works.

Usage: ``interrupt_loop.py MODE NAME DIRECTORY SEED LOCK_TIMEOUT SECONDS MAX_INTERRUPTS``

* ``MODE=sigint``: the parent sends SIGINT (a real KeyboardInterrupt, as Ctrl-C in a
  REPL or notebook).  Protocol on stdout: ``R`` once ready, then one ``A`` per
  interrupt caught; the parent sends the next SIGINT only after an ``A``, and the
  ``A`` is written from inside the ``try`` of the loop, so no interrupt can land in
  the handler.  A line ``stop`` on stdin ends the loop.
* ``MODE=alarm``: the program arms ``setitimer`` itself with seeded random delays;
  the handler raises :class:`AlarmTimeout` (an ``Exception``, as timeout decorators
  do).  One timer at a time, re-armed only from inside the ``try``.

Afterwards (interrupts off): one update from this process must be stored, and
``check()`` must find nothing.  The result is printed as one ``RESULT {json}``
line; the program then keeps the cache open until a line arrives on stdin, so the
parent can test another process against whatever this one still holds.
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import sys
import time
import traceback
from typing import Any

from _robust_helpers import LLM, MIB, prompt_of, quiet_logging_to_stderr, value_of, value_problem
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.outputs import Generation

from shmcache import SharedMemoryCache, ShmCacheError

KEYS = 40


class AlarmTimeout(Exception):
    """What an alarm-based timeout raises from its signal handler."""


class Loop:
    def __init__(self, mode: str, cache: SharedMemoryCache, seed: int, seconds: float,
                 max_interrupts: int) -> None:
        self.mode = mode
        self.cache = cache
        self.rng = random.Random(seed)
        self.timer_rng = random.Random(seed + 1)
        self.deadline = time.monotonic() + seconds
        self.max_interrupts = max_interrupts
        self.model = FakeListChatModel(responses=[f"answer {i}" for i in range(7)], cache=cache)
        self.caught = 0
        self.iterations = 0
        self.seq = 0
        self.errors: dict[str, int] = {}
        self.wrong: list[str] = []
        self.tracebacks: list[str] = []
        # The byte to tell the parent, written from inside the try (so the SIGINT it
        # releases lands there): b"R" once ready, b"A" after each interrupt.
        self.tell: bytes = b"R" if mode == "sigint" else b""
        self.armed = False

    # -- the stimulus --------------------------------------------------------------

    def on_alarm(self, signum: int, frame: Any) -> None:
        self.armed = False
        raise AlarmTimeout("alarm")

    def arm(self) -> None:
        self.armed = True
        signal.setitimer(signal.ITIMER_REAL, self.timer_rng.uniform(20e-6, 1.5e-3))

    def stop_requested(self) -> bool:
        if self.mode == "alarm":
            return self.caught >= self.max_interrupts or time.monotonic() >= self.deadline
        ready, _, _ = select.select([0], [], [], 0)
        return bool(ready)

    # -- one call of the mix ---------------------------------------------------------

    def one_op(self) -> None:
        rng, cache = self.rng, self.cache
        key = rng.randrange(KEYS)
        roll = rng.random()
        try:
            if roll < 0.30:
                self.seq += 1
                cache.update(prompt_of(key), LLM, value_of(key, os.getpid(), self.seq))
            elif roll < 0.55:
                problem = value_problem(key, cache.lookup(prompt_of(key), LLM))
                if problem is not None:
                    self.wrong.append(problem)
            elif roll < 0.75:
                self.model.invoke(f"question {key}")
            elif roll < 0.79:
                cache.clear()
            elif roll < 0.83:
                cache.clear(llm_string=LLM)
            elif roll < 0.90:
                cache.flush()
            elif roll < 0.95:
                problems = cache.check()
                if problems:
                    self.errors["check problems"] = self.errors.get("check problems", 0) + 1
            else:
                cache.stats()
        except ShmCacheError as exc:  # e.g. LockTimeoutError: a symptom, counted
            name = type(exc).__name__
            self.errors[name] = self.errors.get(name, 0) + 1
        except AlarmTimeout:
            raise
        except Exception as exc:  # any other error is a defect too: recorded, go on
            name = f"{type(exc).__name__}: {exc}"[:200]
            self.errors[name] = self.errors.get(name, 0) + 1
            if len(self.tracebacks) < 3:
                self.tracebacks.append(traceback.format_exc()[-2000:])

    def run(self) -> None:
        while True:
            try:
                while True:
                    if self.tell:  # inside the try: the next SIGINT may come now
                        tell, self.tell = self.tell, b""
                        os.write(1, tell)
                    if self.mode == "alarm" and not self.armed:
                        self.arm()
                    if self.stop_requested():
                        if self.mode == "alarm":
                            signal.setitimer(signal.ITIMER_REAL, 0)
                            self.armed = False
                        return
                    self.iterations += 1
                    self.one_op()
            except (KeyboardInterrupt, AlarmTimeout):
                self.caught += 1
                self.tell = b"A" if self.mode == "sigint" else b""


def main() -> int:
    mode, name, directory, seed, lock_timeout, seconds, max_interrupts = sys.argv[1:8]
    quiet_logging_to_stderr()
    cache = SharedMemoryCache(name, directory=directory, size_bytes=MIB,
                              lock_timeout=float(lock_timeout))
    loop = Loop(mode, cache, int(seed), float(seconds), int(max_interrupts))
    # Warm up before any interrupt: LangChain imports modules lazily at the first
    # invoke, and an interrupt inside an import breaks that module for good.
    loop.model.invoke("warm-up")
    cache.lookup("warm-up", LLM)
    cache.flush()
    cache.check()
    if mode == "alarm":
        signal.signal(signal.SIGALRM, loop.on_alarm)
    loop.run()
    # The stimulus is over (no timer armed, the parent sends no more SIGINTs).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGALRM, signal.SIG_IGN)
    if mode == "sigint":
        sys.stdin.readline()  # the "stop" line
    result: dict[str, Any] = {
        "caught": loop.caught, "iterations": loop.iterations, "errors": loop.errors,
        "wrong": loop.wrong[:5], "tracebacks": loop.tracebacks, "pid": os.getpid(),
    }
    value = [Generation(text="the final update")]
    before = cache.stats()
    cache.update("final", LLM, value)
    after = cache.stats()
    result["final_skipped"] = after.skipped - before.skipped
    result["final_updates"] = after.updates - before.updates
    result["final_found"] = cache.lookup("final", LLM) == value
    try:
        result["check"] = cache.check()
    except ShmCacheError as exc:
        result["check"] = [f"{type(exc).__name__}: {exc}"]
    sys.stdout.write("\nRESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()
    sys.stdin.readline()  # keep the cache open while the parent tests another process
    cache.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

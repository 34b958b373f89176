"""Soak test: 4 worker processes run mixed calls on one cache while this supervisor
SIGKILLs and SIGSTOP/SIGCONTs them at random; every value read is verified.

Usage::

    .venv/bin/python tests/stress/soak.py --seconds 30

The last line printed holds the counts (kills, freezes, reads verified, wrong values).
Exit status: 0 when no wrong value was read and nothing hung; 1 on a wrong value; 2
on a hang (a worker that was not frozen made no progress for HANG_S seconds, or the
supervisor's own calls overran their bound).  The temp directory and every child are
removed whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import select
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Final

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for _hardening_helpers

from _hardening_helpers import Verifier, generations, prompt_of

import shmcache._arena
from shmcache import SharedMemoryCache

WORKERS: Final = 4
KEYS: Final = 400
LOCK_TIMEOUT_S: Final = 0.5
HANG_S: Final = 10.0
HEARTBEAT_EVERY: Final = 50  # calls between a worker's progress reports


def _worker(cache: SharedMemoryCache, slot: int, pipe: int) -> int:
    """Mixed calls forever; report progress (and any wrong value) on ``pipe``.

    Slot ``slot`` alone writes keys ``k % WORKERS == slot``, with growing stamps, so
    a reader can also tell a stale value from a current one.
    """
    logging.disable(logging.WARNING)
    rng = random.Random(os.getpid())
    if rng.random() < 0.3:  # some workers die at a chosen write step
        shmcache._arena.step_hook = _die_at(rng.randint(1, 7), rng.randint(0, 500))
    verifier = Verifier()
    loop = asyncio.new_event_loop()
    calls = 0
    while True:
        for _ in range(HEARTBEAT_EVERY):
            r = rng.random()
            if r < 0.5:
                key = rng.randrange(KEYS)
                verifier.check(key, cache.lookup(prompt_of(key), "llm"))
            elif r < 0.6:
                key = rng.randrange(KEYS)
                verifier.check(key, loop.run_until_complete(cache.alookup(prompt_of(key), "llm")))
            elif r < 0.95:
                key = rng.randrange(slot, KEYS, WORKERS)
                value = generations(key, slot, time.monotonic_ns(), max_len=6000)
                if r < 0.85:
                    cache.update(prompt_of(key), "llm", value)
                else:
                    loop.run_until_complete(cache.aupdate(prompt_of(key), "llm", value))
            elif r < 0.995:
                cache.update(f"scratch {slot}", "scratch", [])  # skipped: empty value
            else:
                with contextlib.suppress(Exception):  # LockTimeoutError while frozen
                    cache.clear(llm_string="scratch")
            if verifier.wrong:
                break
        calls += HEARTBEAT_EVERY
        report = {"calls": calls, **verifier.summary()}
        os.write(pipe, (json.dumps(report) + "\n").encode())
        if verifier.wrong:  # reported before anyone can kill this worker
            return 5


def _die_at(step: int, after: int) -> Any:
    remaining = [after]

    def hook(k: int) -> None:
        if k == step:
            remaining[0] -= 1
            if remaining[0] < 0:
                os.kill(os.getpid(), signal.SIGKILL)

    return hook


class Supervisor:
    """Runs the workers, kills and freezes them, collects their reports."""

    def __init__(self, cache: SharedMemoryCache, seed: int) -> None:
        self.cache = cache
        self.rng = random.Random(seed)
        self.workers: dict[int, dict[str, Any]] = {}  # slot -> pid, pipe, buffer, ...
        self.kills = self.freezes = self.verified = self.wrong = self.calls = 0
        self.examples: list[str] = []

    def spawn(self, slot: int) -> None:
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the worker
            os.close(read_fd)
            code = 1
            try:
                code = _worker(self.cache, slot, write_fd)
            finally:
                os._exit(code)
        os.close(write_fd)
        os.set_blocking(read_fd, False)
        self.workers[slot] = {"pid": pid, "fd": read_fd, "buffer": b"", "last": {},
                              "progress_at": time.monotonic(), "frozen_until": None}

    def drain(self, slot: int) -> None:
        worker = self.workers[slot]
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(worker["fd"], 65536):
                worker["buffer"] += chunk
        *lines, worker["buffer"] = worker["buffer"].split(b"\n")
        for line in lines:
            worker["last"] = json.loads(line)
            worker["progress_at"] = time.monotonic()

    def retire(self, slot: int) -> None:
        """SIGKILL a worker, reap it, and add up what it reported."""
        pid = self.workers[slot]["pid"]
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        self._account_dead(slot)

    def _account_dead(self, slot: int) -> None:
        self.drain(slot)
        worker = self.workers.pop(slot)
        os.close(worker["fd"])
        last = worker["last"]
        self.verified += last.get("verified", 0)
        self.calls += last.get("calls", 0)
        self.wrong += last.get("wrong", 0)
        self.examples += last.get("examples", [])

    def check_probe(self) -> str | None:
        """The supervisor writes and reads back a key of its own; None when fine."""
        stamp = time.monotonic_ns()
        value = generations(KEYS, 99, stamp)
        skipped = self.cache.stats().skipped
        started = time.monotonic()
        self.cache.update(prompt_of(KEYS), "llm", value)
        got = self.cache.lookup(prompt_of(KEYS), "llm")
        if time.monotonic() - started > 2 * LOCK_TIMEOUT_S + 3:
            return "hang: the supervisor's update+lookup overran its bound"
        if self.cache.stats().skipped == skipped and got not in (None, value):
            self.wrong += 1
            self.examples.append("supervisor probe: not read back")
        return None

    def run(self, seconds: float) -> int:
        for slot in range(WORKERS):
            self.spawn(slot)
        end = time.monotonic() + seconds
        status = 0
        while time.monotonic() < end and status == 0:
            fds = [w["fd"] for w in self.workers.values()]
            select.select(fds, [], [], 0.02)
            now = time.monotonic()
            for slot in list(self.workers):
                worker = self.workers[slot]
                self.drain(slot)
                if worker["last"].get("wrong"):
                    status = 1
                done, wait_status = os.waitpid(worker["pid"], os.WNOHANG)
                if done:
                    killed = os.WIFSIGNALED(wait_status) and (
                        os.WTERMSIG(wait_status) == signal.SIGKILL
                    )
                    self._account_dead(slot)
                    if not killed:  # exit 5: a wrong value; anything else: a crash
                        self.examples.append(f"worker {slot} ended with status {wait_status}")
                        status = 1
                        break
                    self.kills += 1  # killed itself at a write step
                    self.spawn(slot)
                    continue
                if worker["frozen_until"] is not None:
                    if now >= worker["frozen_until"]:
                        os.kill(worker["pid"], signal.SIGCONT)
                        worker["frozen_until"] = None
                        worker["progress_at"] = now
                    continue
                if now - worker["progress_at"] > HANG_S:
                    self.examples.append(f"worker {slot} made no progress for {HANG_S} s")
                    status = 2
                    break
                r = self.rng.random()
                if r < 0.02:
                    self.retire(slot)
                    self.kills += 1
                    self.spawn(slot)
                elif r < 0.025:
                    os.kill(worker["pid"], signal.SIGSTOP)
                    worker["frozen_until"] = now + self.rng.uniform(0.1, 3 * LOCK_TIMEOUT_S)
                    self.freezes += 1
            if status == 0 and (problem := self.check_probe()):
                self.examples.append(problem)
                status = 2
        for slot in list(self.workers):
            self.retire(slot)
        if self.wrong and status == 0:
            status = 1
        if status == 0:
            problems = self.cache.check()
            if problems:
                self.examples += problems[:5]
                status = 1
        return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    directory = tempfile.mkdtemp(prefix="shmcache-soak-")
    supervisor: Supervisor | None = None
    status = 2
    try:
        cache = SharedMemoryCache(
            "soak", directory=directory, size_bytes=2 << 20, lock_timeout=LOCK_TIMEOUT_S
        )
        supervisor = Supervisor(cache, args.seed)
        try:
            status = supervisor.run(args.seconds)
        finally:
            for worker in supervisor.workers.values():  # on any error: no stragglers
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker["pid"], signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(worker["pid"], 0)
            cache.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    if supervisor is not None:
        for example in supervisor.examples[:10]:
            print(f"problem: {example}")
        verdict = {0: "ok", 1: "WRONG VALUE", 2: "HANG"}[status]
        print(
            f"soak {verdict}: {args.seconds:.0f} s, kills {supervisor.kills}, "
            f"freezes {supervisor.freezes}, calls {supervisor.calls}, "
            f"reads verified {supervisor.verified}, wrong values {supervisor.wrong}"
        )
    return status


if __name__ == "__main__":
    sys.exit(main())

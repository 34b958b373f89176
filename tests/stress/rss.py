"""Memory stress: 10^6 mixed calls in one process; the resident set must not grow.

Usage::

    .venv/bin/python tests/stress/rss.py [--ops 1000000] [--max-growth-mib 16]

Private RSS (``RssAnon`` in /proc/self/status: the shared segment's pages are not
counted) is read after a warm-up (the first 10% of the calls) and at the end; the
program prints both, with the total VmRSS, and exits 1 if the growth exceeds the bound.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import random
import shutil
import sys
import tempfile
import time

from langchain_core.outputs import Generation

from shmcache import SharedMemoryCache


def rss_kib(field: str = "RssAnon") -> int:
    """A resident-set figure of this process in KiB (``RssAnon``: private memory,
    which excludes the shared segment's pages, counted in ``RssShmem``)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=1_000_000)
    parser.add_argument("--max-growth-mib", type=float, default=16.0)
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    directory = tempfile.mkdtemp(prefix="shmcache-rss-")
    rng = random.Random(1)
    loop = asyncio.new_event_loop()
    try:
        cache = SharedMemoryCache("rss", directory=directory, size_bytes=8 << 20)
        warm_up = args.ops // 10
        baseline = 0
        started = time.monotonic()
        for i in range(args.ops):
            if i == warm_up:
                gc.collect()
                baseline = rss_kib()
            key = f"prompt {rng.randrange(5000)}"
            r = rng.random()
            if r < 0.6:
                cache.lookup(key, "llm")
            elif r < 0.9:
                cache.update(key, "llm", [Generation(text=key * rng.randint(1, 60))])
            elif r < 0.95:
                loop.run_until_complete(cache.alookup(key, "llm"))
            elif r < 0.999:
                cache.update(key, "llm", [])  # skipped (empty): warning path
            else:
                cache.clear(llm_string="llm")
            if i % 100_000 == 0:
                cache.stats()
        gc.collect()
        final = rss_kib()
        total = rss_kib("VmRSS")
        elapsed = time.monotonic() - started
        problems = cache.check()
        cache.close()
    finally:
        loop.close()
        shutil.rmtree(directory, ignore_errors=True)
    growth_mib = (final - baseline) / 1024
    ok = growth_mib <= args.max_growth_mib and not problems
    print(
        f"rss {'ok' if ok else 'FAILED'}: {args.ops} calls in {elapsed:.0f} s, private RSS after "
        f"warm-up {baseline / 1024:.1f} MiB, at end {final / 1024:.1f} MiB, growth "
        f"{growth_mib:+.1f} MiB (bound {args.max_growth_mib} MiB; total VmRSS "
        f"{total / 1024:.1f} MiB with the shared segment), check problems "
        f"{len(problems)}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Send the gunicorn demo one burst of identical first requests; show what it cost.

    gunicorn -c examples/gunicorn_app/gunicorn.conf.py     # terminal 1
    python examples/gunicorn_app/burst.py                  # terminal 2: 16 at once
    python examples/gunicorn_app/burst.py -n 32 --prompt "What is mmap?"
    python examples/gunicorn_app/burst.py --json           # the result as one JSON line

``--requests`` client threads connect, meet at a barrier and POST the same prompt,
one nobody asked before (unless ``--prompt`` says otherwise), to ``/ask`` at the
same moment: every worker receives it while the first worker's model call is in
flight. ``/stats`` read before and after shows what the burst cost on the whole
host: one miss (the one model call), the other requests hits, and ``coalesced``:
how many of those hits waited for the first worker's call instead of calling the
model themselves (shmcache coalesces concurrent identical misses by default).

Standard library only; talks to ``http://127.0.0.1:$SHMCACHE_DEMO_PORT`` (8000).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit

# The counters whose change the burst explains.
COUNTERS = ("misses", "hits", "coalesced", "updates", "coalesce_timeouts", "uncoalesced")


def _connection(url: str, timeout_s: float) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"expected an http://host:port URL, not {url!r}")
    return http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout_s)


def _request(
    conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None
) -> dict[str, Any]:
    conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    data = response.read()
    if response.status != 200:
        raise RuntimeError(f"{method} {path}: HTTP {response.status} {data[:200]!r}")
    result: dict[str, Any] = json.loads(data)
    return result


def get_stats(url: str, timeout_s: float) -> dict[str, Any]:
    """The server's ``GET /stats`` (the cache's counters, summed over all processes)."""
    conn = _connection(url, timeout_s)
    try:
        return _request(conn, "GET", "/stats")
    finally:
        conn.close()


def burst(url: str, prompt: str, requests: int, timeout_s: float) -> dict[str, Any]:
    """POST ``prompt`` to ``/ask`` from ``requests`` threads at once.

    Returns:
        ``seconds`` (first send to last answer), ``answers`` (one dict per request
        that succeeded) and ``errors`` (one message per request that did not).
    """
    body = json.dumps({"prompt": prompt}).encode()
    # Everyone connects first, then all send together (the parent is a party too).
    ready = threading.Barrier(requests + 1, timeout=timeout_s)
    answers: list[dict[str, Any]] = []
    errors: list[str] = []
    guard = threading.Lock()

    def client() -> None:
        conn = _connection(url, timeout_s)
        try:
            conn.connect()
            ready.wait()
            answer = _request(conn, "POST", "/ask", body)
            with guard:
                answers.append(answer)
        except Exception as exc:
            with guard:
                errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            conn.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(requests)]
    for thread in threads:
        thread.start()
    # A client that cannot connect breaks the barrier: its error says why.
    with contextlib.suppress(threading.BrokenBarrierError):
        ready.wait()
    started = time.monotonic()
    for thread in threads:
        thread.join(timeout_s + 5)
    seconds = time.monotonic() - started
    stuck = sum(thread.is_alive() for thread in threads)
    if stuck:
        errors.append(f"{stuck} requests had no answer after {timeout_s + 5:.0f} s")
    return {"seconds": seconds, "answers": answers, "errors": errors}


def _format(result: dict[str, Any]) -> Iterable[str]:
    delta = result["delta"]
    workers = result["workers"]
    yield (
        f"burst           {result['requests']} concurrent POST /ask, one new prompt: "
        f"{result['prompt']!r}"
    )
    yield (
        f"answered        {result['answered']} in {result['seconds']:.2f} s by "
        f"{len(workers)} workers (pids {', '.join(map(str, workers))}), "
        f"{'all the same answer' if len(result['answers']) == 1 else 'DIFFERENT ANSWERS'}"
    )
    for error in result["errors"]:
        yield f"ERROR           {error}"
    yield (
        f"/stats change   misses +{delta['misses']} (= model calls), hits +{delta['hits']}, "
        f"coalesced +{delta['coalesced']}"
    )
    yield (
        f"                {delta['coalesced']} requests waited for the first worker's model call"
        f" instead of making their own; the other {delta['hits'] - delta['coalesced']} hits"
        " came after it"
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    port = os.environ.get("SHMCACHE_DEMO_PORT", "8000")
    p = argparse.ArgumentParser(description="Send the gunicorn demo a burst of one new prompt.")
    p.add_argument("--url", default=f"http://127.0.0.1:{port}", help="server (default %(default)s)")
    p.add_argument("-n", "--requests", type=int, default=16, help="concurrent requests (16)")
    p.add_argument("--prompt", default=None, help="the prompt (default: a new one each run)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request (30)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    args = p.parse_args(argv)
    if args.requests < 1:
        p.error("--requests must be at least 1")
    if args.prompt is None:
        args.prompt = f"Burst question {uuid.uuid4().hex[:8]}: what does single-flight mean?"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Read /stats, send the burst, read /stats again, print what changed."""
    args = parse_args(argv)
    before = get_stats(args.url, args.timeout)
    sent = burst(args.url, args.prompt, args.requests, args.timeout)
    after = get_stats(args.url, args.timeout)
    result = {
        "requests": args.requests,
        "prompt": args.prompt,
        "seconds": sent["seconds"],
        "answers": sorted({a["answer"] for a in sent["answers"]}),
        "answered": len(sent["answers"]),
        "workers": sorted({a["worker_pid"] for a in sent["answers"]}),
        "errors": sent["errors"],
        "delta": {k: after.get(k, 0) - before.get(k, 0) for k in COUNTERS},
        "stats": {k: v for k, v in after.items() if k != "worker_pid"},
    }
    if args.json:
        print(json.dumps(result))
    else:
        print("\n".join(_format(result)))
    return 1 if sent["errors"] or len(result["answers"]) != 1 else 0


if __name__ == "__main__":
    sys.exit(main())

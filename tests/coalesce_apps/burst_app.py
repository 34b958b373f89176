"""WSGI app of the server coalescing tests: ``GET /ask?prompt=...`` asks a chat model
through a ``SharedMemoryCache`` set as LangChain's global cache.

Each real model call appends a line to ``BURST_CALLS_FILE`` (every worker, every
server kind), so "one model call on the host" is read from one file.  The computing
caller's model call is held until ``BURST_HOLD_FOR`` waits are noted in
``BURST_WAITS_FILE`` (at most 20 s): the burst's other requests are then known to
wait for it — nothing depends on timing.

``BURST_OPEN``: ``import`` opens the cache when this module is imported (gunicorn
``--preload`` and uWSGI's default mode: in the master, before the workers are
forked); ``post_fork`` leaves it to the gunicorn config's ``post_fork`` hook (each
worker opens its own).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

from coalesce_support import BurstChatModel, count_lines, instrument_waits
from langchain_core.globals import set_llm_cache

from shmcache import SharedMemoryCache

CALLS_FILE = os.environ["BURST_CALLS_FILE"]
WAITS_FILE = os.environ["BURST_WAITS_FILE"]
HOLD_FOR = int(os.environ["BURST_HOLD_FOR"])
OPEN = os.environ.get("BURST_OPEN", "import")
LOADED_IN = os.getpid()

_cache: SharedMemoryCache | None = None


def _hold(_: str) -> None:
    deadline = time.monotonic() + 20.0
    while count_lines(WAITS_FILE) < HOLD_FOR and time.monotonic() < deadline:
        time.sleep(0.002)  # a bounded poll: the waits file decides


MODEL = BurstChatModel(calls_file=CALLS_FILE).with_hooks(_hold)


def open_cache() -> SharedMemoryCache:
    """Open the cache (once per process) and make it LangChain's global cache."""
    global _cache
    if _cache is None:
        _cache = SharedMemoryCache(
            os.environ["BURST_CACHE_NAME"], directory=os.environ["BURST_CACHE_DIR"],
            size_bytes=1 << 20, coalesce_timeout=30.0,
        )
        instrument_waits(_cache, WAITS_FILE)
        set_llm_cache(_cache)
    return _cache


def close_cache() -> None:
    global _cache
    if _cache is not None:
        set_llm_cache(None)
        _cache.close()
        _cache = None


def _json(start_response: Callable[..., Any], status: str, body: dict[str, Any]) -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(status, [("Content-Type", "application/json"),
                            ("Content-Length", str(len(data)))])
    return [data]


def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "/")
    if path == "/ask":
        prompt = parse_qs(environ.get("QUERY_STRING", ""))["prompt"][0]
        answer = MODEL.invoke(prompt)
        return _json(start_response, "200 OK", {
            "answer": answer.content, "pid": os.getpid(), "loaded_in": LOADED_IN,
            "cache_open": _cache is not None,
        })
    if path == "/healthz":
        return _json(start_response, "200 OK", {"pid": os.getpid()})
    return _json(start_response, "404 Not Found", {"error": path})


if OPEN == "import":
    open_cache()

"""A tiny WSGI app (stdlib only) whose chat model answers from a shared cache.

Every gunicorn worker answers ``POST /ask`` through the same ``SharedMemoryCache``,
so a prompt costs one model call on the whole host, whichever worker gets it --
even when several workers get it at the same moment: their lookups wait for the
first one's model call (coalescing). ``burst.py`` beside this file shows it.

Endpoints:

* ``POST /ask`` with JSON ``{"prompt": "..."}`` -> ``{"answer": "...", "worker_pid": N}``
* ``GET /stats`` -> the cache's ``stats()`` as JSON (summed over all processes)
* ``GET /metrics`` -> the same counters for Prometheus (text exposition format),
  from ``shmcache.prometheus.ShmCacheCollector``: the host's totals whichever worker
  answers, with no prometheus_client multiprocess mode (the counters live in the
  segment). Needs ``pip install 'shmcache[prometheus]'``; without it: 501.
* ``GET /healthz`` -> ``{"ok": true, "worker_pid": N}``

Environment variables:

* ``SHMCACHE_DEMO_NAME``: cache name (default ``gunicorn-demo``).
* ``SHMCACHE_DEMO_DIR``: segment directory (default: shmcache's, under /dev/shm).
* ``SHMCACHE_DEMO_DEPLOY``: ``preload`` (default) opens the cache when this module
  is imported -- in the gunicorn master with ``preload_app`` -- and the workers
  inherit it through ``fork``; ``post_fork`` leaves it to ``gunicorn.conf.py``'s
  ``post_fork`` hook to open it in each worker.
* ``SHMCACHE_DEMO_DELAY`` / ``SHMCACHE_DEMO_CALLS_FILE``: see ``fake_model.py``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterable
from typing import Any

from fake_model import SlowEchoChatModel
from langchain_core.globals import set_llm_cache
from langchain_core.language_models import BaseChatModel

from shmcache import SharedMemoryCache

# The one line to change for a real provider, e.g. (after its import):
#   MODEL: BaseChatModel = ChatOpenAI(model="gpt-4o-mini")
MODEL: BaseChatModel = SlowEchoChatModel()

CACHE_NAME = os.environ.get("SHMCACHE_DEMO_NAME", "gunicorn-demo")
CACHE_DIR = os.environ.get("SHMCACHE_DEMO_DIR") or None
DEPLOY = os.environ.get("SHMCACHE_DEMO_DEPLOY", "preload")
MAX_BODY_BYTES = 1 << 20

StartResponse = Callable[[str, list[tuple[str, str]]], Any]

_cache: SharedMemoryCache | None = None



def _metrics_registry() -> Any:
    """The /metrics registry, or None without prometheus_client.

    The collector reads the segment at each scrape (read-only, counting nothing), so
    it holds no file or lock and is safe to build before ``fork``: every worker
    serves the same host-wide totals. No ``PROMETHEUS_MULTIPROC_DIR`` is needed.
    """
    try:
        from prometheus_client import CollectorRegistry

        from shmcache.prometheus import ShmCacheCollector
    except ImportError:  # optional here: /metrics then says what to install
        return None
    registry = CollectorRegistry()
    registry.register(ShmCacheCollector(CACHE_NAME, directory=CACHE_DIR))
    return registry


METRICS_REGISTRY = _metrics_registry()


def open_cache() -> SharedMemoryCache:
    """Attach to the shared cache and make it LangChain's global LLM cache.

    Idempotent in a process. Safe to call before ``fork``: a forked worker keeps
    using the instance it inherited (shmcache re-creates its locks in the child).

    Returns:
        The open cache.
    """
    global _cache
    if _cache is None:
        _cache = SharedMemoryCache(CACHE_NAME, directory=CACHE_DIR)
        set_llm_cache(_cache)
    return _cache


def close_cache() -> None:
    """Detach this process from the cache (its counts stay in the shared stats)."""
    global _cache
    if _cache is not None:
        set_llm_cache(None)
        _cache.close()
        _cache = None


def _json_response(start_response: StartResponse, status: str, body: dict[str, Any]) -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(
        status,
        [("Content-Type", "application/json"), ("Content-Length", str(len(data)))],
    )
    return [data]


def _read_prompt(environ: dict[str, Any]) -> str:
    """Return the request's prompt; ``ValueError`` with a client-facing message."""
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError as exc:
        raise ValueError("bad Content-Length") from exc
    if not 0 < length <= MAX_BODY_BYTES:
        raise ValueError(f"body must be 1..{MAX_BODY_BYTES} bytes of JSON")
    try:
        payload = json.loads(environ["wsgi.input"].read(length))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError("body is not JSON") from exc
    prompt = payload.get("prompt") if isinstance(payload, dict) else None
    if not isinstance(prompt, str) or not prompt:
        raise ValueError('expected {"prompt": "<non-empty string>"}')
    return prompt


def application(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    """WSGI entry point."""
    method = environ.get("REQUEST_METHOD", "GET")
    path = environ.get("PATH_INFO", "/")
    if path == "/ask":
        if method != "POST":
            return _json_response(start_response, "405 Method Not Allowed", {"error": "POST"})
        try:
            prompt = _read_prompt(environ)
        except ValueError as exc:
            return _json_response(start_response, "400 Bad Request", {"error": str(exc)})
        answer = MODEL.invoke(prompt)
        return _json_response(
            start_response, "200 OK", {"answer": answer.text, "worker_pid": os.getpid()}
        )
    if path == "/healthz" and method == "GET":
        return _json_response(start_response, "200 OK", {"ok": True, "worker_pid": os.getpid()})
    if path == "/metrics" and method == "GET":
        if METRICS_REGISTRY is None:
            return _json_response(
                start_response, "501 Not Implemented",
                {"error": "install prometheus_client: pip install 'shmcache[prometheus]'"},
            )
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        data = generate_latest(METRICS_REGISTRY)
        start_response("200 OK", [
            ("Content-Type", CONTENT_TYPE_LATEST),
            ("Content-Length", str(len(data))),
            # Only so the demo (and its test) can see which worker answered.
            ("X-Worker-Pid", str(os.getpid())),
        ])
        return [data]
    if path == "/stats" and method == "GET":
        if _cache is None:
            return _json_response(start_response, "503 Service Unavailable", {"error": "no cache"})
        stats = dataclasses.asdict(_cache.stats())
        return _json_response(start_response, "200 OK", {**stats, "worker_pid": os.getpid()})
    return _json_response(start_response, "404 Not Found", {"error": f"no route {path}"})


if DEPLOY == "preload":
    # With `preload_app = True` this runs once, in the gunicorn master, before it
    # forks the workers; every worker (respawned ones too) inherits the open cache.
    open_cache()

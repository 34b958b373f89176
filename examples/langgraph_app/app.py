"""A LangGraph app whose expensive node is cached for every gunicorn worker at once.

The graph answers a question in three steps::

    normalize -> research -> answer

``research`` stands for the costly part of a real graph (a model call, a retrieval,
a tool): here it sleeps ``SHMCACHE_LG_DELAY`` seconds. It has a ``CachePolicy``, and
the graph is compiled with ``cache=SharedMemoryNodeCache(...)``: its result is kept in
one shared-memory segment that all workers of the host attach to. Whichever worker
gets a question first runs ``research``; every later request for the same question,
on any worker, is answered from the segment (LangGraph reports the node as cached).
``normalize`` and ``answer`` are cheap and run every time.

Endpoints:

* ``POST /ask`` with JSON ``{"question": "..."}`` ->
  ``{"answer": "...", "cached_nodes": ["research"], "worker_pid": N}``
* ``POST /clear`` -> clears the graph's cached nodes (for every worker)
* ``GET /stats`` -> the node cache's ``stats()``, summed over all processes
  (``misses``: how often ``research`` had to run; ``hits``: how often it did not)
* ``GET /healthz`` -> ``{"ok": true, "worker_pid": N}``

Environment variables:

* ``SHMCACHE_LG_NAME``: node cache name (default ``langgraph-demo``).
* ``SHMCACHE_LG_DIR``: segment directory (default: shmcache's, under /dev/shm).
* ``SHMCACHE_LG_DELAY``: seconds one ``research`` run takes (default 0.5).
* ``SHMCACHE_LG_TTL``: seconds a cached ``research`` result stays valid (default 600;
  ``none``: until evicted).
* ``SHMCACHE_LG_RUNS_FILE``: if set, every ``research`` run appends one line
  (``pid<TAB>question``) to this file, so runs can be counted across workers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterable
from typing import Any, TypedDict

from langgraph.graph import END, START, StateGraph
from langgraph.types import CachePolicy

from shmcache.langgraph import SharedMemoryNodeCache

CACHE_NAME = os.environ.get("SHMCACHE_LG_NAME", "langgraph-demo")
CACHE_DIR = os.environ.get("SHMCACHE_LG_DIR") or None
DELAY_S = float(os.environ.get("SHMCACHE_LG_DELAY", "0.5"))
_TTL = os.environ.get("SHMCACHE_LG_TTL", "600")
TTL_S: int | None = None if _TTL.lower() == "none" else int(_TTL)
RUNS_FILE = os.environ.get("SHMCACHE_LG_RUNS_FILE") or None
MAX_BODY_BYTES = 1 << 20

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


class State(TypedDict, total=False):
    question: str
    notes: list[str]
    answer: str


def normalize(state: State) -> State:
    """Cheap: collapse whitespace, so "a  b" and "a b" are the same question."""
    return {"question": " ".join(state["question"].split())}


def research(state: State) -> State:
    """The expensive node (fake work). Its input is the key of its cache entry."""
    question = state["question"]
    if RUNS_FILE:
        fd = os.open(RUNS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, f"{os.getpid()}\t{json.dumps(question)}\n".encode())
        finally:
            os.close(fd)
    time.sleep(DELAY_S)
    words = question.split()
    return {
        "notes": [
            f"{len(words)} words, {len(question)} characters",
            f"longest word: {max(words, key=len) if words else '-'}",
            f"reversed: {question[::-1]}",
        ]
    }


def answer(state: State) -> State:
    """Cheap: format the notes."""
    return {"answer": f"{state['question']!r}: " + "; ".join(state["notes"])}


def build_graph(cache: SharedMemoryNodeCache[Any]) -> Any:
    """The compiled graph, with ``research`` cached in ``cache``."""
    builder = StateGraph(State)
    builder.add_node("normalize", normalize)
    builder.add_node("research", research, cache_policy=CachePolicy(ttl=TTL_S))
    builder.add_node("answer", answer)
    builder.add_edge(START, "normalize")
    builder.add_edge("normalize", "research")
    builder.add_edge("research", "answer")
    builder.add_edge("answer", END)
    return builder.compile(cache=cache)


# Opened when this module is imported: with gunicorn's `preload_app` that is in the
# master, before it forks the workers; each worker inherits the open cache (shmcache
# re-creates its locks after fork) and the compiled graph.
cache: SharedMemoryNodeCache[Any] = SharedMemoryNodeCache(CACHE_NAME, directory=CACHE_DIR)
graph = build_graph(cache)


def ask(question: str) -> dict[str, Any]:
    """Run the graph; return its answer and the nodes LangGraph took from the cache."""
    final: dict[str, Any] = {}
    cached: list[str] = []
    for mode, chunk in graph.stream({"question": question}, stream_mode=["updates", "values"]):
        if mode == "values":
            final = chunk
        elif chunk.get("__metadata__", {}).get("cached"):
            cached.extend(node for node in chunk if node != "__metadata__")
    return {"answer": final["answer"], "cached_nodes": cached}


def close_cache() -> None:
    """Detach this process from the segment (its counts stay in the shared stats)."""
    cache.close()


def _json_response(start_response: StartResponse, status: str, body: dict[str, Any]) -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    )
    return [data]


def _read_question(environ: dict[str, Any]) -> str:
    """The request's question; ``ValueError`` with a client-facing message."""
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
    question = payload.get("question") if isinstance(payload, dict) else None
    if not isinstance(question, str) or not question.strip():
        raise ValueError('expected {"question": "<non-empty string>"}')
    return question


def application(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    """WSGI entry point."""
    method = environ.get("REQUEST_METHOD", "GET")
    path = environ.get("PATH_INFO", "/")
    pid = os.getpid()
    if path == "/ask" and method == "POST":
        try:
            question = _read_question(environ)
        except ValueError as exc:
            return _json_response(start_response, "400 Bad Request", {"error": str(exc)})
        return _json_response(start_response, "200 OK", {**ask(question), "worker_pid": pid})
    if path == "/clear" and method == "POST":
        graph.clear_cache()
        return _json_response(start_response, "200 OK", {"cleared": True, "worker_pid": pid})
    if path == "/stats" and method == "GET":
        stats = dataclasses.asdict(cache.stats())
        return _json_response(start_response, "200 OK", {**stats, "worker_pid": pid})
    if path == "/healthz" and method == "GET":
        return _json_response(start_response, "200 OK", {"ok": True, "worker_pid": pid})
    if path in ("/ask", "/clear", "/stats", "/healthz"):
        return _json_response(start_response, "405 Method Not Allowed", {"error": method})
    return _json_response(start_response, "404 Not Found", {"error": f"no route {path}"})

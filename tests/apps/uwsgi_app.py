"""WSGI app for test_robustness_uwsgi, run by a real uWSGI in its default mode.

The cache is opened at import, so with uWSGI's default (no ``--lazy-apps``) it is
opened in the master, and the workers are forked from C: no ``os.register_at_fork``
hook runs in them.  Each request makes a seeded mix of overwrites and lookups over a
bounded key set (a miss is stored, as LangChain does), verifies every value it
reads, and answers with its counts as JSON.
"""

from __future__ import annotations

import json
import os
import random
from typing import Any
from urllib.parse import parse_qs

from _robust_helpers import (
    LLM,
    MIB,
    prompt_of,
    quiet_logging_to_stderr,
    value_of,
    value_problem,
)

from shmcache import SharedMemoryCache

quiet_logging_to_stderr()

LOADED_IN_PID = os.getpid()
KEYS = int(os.environ["ROBUST_KEYS"])
CACHE = SharedMemoryCache(
    os.environ["ROBUST_CACHE_NAME"], directory=os.environ["ROBUST_CACHE_DIR"], size_bytes=MIB
)


def application(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    query = parse_qs(environ.get("QUERY_STRING", ""))
    seed = int(query["seed"][0])
    ops = int(query["ops"][0])
    rng = random.Random(seed)
    pid = os.getpid()
    counts = {"lookups": 0, "hits": 0, "misses": 0, "updates": 0}
    wrong: list[str] = []
    for i in range(ops):
        key = rng.randrange(KEYS)
        if rng.random() < 0.3:  # overwrite
            CACHE.update(prompt_of(key), LLM, value_of(key, pid, seed * 1000 + i))
            counts["updates"] += 1
            continue
        found = CACHE.lookup(prompt_of(key), LLM)
        counts["lookups"] += 1
        counts["hits" if found is not None else "misses"] += 1
        problem = value_problem(key, found)
        if problem is not None:
            wrong.append(problem)
        if found is None:  # as LangChain does: a miss is computed and stored
            CACHE.update(prompt_of(key), LLM, value_of(key, pid, seed * 1000 + i))
            counts["updates"] += 1
    body = json.dumps(
        {"pid": pid, "loaded_in": LOADED_IN_PID, "wrong": wrong, **counts}
    ).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]

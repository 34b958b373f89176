"""A real uWSGI in its default mode: the app is loaded in the master and the workers
are forked from C, so no ``os.register_at_fork`` hook runs in them (issue 8, defect 1).

uWSGI comes from the ``[test]`` extra (the ``pyuwsgi`` wheel: real uWSGI, with the
``uwsgi`` command, no compiler needed).  A missing uWSGI fails the test: CI must
never pass by skipping it.
"""

from __future__ import annotations

import contextlib
import json
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from _robust_helpers import (
    APPS_DIR,
    DIED_MID_WRITE,
    UnixHTTPConnection,
    child_env,
    kill_process_group,
    log_lines,
)
from _samples import CacheFactory

WORKERS = 4
REQUESTS = WORKERS * 120
OPS_PER_REQUEST = 40
KEYS = 48
CLIENT_THREADS = 8
DEADLINE_S = 40.0


def _uwsgi() -> str:
    beside = Path(sys.executable).parent / "uwsgi"
    found = str(beside) if beside.exists() else shutil.which("uwsgi")
    if found is None:
        pytest.fail(
            "uWSGI is not installed; `pip install -e '.[test]'` installs it (pyuwsgi)"
        )
    return found


def _get(socket_path: str, target: str) -> dict[str, Any]:
    connection = UnixHTTPConnection(socket_path, timeout=30)
    try:
        connection.request("GET", target)
        response = connection.getresponse()
        body = response.read()
        assert response.status == 200, f"{target}: HTTP {response.status}: {body[:500]!r}"
        result: dict[str, Any] = json.loads(body)
        return result
    finally:
        connection.close()


def _wait_for(predicate: Any, what: str, deadline_s: float, log: Path) -> None:
    end = time.monotonic() + deadline_s
    delay = 0.005
    while not predicate():
        if time.monotonic() >= end:
            raise AssertionError(f"{what} within {deadline_s} s; log:\n{log.read_text()[-3000:]}")
        time.sleep(delay)  # a bounded poll with a deadline
        delay = min(delay * 2, 0.1)


def _load(socket_path: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Send REQUESTS requests from CLIENT_THREADS threads; return responses, errors."""
    seeds: queue.Queue[int] = queue.Queue()
    for seed in range(REQUESTS):
        seeds.put(seed)
    responses: list[dict[str, Any]] = []
    errors: list[str] = []
    guard = threading.Lock()

    def client() -> None:
        while True:
            try:
                seed = seeds.get_nowait()
            except queue.Empty:
                return
            try:
                result = _get(socket_path, f"/work?seed={seed}&ops={OPS_PER_REQUEST}")
            except Exception as exc:
                with guard:
                    errors.append(f"seed {seed}: {exc!r}")
                continue
            with guard:
                responses.append(result)

    threads = [threading.Thread(target=client) for _ in range(CLIENT_THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=DEADLINE_S)
    assert not any(t.is_alive() for t in threads), "the clients did not finish in time"
    return responses, errors


@pytest.mark.timeout(90)
def test_uwsgi_default_mode_workers_keep_the_segment_sound(
    make_cache: CacheFactory, cache_dir: Path
) -> None:
    """4 uWSGI workers forked from C after the master opened the cache, 120 requests
    each of mixed updates and lookups: every value read is one stored for its key,
    ``check()`` finds nothing, no "died mid-write" repair is logged for the living
    workers, and the hits and misses counted are exactly the lookups done."""
    uwsgi = _uwsgi()
    cache = make_cache("uwsgi")
    start = cache.stats()
    run_dir = Path(tempfile.mkdtemp(prefix="shmuw-"))  # short: a unix socket path
    socket_path = str(run_dir / "http.sock")
    fifo = run_dir / "master.fifo"
    log = run_dir / "uwsgi.log"
    command = [
        uwsgi, "--master", "--processes", str(WORKERS),
        "--http-socket", socket_path,
        "--wsgi-file", str(APPS_DIR / "uwsgi_app.py"),
        "--need-app", "--strict", "--master-fifo", str(fifo),
        "--die-on-term", "--worker-reload-mercy", "20", "--reload-mercy", "20",
        "--disable-logging",  # request lines; uWSGI's own and the app's stderr stay
    ]
    env = child_env(
        ROBUST_CACHE_NAME="uwsgi", ROBUST_CACHE_DIR=str(cache_dir), ROBUST_KEYS=str(KEYS)
    )
    with log.open("wb") as log_file:
        server = subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, stdout=log_file,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        _wait_for(
            lambda: server.poll() is not None
            or f"spawned uWSGI worker {WORKERS} " in log.read_text(errors="replace"),
            f"uWSGI did not spawn worker {WORKERS}", 30, log,
        )
        assert server.poll() is None, f"uWSGI exited early:\n{log.read_text()[-3000:]}"
        responses, errors = _load(socket_path)
        fifo.write_bytes(b"q")  # graceful shutdown: workers finish and exit
        try:
            code = server.wait(timeout=30)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"uWSGI did not stop:\n{log.read_text()[-3000:]}") from exc
    finally:
        kill_process_group(server)
        output = log.read_text(errors="replace") if log.exists() else ""
        with contextlib.suppress(OSError):
            shutil.rmtree(run_dir)

    assert errors == [], f"{len(errors)} requests failed, e.g. {errors[:3]}\n{output[-3000:]}"
    assert len(responses) == REQUESTS
    masters = {r["loaded_in"] for r in responses}
    workers = {r["pid"] for r in responses}
    # The scenario itself: one master loaded the app; workers are other processes.
    assert len(masters) == 1 and not masters & workers, (masters, workers)
    assert len(workers) >= 2, f"only {len(workers)} worker served: no concurrency"
    wrong = [w for r in responses for w in r["wrong"]]
    assert wrong == [], f"{len(wrong)} wrong values, e.g. {wrong[:3]}"

    problems = cache.check()
    repairs = log_lines(output, DIED_MID_WRITE)
    damaged = log_lines(output, "damaged")
    end = cache.stats()
    lookups = sum(r["lookups"] for r in responses)
    hits = sum(r["hits"] for r in responses)
    misses = sum(r["misses"] for r in responses)
    counted = (end.hits - start.hits, end.misses - start.misses)
    summary = (
        f"workers {len(workers)}, uWSGI exit {code}, check: {len(problems)} problems "
        f"{problems[:3]}, {len(repairs)} 'died mid-write' lines, {len(damaged)} 'damaged' "
        f"lines, lookups {lookups} = hits {hits} + misses {misses}, counted "
        f"hits {counted[0]} + misses {counted[1]}"
    )
    print(summary)
    assert problems == [], summary
    assert repairs == [] and damaged == [], f"{summary}\n{(repairs + damaged)[:5]}"
    assert counted == (hits, misses), summary
    assert sum(counted) == lookups, summary

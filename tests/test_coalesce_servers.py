"""Real servers, 4 workers each, 16 concurrent identical first requests: one model
call on the host (issue 9).

* gunicorn ``sync`` and ``gthread`` (4 threads) workers, with ``--preload`` (the
  cache opened in the master, inherited by ``fork``) and with the cache opened in
  each worker's ``post_fork`` hook;
* uWSGI in its default mode (the app, and so the cache, loaded in the master; the
  workers forked from C, so no ``os.register_at_fork`` hook runs in them).

16 client threads connect, meet at a barrier, and send the same first request at
once.  The app's fake model appends a line per real call to a file; the computing
caller's call is held until 3 other requests are known to wait for it (so the burst
really overlaps), then the test checks: one line, 16 right answers, 15 hits of which
at least 3 coalesced.  Servers run in their own session and are killed (the whole
group) in ``finally``; every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from _robust_helpers import UnixHTTPConnection
from _samples import CacheFactory
from coalesce_apps.coalesce_support import (
    APPS_DIR,
    child_env,
    count_lines,
    expected_answer,
    read_lines,
)

from shmcache import SharedMemoryCache

pytestmark = pytest.mark.skipif(os.name != "posix", reason="shmcache needs POSIX")

WORKERS = 4
THREADS = 4
CLIENTS = 16
# The computing caller answers once this many other requests wait for it.
HOLD_FOR = WORKERS - 1
START_DEADLINE_S = 30.0
REQUEST_TIMEOUT_S = 30.0


class Server:
    """A server process group started in a short private directory."""

    def __init__(self, run_dir: Path, cache_dir: Path, name: str, open_mode: str) -> None:
        self.run_dir = run_dir
        self.socket_path = str(run_dir / "http.sock")
        self.calls_file = run_dir / "calls.jsonl"
        self.waits_file = run_dir / "waits.jsonl"
        self.ready_file = run_dir / "ready.jsonl"
        self.log_path = run_dir / "server.log"
        self.env = child_env(
            BURST_CALLS_FILE=str(self.calls_file), BURST_WAITS_FILE=str(self.waits_file),
            BURST_READY_FILE=str(self.ready_file), BURST_HOLD_FOR=str(HOLD_FOR),
            BURST_OPEN=open_mode, BURST_CACHE_NAME=name, BURST_CACHE_DIR=str(cache_dir),
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, command: list[str]) -> None:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                command, env=self.env, cwd=self.run_dir, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_until(self, ready: Any, what: str) -> None:
        """Poll ``ready()`` against a deadline, failing early if the server exits."""
        assert self.proc is not None
        end = time.monotonic() + START_DEADLINE_S
        while not ready():
            if self.proc.poll() is not None:
                pytest.fail(f"the server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            if time.monotonic() >= end:
                pytest.fail(f"{what} within {START_DEADLINE_S} s:\n{self.log()[-3000:]}")
            time.sleep(0.02)  # a bounded poll: the predicate decides

    def stop(self) -> None:
        """SIGTERM the master, then SIGKILL the whole group (bounded either way)."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers: workers of a stuck master
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


@pytest.fixture
def run_dir() -> Iterator[Path]:
    """A short private directory (a unix socket path must stay under 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="shmco-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _burst(socket_path: str, prompt: str) -> tuple[list[dict[str, Any]], list[str]]:
    """16 client threads connect, meet at a barrier, then send the same request."""
    barrier = threading.Barrier(CLIENTS, timeout=REQUEST_TIMEOUT_S)
    responses: list[dict[str, Any]] = []
    errors: list[str] = []
    guard = threading.Lock()

    def client() -> None:
        connection = UnixHTTPConnection(socket_path, timeout=REQUEST_TIMEOUT_S)
        try:
            connection.connect()
            barrier.wait()
            connection.request("GET", f"/ask?prompt={quote(prompt)}")
            response = connection.getresponse()
            body = response.read()
            if response.status != 200:
                raise AssertionError(f"HTTP {response.status}: {body[:300]!r}")
            with guard:
                responses.append(json.loads(body))
        except Exception as exc:
            with guard:
                errors.append(repr(exc))
        finally:
            connection.close()

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=REQUEST_TIMEOUT_S + 10)
    assert not any(t.is_alive() for t in threads), "the clients did not finish in time"
    return responses, errors


def _check_burst(
    server: Server, cache: SharedMemoryCache, prompt: str, loaded_in_master: bool
) -> None:
    start = cache.stats()
    responses, errors = _burst(server.socket_path, prompt)
    stats = cache.stats()
    calls = read_lines(server.calls_file)
    summary = (
        f"{len(responses)} answers, {len(errors)} errors {errors[:2]}, {len(calls)} model "
        f"calls, workers {sorted({r['pid'] for r in responses})}, waits noted "
        f"{count_lines(server.waits_file)}, stats {stats}"
    )
    print(f"\n{summary}")
    assert errors == [], f"{summary}\n{server.log()[-3000:]}"
    assert [r["answer"] for r in responses] == [expected_answer(prompt)] * CLIENTS, summary
    assert all(r["cache_open"] for r in responses)
    workers = {r["pid"] for r in responses}
    loaded_in = {r["loaded_in"] for r in responses}
    if loaded_in_master:  # the app (and the cache) came from the master through fork
        assert len(loaded_in) == 1 and not loaded_in & workers, (loaded_in, workers)
    else:
        assert loaded_in == workers, (loaded_in, workers)
    assert len(calls) == 1, summary
    assert len({r["pid"] for r in responses}) >= 2, f"one worker served all: {summary}"
    assert (stats.misses - start.misses, stats.hits - start.hits) == (1, CLIENTS - 1), summary
    assert stats.coalesced - start.coalesced >= HOLD_FOR, summary
    assert stats.coalesce_timeouts == start.coalesce_timeouts, summary


@pytest.mark.timeout(60)
@pytest.mark.parametrize("worker_class", ["sync", "gthread"])
@pytest.mark.parametrize("deploy", ["preload", "post_fork"])
def test_gunicorn_burst_makes_one_model_call(
    make_cache: CacheFactory, cache_dir: Path, run_dir: Path, worker_class: str, deploy: str
) -> None:
    """gunicorn, 4 workers: 16 concurrent identical first requests, 1 model call."""
    name = f"gunicorn-{worker_class}-{deploy}"
    cache = make_cache(name)  # creates the segment (and unlinks it at teardown)
    server = Server(run_dir, cache_dir, name, "import" if deploy == "preload" else "post_fork")
    command = [
        sys.executable, "-m", "gunicorn", "-c", str(APPS_DIR / "gunicorn_burst_conf.py"),
        "--workers", str(WORKERS), "--worker-class", worker_class,
        "--bind", f"unix:{server.socket_path}", "--chdir", str(APPS_DIR),
    ]
    if worker_class == "gthread":
        command += ["--threads", str(THREADS)]
    if deploy == "preload":
        command.append("--preload")
    command.append("burst_app:application")
    try:
        server.start(command)
        server.wait_until(
            lambda: count_lines(server.ready_file) >= WORKERS
            and os.path.exists(server.socket_path),
            f"{WORKERS} gunicorn workers ready",
        )
        _check_burst(server, cache, f"first question for gunicorn {worker_class} {deploy}",
                     loaded_in_master=deploy == "preload")
    finally:
        server.stop()


def _uwsgi() -> str:
    beside = Path(sys.executable).parent / "uwsgi"
    found = str(beside) if beside.exists() else shutil.which("uwsgi")
    if found is None:
        pytest.fail("uWSGI is not installed; `pip install -e '.[test]'` installs it (pyuwsgi)")
    return found


@pytest.mark.timeout(60)
def test_uwsgi_default_mode_burst_makes_one_model_call(
    make_cache: CacheFactory, cache_dir: Path, run_dir: Path
) -> None:
    """uWSGI default mode (app loaded in the master, workers forked from C), 4 workers:
    16 concurrent identical first requests, 1 model call."""
    name = "uwsgi-burst"
    cache = make_cache(name)
    server = Server(run_dir, cache_dir, name, "import")
    command = [
        _uwsgi(), "--master", "--processes", str(WORKERS),
        "--http-socket", server.socket_path,
        "--wsgi-file", str(APPS_DIR / "burst_app.py"),
        "--need-app", "--strict", "--die-on-term",
        "--worker-reload-mercy", "5", "--reload-mercy", "5",
        "--disable-logging",
    ]
    try:
        server.start(command)
        server.wait_until(
            lambda: f"spawned uWSGI worker {WORKERS} " in server.log()
            and os.path.exists(server.socket_path),
            f"uWSGI to spawn worker {WORKERS}",
        )
        _check_burst(server, cache, "first question for uWSGI", loaded_in_master=True)
    finally:
        server.stop()

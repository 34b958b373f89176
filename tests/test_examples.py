"""End-to-end tests of the examples: real gunicorn, real process pools, real asyncio.

Every model call made by any process is one line in a count file (the examples'
fake model appends with O_APPEND), so "the model ran once per distinct prompt on
the whole host" is checked by reading a file, not process memory. Waits poll a
condition against a deadline; every process is stopped by pid and every segment
is unlinked in ``finally`` blocks or fixtures.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import pytest

from shmcache import SharedMemoryCache

pytestmark = pytest.mark.skipif(os.name != "posix", reason="shmcache and gunicorn need POSIX")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
GUNICORN_CONF = EXAMPLES / "gunicorn_app" / "gunicorn.conf.py"
BURST = EXAMPLES / "gunicorn_app" / "burst.py"
BATCH = EXAMPLES / "batch.py"

MODEL_DELAY_S = 0.08  # long enough to matter, short enough for a 2-core CI box
STARTUP_TIMEOUT_S = 30.0
HTTP_TIMEOUT_S = 10.0
GUNICORN_WORKERS = 3

T = TypeVar("T")


# --- helpers -------------------------------------------------------------------


def wait_for(what: str, check: Callable[[], T | None], timeout_s: float = STARTUP_TIMEOUT_S) -> T:
    """Poll ``check`` until it returns something other than None; fail at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.02)  # poll interval, not synchronisation: the check decides


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def calls_in(calls_file: Path) -> Counter[str]:
    """Prompt -> number of real model calls recorded in ``calls_file`` (all processes)."""
    if not calls_file.exists():
        return Counter()
    lines = calls_file.read_text().splitlines()
    return Counter(json.loads(line.split("\t", 1)[1]) for line in lines)


def unlink_segment(name: str, directory: Path) -> None:
    """Remove the segment ``name`` in ``directory``, if the test left one."""
    if not directory.exists():
        return
    cache = SharedMemoryCache(name, directory=str(directory))
    cache.unlink()
    cache.close()


def stop_process(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM) -> None:
    """Signal ``proc`` by pid and wait for it, with SIGKILL as the bounded fallback."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def run_example(script: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run an example script with a bounded wait; fail with its output if it fails."""
    proc = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A private temp directory, removed (with any segment in it) after the test."""
    with tempfile.TemporaryDirectory(prefix="shmcache-examples-") as d:
        yield Path(d)


@pytest.fixture
def cache_name(workdir: Path) -> Iterator[str]:
    """A unique cache name whose segment (under ``workdir/cache``) is unlinked afterwards."""
    name = f"ex-{uuid.uuid4().hex[:12]}"
    yield name
    unlink_segment(name, workdir / "cache")


@pytest.fixture
def examples() -> Iterator[dict[str, ModuleType]]:
    """Import ``fake_model``, ``async_demo`` and ``batch`` from examples/, then forget them."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        import async_demo
        import batch
        import fake_model

        yield {"fake_model": fake_model, "async_demo": async_demo, "batch": batch}
    finally:
        sys.path.remove(str(EXAMPLES))
        for mod in ("async_demo", "batch", "fake_model"):
            sys.modules.pop(mod, None)


def expected_answer(prompt: str) -> str:
    """What the examples' fake model answers (kept independent of its code)."""
    return f"[slow-echo-1] {prompt[::-1]} ({len(prompt.split())} words)"


# --- gunicorn ------------------------------------------------------------------


class Gunicorn:
    """A gunicorn master serving examples/gunicorn_app, started and stopped by pid."""

    def __init__(
        self, workdir: Path, name: str, deploy: str, delay_s: float = MODEL_DELAY_S
    ) -> None:
        self.port = free_port()
        self.log_path = workdir / f"gunicorn-{deploy}.log"
        self.calls_file = workdir / "model-calls.log"
        env = {
            **os.environ,
            "SHMCACHE_DEMO_NAME": name,
            "SHMCACHE_DEMO_DIR": str(workdir / "cache"),
            "SHMCACHE_DEMO_DELAY": str(delay_s),
            "SHMCACHE_DEMO_CALLS_FILE": str(self.calls_file),
            "SHMCACHE_DEMO_PORT": str(self.port),
            "SHMCACHE_DEMO_DEPLOY": deploy,
        }
        cmd = [sys.executable, "-m", "gunicorn", "-c", str(GUNICORN_CONF)]
        cmd += ["--workers", str(GUNICORN_WORKERS)]
        if deploy == "preload":
            cmd.append("--preload")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir
            )

    def log(self) -> str:
        """Gunicorn's combined output so far."""
        return self.log_path.read_text(errors="replace")

    def booted_pids(self) -> list[int]:
        """Worker pids in boot order, from gunicorn's own log."""
        return [int(p) for p in re.findall(r"Booting worker with pid: (\d+)", self.log())]

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, Any]:
        """One HTTP request; returns ``(status, decoded JSON body)``."""
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            data=body,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def ask(self, prompt: str) -> dict[str, Any]:
        """POST /ask, checking the status and that the answer is the right one."""
        status, body = self.request("POST", "/ask", json.dumps({"prompt": prompt}).encode())
        assert status == 200, body
        assert body["answer"] == expected_answer(prompt), (prompt, body)
        return dict(body)

    def _healthy(self) -> bool | None:
        if self.proc.poll() is not None:
            pytest.fail(f"gunicorn exited with {self.proc.returncode}:\n{self.log()}")
        if len(self.booted_pids()) < GUNICORN_WORKERS:
            return None
        try:
            status, _ = self.request("GET", "/healthz")
        except OSError:  # not listening yet
            return None
        return True if status == 200 else None

    def wait_ready(self) -> None:
        wait_for("gunicorn to answer /healthz", self._healthy)

    def stop(self) -> None:
        """SIGTERM the master (graceful: workers close their caches), bounded wait."""
        stop_process(self.proc)
        if self.proc.returncode == -signal.SIGKILL:
            # The master did not shut down in time: its workers may be orphans.
            for pid in self.booted_pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def gunicorn(workdir: Path, cache_name: str) -> Iterator[Callable[..., Gunicorn]]:
    """Factory starting gunicorn with a deployment style; every server is stopped after."""
    servers: list[Gunicorn] = []

    def start(deploy: str, delay_s: float = MODEL_DELAY_S) -> Gunicorn:
        server = Gunicorn(workdir, cache_name, deploy, delay_s)
        servers.append(server)
        server.wait_ready()
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.stop()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("deploy", ["preload", "post_fork"])
def test_gunicorn_workers_share_one_cache(
    gunicorn: Callable[..., Gunicorn], workdir: Path, cache_name: str, deploy: str
) -> None:
    server = gunicorn(deploy)
    prompts = [f"{deploy} question {i}: why share a cache?" for i in range(6)]

    # Random order, 8 at a time, no first wave: a prompt's first request and its
    # repeats are in flight in different workers at once.
    requests = prompts * 9
    random.Random(0).shuffle(requests)
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(server.ask, requests))
    pids = {a["worker_pid"] for a in answers}

    # Exactly one model call per distinct prompt, whichever worker served it.
    assert calls_in(server.calls_file) == Counter(prompts)
    assert len(pids) > 1, f"only worker {pids} answered"
    assert pids <= set(server.booted_pids())

    status, body = server.request("POST", "/ask", b"not json")
    assert (status, body) == (400, {"error": "body is not JSON"})

    server.stop()  # graceful: each worker closes its cache, flushing its counts
    assert server.proc.returncode == 0, server.log()
    with SharedMemoryCache(cache_name, directory=str(workdir / "cache")) as cache:
        stats = cache.stats()
    hits = len(requests) - len(prompts)
    assert (stats.hits, stats.misses, stats.entries) == (hits, len(prompts), len(prompts))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("deploy", ["preload", "post_fork"])
def test_gunicorn_respawned_worker_keeps_the_cache(
    gunicorn: Callable[..., Gunicorn], deploy: str
) -> None:
    server = gunicorn(deploy)
    prompts = [f"{deploy} respawn question {i}" for i in range(4)]
    victim = [server.ask(p)["worker_pid"] for p in prompts][-1]
    workers = set(server.booted_pids())
    assert victim in workers and len(workers) == GUNICORN_WORKERS

    os.kill(victim, signal.SIGKILL)

    survivors = workers - {victim}
    served: set[int] = set()

    def survivor_and_replacement_answered() -> bool | None:
        with ThreadPoolExecutor(max_workers=6) as pool:
            answers = list(pool.map(server.ask, prompts + prompts[:2]))
        served.update(a["worker_pid"] for a in answers)
        replacements = set(server.booted_pids()) - workers
        assert victim not in served
        assert served <= survivors | replacements, (served, survivors, replacements)
        return True if served & survivors and served & replacements else None

    # Every request is answered meanwhile: by the other workers, and by the one
    # gunicorn forks in place of the killed worker once it is up.
    wait_for("a survivor and the replacement worker to answer", survivor_and_replacement_answered)

    # Everything after the first round was a hit, the new worker's answers included.
    assert calls_in(server.calls_file) == Counter(prompts)

    # A prompt first asked after the respawn, 12 times at once, still costs one
    # call on the whole host.
    fresh = f"{deploy} asked after the respawn"
    with ThreadPoolExecutor(max_workers=6) as pool:
        list(pool.map(server.ask, [fresh] * 12))
    assert calls_in(server.calls_file) == Counter([*prompts, fresh])


# The burst test's model call lasts this long: the window in which the burst's
# other requests reach the other workers and wait for it (they arrive within
# milliseconds). A slower box only turns waits into plain hits: the model-call
# count does not depend on it. tests/test_coalesce_servers.py holds the call
# until the waits are seen, for the strict version.
BURST_DELAY_S = 0.5
BURST_REQUESTS = 12


@pytest.mark.timeout(60)
@pytest.mark.parametrize("deploy", ["preload", "post_fork"])
def test_gunicorn_burst_makes_one_model_call(
    gunicorn: Callable[..., Gunicorn], deploy: str
) -> None:
    """examples/gunicorn_app/burst.py: N concurrent identical first requests, 1 model call."""
    server = gunicorn(deploy, delay_s=BURST_DELAY_S)
    prompt = f"{deploy}: a question nobody asked before"
    url = f"http://127.0.0.1:{server.port}"
    args = ["--url", url, "--requests", str(BURST_REQUESTS), "--prompt", prompt]
    proc = run_example(BURST, *args, "--json")
    result = json.loads(proc.stdout.strip().splitlines()[-1])

    assert result["errors"] == [], result
    assert result["answered"] == BURST_REQUESTS
    assert result["answers"] == [expected_answer(prompt)]
    assert calls_in(server.calls_file) == Counter({prompt: 1})
    # What /stats shows: one miss (the model call), every other request a hit,
    # and the requests that reached other workers during the call coalesced.
    delta = result["delta"]
    assert (delta["misses"], delta["hits"], delta["updates"]) == (1, BURST_REQUESTS - 1, 1)
    assert delta["coalesced"] >= 1, result
    assert delta["coalesce_timeouts"] == delta["uncoalesced"] == 0, result
    assert len(result["workers"]) > 1, f"only worker {result['workers']} answered"
    assert set(result["workers"]) <= set(server.booted_pids())

    # The plain-text summary of a second burst of the same (now cached) prompt.
    proc = run_example(BURST, *args)
    assert "misses +0 (= model calls), hits +12, coalesced +0" in proc.stdout, proc.stdout
    assert calls_in(server.calls_file) == Counter({prompt: 1})


@pytest.mark.timeout(60)
@pytest.mark.parametrize("deploy", ["preload", "post_fork"])
def test_gunicorn_metrics_show_the_host_totals(
    gunicorn: Callable[..., Gunicorn], deploy: str, cache_name: str
) -> None:
    """GET /metrics (ShmCacheCollector) from any worker: the totals of all workers."""
    from prometheus_client.parser import text_string_to_metric_families

    server = gunicorn(deploy)
    prompts = [f"{deploy} metrics question {i}" for i in range(4)]
    requests = prompts * 5
    with ThreadPoolExecutor(max_workers=6) as pool:
        answered_by = {a["worker_pid"] for a in pool.map(server.ask, requests)}
    assert len(answered_by) > 1, f"only worker {answered_by} answered"
    assert calls_in(server.calls_file) == Counter(prompts)

    def scrape(_: int) -> tuple[int, dict[str, float]]:
        url = f"http://127.0.0.1:{server.port}/metrics"
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain; version=")
            pid, text = int(resp.headers["X-Worker-Pid"]), resp.read().decode()
        values = {
            sample.name: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.labels == {"cache": cache_name, "kind": "llm"}
        }
        return pid, values

    by_worker: dict[int, dict[str, float]] = {}

    def scraped_from_several_workers() -> bool | None:
        with ThreadPoolExecutor(max_workers=GUNICORN_WORKERS * 2) as pool:
            by_worker.update(pool.map(scrape, range(GUNICORN_WORKERS * 2)))
        return True if len(by_worker) >= 2 else None

    wait_for("/metrics answers from two workers", scraped_from_several_workers, 15.0)
    assert set(by_worker) <= set(server.booted_pids())
    # Every worker reports the same numbers: each request counted once, host-wide
    # (one miss per distinct prompt, every other request a hit).
    hits = len(requests) - len(prompts)
    for values in by_worker.values():
        assert values["shmcache_hits_total"] == hits, by_worker
        assert values["shmcache_misses_total"] == len(prompts), by_worker
        assert values["shmcache_updates_total"] == len(prompts), by_worker
        assert values["shmcache_entries"] == len(prompts), by_worker
    # ... and the same as the cache's own stats() (any worker's /stats).
    status, stats = server.request("GET", "/stats")
    assert status == 200
    some_worker = next(iter(by_worker.values()))
    for field, value in stats.items():
        if field == "worker_pid":
            continue
        name = f"shmcache_{field}" if field in ("entries", "used_bytes", "size_bytes") \
            else f"shmcache_{field}_total"
        assert some_worker[name] == value, (field, some_worker, stats)


# --- batch.py ------------------------------------------------------------------


def last_json_line(proc: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_batch_order_is_random_with_no_waves(examples: dict[str, ModuleType]) -> None:
    """batch.py sends every distinct prompt at least once, shuffled: no first wave."""
    make_prompts = examples["batch"].make_prompts
    for total, distinct in [(100, 10), (30, 5)]:  # the defaults, the test below
        prompts = make_prompts(total, distinct, 0)
        assert len(prompts) == total and len(set(prompts)) == distinct
        assert make_prompts(total, distinct, 0) == prompts  # seeded
        assert make_prompts(total, distinct, 1) != prompts
        first_seen = [prompts.index(p) for p in set(prompts)]
        first_repeat = next(i for i, p in enumerate(prompts) if prompts.index(p) < i)
        # A repeat goes out before some prompt's first occurrence.
        assert first_repeat < max(first_seen), "first occurrences come first"


@pytest.mark.timeout(90)
def test_batch_summary(workdir: Path, cache_name: str) -> None:
    cache_dir = workdir / "cache"
    sizes = ["--workers", "3", "--prompts", "30", "--distinct", "5", "--delay", "0.05"]
    where = ["--name", cache_name, "--directory", str(cache_dir)]

    proc = run_example(BATCH, *sizes, *where, "--json")
    summary = last_json_line(proc)
    assert summary["requests"] == 30
    assert summary["uncached"]["model_calls"] == 30
    # Random order, no waves: still one model call per distinct prompt.
    assert summary["model_calls"] == summary["cached"]["model_calls"] == summary["distinct"] == 5
    assert summary["cache_hits"] == 30 - 5 == summary["stats"]["hits"]
    assert summary["coalesced"] == summary["stats"]["coalesced"] <= summary["cache_hits"]
    assert summary["stats"]["misses"] == 5 and summary["stats"]["entries"] == 5
    assert summary["stats"]["coalesce_timeouts"] == summary["stats"]["uncoalesced"] == 0
    assert summary["wrong_answers"] == 0
    assert "30/30" in proc.stderr  # the progress bar ran to the end
    assert not Path(summary["segment"]).exists(), "segment not unlinked without --keep"

    # --keep leaves a warm segment; the next run finds every answer in it.
    proc = run_example(BATCH, *sizes, *where, "--keep")
    assert "with shmcache" in proc.stdout and "cache hits" in proc.stdout
    assert "coalesced" in proc.stdout and "random order" in proc.stdout
    assert Path(summary["segment"]).exists(), "segment removed despite --keep"

    proc = run_example(BATCH, *sizes, *where, "--json")
    summary = last_json_line(proc)
    assert summary["model_calls"] == 0
    assert summary["cache_hits"] == 30
    assert summary["coalesced"] == 0
    assert not Path(summary["segment"]).exists()


@pytest.mark.timeout(90)
def test_batch_one_prompt_burst(workdir: Path, cache_name: str) -> None:
    """Every worker's first request is the same new prompt: one model call in all."""
    workers, total = 4, 12
    sizes = ["--workers", str(workers), "--prompts", str(total), "--distinct", "1"]
    where = ["--name", cache_name, "--directory", str(workdir / "cache")]
    # The model call lasts 0.3 s; the pool's workers start together (they meet at
    # a barrier), so the others ask within milliseconds and wait for it.
    summary = last_json_line(run_example(BATCH, *sizes, "--delay", "0.3", *where, "--json"))
    assert summary["uncached"]["model_calls"] == total
    assert summary["model_calls"] == 1
    assert summary["cache_hits"] == total - 1
    assert 1 <= summary["coalesced"] <= workers - 1, summary
    assert summary["wrong_answers"] == 0


# --- asyncio -------------------------------------------------------------------

# A plain asyncio program: answers each stdin line (a JSON list of prompts) with
# one concurrent round of ``ainvoke`` calls, so the test can run two of them in
# lockstep without sleeping.
ASYNC_CHILD = """
import asyncio, dataclasses, json, os, sys

from async_demo import ask_round
from fake_model import SlowEchoChatModel
from langchain_core.globals import set_llm_cache
from shmcache import SharedMemoryCache


async def main() -> None:
    cache = SharedMemoryCache(sys.argv[1], directory=sys.argv[2])
    set_llm_cache(cache)
    model = SlowEchoChatModel()
    # Off the record: first calls import things lazily and would look like a stall.
    quiet = model.model_copy(update={"delay_s": 0.0, "calls_file": None})
    await ask_round(quiet, [f"warm-up {os.getpid()}"])
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:  # no heartbeat runs while we wait for the next round
        result = await ask_round(model, json.loads(line))
        print(json.dumps(dataclasses.asdict(result)), flush=True)
    cache.close()


asyncio.run(main())
"""

ASYNC_DELAY_S = 0.2
# A loop blocked by one model call would stall for ASYNC_DELAY_S; a free loop
# stalls for milliseconds. Half the delay leaves room for a noisy 2-core box.
MAX_STALL_S = ASYNC_DELAY_S / 2


def read_json_line(proc: subprocess.Popen[str], timeout_s: float = STARTUP_TIMEOUT_S) -> Any:
    """Read one JSON line from ``proc``'s stdout within ``timeout_s``."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    if not ready:
        pytest.fail(f"no output from pid {proc.pid} within {timeout_s:.0f} s")
    line = proc.stdout.readline()
    if not line:
        pytest.fail(f"pid {proc.pid} exited with {proc.wait(timeout=5)}")
    return json.loads(line)


def run_rounds(procs: list[subprocess.Popen[str]], rounds: list[list[str]]) -> list[Any]:
    """Send each process its round at once, then collect every result."""
    for proc, prompts in zip(procs, rounds, strict=True):
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(prompts) + "\n")
        proc.stdin.flush()
    return [read_json_line(proc) for proc in procs]


def check_round(result: dict[str, Any], prompts: list[str]) -> None:
    assert result["answers"] == [expected_answer(p) for p in prompts]
    assert result["max_gap_s"] < MAX_STALL_S, result


@pytest.mark.timeout(60)
def test_two_asyncio_processes_share_the_cache(workdir: Path, cache_name: str) -> None:
    calls_file = workdir / "model-calls.log"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(EXAMPLES), os.environ.get("PYTHONPATH")])),
        "SHMCACHE_DEMO_DELAY": str(ASYNC_DELAY_S),
        "SHMCACHE_DEMO_CALLS_FILE": str(calls_file),
    }
    procs: list[subprocess.Popen[str]] = []
    try:
        for i in range(2):
            with open(workdir / f"async-{i}.err", "w") as err:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-c", ASYNC_CHILD, cache_name, str(workdir / "cache")],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        stderr=err,
                        text=True,
                        env=env,
                    )
                )
        assert [read_json_line(p) for p in procs] == [{"ready": True}] * 2

        mine = [f"process A question {i}" for i in range(8)]
        theirs = [f"process B question {i}" for i in range(8)]

        # Round 1: both processes at once, each asking its own distinct prompts
        # concurrently -- every request is a miss awaiting the model.
        a1, b1 = run_rounds(procs, [mine, theirs])
        check_round(a1, mine)
        check_round(b1, theirs)
        # The heartbeat really ran while the model calls were in flight.
        assert a1["ticks"] > 0 and b1["ticks"] > 0
        assert a1["started"] < b1["started"] + b1["seconds"]
        assert b1["started"] < a1["started"] + a1["seconds"], "the rounds did not overlap"
        assert calls_in(calls_file) == Counter(mine + theirs)

        # Round 2: each asks the other's prompts (and its own again): all hits.
        a_prompts, b_prompts = theirs + mine + theirs, mine + theirs + mine
        a2, b2 = run_rounds(procs, [a_prompts, b_prompts])
        check_round(a2, a_prompts)
        check_round(b2, b_prompts)
        assert calls_in(calls_file) == Counter(mine + theirs)

        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.close()  # EOF: the child closes its cache and exits
            assert proc.wait(timeout=15) == 0
    finally:
        for proc in procs:
            stop_process(proc, signal.SIGKILL)

    with SharedMemoryCache(cache_name, directory=str(workdir / "cache")) as cache:
        assert cache.stats().hits == len(a_prompts) + len(b_prompts)


def test_heartbeat_catches_a_blocked_loop(examples: dict[str, ModuleType]) -> None:
    """The stall assertion above has teeth: a model that blocks the loop fails it."""
    fake_model, async_demo = examples["fake_model"], examples["async_demo"]

    class BlockingModel(fake_model.SlowEchoChatModel):  # type: ignore[name-defined,misc]
        async def _agenerate(self, messages: Any, *args: Any, **kwargs: Any) -> Any:
            return self._generate(messages)  # time.sleep() on the event loop

    delay = 0.05
    prompts = ["blocking 1", "blocking 2", "blocking 3"]
    blocking = BlockingModel(delay_s=delay, calls_file=None, cache=False)
    result = asyncio.run(async_demo.ask_round(blocking, prompts))
    assert result.answers == [expected_answer(p) for p in prompts]
    assert result.max_gap_s >= delay

    awaiting = fake_model.SlowEchoChatModel(delay_s=delay, calls_file=None, cache=False)
    asyncio.run(async_demo.ask_round(awaiting, ["warm-up"]))  # lazy imports off the record
    result = asyncio.run(async_demo.ask_round(awaiting, prompts))
    assert result.max_gap_s < delay


# --- langgraph_app/ ---------------------------------------------------------------

LANGGRAPH_CONF = EXAMPLES / "langgraph_app" / "gunicorn.conf.py"


@pytest.mark.timeout(90)
def test_langgraph_app_runs_the_cached_node_once_for_all_workers(workdir: Path) -> None:
    """examples/langgraph_app: gunicorn workers share one SharedMemoryNodeCache, so the
    graph's expensive node runs once per question on the host, whichever worker asks."""
    from _robust_helpers import UnixHTTPConnection

    from shmcache.langgraph import SharedMemoryNodeCache

    name = f"lg-{uuid.uuid4().hex[:12]}"
    segments = workdir / "cache"
    sock = workdir / "lg.sock"
    runs_file = workdir / "node-runs.log"
    log_path = workdir / "gunicorn-langgraph.log"
    env = {
        **os.environ,
        "SHMCACHE_LG_NAME": name,
        "SHMCACHE_LG_DIR": str(segments),
        "SHMCACHE_LG_DELAY": "0.3",
        "SHMCACHE_LG_RUNS_FILE": str(runs_file),
        "SHMCACHE_LG_BIND": f"unix:{sock}",
    }
    cmd = [sys.executable, "-m", "gunicorn", "-c", str(LANGGRAPH_CONF)]
    cmd += ["--workers", str(GUNICORN_WORKERS)]

    def log() -> str:
        return log_path.read_text(errors="replace")

    def booted() -> set[int]:
        return {int(p) for p in re.findall(r"Booting worker with pid: (\d+)", log())}

    def runs() -> list[str]:
        """The question of every run of the cached node, any worker, in order."""
        lines = runs_file.read_text().splitlines() if runs_file.exists() else []
        return [json.loads(line.split("\t", 1)[1]) for line in lines]

    def request(method: str, path: str, body: bytes | None = None) -> tuple[int, Any]:
        conn = UnixHTTPConnection(str(sock), HTTP_TIMEOUT_S)
        try:
            conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        finally:
            conn.close()

    def ask(question: str) -> dict[str, Any]:
        status, body = request("POST", "/ask", json.dumps({"question": question}).encode())
        assert status == 200, body
        return dict(body)

    def healthy() -> bool | None:
        if proc.poll() is not None:
            pytest.fail(f"gunicorn exited with {proc.returncode}:\n{log()}")
        if len(booted()) < GUNICORN_WORKERS:
            return None
        try:
            status, _ = request("GET", "/healthz")
        except OSError:  # not listening yet
            return None
        return True if status == 200 else None

    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    try:
        wait_for("the langgraph app to answer /healthz", healthy)
        workers = booted()
        question = "Why share a node cache between workers?"

        first = ask(question)
        assert first["cached_nodes"] == []
        assert runs() == [question]
        assert "Why share a node cache between workers?" in first["answer"]

        # Then the same question, 6 at a time, until at least two workers answered.
        answers = [first]

        def two_workers_answered() -> bool | None:
            with ThreadPoolExecutor(max_workers=6) as pool:
                answers.extend(pool.map(ask, [question] * 6))
            return True if len({a["worker_pid"] for a in answers}) >= 2 else None

        wait_for("two workers to answer", two_workers_answered)
        pids = {a["worker_pid"] for a in answers}
        assert pids <= workers, (pids, workers)
        assert {a["answer"] for a in answers} == {first["answer"]}
        assert all(a["cached_nodes"] == ["research"] for a in answers[1:]), answers
        assert runs() == [question], "the cached node ran again"
        # Extra whitespace is normalised before the cached node: the same input.
        assert ask("  Why share a node   cache between workers? ")["cached_nodes"] == ["research"]

        other = ask("A different question")
        assert other["cached_nodes"] == []
        assert runs() == [question, "A different question"]

        status, body = request("POST", "/clear")
        assert (status, body["cleared"]) == (200, True)
        assert ask(question)["cached_nodes"] == []
        assert runs() == [question, "A different question", question]

        status, body = request("POST", "/ask", b"not json")
        assert (status, body) == (400, {"error": "body is not JSON"})

        stop_process(proc)  # graceful: each worker closes its cache, flushing its counts
        assert proc.returncode == 0, log()
        cache = SharedMemoryNodeCache(name, directory=str(segments))
        try:
            stats = cache.stats()
        finally:
            cache.close()
        # One lookup per request: a miss for each of the 3 runs, a hit for the rest.
        assert (stats.misses, stats.hits) == (3, len(answers)), stats
    finally:
        stop_process(proc)
        if proc.returncode == -signal.SIGKILL:  # the master did not stop: kill orphans
            for pid in booted():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if segments.exists():
            leftover = SharedMemoryNodeCache(name, directory=str(segments))
            leftover.unlink()
            leftover.close()
            assert not Path(leftover.path).exists()


# --- embeddings ------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_embeddings_demo_embeds_each_text_once_across_the_pool(workdir: Path) -> None:
    """embeddings_demo.py: with per-process stores the pool embeds ``workers x texts``;
    with one SharedMemoryByteStore each text once, and a kept segment serves a rerun."""
    demo = EXAMPLES / "embeddings_demo.py"
    workers, texts = 3, 20
    args = ["--workers", str(workers), "--texts", str(texts), "--delay", "0.005",
            "--name", "embeddings-test", "--directory", str(workdir / "cache")]

    summary = last_json_line(run_example(demo, *args, "--json"))
    plain, shared = summary["in_memory"], summary["shared"]
    assert (plain["shard_pass_embedded"], plain["full_pass_embedded"]) == (
        texts, (workers - 1) * texts,
    )
    assert plain["embedded"] == workers * texts
    assert (shared["shard_pass_embedded"], shared["full_pass_embedded"]) == (texts, 0)
    assert shared["embedded"] == texts
    assert plain["workers_seen"] == shared["workers_seen"] == workers
    assert summary["saved"] == (workers - 1) * texts
    assert summary["identical_vectors"] is True
    assert summary["this_run"] == {"hits": workers * texts, "misses": texts, "updates": texts}
    assert summary["stats"]["entries"] == texts and summary["stats"]["evictions"] == 0
    segment = Path(summary["segment"])
    assert segment.name.startswith("embeddings-test.v") and segment.name.endswith(".bytes.shm")
    assert not segment.exists(), "segment not unlinked without --keep"

    proc = run_example(demo, *args, "--keep")
    assert f"{workers * texts} texts embedded" in proc.stdout
    assert "each text embedded once across the pool" in proc.stdout
    assert "identical in every worker, both runs: yes" in proc.stdout
    assert segment.exists(), "segment removed despite --keep"

    # A rerun finds every vector in the kept segment (and removes it).
    summary = last_json_line(run_example(demo, *args, "--json"))
    assert summary["shared"]["embedded"] == 0
    assert summary["in_memory"]["embedded"] == workers * texts
    assert summary["this_run"] == {"hits": (workers + 1) * texts, "misses": 0, "updates": 0}
    assert summary["identical_vectors"] is True
    assert not segment.exists()

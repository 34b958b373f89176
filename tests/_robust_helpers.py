"""Helpers for the robustness tests (issue 8): child programs, values that carry
their own identity, fd counting, and the one place that touches shmcache internals.

Functions here also run in other processes: ``spawn`` pool workers and programs
started with :func:`run_helper` import this module by name (``tests/`` is put on
their ``PYTHONPATH`` by :func:`child_env`).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import pickle
import re
import resource
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

from langchain_core.outputs import Generation

import shmcache
from shmcache import SharedMemoryCache

TESTS_DIR: Final = Path(__file__).resolve().parent
APPS_DIR: Final = TESTS_DIR / "apps"
LLM: Final = "llm"
MIB: Final = 1 << 20
# The line shmcache logs when it repairs what a dead writer left half-done.
DIED_MID_WRITE: Final = "died mid-write"


# -- processes ---------------------------------------------------------------------


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child program: it imports the very shmcache this test
    process imported (an exported tree on PYTHONPATH included) and these helpers."""
    env = dict(os.environ)
    package_root = str(Path(shmcache.__file__).resolve().parent.parent)
    parts = [str(TESTS_DIR), package_root]
    if env.get("PYTHONPATH"):
        parts.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env["PYTHONUNBUFFERED"] = "1"
    for tracing in ("LANGCHAIN_TRACING_V2", "LANGCHAIN_TRACING", "LANGSMITH_TRACING"):
        env.pop(tracing, None)
    env.update(extra)
    return env


_HELPER_MAIN: Final = (
    "import json, sys\n"
    "import _robust_helpers as h\n"
    "result = getattr(h, sys.argv[1])(*json.loads(sys.argv[2]))\n"
    "print('RESULT ' + json.dumps(result), flush=True)\n"
)


def helper_command(function: str, *args: Any) -> list[str]:
    """The argv that runs ``_robust_helpers.function(*args)`` in a new interpreter."""
    return [sys.executable, "-c", _HELPER_MAIN, function, json.dumps(args)]


def parse_result(stdout: str) -> Any:
    """The JSON a helper program printed on its ``RESULT`` line."""
    for line in reversed(stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise AssertionError(f"no RESULT line in the child's output:\n{stdout[-2000:]}")


def run_helper(function: str, *args: Any, timeout_s: float = 60.0) -> tuple[Any, str]:
    """Run ``_robust_helpers.function(*args)`` in a new interpreter.

    Returns:
        ``(its JSON result, its stderr)``.

    Raises:
        AssertionError: it failed (its stderr is in the message).
    """
    done = subprocess.run(
        helper_command(function, *args), env=child_env(), capture_output=True, text=True,
        timeout=timeout_s, check=False,
    )
    assert done.returncode == 0, (
        f"{function} exited {done.returncode}:\n{done.stderr[-4000:]}"
    )
    return parse_result(done.stdout), done.stderr


def read_line(stream: Any, deadline_s: float) -> bytes:
    """Read one line from a child's pipe (a binary, unbuffered stream) by a deadline."""
    fd = stream.fileno()
    end = time.monotonic() + deadline_s
    data = b""
    while not data.endswith(b"\n"):
        remaining = end - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no line from the child within {deadline_s} s (got {data!r})")
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            chunk = os.read(fd, 1)
            if not chunk:
                raise AssertionError(f"the child closed its output (got {data!r})")
            data += chunk
    return data


def kill_process_group(process: subprocess.Popen[Any]) -> None:
    """SIGKILL a child started with ``start_new_session=True`` and all its children."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


def log_lines(text: str, needle: str) -> list[str]:
    """The lines of a log that contain ``needle``."""
    return [line for line in text.splitlines() if needle in line]


def open_fds() -> int:
    """How many file descriptors this process has open."""
    return len(os.listdir("/proc/self/fd")) - 1  # minus the one listdir used


def quiet_logging_to_stderr() -> None:
    """WARNINGs of the ``shmcache`` logger go to stderr, with the pid (child side)."""
    import logging

    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr,
        format="%(process)d %(name)s %(levelname)s %(message)s",
    )


# -- values that name their key --------------------------------------------------

_VALUE_RE: Final = re.compile(r"key=(\d+) writer=(\d+) seq=(\d+) n=(\d+) \|")


def value_text(key: int, writer: int, seq: int, max_len: int = 3000) -> str:
    """A value naming its key, writer and sequence number, padded deterministically
    to a length that varies (so the log wraps and records of many sizes are written)."""
    length = (key * 7919 + seq * 104729 + writer * 31) % max_len
    head = f"key={key} writer={writer} seq={seq} n={length} |"
    seed = hashlib.blake2b(head.encode(), digest_size=16).hexdigest()
    return head + (seed * (length // len(seed) + 1))[:length]


def value_of(key: int, writer: int, seq: int) -> list[Generation]:
    """The generations stored for ``key`` by ``writer`` at ``seq``."""
    return [Generation(text=value_text(key, writer, seq))]


def prompt_of(key: int) -> str:
    """The prompt under which key number ``key`` is stored."""
    return f"prompt {key}"


def value_problem(key: int, found: object) -> str | None:
    """None if ``found`` is exactly a value some writer stored for ``key``; else why not.

    A miss (None) is not a problem.
    """
    if found is None:
        return None
    if not (isinstance(found, list) and len(found) == 1 and type(found[0]) is Generation):
        return f"key {key}: unexpected shape {found!r:.80}"
    text = found[0].text
    match = _VALUE_RE.match(text)
    if match is None:
        return f"key {key}: not a test value {text[:60]!r}"
    got_key, writer, seq, _ = (int(g) for g in match.groups())
    if got_key != key:
        return f"key {key}: got the value of key {got_key}"
    if text != value_text(got_key, writer, seq):
        return f"key {key}: torn value ({len(text)} chars)"
    return None


# -- the one place that uses shmcache internals -------------------------------------


@contextlib.contextmanager
def hold_writer_lock(cache: SharedMemoryCache, timeout_s: float = 10.0) -> Iterator[None]:
    """Hold ``cache``'s writer lock (for the calling thread) inside the ``with``.

    Internal API: the only function of the robustness tests that touches a private
    attribute, so a rewrite of ``_lock.py`` changes this one place.
    """
    lock = cache._lock
    assert lock.acquire(timeout_s), "could not take the writer lock to hold it"
    try:
        yield
    finally:
        lock.release()


# -- spawn pool workers (dropped instances) ---------------------------------------------


def lower_fd_limit(limit: int) -> None:
    """Pool initializer: lower this process's soft RLIMIT_NOFILE to ``limit``."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))


def pool_task(cache: SharedMemoryCache, task: int, keys: int) -> dict[str, Any]:
    """One task of the documented spawn pattern: the cache arrives pickled by name.

    Looks a key up, stores it when missing, and reports what it saw and how many
    fds this worker has open.
    """
    key = task % keys
    found = cache.lookup(prompt_of(key), LLM)
    problem = value_problem(key, found)
    if found is None:
        cache.update(prompt_of(key), LLM, value_of(key, 0, task))
    return {"pid": os.getpid(), "task": task, "problem": problem, "fds": open_fds()}


# -- programs run in a fresh interpreter (run_helper) -------------------------------------


def drop_instances(blob_hex: str, warmup: int, dropped: int) -> dict[str, Any]:
    """Unpickle the cache ``warmup + dropped`` times in a process where it is not
    open, use each instance once and drop it; report fds before, peak and after."""
    import gc

    blob = bytes.fromhex(blob_hex)

    def use_and_drop(i: int) -> None:
        cache = pickle.loads(blob)
        key = i % 20
        if cache.lookup(prompt_of(key), LLM) is None:
            cache.update(prompt_of(key), LLM, value_of(key, 1, i))

    for i in range(warmup):
        use_and_drop(i)
    before = open_fds()
    peak = before
    for i in range(dropped):
        use_and_drop(i)
        peak = max(peak, open_fds())
    gc.collect()
    return {"before": before, "peak": peak, "after": open_fds(), "dropped": dropped}


def drop_then_update_and_wait(blob_hex: str, dropped: int) -> None:
    """Drop ``dropped`` instances, then update through a new one and report whether
    it was stored (stats before/after); stay alive, holding what the process holds,
    until a line arrives on stdin."""
    blob = bytes.fromhex(blob_hex)
    for i in range(dropped):
        cache = pickle.loads(blob)
        cache.lookup(prompt_of(i % 20), LLM)
        del cache
    cache = pickle.loads(blob)
    before = cache.stats()
    cache.update("after drops", LLM, [Generation(text="stored after drops")])
    after = cache.stats()
    result = {
        "skipped": after.skipped - before.skipped,
        "updates": after.updates - before.updates,
        "found": cache.lookup("after drops", LLM) == [Generation(text="stored after drops")],
    }
    print("RESULT " + json.dumps(result), flush=True)
    sys.stdin.readline()


def hit_and_vanish(name: str, directory: str, prompt: str, hits: int) -> None:
    """Open the cache by name, look ``prompt`` up ``hits`` times, then end with
    ``os._exit`` (no close, no atexit), as multiprocessing children do."""
    cache = SharedMemoryCache(name, directory=directory, size_bytes=MIB)
    good = sum(cache.lookup(prompt, LLM) is not None for _ in range(hits))
    print("RESULT " + json.dumps({"hits": good}), flush=True)
    os._exit(0)


# -- exact statistics -------------------------------------------------------------


def hit_n_times(cache: SharedMemoryCache, prompt: str, expected: str, hits: int,
                misses: int) -> int:
    """Look ``prompt`` up ``hits`` times (each must return ``expected``) and absent
    keys ``misses`` times; return how many lookups gave what was expected.

    The absent keys are this call's own (a random token), so no other process's
    miss of the same key is ever waited for (request coalescing).
    """
    good = sum(cache.lookup(prompt, LLM) == [Generation(text=expected)] for _ in range(hits))
    token = os.urandom(8).hex()
    good += sum(cache.lookup(f"absent {token} {i}", LLM) is None for i in range(misses))
    return good


# The cache a fork Pool's workers inherit (set in the parent before the pool starts).
INHERITED: list[SharedMemoryCache] = []


def hit_inherited_or_passed(cache: SharedMemoryCache, use_inherited: bool, prompt: str,
                            expected: str, hits: int, misses: int) -> int:
    """Pool task: :func:`hit_n_times` on the inherited instance, or on ``cache``
    (which arrived pickled)."""
    target = INHERITED[0] if use_inherited else cache
    return hit_n_times(target, prompt, expected, hits, misses)


def fork_child_counts(cache: SharedMemoryCache, prompt: str, expected: str, hits: int,
                      misses: int) -> None:
    """multiprocessing target: exit 0 only if every lookup gave what was expected."""
    good = hit_n_times(cache, prompt, expected, hits, misses)
    sys.exit(0 if good == hits + misses else 3)


def keep_updating(cache: SharedMemoryCache, prompt: str, text: str, stop: Any) -> None:
    """multiprocessing target: store ``text`` under ``prompt`` again and again (the
    writer lock is busy, and the entry stays the newest, never evicted) until
    ``stop`` (an Event) is set."""
    value = [Generation(text=text)]
    while not stop.is_set():
        cache.update(prompt, LLM, value)


def namespace_container(name: str, directory: str, burn: int, hits: int, misses: int,
                        prompt: str, expected: str) -> None:
    """Run as pid 1 of a new pid namespace (``unshare --pid --fork``), like a
    container's init: use up ``burn`` pids, then fork the app process, which opens
    the cache, says READY, waits for a line on stdin, counts its lookups and exits
    normally.  Exits with the app's exit code."""
    for _ in range(burn):  # so the app's pid differs from the other namespaces' apps
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
    app = os.fork()
    if app == 0:
        code = 1
        try:
            cache = SharedMemoryCache(name, directory=directory, size_bytes=MIB)
            print(f"READY {os.getpid()}", flush=True)
            sys.stdin.readline()
            good = hit_n_times(cache, prompt, expected, hits, misses)
            cache.close()
            print("RESULT " + json.dumps({"good": good, "pid": os.getpid()}), flush=True)
            code = 0
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            os._exit(code)
    _, status = os.waitpid(app, 0)
    sys.exit(os.waitstatus_to_exitcode(status))


# -- after the interrupts: another process must get the lock --------------------------


def second_process_uses(name: str, directory: str, lock_timeout: float) -> dict[str, Any]:
    """Update, look up, clear and check from a fresh process; report what happened."""
    quiet_logging_to_stderr()
    from shmcache import LockTimeoutError

    cache = SharedMemoryCache(name, directory=directory, size_bytes=MIB,
                              lock_timeout=lock_timeout)
    result: dict[str, Any] = {}
    before = cache.stats()
    cache.update("second process", LLM, [Generation(text="from the second process")])
    after = cache.stats()
    result["skipped"] = after.skipped - before.skipped
    result["updates"] = after.updates - before.updates
    result["found"] = (
        cache.lookup("second process", LLM) == [Generation(text="from the second process")]
    )
    try:
        cache.clear()
        result["clear"] = "ok"
    except LockTimeoutError as exc:
        result["clear"] = f"LockTimeoutError: {exc}"
    result["after_clear"] = cache.lookup("second process", LLM) is None
    try:
        result["check"] = cache.check()
    except LockTimeoutError as exc:
        result["check"] = [f"LockTimeoutError: {exc}"]
    cache.close()
    return result


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a unix socket: no TCP port to pick, nothing reachable from outside."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._socket_path)
        self.sock = sock

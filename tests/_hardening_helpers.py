"""Helpers shared by the hardening tests: forked children with deadlines, raw
segment access, and value bookkeeping.

Every child is a real process (``os.fork``); the parent waits for it with an
explicit deadline and kills it in ``finally`` so no test leaves a straggler.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

from langchain_core.outputs import Generation

from shmcache._keys import key_digest, split_digest

HEAD_WORD_BYTE: Final = 32 * 8  # byte offset of the log head word in the header
TAIL_WORD_BYTE: Final = 33 * 8
BUSY_WORD_BYTE: Final = 34 * 8


class ChildTimeout(AssertionError):
    """A child process did not finish before its deadline (a hang)."""


def fork_child(target: Callable[[], int]) -> int:
    """Fork a child that runs ``target`` and ``os._exit``s with its return value."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            code = target()
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 99
        finally:
            os._exit(code)
    return pid


@contextlib.contextmanager
def forked(target: Callable[[], int]) -> Iterator[int]:
    """Fork a child that runs ``target`` and ``os._exit``s with its return value.

    Yields the child's pid; on exit the child is SIGKILLed if still alive and
    reaped, so a failing test never leaves it behind.
    """
    pid = fork_child(target)
    try:
        yield pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def wait_exit(pid: int, deadline_s: float) -> int:
    """Wait for ``pid`` to end within ``deadline_s`` seconds; return its wait status.

    Raises:
        ChildTimeout: the child is still running at the deadline.
    """
    end = time.monotonic() + deadline_s
    delay = 0.001
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() >= end:
            raise ChildTimeout(f"child {pid} still running after {deadline_s} s")
        time.sleep(delay)  # polling with a deadline, not synchronisation by sleep
        delay = min(delay * 2, 0.02)


def run_in_child(target: Callable[[], int], deadline_s: float) -> int:
    """Run ``target`` in a forked child; return its exit code (raise on hang)."""
    with forked(target) as pid:
        status = wait_exit(pid, deadline_s)
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def poke(path: str, offset: int, data: bytes) -> None:
    """Overwrite bytes of a segment file from outside the cache (``pwrite``)."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def peek(path: str, offset: int, length: int) -> bytes:
    """Read bytes of a segment file from outside the cache (``pread``)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


# -- more process helpers -------------------------------------------------------


def wait_stopped(pid: int, deadline_s: float) -> None:
    """Wait until ``pid`` is stopped by a signal (e.g. it SIGSTOPped itself).

    Raises:
        ChildTimeout: it is not stopped by the deadline.
        AssertionError: it exited instead.
    """
    end = time.monotonic() + deadline_s
    delay = 0.001
    while True:
        done, status = os.waitpid(pid, os.WNOHANG | os.WUNTRACED)
        if done:
            assert os.WIFSTOPPED(status), f"child {pid} ended (status {status}) instead of stopping"
            return
        if time.monotonic() >= end:
            raise ChildTimeout(f"child {pid} did not stop within {deadline_s} s")
        time.sleep(delay)  # polling with a deadline
        delay = min(delay * 2, 0.02)


def exit_code(status: int) -> int:
    """Turn a wait status into an exit code, negative for a signal (like Popen)."""
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def kill_at_step(step: int, sig: int = signal.SIGKILL, after: int = 0) -> Callable[[int], None]:
    """A ``shmcache._arena.step_hook`` that sends ``sig`` to this process at ``step``.

    Args:
        step: The write step (1..7) to stop at.
        sig: SIGKILL to crash, SIGSTOP to freeze holding the writer lock.
        after: How many writes to let through first.
    """
    remaining = [after]

    def hook(k: int) -> None:
        if k != step:
            return
        if remaining[0] > 0:
            remaining[0] -= 1
            return
        os.kill(os.getpid(), sig)

    return hook


class Children:
    """Forked children of one test: all are SIGKILLed and reaped on exit."""

    def __init__(self) -> None:
        self.pids: set[int] = set()

    def spawn(self, target: Callable[[], int]) -> int:
        """Fork a child that runs ``target`` and ``os._exit``s with its return value."""
        pid = fork_child(target)
        self.pids.add(pid)
        return pid

    def poll(self, pid: int) -> int | None:
        """Return the child's wait status if it ended (and forget it), else None."""
        done, status = os.waitpid(pid, os.WNOHANG)
        if not done:
            return None
        self.pids.discard(pid)
        return status

    def wait(self, pid: int, deadline_s: float) -> int:
        """Wait for the child to end; return its exit code (negative: signal)."""
        status = wait_exit(pid, deadline_s)
        self.pids.discard(pid)
        return exit_code(status)

    def kill(self, pid: int, deadline_s: float = 10.0) -> int:
        """SIGKILL the child and reap it; return its exit code."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        return self.wait(pid, deadline_s)

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc: object) -> None:
        for pid in list(self.pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self.pids.clear()


def read_json_from(fd: int, deadline_s: float) -> Any:
    """Read one JSON document a child writes to pipe ``fd`` before closing it."""
    end = time.monotonic() + deadline_s
    chunks: list[bytes] = []
    while True:
        remaining = end - time.monotonic()
        if remaining <= 0:
            raise ChildTimeout(f"no result on fd {fd} within {deadline_s} s")
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            return json.loads(b"".join(chunks))
        chunks.append(chunk)


def write_json_to(fd: int, value: Any) -> None:
    """Write ``value`` as JSON to pipe ``fd`` and close it (child side)."""
    data = json.dumps(value).encode()
    while data:
        data = data[os.write(fd, data) :]
    os.close(fd)


def cli(*args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run the ``shmcache`` command (``python -m shmcache``) as a real subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "shmcache", *args],
        capture_output=True, text=True, timeout=timeout_s, check=False,
    )


def open_fds() -> int:
    """How many file descriptors this process has open."""
    return len(os.listdir("/proc/self/fd")) - 1  # minus the one listdir used


def word(path: str, byte_offset: int) -> int:
    """Read one little-endian u64 of a segment file."""
    return int.from_bytes(peek(path, byte_offset, 8), "little")


# -- values that carry their own identity ---------------------------------------

_TEXT_RE: Final = re.compile(r"k=(\d+) w=(\d+) s=(\d+) n=(\d+) \|")


def _padding(head: str, length: int) -> str:
    seed = hashlib.blake2b(head.encode(), digest_size=16).hexdigest()
    return (seed * (length // len(seed) + 1))[:length]


def make_text(key: int, writer: int, stamp: int, max_len: int = 4000) -> str:
    """A value that names its key, writer, stamp and length, padded deterministically.

    Any torn, shifted, truncated or foreign value fails :func:`parse_text`; the
    padding length varies with ``(key, stamp)`` so records of many sizes are written.
    """
    length = (key * 7919 + stamp * 104729) % max_len
    head = f"k={key} w={writer} s={stamp} n={length} |"
    return head + _padding(head, length)


def parse_text(text: str) -> tuple[int, int, int]:
    """Return ``(key, writer, stamp)`` of a :func:`make_text` value.

    Raises:
        ValueError: the text is not exactly what :func:`make_text` makes.
    """
    match = _TEXT_RE.match(text)
    if match is None:
        raise ValueError(f"not a test value: {text[:60]!r}")
    key, writer, stamp, length = (int(g) for g in match.groups())
    if text[match.end() :] != _padding(match.group(0), length):
        raise ValueError(f"torn value: {text[:60]!r} ({len(text)} chars)")
    return key, writer, stamp


def prompt_of(key: int) -> str:
    """The prompt under which key number ``key`` is stored."""
    return f"prompt {key}"


def generations(key: int, writer: int, stamp: int, max_len: int = 4000) -> list[Generation]:
    """The value written for ``key`` by ``writer`` at ``stamp``."""
    return [Generation(text=make_text(key, writer, stamp, max_len))]


@dataclass
class Verifier:
    """Checks every lookup: None, or exactly a value written for that key, never older
    than one this verifier already saw for the key (stamps only grow per key)."""

    verified: int = 0
    misses: int = 0
    wrong: list[str] = field(default_factory=list)
    last: dict[int, int] = field(default_factory=dict)

    def check(self, key: int, found: object) -> None:
        """Check one lookup result for ``key``."""
        if found is None:
            self.misses += 1
            return
        if not (isinstance(found, list) and len(found) == 1 and type(found[0]) is Generation):
            self.wrong.append(f"key {key}: unexpected shape {found!r:.80}")
            return
        try:
            got_key, _, stamp = parse_text(found[0].text)
        except ValueError as exc:
            self.wrong.append(f"key {key}: {exc}")
            return
        if got_key != key:
            self.wrong.append(f"key {key}: got the value of key {got_key}")
            return
        if stamp < self.last.get(key, -1):
            self.wrong.append(f"key {key}: stale stamp {stamp} after {self.last[key]}")
            return
        self.last[key] = stamp
        self.verified += 1

    def summary(self) -> dict[str, Any]:
        """Counts as a JSON-able dict (the first few wrong values included)."""
        return {"verified": self.verified, "misses": self.misses,
                "wrong": len(self.wrong), "examples": self.wrong[:5]}


def bucket_index(prompt: str, llm_string: str, n_buckets: int) -> int:
    """The index bucket an entry falls in."""
    return split_digest(key_digest(prompt, llm_string))[1] % n_buckets


def same_bucket_prompts(
    prompt: str, llm_string: str, n_buckets: int, count: int, prefix: str = "same-bucket"
) -> list[str]:
    """Find ``count`` prompts whose entries fall in the same index bucket as ``prompt``."""
    target = bucket_index(prompt, llm_string, n_buckets)
    found: list[str] = []
    i = 0
    while len(found) < count:
        candidate = f"{prefix} {i}"
        if bucket_index(candidate, llm_string, n_buckets) == target:
            found.append(candidate)
        i += 1
    return found

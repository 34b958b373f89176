"""The caches under test: how each is set up (parent side) and opened (worker side).

A peer is prepared once in the parent process (temp dir, server, shared segment name)
by :func:`prepared`, which yields a picklable :class:`PeerSpec`.  Each worker process
then calls :func:`open_cache` on that spec to attach its own handle, exactly as
independent application processes would.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final

from langchain_core.caches import BaseCache

SHMCACHE: Final = "shmcache"
INMEMORY: Final = "inmemory"
PICKLE: Final = "pickle"
LMDB_FAST: Final = "lmdb-nosync"
WARP: Final = "warp-cache"

PEER_IDS: Final = (
    SHMCACHE,
    INMEMORY,
    PICKLE,
    LMDB_FAST,
    WARP,
    "lmdb",
    "diskcache",
    "manager-dict",
    "sqlite",
    "redis",
)
"""Every peer, in table order. ``--only`` takes a comma-separated subset of these."""

LABELS: Final = {
    SHMCACHE: "shmcache",
    INMEMORY: "InMemoryCache (in-process floor)",
    PICKLE: "pickle.loads/dumps (reference)",
    LMDB_FAST: "lmdb sync=False",
    WARP: "warp-cache (shared)",
    "lmdb": "lmdb (default)",
    "diskcache": "diskcache.Cache",
    "manager-dict": "Manager().dict()",
    "sqlite": "SQLiteCache",
    "redis": "RedisCache",
}

NOTES: Final = {
    SHMCACHE: (
        "SharedMemoryCache in a private dir under /dev/shm; size_bytes fits the data "
        "(mixed load: the data plus every rewrite of the phase)"
    ),
    INMEMORY: "langchain_core; returns the stored objects themselves; same process only",
    PICKLE: "hit = pickle.loads of the value's bytes, update = pickle.dumps; no storage",
    LMDB_FAST: (
        "sync=False, metasync=False, writemap=True, map_async=True, readahead=False; "
        "zero-copy reads (buffers=True)"
    ),
    WARP: "SharedCachedFunction get/set, fixed slots in /dev/shm, SIEVE eviction",
    "lmdb": "py-lmdb defaults (fsync at each commit)",
    "diskcache": "defaults (SQLite WAL, synchronous=NORMAL), least-recently-stored",
    "manager-dict": "DictProxy: one socket round trip to the manager process per op",
    "sqlite": "langchain_community SQLiteCache (+ PRAGMA journal_mode=WAL, synchronous=NORMAL)",
    "redis": "langchain_community RedisCache, redis-server on 127.0.0.1, no persistence",
}


class Skip(Exception):
    """The peer cannot run here; the message says why (shown in the table)."""


@dataclass(frozen=True)
class PeerSpec:
    """Everything a worker needs to attach to a prepared peer (picklable).

    Attributes:
        peer_id: One of :data:`PEER_IDS`.
        kind: ``"shared"`` (cross-process store), ``"inprocess"`` or ``"pickle"``.
        options: Backend-specific arguments for :func:`open_cache`.
    """

    peer_id: str
    kind: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """Human-readable name for tables and plots."""
        return LABELS[self.peer_id]


@dataclass
class Capacity:
    """What a peer must hold without evicting (sizes its arena, map or slots).

    Attributes:
        entries: Number of entries that will be written.
        value_bytes: Largest pickled value, in bytes.
        shm_size_bytes: Explicit shmcache ``size_bytes`` (``None``: estimated).
        rewrites: Updates of already stored keys the phase may make. A store that
            appends every write (shmcache's log) needs room for them as well, or
            they evict stored entries; stores that rewrite in place ignore it.
    """

    entries: int
    value_bytes: int
    shm_size_bytes: int | None = None
    rewrites: int = 0


MIB: Final = 1024 * 1024


def shm_root() -> str:
    """Directory for shared-memory files: ``/dev/shm`` when present, else the temp dir."""
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def estimate_shm_size(cap: Capacity, bytes_per_entry: float | None = None) -> int:
    """A shmcache ``size_bytes`` that holds ``cap.entries`` and ``cap.rewrites`` records
    with headroom, MiB-rounded (nothing is evicted while they are written)."""
    per_entry = bytes_per_entry or (cap.value_bytes * 1.2 + 1024)
    size = int(per_entry * (cap.entries + cap.rewrites) * 1.5) + 8 * MIB
    return max(4 * MIB, -(-size // MIB) * MIB)


@contextlib.contextmanager
def prepared(peer_id: str, cap: Capacity, tmp_root: str) -> Iterator[PeerSpec]:
    """Set up ``peer_id`` for ``cap``; tear everything down (files, servers) on exit.

    Raises:
        Skip: The peer cannot run on this machine (missing binary or package).
    """
    if peer_id == SHMCACHE:
        with _shmcache(cap) as spec:
            yield spec
    elif peer_id == INMEMORY:
        yield PeerSpec(peer_id, "inprocess")
    elif peer_id == PICKLE:
        yield PeerSpec(peer_id, "pickle")
    elif peer_id in ("lmdb", LMDB_FAST):
        path = tempfile.mkdtemp(prefix=f"{peer_id}-", dir=tmp_root)
        map_size = max(256 * MIB, cap.entries * (cap.value_bytes + 512) * 3)
        yield PeerSpec(peer_id, "shared", {"path": path, "map_size": map_size})
    elif peer_id == "diskcache":
        path = tempfile.mkdtemp(prefix="diskcache-", dir=tmp_root)
        yield PeerSpec(peer_id, "shared", {"directory": path})
    elif peer_id == "sqlite":
        path = os.path.join(tempfile.mkdtemp(prefix="sqlite-", dir=tmp_root), "cache.db")
        yield PeerSpec(peer_id, "shared", {"path": path})
    elif peer_id == WARP:
        with _warp(cap) as spec:
            yield spec
    elif peer_id == "manager-dict":
        with _manager() as spec:
            yield spec
    elif peer_id == "redis":
        with _redis() as spec:
            yield spec
    else:
        raise ValueError(f"unknown peer {peer_id!r}; choose from {', '.join(PEER_IDS)}")


@contextlib.contextmanager
def _shmcache(cap: Capacity) -> Iterator[PeerSpec]:
    try:
        import shmcache  # noqa: F401
    except ImportError as exc:
        raise Skip(f"shmcache is not importable yet ({exc})") from exc
    directory = tempfile.mkdtemp(prefix="shmcache-bench-", dir=shm_root())
    size = cap.shm_size_bytes or estimate_shm_size(cap)
    try:
        yield PeerSpec(
            SHMCACHE,
            "shared",
            {"name": f"bench-{uuid.uuid4().hex[:12]}", "directory": directory, "size": size},
        )
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def _warp(cap: Capacity) -> Iterator[PeerSpec]:
    from benchmarks.adapters import remove_files, warp_cache_files

    try:
        import warp_cache  # noqa: F401
    except ImportError as exc:
        raise Skip(f"warp-cache is not installed ({exc})") from exc
    name = f"shmcache-bench-warp-{uuid.uuid4().hex[:12]}"
    # The value is the pickled bytes; leave room for warp-cache's own framing.
    max_value = cap.value_bytes + 256
    try:
        yield PeerSpec(
            WARP,
            "shared",
            {"shm_name": name, "max_entries": int(cap.entries * 1.25) + 64, "max_value": max_value},
        )
    finally:
        remove_files(warp_cache_files(name))


@contextlib.contextmanager
def _manager() -> Iterator[PeerSpec]:
    import multiprocessing

    manager = multiprocessing.get_context("spawn").Manager()
    try:
        mapping = manager.dict()
        server = getattr(manager, "_process", None)
        yield PeerSpec(
            "manager-dict",
            "shared",
            {"proxy": mapping, "server_pid": server.pid if server else None},
        )
    finally:
        manager.shutdown()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def _redis() -> Iterator[PeerSpec]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise Skip("redis-server binary not found (apt-get install -y redis-server)")
    try:
        import redis
    except ImportError as exc:
        raise Skip(f"redis client package missing ({exc})") from exc
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="shmcache-bench-redis-")
    proc = subprocess.Popen(
        [
            binary,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", workdir,
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--loglevel", "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        client = redis.Redis(host="127.0.0.1", port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError as exc:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise Skip(f"redis-server did not start on port {port}") from exc
                time.sleep(0.05)
        version = client.info("server").get("redis_version", "?")
        client.close()
        yield PeerSpec(
            "redis",
            "shared",
            {"port": port, "server_pid": proc.pid, "server_version": str(version)},
        )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def open_cache(spec: PeerSpec) -> BaseCache:
    """Attach this process to the prepared peer (called inside worker processes)."""
    opts = spec.options
    pid = spec.peer_id
    if pid == SHMCACHE:
        from shmcache import SharedMemoryCache

        return SharedMemoryCache(opts["name"], size_bytes=opts["size"], directory=opts["directory"])
    if pid == INMEMORY:
        from langchain_core.caches import InMemoryCache

        return InMemoryCache()
    if pid in ("lmdb", LMDB_FAST):
        from benchmarks.adapters import LmdbAdapter

        return LmdbAdapter(opts["path"], opts["map_size"], fast=pid == LMDB_FAST)
    if pid == "diskcache":
        from benchmarks.adapters import DiskCacheAdapter

        return DiskCacheAdapter(opts["directory"])
    if pid == "manager-dict":
        from benchmarks.adapters import MappingAdapter

        return MappingAdapter(opts["proxy"])
    if pid == WARP:
        from benchmarks.adapters import WarpCacheAdapter

        return WarpCacheAdapter(opts["shm_name"], opts["max_entries"], opts["max_value"])
    if pid == "sqlite":
        return _open_sqlite(opts["path"])
    if pid == "redis":
        import redis
        from langchain_community.cache import RedisCache

        return RedisCache(redis.Redis(host="127.0.0.1", port=opts["port"]))
    raise ValueError(f"peer {pid!r} has no cache to open")


def _open_sqlite(path: str) -> BaseCache:
    """``SQLiteCache`` with SQLite's documented fast-and-safe pragmas on every connection."""
    from langchain_community.cache import SQLiteCache
    from sqlalchemy import event

    cache = SQLiteCache(database_path=path)

    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    event.listen(cache.engine, "connect", _pragmas)
    cache.engine.dispose()  # drop the connection made before the listener existed
    return cache


def close_cache(cache: BaseCache) -> None:
    """Detach this process's handle, whatever the backend."""
    if hasattr(cache, "close"):
        cache.close()
    elif hasattr(cache, "redis"):
        cache.redis.close()
    elif hasattr(cache, "engine"):
        cache.engine.dispose()


def server_peak_rss_mb(spec: PeerSpec) -> float | None:
    """Peak RSS (VmHWM) of the peer's server process, if it has one, in MB."""
    pid = spec.options.get("server_pid")
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None

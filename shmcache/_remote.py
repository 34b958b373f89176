"""The remote tier: one Redis shared by every host, behind each host's segment.

The segment stays the host's tier (a hit never leaves the host); Redis is the tier
all hosts share.  This module holds every piece of Redis logic: checking ``remote=``,
the client (made with ``remote_timeout`` on every socket operation and no retries),
the circuit breaker, the key layout and value envelope, the clear log that carries
``clear()`` to every host, and the Redis leases that make coalescing span hosts.
``cache.py`` decides *when* to call it; nothing here touches the segment except
through the callbacks of :class:`RemoteHost`.

Keys (``P`` = ``shmcache:<name>:``; the part in braces is the Redis Cluster hash tag)::

    P e:<llm_string hash, 16 hex>:{<key digest, 64 hex>}   value envelope (below)
    P l:{<key digest>}                 lease: token of the computing caller
    P clears:{<name>}                  hash: epoch, seq
    P clearlog:{<name>}                list: "<seq> <ms> a", "<seq> <ms> l<llm hash>"

An entry and its lease share a hash tag (one Lua script may touch both, also on a
cluster); the llm_string hash in the entry key lets ``clear(llm_string=)`` find its
entries with ``SCAN MATCH``; the two clear keys share the cache's own tag.

Value envelope (little-endian)::

    b"SHR1" | crc32 of the rest (u32) | expires (f64 unix s, 0 = never) |
    llm_string hash (u64) | key digest (32 bytes) | codec payload (_codec.py)

A value is accepted only if its magic, crc, full key digest and llm_string hash
match the key looked up, and its payload passes ``decode_generations`` — the
decoder that shape-checks everything it reads (never the trusted ``decode_verified``
of the local hit path).  Garbage, another key's record, a damaged record or a
value of the wrong Redis type is a miss.  Only then are the same payload bytes
stored in the segment.  (Whoever may *write* the Redis keys can still plant a
well-formed answer for a key: Redis is trusted like the model provider; it is
never a way to run code.)

Clears reach every host through the clear log.  ``clear()`` deletes the remote
entries at once (``SCAN`` + ``UNLINK``), then appends an event with a Lua script
(``HINCRBY seq``, ``RPUSH``, ``LTRIM`` to the last ``CLEAR_LOG_MAX``, atomically).
Each process runs one daemon *poller* thread; the pollers of a host take turns
through a header word (``W_NEXT_POLL_NS``) so the host reads ``HMGET epoch seq``
about every ``POLL_INTERVAL_S``, and applies the events it has not applied yet
under the segment's writer lock, recording ``(epoch, seq)`` in the header: each
clear is applied once per host, within about ``POLL_INTERVAL_S`` of the clear and
never on the lookup path.  The epoch (random, made with the log) tells a log that
Redis lost (restart without persistence, eviction) from the one the host followed;
a host that meets a log it never followed applies the events newer than its
segment; a gap (the log was trimmed past the host) is a full clear — over-clearing
a cache is safe, missing a clear is not.

Coalescing across hosts: the computing caller of a key (the local lease holder)
also takes ``SET P l:{digest} <token> NX PX coalesce_timeout``; callers on other
hosts that find it wait, polling the entry and the lease with back-off, within their
own ``coalesce_timeout``; the update that stores the value deletes the lease in the
same script (only if it still holds the caller's token).  A dead host's lease
lapses with its ``PX``; a dead process's lease is deleted at once by its host-mates,
who can prove it dead (the token names the host and the owner slot).

Failures: every socket operation has ``remote_timeout`` (connect included) and
redis-py's retries are off, so one remote call takes at most about that long.  A
call that fails for the connection's sake opens the breaker: every remote call is
then skipped at no cost until the poller thread's probe (with a back-off from
``BREAKER_MIN_S`` doubling to ``BREAKER_MAX_S``) gets an answer again.  One
WARNING is logged per outage and one INFO when it ends.  Nothing here raises into
a cache call.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import hashlib
import logging
import math
import os
import random
import secrets
import socket
import struct
import threading
import time
import weakref
import zlib
from collections.abc import Callable, Iterable
from typing import Any, Final, NamedTuple, Protocol, TypeVar

from . import _arena
from ._errors import InvalidArgumentError, ShmCacheError

__all__ = [
    "FAILED",
    "MISS",
    "TAKEN",
    "ClearPlan",
    "Fetched",
    "RemoteDependencyError",
    "RemoteHost",
    "RemoteSpec",
    "RemoteTier",
    "parse_remote",
    "plan_clears",
]

logger = logging.getLogger("shmcache")

# -- segment header words ----------------------------------------------------------
# The arena's shared words end at W_LOCK_PID (42, growing upwards); its owner table
# starts at word 128.  The remote tier takes the top of that gap (ask the arena's
# owner before moving them).  Every one is written under the writer lock except
# W_NEXT_POLL_NS (a hint: a lost race means one extra poll).
W_REMOTE_HITS: Final = _arena.W_REMOTE_HITS  # header words reserved in _arena.py
W_REMOTE_MISSES: Final = _arena.W_REMOTE_MISSES
W_REMOTE_ERRORS: Final = _arena.W_REMOTE_ERRORS
W_CLEAR_EPOCH: Final = _arena.W_CLEAR_EPOCH  # the clear log this host follows (0: none)
W_CLEAR_SEQ: Final = _arena.W_CLEAR_SEQ  # the last event of that log applied on this host
W_LOCAL_CLEARS: Final = _arena.W_LOCAL_CLEARS  # bumped by every clear (fills check it)
W_NEXT_POLL_NS: Final = _arena.W_NEXT_POLL_NS  # CLOCK_MONOTONIC ns of the next poll
REMOTE_WORDS: Final = (W_REMOTE_HITS, W_REMOTE_MISSES, W_REMOTE_ERRORS)
# Indices into the pending-count triple.
HIT: Final = 0
MISS_COUNT: Final = 1
ERROR: Final = 2

# -- timing ---------------------------------------------------------------------------
DEFAULT_REMOTE_TIMEOUT_S: Final = 0.05
# Each host reads the clear log this often: clears reach every host within about
# this long (plus one poller tick), well inside the 1 s the contract allows.
POLL_INTERVAL_S: Final = 0.5
_POLL_TICK_S: Final = 0.1
BREAKER_MIN_S: Final = 0.25
BREAKER_MAX_S: Final = 4.0
# Waiting for another host's computing caller: first pause, longest pause.
LEASE_POLL_FIRST_S: Final = 0.001
LEASE_POLL_MAX_S: Final = 0.02
# How often a waiter proves a same-host lease holder alive.
LEASE_LIVENESS_EVERY_S: Final = 0.1
# Redis caps PX at 2**63 ms; a lease never needs more than this (30 days).
_MAX_LEASE_MS: Final = 30 * 86400 * 1000
CLEAR_LOG_MAX: Final = 64
_SCAN_COUNT: Final = 1000
_UNLINK_BATCH: Final = 500
# A host that meets a clear log it never followed applies the events newer than its
# segment, less this margin for clocks that disagree between hosts.
_CLOCK_MARGIN_MS: Final = 5000
_WARNING_INTERVAL_S: Final = 10.0
_ASYNC_WORKERS: Final = 8
_JOIN_S: Final = 1.0

# -- the value envelope -------------------------------------------------------------------
_MAGIC: Final = b"SHR1"
_ENVELOPE: Final = struct.Struct("<4sIdQ32s")
_ENVELOPE_TAIL: Final = struct.Struct("<dQ32s")
ENVELOPE_BYTES: Final = _ENVELOPE.size

_SCHEMES: Final = ("redis://", "rediss://", "unix://")
_EXTRA_HINT: Final = "install it with `pip install 'shmcache[redis]'`"

# Connection settings copied from a client the caller passed; everything else
# (timeouts, retries, health checks, response decoding) is ours.  A setting left out
# falls back to redis-py's default, which for TLS is the stricter one.
_COPIED_SETTINGS: Final = frozenset({
    "host", "port", "db", "username", "password", "path", "credential_provider",
    "client_name", "protocol", "socket_keepalive", "socket_keepalive_options",
    "lib_name", "lib_version", "driver_info", "redis_connect_func",
    "ssl_keyfile", "ssl_certfile", "ssl_cert_reqs", "ssl_ca_certs", "ssl_ca_data",
    "ssl_ca_path", "ssl_check_hostname", "ssl_password", "ssl_min_version",
    "ssl_ciphers", "ssl_include_verify_flags", "ssl_exclude_verify_flags",
    "ssl_validate_ocsp", "ssl_validate_ocsp_stapled", "ssl_ocsp_context",
    "ssl_ocsp_expected_cert",
})

_CLEAR_SCRIPT: Final = """
local e = redis.call('HGET', KEYS[1], 'epoch')
if not e then
  e = ARGV[1]
  redis.call('HSET', KEYS[1], 'epoch', e)
end
local n = redis.call('HINCRBY', KEYS[1], 'seq', 1)
redis.call('RPUSH', KEYS[2], n .. ' ' .. ARGV[2])
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[3]), -1)
return {e, n}
"""
_PUT_SCRIPT: Final = """
if ARGV[2] == '0' then
  redis.call('SET', KEYS[1], ARGV[1])
else
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
if ARGV[3] ~= '' and redis.call('GET', KEYS[2]) == ARGV[3] then
  redis.call('DEL', KEYS[2])
end
return 1
"""
# The value, else the lease: atomic, so no update can slip between a miss and the
# lease (that would cost a second model call).  pcall: a planted key of another type
# reads as "no value".
_FETCH_OR_LEASE_SCRIPT: Final = """
local v = redis.pcall('GET', KEYS[1])
if type(v) == 'string' then
  return {1, v, redis.call('PTTL', KEYS[1])}
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {2}
end
return {3, redis.pcall('GET', KEYS[2])}
"""
_RELEASE_SCRIPT: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

_T = TypeVar("_T")


class RemoteDependencyError(ShmCacheError, ImportError):
    """``remote=`` was given but the ``redis`` package is not installed."""


class _Outcome:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


FAILED: Final = _Outcome("FAILED")  # the call failed, or was skipped (breaker open)
MISS: Final = _Outcome("MISS")  # Redis answered: nothing usable for this key
TAKEN: Final = _Outcome("TAKEN")  # the lease is ours


class Fetched(NamedTuple):
    """A remote value that passed the envelope checks (not yet decoded)."""

    payload: bytes
    expires: float  # unix seconds, 0 = never


class ClearEvent(NamedTuple):
    """A clear appended to the clear log: its log's epoch and its sequence number."""

    epoch: int
    seq: int


class ClearPlan(NamedTuple):
    """What a host must do to catch up with the clear log."""

    expected: tuple[int, int]  # the host's (epoch, seq) the plan was made from
    epoch: int
    seq: int
    full: bool
    llm_hashes: frozenset[int]

    @property
    def clears_anything(self) -> bool:
        return self.full or bool(self.llm_hashes)


class RemoteHost(Protocol):
    """What the poller thread needs from the cache that owns the tier."""

    @property
    def closed(self) -> bool: ...

    def _remote_state(self) -> tuple[int, int]:
        """The host's (epoch, seq) of the clear log (lock-free read)."""
        ...

    def _remote_poll_due(self, interval_ns: int) -> bool:
        """Is it this process's turn to read the clear log? (claims the turn)"""
        ...

    def _remote_apply(self, plan: ClearPlan) -> None:
        """Apply ``plan`` to the segment under the writer lock."""
        ...

    def _remote_own_clear(self, event: ClearEvent) -> None:
        """Record a clear this process made (and applied locally) as applied."""
        ...

    def _remote_flush(self) -> None:
        """Publish pending remote counts (without waiting for the lock)."""
        ...


# -- remote= ----------------------------------------------------------------------------


def _import_redis() -> Any:
    try:
        import redis
    except ImportError as exc:
        raise RemoteDependencyError(
            f"remote= needs the redis package (redis-py), which is not installed; {_EXTRA_HINT}"
        ) from exc
    return redis


class RemoteSpec:
    """What ``remote=`` named, checked at open (no connection is made then).

    Attributes:
        kind: ``"url"``, ``"client"`` or ``"cluster"``.
        url: The URL (kind ``"url"``).
        client: The caller's client (other kinds); a sibling client with our
            timeouts is made from its settings.
    """

    def __init__(self, kind: str, url: str | None = None, client: Any = None) -> None:
        self.kind = kind
        self.url = url
        self.client = client

    @property
    def identity(self) -> object:
        """Hashable: two caches with the same identity talk to the same Redis."""
        return self.url if self.kind == "url" else (self.kind, id(self.client))

    def describe(self) -> str:
        """Where the remote is, for log messages (never the password)."""
        if self.kind == "url":
            assert self.url is not None
            scheme, _, rest = self.url.partition("://")
            location = rest.rpartition("@")[2].split("?")[0]
            return f"{scheme}://{location}"
        if self.kind == "cluster":
            nodes = [f"{n.host}:{n.port}" for n in self.client.get_nodes()[:3]]
            return f"Redis Cluster {','.join(nodes)}"
        kwargs = getattr(self.client.connection_pool, "connection_kwargs", {})
        if "path" in kwargs:
            return f"unix://{kwargs['path']}"
        return f"redis client {kwargs.get('host', '?')}:{kwargs.get('port', '?')}"

    def reduce(self) -> object:
        """What a pickle of the cache carries for this remote."""
        if self.kind == "url":
            return self.url
        raise TypeError(
            "a SharedMemoryCache opened with remote=<redis client> cannot be pickled "
            "(a client holds sockets and locks); open it with remote=<URL> to send it to "
            "other processes"
        )


def parse_remote(remote: object) -> RemoteSpec | None:
    """Check ``remote=``; returns None for None.

    Raises:
        TypeError: not None, a str or a redis-py (sync) client.
        InvalidArgumentError: a str that is not a ``redis://``, ``rediss://`` or
            ``unix://`` URL, or a URL redis-py cannot parse.
        RemoteDependencyError: the redis package is missing.
    """
    if remote is None:
        return None
    if isinstance(remote, str):
        if not remote.startswith(_SCHEMES):
            shown = remote.split("://")[0] + "://" if "://" in remote else repr(remote[:40])
            raise InvalidArgumentError(
                f"remote must be a redis://, rediss:// or unix:// URL, got {shown}; "
                "e.g. remote='redis://127.0.0.1:6379/0'"
            )
        redis = _import_redis()
        try:
            kwargs = redis.connection.parse_url(remote)
            connection_class = kwargs.pop("connection_class", redis.Connection)
            connection_class(**_our_settings(kwargs, 1.0))  # checks names; no connection
        except (TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"remote URL is not valid: {exc}") from None
        return RemoteSpec("url", url=remote)
    redis = _redis_or_none()
    if redis is not None:
        if isinstance(remote, redis.Redis):
            return RemoteSpec("client", client=remote)
        if isinstance(remote, redis.cluster.RedisCluster):
            return RemoteSpec("cluster", client=remote)
        module = type(remote).__module__
        if module.startswith("redis.asyncio"):
            raise TypeError(
                "remote must be a sync redis.Redis or RedisCluster client, not "
                f"{module}.{type(remote).__name__}: the cache runs its async calls itself"
            )
    raise TypeError(
        "remote must be None, a redis://, rediss:// or unix:// URL or a redis.Redis "
        f"client, not {type(remote).__name__}"
    )


def _redis_or_none() -> Any:
    try:
        import redis
        import redis.cluster
    except ImportError:
        return None
    return redis


def _our_settings(kwargs: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return {
        **kwargs,
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "retry": Retry(NoBackoff(), 0),
        "retry_on_error": [],
        "health_check_interval": 0,
        "decode_responses": False,
    }


def _make_client(spec: RemoteSpec, timeout_s: float) -> Any:
    """A client whose every socket operation is bounded by ``timeout_s``, no retries."""
    redis = _import_redis()
    if spec.kind == "url":
        kwargs = redis.connection.parse_url(spec.url)
        connection_class = kwargs.pop("connection_class", redis.Connection)
        pool = redis.ConnectionPool(
            connection_class=connection_class, **_our_settings(kwargs, timeout_s)
        )
        return redis.Redis(connection_pool=pool)
    client = spec.client
    if spec.kind == "cluster":
        from redis.backoff import NoBackoff
        from redis.cluster import ClusterNode, RedisCluster
        from redis.retry import Retry

        source = client.nodes_manager.connection_kwargs
        copied = {k: v for k, v in source.items() if k in _COPIED_SETTINGS - {"host", "port"}}
        settings = _our_settings(copied, timeout_s)
        del settings["retry"], settings["retry_on_error"]  # cluster mode refuses them
        nodes = [
            ClusterNode(n.host, n.port)  # type: ignore[no-untyped-call]
            for n in client.get_nodes()
        ]
        return RedisCluster(
            startup_nodes=nodes, retry=Retry(NoBackoff(), 0),
            require_full_coverage=False, **settings,
        )
    pool = client.connection_pool
    if type(pool) not in (redis.ConnectionPool, redis.BlockingConnectionPool):
        logger.warning(
            "shmcache: remote client has a %s: its own socket_timeout bounds remote calls "
            "(remote_timeout cannot be applied to it)", type(pool).__name__,
        )
        return client
    copied = {k: v for k, v in pool.connection_kwargs.items() if k in _COPIED_SETTINGS}
    new_pool = redis.ConnectionPool(
        connection_class=pool.connection_class, **_our_settings(copied, timeout_s)
    )
    return redis.Redis(connection_pool=new_pool)


# -- keys and values ------------------------------------------------------------------------


class Keys:
    """The Redis key names of one cache."""

    def __init__(self, name: str) -> None:
        self.prefix = f"shmcache:{name}:"
        self.clears = f"{self.prefix}clears:{{{name}}}"
        self.clear_log = f"{self.prefix}clearlog:{{{name}}}"

    def entry(self, digest: bytes, llm_hash: int) -> str:
        return f"{self.prefix}e:{llm_hash:016x}:{{{digest.hex()}}}"

    def lease(self, digest: bytes) -> str:
        return f"{self.prefix}l:{{{digest.hex()}}}"

    def entries_pattern(self, llm_hash: int | None) -> str:
        # Names are [A-Za-z0-9._-] and hashes hex: no glob character to escape.
        return f"{self.prefix}e:*" if llm_hash is None else f"{self.prefix}e:{llm_hash:016x}:*"


def pack_value(digest: bytes, llm_hash: int, expires: float, payload: bytes) -> bytes:
    """The envelope stored in Redis for one entry."""
    tail = _ENVELOPE_TAIL.pack(expires, llm_hash, digest)
    crc = zlib.crc32(payload, zlib.crc32(tail))
    return b"".join((_MAGIC, crc.to_bytes(4, "little"), tail, payload))


def unpack_value(data: object, digest: bytes, llm_hash: int) -> Fetched | None:
    """The payload of an envelope for exactly this key, or None (garbage, another
    key's record, damaged)."""
    if type(data) is not bytes or len(data) <= ENVELOPE_BYTES:
        return None
    magic, crc, expires, stored_llm, stored_digest = _ENVELOPE.unpack_from(data)
    if magic != _MAGIC or stored_digest != digest or stored_llm != llm_hash:
        return None
    if zlib.crc32(memoryview(data)[8:]) != crc:
        return None
    if not (math.isfinite(expires) and expires >= 0):
        return None
    return Fetched(data[ENVELOPE_BYTES:], expires)


def _remaining(fetched: Fetched, pttl: object, now: float) -> Fetched | None:
    """Apply Redis' remaining TTL (clock-independent) to a fetched value."""
    if type(pttl) is int and pttl > 0:
        return fetched._replace(expires=now + pttl / 1000.0)
    if type(pttl) is int and pttl == -2:
        return None  # expired between GET and PTTL
    if fetched.expires and fetched.expires <= now:
        return None
    return fetched


def lease_token(host_id: str, slot: int, generation: int) -> str:
    """A lease token naming this host and owner slot (so host-mates can prove it dead)."""
    return f"{host_id}:{slot}:{generation & 0xFFFFFFFF}:{secrets.token_hex(6)}"


def parse_token(token: str) -> tuple[str, int, int] | None:
    """(host id, owner slot, generation) of a lease token, or None if it is not ours."""
    parts = token.split(":")
    if len(parts) != 4 or not (parts[1].isdigit() and parts[2].isdigit()):
        return None
    return parts[0], int(parts[1]), int(parts[2])


def host_id(segment_path: str, created_ns: int) -> str:
    """Names one host's segment in lease tokens (hostname, path and creation time)."""
    text = f"{socket.gethostname()}\0{segment_path}\0{created_ns}"
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


# -- the clear log ---------------------------------------------------------------------------


class _Event(NamedTuple):
    seq: int
    time_ms: int
    llm_hash: int | None  # None: a full clear


def _parse_event(raw: object) -> _Event | None:
    if type(raw) is not bytes or len(raw) > 64:
        return None
    parts = raw.split(b" ")
    if len(parts) != 3 or not (parts[0].isdigit() and parts[1].isdigit()):
        return None
    kind = parts[2]
    if kind == b"a":
        return _Event(int(parts[0]), int(parts[1]), None)
    if kind[:1] == b"l" and len(kind) == 17:
        try:
            return _Event(int(parts[0]), int(parts[1]), int(kind[1:], 16))
        except ValueError:
            return None
    return None


def plan_clears(
    host: tuple[int, int], created_ns: int, log: tuple[int, int], raw_events: Iterable[object]
) -> ClearPlan | None:
    """What a host at ``host`` = (epoch, seq) must clear to catch up with ``log``.

    Args:
        host: The (epoch, seq) recorded in the host's segment; epoch 0: never synced.
        created_ns: When the host's segment was created (wall clock, ns).
        log: The (epoch, seq) Redis holds.
        raw_events: The clear log's entries as Redis returned them.

    Returns:
        None when the host is up to date.
    """
    epoch, seq = log
    host_epoch, host_seq = host
    events = sorted(e for e in map(_parse_event, raw_events) if e is not None)
    if host_epoch == epoch:
        if seq <= host_seq:
            # Nothing new (or Redis went back to an older snapshot of the same log).
            return None if seq == host_seq else ClearPlan(host, epoch, seq, False, frozenset())
        new = [e for e in events if host_seq < e.seq <= seq]
        gap = not events or events[0].seq > host_seq + 1
    else:
        # A log this host never followed: a new segment, or Redis lost the old log.
        cutoff_ms = created_ns // 1_000_000 - _CLOCK_MARGIN_MS
        new = [e for e in events if e.time_ms >= cutoff_ms and e.seq <= seq]
        gap = not events or (events[0].seq > 1 and events[0].time_ms >= cutoff_ms)
    full = gap or any(e.llm_hash is None for e in new)
    hashes = frozenset() if full else frozenset(e.llm_hash for e in new if e.llm_hash is not None)
    return ClearPlan(host, epoch, seq, full, hashes)


def _as_int(value: object) -> int | None:
    if type(value) is bytes and value.isdigit() and len(value) <= 19:
        return int(value)
    if type(value) is int and value >= 0:
        return value
    return None


# -- the breaker -----------------------------------------------------------------------------


class _Breaker:
    """Open after a connection failure: remote calls are skipped until a probe answers.

    Only the poller thread probes (so lookups never pay for an outage after its first
    failure); the back-off doubles from ``BREAKER_MIN_S`` to ``BREAKER_MAX_S``.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.down = False
        self.down_since = 0.0
        self.open_until = 0.0
        self.backoff_s = BREAKER_MIN_S
        self.outages = 0
        self._guard = threading.Lock()

    def failed(self, where: str, exc: BaseException) -> None:
        with self._guard:
            now = time.monotonic()
            if not self.down:
                self.down = True
                self.down_since = now
                self.outages += 1
                self.backoff_s = BREAKER_MIN_S
                logger.warning(
                    "shmcache %r: remote tier %s failed (%s: %s); using the local tier "
                    "only and retrying in the background", self.name, where,
                    type(exc).__name__, exc,
                )
            else:
                self.backoff_s = min(self.backoff_s * 2, BREAKER_MAX_S)
            self.open_until = now + self.backoff_s * random.uniform(0.8, 1.0)

    def succeeded(self, where: str) -> None:
        if not self.down:
            return
        with self._guard:
            if self.down:
                self.down = False
                logger.info(
                    "shmcache %r: remote tier %s answers again after %.1f s",
                    self.name, where, time.monotonic() - self.down_since,
                )

    def probe_due(self) -> bool:
        """A probe may run now (claims it: the next one waits a back-off)."""
        with self._guard:
            now = time.monotonic()
            if now < self.open_until:
                return False
            self.open_until = now + self.backoff_s
            return True


# -- the tier ----------------------------------------------------------------------------------


def _connection_failure(exc: BaseException) -> bool:
    """Does ``exc`` say the remote is unusable (vs. a per-key error such as WRONGTYPE)?"""
    try:
        from redis import exceptions
    except ImportError:  # pragma: no cover - the tier exists only with redis
        return True
    if isinstance(exc, (exceptions.ConnectionError, exceptions.TimeoutError)):
        return True
    if isinstance(exc, exceptions.ResponseError):
        return isinstance(exc, exceptions.ClusterDownError)
    return True


class RemoteTier:
    """One cache instance's link to Redis (all calls bounded, none raises).

    Args:
        spec: What ``remote=`` named.
        name: The cache name (key prefix).
        timeout_s: ``remote_timeout``.
        host: Identifies this host's segment in lease tokens (:func:`host_id`).
        created_ns: The segment's creation time (wall clock ns), for the clear log.
    """

    def __init__(
        self, spec: RemoteSpec, name: str, timeout_s: float, host: str, created_ns: int
    ) -> None:
        self.spec = spec
        self.timeout_s = timeout_s
        self.keys = Keys(name)
        self.host_id = host
        self.created_ns = created_ns
        self.where = spec.describe()
        self.breaker = _Breaker(name)
        self._name = name
        self._client: Any = None
        self._client_guard = threading.Lock()
        self._scripts: dict[str, Any] = {}
        self._pid = os.getpid()
        self._counts = [0, 0, 0]
        self._counts_guard = threading.Lock()
        # Clears that could not reach Redis: replayed by the poller once it answers.
        self._pending_clears: list[int | None] = []
        self._clears_guard = threading.Lock()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._poller: threading.Thread | None = None
        self._stop = threading.Event()
        self._host: weakref.ReferenceType[RemoteHost] | None = None
        self._last_warning: dict[str, float] = {}
        self._closed = False
        if spec.kind != "cluster":
            # No connection yet (a cluster client would connect to map its slots).
            self._client = _make_client(spec, timeout_s)

    # -- lifetime ---------------------------------------------------------------------

    def _check_pid(self) -> None:
        """In a forked child: the parent's threads, executor and pending work stay its."""
        if self._pid != os.getpid():
            self._pid = os.getpid()
            # A new client too: the parent's pool may have been locked by one of its
            # threads at the fork (redis-py would then wait for it, then raise).
            self._client = None
            self._scripts = {}
            self._executor = None
            self._poller = None
            self._stop = threading.Event()
            self._client_guard = threading.Lock()
            self.breaker._guard = threading.Lock()
            self._counts_guard = threading.Lock()
            self._counts = [0, 0, 0]
            self._pending_clears = []
            self._clears_guard = threading.Lock()

    def start(self, host: RemoteHost) -> None:
        """Start (or, in a forked child, restart) the poller thread."""
        self._check_pid()
        if self._closed:
            return
        self._host = weakref.ref(host)
        poller = self._poller
        if poller is not None and poller.is_alive():
            return
        poller = threading.Thread(
            target=_poll_loop, args=(weakref.ref(self), self._stop),
            name=f"shmcache-remote-{self._name}", daemon=True,
        )
        self._poller = poller
        poller.start()

    def ensure_started(self) -> None:
        """Cheap check for the paths that follow a fork no hook saw (uWSGI)."""
        if self._pid != os.getpid() and self._host is not None:
            host = self._host()
            if host is not None:
                self.start(host)

    def close(self) -> None:
        """Stop the poller and the async workers (idempotent)."""
        self._closed = True
        self._stop.set()
        poller = self._poller
        if poller is not None and poller is not threading.current_thread() and (
            self._pid == os.getpid()
        ):
            poller.join(_JOIN_S + self.timeout_s * 4)
        executor, self._executor = self._executor, None
        if executor is not None and self._pid == os.getpid():
            executor.shutdown(wait=False, cancel_futures=True)
        client = self._client
        if client is not None and self._pid == os.getpid() and client is not self.spec.client:
            with contextlib.suppress(Exception):  # our own client: close its sockets
                if self.spec.kind == "cluster":
                    client.close()
                else:
                    client.connection_pool.disconnect()

    # -- calling Redis ------------------------------------------------------------------

    @property
    def down(self) -> bool:
        """True during an outage: calls are skipped until the poller's probe answers."""
        return self.breaker.down

    def _get_client(self) -> Any:
        client = self._client
        if client is None:
            with self._client_guard:
                client = self._client
                if client is None:
                    client = self._client = _make_client(self.spec, self.timeout_s)
        return client

    def _script(self, text: str) -> Any:
        script = self._scripts.get(text)
        if script is None:
            script = self._scripts[text] = self._get_client().register_script(text)
        return script

    def _call(self, what: str, fn: Callable[[Any], _T], probe: bool = False) -> _T | _Outcome:
        """Run ``fn(client)``; FAILED when it raises or the breaker is open."""
        if self.breaker.down and not probe:
            return FAILED
        self._check_pid()
        try:
            result = fn(self._get_client())
        except Exception as exc:
            self._count(ERROR)
            if _connection_failure(exc):
                self.breaker.failed(self.where, exc)
                self._drop_connections()
            else:
                self._warn(what, "remote tier %s: %s failed (%s: %s)",
                           self.where, what, type(exc).__name__, exc)
            self._flush_soon()
            return FAILED
        self.breaker.succeeded(self.where)
        return result

    def _drop_connections(self) -> None:
        """Close pooled connections: after a restart they are all dead, and each would
        fail once more."""
        client = self._client
        if client is None:
            return
        with contextlib.suppress(Exception):
            if self.spec.kind == "cluster":
                client.disconnect_connection_pools()
            else:
                client.connection_pool.disconnect()

    def _warn(self, kind: str, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last_warning.get(kind, -math.inf) >= _WARNING_INTERVAL_S:
            self._last_warning[kind] = now
            logger.warning("shmcache %r: " + message, self._name, *args)

    def _executor_now(self) -> concurrent.futures.ThreadPoolExecutor:
        self._check_pid()
        executor = self._executor
        if executor is None:
            executor = self._executor = concurrent.futures.ThreadPoolExecutor(
                _ASYNC_WORKERS, thread_name_prefix=f"shmcache-remote-{self._name}"
            )
        return executor

    async def run(self, fn: Callable[..., _T], *args: Any) -> _T | _Outcome:
        """Run a blocking tier call in a worker thread: the event loop never waits.

        Measured (2-core VM, redis-py 8): a sync GET 46 µs inline, 90 µs with
        redis.asyncio, 110-150 µs through a worker thread.  The thread hop costs
        ~50 µs on a path that precedes a model call anyway, and keeps one client, one
        breaker and one set of timeouts for sync and async callers on any loop.
        """
        if self.breaker.down:
            return FAILED
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor_now(), functools.partial(fn, *args))
        except RuntimeError:  # the executor was shut down by close() meanwhile
            return FAILED

    # -- counters ------------------------------------------------------------------------

    def _count(self, which: int) -> None:
        with self._counts_guard:
            self._counts[which] += 1

    def count_hit(self) -> None:
        self._count(HIT)

    def count_miss(self) -> None:
        self._count(MISS_COUNT)

    def pending_counts(self) -> tuple[int, int, int]:
        counts = self._counts
        return counts[0], counts[1], counts[2]

    def take_counts(self) -> tuple[int, int, int]:
        """Hand the pending counts over (to be added to the header words)."""
        with self._counts_guard:
            counts = self._counts
            taken = (counts[0], counts[1], counts[2])
            self._counts = [0, 0, 0]
        return taken

    def _flush_soon(self) -> None:
        host = self._host() if self._host is not None else None
        if host is not None and not host.closed:
            with contextlib.suppress(Exception):  # a mapping closed meanwhile
                host._remote_flush()

    # -- entries ---------------------------------------------------------------------------

    def fetch(self, digest: bytes, llm_hash: int) -> Fetched | _Outcome:
        """The remote value of one key: Fetched, MISS or FAILED."""
        key = self.keys.entry(digest, llm_hash)

        def op(client: Any) -> tuple[Any, ...]:
            pipe = client.pipeline(transaction=False)
            pipe.get(key)
            pipe.pttl(key)
            return tuple(pipe.execute(raise_on_error=False))

        result = self._call("GET", op)
        if isinstance(result, _Outcome):
            return result
        return self._checked(result[0], result[1], digest, llm_hash)

    def _checked(
        self, raw: object, pttl: object, digest: bytes, llm_hash: int
    ) -> Fetched | _Outcome:
        if raw is None:
            return MISS
        fetched = unpack_value(raw, digest, llm_hash)
        if fetched is None:
            self._warn(
                "bad-value", "remote value at %s is not a record of that key (garbage, "
                "another key's record, damaged, or not a string); treated as a miss",
                self.keys.entry(digest, llm_hash),
            )
            return MISS
        fetched_now = _remaining(fetched, pttl, time.time())
        return MISS if fetched_now is None else fetched_now

    def warn_undecodable(self, digest: bytes, llm_hash: int, reason: str) -> None:
        self._warn(
            "bad-value", "remote value at %s does not decode (%s); treated as a miss",
            self.keys.entry(digest, llm_hash), reason,
        )

    def put(
        self, digest: bytes, llm_hash: int, payload: bytes, expires: float,
        ttl_s: float | None, token: str | None,
    ) -> bool:
        """Write one entry (``ttl_s`` as its expiry) and end the caller's lease of it."""
        value = pack_value(digest, llm_hash, expires, payload)
        px = "0" if ttl_s is None else str(max(1, min(int(ttl_s * 1000), 2**62)))
        keys = [self.keys.entry(digest, llm_hash), self.keys.lease(digest)]
        result = self._call(
            "SET", lambda c: self._script(_PUT_SCRIPT)(keys=keys, args=[value, px, token or ""])
        )
        return result is not FAILED

    # -- leases ------------------------------------------------------------------------------

    def take_lease(self, digest: bytes, token: str, timeout_s: float) -> _Outcome | str:
        """TAKEN, FAILED, or the token of the caller that holds the lease."""
        key = self.keys.lease(digest)
        px = max(1, min(int(timeout_s * 1000), _MAX_LEASE_MS))

        def op(client: Any) -> tuple[Any, ...]:
            pipe = client.pipeline(transaction=False)
            pipe.set(key, token, nx=True, px=px)
            pipe.get(key)
            return tuple(pipe.execute(raise_on_error=False))

        result = self._call("SET NX", op)
        if isinstance(result, _Outcome):
            return result
        taken, holder = result
        if taken is True:
            return TAKEN
        if type(holder) is bytes:
            return holder.decode("ascii", "replace")
        return TAKEN if holder is None else FAILED  # lapsed meanwhile; a wrong type: give up

    def fetch_or_lease(
        self, digest: bytes, llm_hash: int, token: str, timeout_s: float
    ) -> tuple[Fetched | _Outcome | None, _Outcome | str | None] | _Outcome:
        """The value if Redis has one, else the lease (atomically): FAILED, or
        ``(value, holder)``: ``(Fetched or MISS, None)`` when a value was there (MISS:
        it failed its checks), ``(None, TAKEN)`` or ``(None, holder's token)``."""
        keys = [self.keys.entry(digest, llm_hash), self.keys.lease(digest)]
        px = max(1, min(int(timeout_s * 1000), _MAX_LEASE_MS))
        result = self._call(
            "GET/SET NX",
            lambda c: self._script(_FETCH_OR_LEASE_SCRIPT)(keys=keys, args=[token, px]),
        )
        if isinstance(result, _Outcome):
            return result
        kind = result[0] if isinstance(result, list) and result else None
        if kind == 1 and len(result) == 3:
            return self._checked(result[1], result[2], digest, llm_hash), None
        if kind == 2:
            return None, TAKEN
        if kind == 3 and len(result) == 2 and type(result[1]) is bytes:
            return None, result[1].decode("ascii", "replace")
        return None, FAILED  # the lease key is not a string: no coordination

    def force_lease(self, digest: bytes, token: str, timeout_s: float) -> None:
        """Take the lease over (the waiter's coalesce_timeout ran out)."""
        key = self.keys.lease(digest)
        px = max(1, min(int(timeout_s * 1000), _MAX_LEASE_MS))
        self._call("SET", lambda c: c.set(key, token, px=px))

    def poll(
        self, digest: bytes, llm_hash: int
    ) -> tuple[Fetched | _Outcome, str | None] | _Outcome:
        """While waiting for another host: (the value or MISS, the lease holder's token)."""
        entry, lease = self.keys.entry(digest, llm_hash), self.keys.lease(digest)

        def op(client: Any) -> tuple[Any, ...]:
            pipe = client.pipeline(transaction=False)
            pipe.get(entry)
            pipe.pttl(entry)
            pipe.get(lease)
            return tuple(pipe.execute(raise_on_error=False))

        result = self._call("GET", op)
        if isinstance(result, _Outcome):
            return result
        raw, pttl, holder = result
        value = self._checked(raw, pttl, digest, llm_hash)
        token = holder.decode("ascii", "replace") if type(holder) is bytes else None
        return value, token

    def release(self, leases: Iterable[tuple[bytes, str]]) -> None:
        """End leases (each only if it still holds its token)."""
        items = list(leases)
        if not items:
            return

        def op(client: Any) -> None:
            script = self._script(_RELEASE_SCRIPT)
            for digest, token in items:
                script(keys=[self.keys.lease(digest)], args=[token])

        self._call("DEL", op)

    # -- clears --------------------------------------------------------------------------------

    def clear(self, llm_hash: int | None) -> ClearEvent | None:
        """Delete the remote entries (all, or one llm_string's) and log the clear.

        Returns:
            The logged event, or None when Redis did not answer: the clear is then
            kept and replayed by the poller once Redis answers again.
        """
        event = self._clear_now(llm_hash)
        if isinstance(event, ClearEvent):
            return event
        self.defer_clear(llm_hash)
        return None

    def defer_clear(self, llm_hash: int | None) -> None:
        """Keep a clear that did not reach Redis, for the poller to replay."""
        self._check_pid()
        with self._clears_guard:
            # A pending full clear covers every other; else keep them in order.
            if None not in self._pending_clears:
                if llm_hash is None:
                    self._pending_clears = [None]
                elif llm_hash not in self._pending_clears:
                    self._pending_clears.append(llm_hash)

    def _clear_now(self, llm_hash: int | None, probe: bool = False) -> ClearEvent | _Outcome:
        pattern = self.keys.entries_pattern(llm_hash)
        text = f"{int(time.time() * 1000)} " + ("a" if llm_hash is None else f"l{llm_hash:016x}")

        def op(client: Any) -> ClearEvent:
            batch: list[bytes] = []
            for key in client.scan_iter(match=pattern, count=_SCAN_COUNT):
                batch.append(key)
                if len(batch) >= _UNLINK_BATCH:
                    client.unlink(*batch)
                    batch = []
            if batch:
                client.unlink(*batch)
            new_epoch = str(secrets.randbits(62) | 1)
            epoch, seq = self._script(_CLEAR_SCRIPT)(
                keys=[self.keys.clears, self.keys.clear_log],
                args=[new_epoch, text, CLEAR_LOG_MAX],
            )
            return ClearEvent(_as_int(epoch) or 0, int(seq))

        return self._call("clear", op, probe=probe)

    def _replay_pending(self, host: RemoteHost) -> None:
        while not self.breaker.down:
            with self._clears_guard:
                if not self._pending_clears:
                    return
                llm_hash = self._pending_clears[0]
            event = self._clear_now(llm_hash)
            if not isinstance(event, ClearEvent):
                return
            with self._clears_guard:
                if self._pending_clears and self._pending_clears[0] == llm_hash:
                    self._pending_clears.pop(0)
            logger.info("shmcache %r: a clear made while the remote tier was down reached it",
                        self._name)
            host._remote_own_clear(event)

    def sync_clears(self, host: RemoteHost, probe: bool = False) -> bool:
        """Read the clear log and apply what this host has not applied yet.

        Returns:
            False when Redis did not answer.
        """
        clears, log = self.keys.clears, self.keys.clear_log
        state = self._call("HMGET", lambda c: c.hmget(clears, ["epoch", "seq"]), probe=probe)
        if isinstance(state, _Outcome):
            return False
        epoch, seq = (_as_int(v) for v in state)
        if epoch is None or seq is None:
            return True  # never cleared (or Redis lost the log, and nobody cleared since)
        here = host._remote_state()
        if here == (epoch, seq):
            return True
        events = self._call("LRANGE", lambda c: c.lrange(log, 0, -1), probe=probe)
        if isinstance(events, _Outcome):
            return False
        plan = plan_clears(here, self.created_ns, (epoch, seq), events)
        if plan is not None:
            host._remote_apply(plan)
        return True

    def tick(self) -> float:
        """One poller step; returns how long to sleep before the next."""
        host = self._host() if self._host is not None else None
        if host is None or host.closed or self._closed:
            self._stop.set()
            return 0.0
        if self.breaker.down:
            if self.breaker.probe_due():
                self.sync_clears(host, probe=True)
        else:
            if self._pending_clears:
                self._replay_pending(host)
            if host._remote_poll_due(int(POLL_INTERVAL_S * 1e9)):
                self.sync_clears(host)
        if any(self._counts):
            host._remote_flush()
        return _POLL_TICK_S * random.uniform(0.8, 1.2)


def _poll_loop(tier_ref: weakref.ReferenceType[RemoteTier], stop: threading.Event) -> None:
    """The poller thread: holds no strong reference between ticks."""
    delay = 0.0
    while not stop.wait(delay):
        tier = tier_ref()
        if tier is None:
            return
        try:
            delay = tier.tick()
        except Exception:  # a closed mapping, a dropped cache: stop quietly
            logger.debug("shmcache: remote poller step failed", exc_info=True)
            delay = POLL_INTERVAL_S
        del tier

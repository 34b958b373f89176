"""The engine: bytes by key digest in one shared segment, for every front-end.

An :class:`Engine` owns one segment (index and log, ``_arena.py``), this process's
owner slot and counters, the coalescing leases (``_coalesce.py``) and the remote
tier (``_remote.py``), with sync and async twins of each operation.  Front-ends
(the LLM cache, the byte store, LangGraph's node cache) only turn their keys into
digests and their values into payload bytes and back; data flows one way, front-end
→ engine → arena / remote, and nothing here knows what a payload means.

Each read takes the front-end's decoders: ``decode`` for bytes that passed the
record's crc (they came from a writer of this release), ``decode_untrusted`` for
bytes from Redis.  A decoder raising ``CodecError`` turns the read into a miss.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import math
import os
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final, TypeVar

from . import _arena, _callbacks, _owners, _remote
from ._arena import CONTENDED, U64_MASK, Arena, Contended, Geometry
from ._coalesce import LEASE_CALLER, CallerKey, Coalescer, caller_key, same_holder
from ._counters import Counters
from ._entries import Decode, Prepared
from ._errors import (
    CacheClosedError,
    CodecError,
    CodecVersionError,
    InvalidArgumentError,
    LockTimeoutError,
    ShmCacheError,
)
from ._leases import Lease, LeaseTable
from ._lock import UNLOCK, SegmentLock, flock
from ._remote import FAILED, RemoteTier
from ._segment import (
    MappedFile,
    check_name,
    open_or_create,
    resolve_directory,
    segment_path,
)
from ._stats import CacheStats
from ._tiers import RemoteTierMixin

__all__ = [
    "DEFAULT_COALESCE_TIMEOUT_S",
    "DEFAULT_LOCK_TIMEOUT_S",
    "DEFAULT_SIZE_BYTES",
    "MIN_SIZE_BYTES",
    "Engine",
    "check_seconds",
]

logger = logging.getLogger("shmcache")

DEFAULT_SIZE_BYTES: Final = 32 * 1024 * 1024


class _DefaultSize(int):
    """The default ``size_bytes``, told apart from the same number passed on purpose.

    Attaching to an existing segment of another size warns only when the caller
    asked for a size.
    """


_DEFAULT_SIZE: Final = _DefaultSize(DEFAULT_SIZE_BYTES)
MIN_SIZE_BYTES: Final = _arena.MIN_SIZE_BYTES
DEFAULT_LOCK_TIMEOUT_S: Final = 1.0
DEFAULT_COALESCE_TIMEOUT_S: Final = 30.0
DEFAULT_REMOTE_TIMEOUT_S: Final = _remote.DEFAULT_REMOTE_TIMEOUT_S
# The same kind of skipped-update warning is logged at most once in this interval.
_WARNING_INTERVAL_S: Final = 10.0
_ASYNC_FIRST_BACKOFF_S: Final = 50e-6
_ASYNC_MAX_BACKOFF_S: Final = 2e-3
# scan() holds the lock for this many index buckets at a time (~1 ms).
_SCAN_STEP_BUCKETS: Final = 512

# Engines open in this process: counts are flushed at exit and reset in fork children.
_OPEN_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()
_getpid = os.getpid
_T = TypeVar("_T")


class _Resources:
    """What an instance holds outside Python objects: fds and its owner slot.

    Kept apart from the instance so a finalizer can release them when an instance is
    dropped without close() (e.g. one unpickled per task in a spawn pool).  The
    mapping itself is closed by its own refcount once the arena's views are gone.
    """

    def __init__(self, fd: int, lock: SegmentLock, owner_file: _owners.OwnerFile) -> None:
        self.fd = fd
        self.lock = lock
        self.owner_file = owner_file
        self.slot = -1
        self.slot_pid = 0

    def release_slot(self) -> None:
        if self.slot >= 0:
            if self.slot_pid == _getpid():
                self.owner_file.release(self.slot)
            self.slot = -1

    def release(self) -> None:
        """Free the slot and close the fds (idempotent; no lock needed)."""
        self.release_slot()
        self.lock.close()
        fd, self.fd = self.fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)




def check_seconds(name: str, value: object) -> float:
    """Validate a positive, finite number of seconds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, not {type(value).__name__}")
    if not (value > 0 and math.isfinite(value)):
        raise InvalidArgumentError(
            f"{name} must be a finite number > 0 seconds, got {value!r}"
        )
    return float(value)


class Engine(RemoteTierMixin):
    """Entries of one front-end kind in one shared segment, for every process.

    Args:
        name: Cache name: 1-64 characters of ``[A-Za-z0-9._-]``, not starting with ``.``.
        kind: The front-end's segment kind (``"llm"``, ``"bytes"``, ``"nodes"``): each
            kind of a name has its own segment file.
        owner: The front-end's class name, for messages (``SharedMemoryCache``).
        size_bytes: Segment size, fixed when the segment is created.
        ttl: Seconds an entry stays valid after it is written; None: until evicted.
        directory: Where segment files live; default ``/dev/shm/shmcache-<uid>``.
        lock_timeout: The longest any call waits for another process, in seconds.
        coalesce: Concurrent identical misses: one caller computes, the rest wait.
        coalesce_timeout: The longest a read waits for one computing caller.
        remote: None, a Redis URL or client: a tier every host shares.
        remote_timeout: The longest one remote call may take before it counts as failed.

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: an argument is out of range, or ``remote`` has another scheme.
        ShmCacheError: the segment cannot be opened (its subclasses say why).
    """

    def __init__(
        self,
        name: str,
        *,
        kind: str = "llm",
        owner: str = "SharedMemoryCache",
        size_bytes: int = _DEFAULT_SIZE,
        ttl: float | None = None,
        directory: str | os.PathLike[str] | None = None,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT_S,
        coalesce: bool = False,
        coalesce_timeout: float = DEFAULT_COALESCE_TIMEOUT_S,
        remote: object = None,
        remote_timeout: float = DEFAULT_REMOTE_TIMEOUT_S,
    ) -> None:
        self._name = check_name(name)
        self._kind = kind
        self._owner = owner
        if not isinstance(coalesce, bool):
            raise TypeError(f"coalesce must be a bool, not {type(coalesce).__name__}")
        self._coalesce_timeout = check_seconds("coalesce_timeout", coalesce_timeout)
        self._remote_timeout = check_seconds("remote_timeout", remote_timeout)
        remote_spec = _remote.parse_remote(remote)  # before any resource is taken
        if isinstance(size_bytes, bool) or not isinstance(size_bytes, int):
            raise TypeError(f"size_bytes must be an int, not {type(size_bytes).__name__}")
        if size_bytes < MIN_SIZE_BYTES:
            raise InvalidArgumentError(
                f"size_bytes must be at least {MIN_SIZE_BYTES} (1 MiB), got {size_bytes}"
            )
        self._ttl = None if ttl is None else check_seconds("ttl", ttl)
        self._lock_timeout = check_seconds("lock_timeout", lock_timeout)
        self._requested_size = size_bytes
        self._directory_arg = None if directory is None else os.fspath(directory)
        directory_path = resolve_directory(directory, create=True)
        self._path = segment_path(directory_path, self._name, _arena.FORMAT_VERSION, kind)
        geometry = Geometry.for_size(size_bytes)
        mapped = open_or_create(
            self._path,
            size_bytes,
            _arena.HEADER_BYTES,
            lambda mapping: _arena.initialise(mapping, geometry),
            self._lock_timeout,
        )
        arena = None
        try:
            arena = Arena(mapped.mapping, self._read_geometry(mapped))
            self._lock = SegmentLock(self._path, mapped.fd)
            owner_file = _owners.for_path(self._path)
        except BaseException:
            if arena is not None:
                arena.release()  # the mapping cannot close while viewed
            mapped.close()
            raise
        self._arena = arena
        self._arena_words = arena.words
        self._compress_from_bytes = arena.geometry.data_bytes // 2
        self._mapped: MappedFile | None = mapped
        self._resources = _Resources(mapped.fd, self._lock, owner_file)
        # Dropped without close(): give back the fds and the owner slot.
        self._finalizer = weakref.finalize(self, self._resources.release)
        self._coalescer = Coalescer(self, self._coalesce_timeout) if coalesce else None
        # The remote tier (None without remote=): Redis leases this instance's callers
        # hold, by caller and key digest, and the asyncio tasks watched for them.
        self._remote: RemoteTier | None = None
        self._remote_leases: dict[CallerKey, dict[bytes, str]] = {}
        self._remote_watched: set[int] = set()
        actual = self._arena.geometry.size_bytes
        if not mapped.created and actual != size_bytes and type(size_bytes) is not _DefaultSize:
            logger.warning(
                "segment %s already exists with size_bytes=%d; ignoring size_bytes=%d "
                "(remove it with `%s` to change its size)",
                self._path, actual, size_bytes, self.cli_command("rm"),
            )
        # Opening takes no lock: what a dead writer left is repaired by the next
        # writer, and the owner slot is claimed (lock-free) at the first count.
        # A weak reference back, not a bound method: no cycle, so an engine dropped
        # without close() is freed (its finalizer releasing its fds) at once.
        engine_ref = weakref.ref(self)

        def counts_slow_path(inherited: bool) -> None:
            engine = engine_ref()
            if engine is not None:
                engine._counts_slow_path(inherited)

        self._counters = Counters(arena, self._resources, self._name, counts_slow_path)
        self._count = self._counters.count
        self._last_warning: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        if remote_spec is not None:
            created_ns = self._arena.geometry.created_ns
            try:
                self._remote = RemoteTier(
                    remote_spec, self._name, self._remote_timeout,
                    _remote.host_id(self._path, created_ns), created_ns,
                )
            except BaseException:
                self.close()
                raise
            self._remote.start(self)  # its first poll runs in the background
        _OPEN_ENGINES.add(self)

    def _settings_key(self) -> tuple[object, ...]:
        remote = self._remote
        return self.settings_key_for(
            self._path, self._ttl, self._lock_timeout, self._coalescer is not None,
            self._coalesce_timeout, None if remote is None else remote.spec.identity,
            self._remote_timeout,
        )

    @staticmethod
    def settings_key_for(
        path: str,
        ttl: float | None,
        lock_timeout: float,
        coalesce: bool = False,
        coalesce_timeout: float = DEFAULT_COALESCE_TIMEOUT_S,
        remote: object = None,
        remote_timeout: float = DEFAULT_REMOTE_TIMEOUT_S,
    ) -> tuple[object, ...]:
        """What tells two instances apart: front-ends reuse an open one on unpickling
        (a pool worker that receives it with every task opens no fds per task)."""
        return (
            path, None if ttl is None else float(ttl), float(lock_timeout), coalesce,
            float(coalesce_timeout), remote, float(remote_timeout),
        )

    def _read_geometry(self, mapped: MappedFile) -> Geometry:
        hint = f"remove it with `{self.cli_command('rm')}` and re-open the cache"
        return _arena.read_geometry(mapped.mapping, self._path, hint)

    def cli_command(self, verb: str) -> str:
        """The ``shmcache`` command line that runs ``verb`` on this segment."""
        kind = "" if self._kind == "llm" else f" --kind {self._kind}"
        directory = "" if self._directory_arg is None else f" --directory {self._directory_arg}"
        return f"shmcache {verb} {self._name}{kind}{directory}"

    def _counts_slow_path(self, inherited: bool) -> None:
        """What the counters' slow path needs of the engine (see ``Counters``)."""
        if inherited:
            if self._coalescer is not None:
                self._coalescer.forget_all()  # the parent's leases stay the parent's
            self._remote_leases = {}
            self._remote_watched = set()
        elif self._remote is not None:
            self._remote.ensure_started()  # a fork no hook saw (uWSGI): a new poller

    # -- properties -------------------------------------------------------------

    @property
    def name(self) -> str:
        """The cache name."""
        return self._name

    @property
    def path(self) -> str:
        """The segment file's path."""
        return self._path

    @property
    def ttl(self) -> float | None:
        """Seconds entries written by this instance stay valid (None: no expiry)."""
        return self._ttl

    @property
    def lock_timeout(self) -> float:
        """The longest any call waits for another process, in seconds."""
        return self._lock_timeout

    @property
    def coalesce(self) -> bool:
        """True when concurrent identical misses are coalesced."""
        return self._coalescer is not None

    @property
    def coalesce_timeout(self) -> float:
        """The longest a lookup waits for one computing caller, in seconds."""
        return self._coalesce_timeout

    @property
    def remote_timeout(self) -> float:
        """The longest one remote call may take, in seconds."""
        return self._remote_timeout

    @property
    def remote(self) -> str | None:
        """Where the remote tier is (no password), or None without one."""
        return None if self._remote is None else self._remote.where

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._mapped is None

    @property
    def has_remote(self) -> bool:
        """True with a remote tier (reads then need their key's tag)."""
        return self._remote is not None

    @property
    def kind(self) -> str:
        """The segment kind (``"llm"``, ``"bytes"``, ``"nodes"``)."""
        return self._kind

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"{self._owner}({self._name!r}, path={self._path!r}, {state})"

    # -- helpers ----------------------------------------------------------------

    def raise_if_closed(self, exc: ValueError) -> None:
        """Raise CacheClosedError if ``exc`` came from a close() in another thread.

        A front-end calls this for a ValueError out of the engine, then re-raises
        ``exc``: another thread's :meth:`close` releases the mapping's views while a
        call may be using them (their use then raises ValueError), and that call met
        a closed cache.  Any other ValueError goes on as it was.
        """
        if self._mapped is None and not isinstance(exc, CacheClosedError):
            try:
                self._open_arena()
            except CacheClosedError as closed:
                raise closed from None  # the released view's error is noise here

    def _open_arena(self) -> Arena:
        if self._mapped is None:
            raise CacheClosedError(
                f"cache {self._name!r} is closed; create a new {self._owner} to use it"
            )
        return self._arena

    def _skip(self, kind: str, message: str, *args: object) -> None:
        """Count a skipped update and warn, at most once per interval per kind."""
        self._count(_arena.SLOT_SKIPPED)
        now = time.monotonic()
        if now - self._last_warning.get(kind, -math.inf) < _WARNING_INTERVAL_S:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        self._last_warning[kind] = now
        suppressed = self._suppressed.pop(kind, 0)
        suffix = f" ({suppressed} similar warnings suppressed)" if suppressed else ""
        logger.warning("shmcache %r: update not stored: " + message + suffix, self._name, *args)

    def skip_lock_timeout(self) -> None:
        self._skip("lock-timeout", "lock not had within lock_timeout=%ss", self._lock_timeout)

    def _flush_locked(self, arena: Arena) -> None:
        """*Locked.* Move counts kept in the process into the segment."""
        self._counters.flush_locked(arena)
        if self._remote is not None:
            self._flush_remote_locked()

    def _maybe_flush(self, arena: Arena) -> None:
        if self._counters.flush_due():
            self._run_locked(self._flush_repaired, arena, timeout_s=0.0)  # never wait for it

    def _flush_repaired(self, arena: Arena) -> None:
        arena.repair()
        self._flush_locked(arena)

    def _run_locked(
        self,
        fn: Callable[..., _T],
        *args: Any,
        timeout_s: float | None = None,
        pid: int | None = None,
    ) -> tuple[bool, _T | None]:
        """Run ``fn(*args)`` holding the writer lock, waiting at most ``timeout_s``.

        Returns ``(False, None)`` when the lock was not had in time.  The acquire is
        inside the ``try`` and the release is the first C call of the ``finally``,
        so an exception raised at any bytecode (KeyboardInterrupt, a signal
        handler's) never leaves the lock held; a write it cut short leaves the
        segment's busy word set and is repaired by the next lock holder.
        ``pid``: this process's pid, when the caller already read it in this call.
        """
        if pid is None:
            pid = _getpid()  # once: it is a syscall, and the lock and the arena need it
        fd = self._lock.thread_fd(pid)
        words = self._arena_words
        held = False
        try:
            held = self._lock.acquire_fd(
                fd, self._lock_timeout if timeout_s is None else timeout_s
            )
            if not held:
                return False, None
            words[_arena.W_LOCK_PID] = pid
            return True, fn(*args)
        finally:
            if held:
                words[_arena.W_LOCK_PID] = 0
            if fd >= 0:
                # Not contextlib.suppress: its Python __enter__ could be interrupted
                # before the unlock runs.
                try:  # noqa: SIM105
                    flock(fd, UNLOCK)
                except OSError:  # closed by close() in another thread meanwhile
                    pass

    async def _arun_locked(self, fn: Callable[..., _T], *args: Any) -> tuple[bool, _T | None]:
        """:meth:`_run_locked` for coroutines: waits with ``asyncio.sleep``."""
        pid = _getpid()
        fd = self._lock.thread_fd(pid)
        words = self._arena_words
        held = False
        try:
            held = await self._acquire_async(fd)
            if not held:
                return False, None
            words[_arena.W_LOCK_PID] = pid
            return True, fn(*args)
        finally:
            if held:
                words[_arena.W_LOCK_PID] = 0
            if fd >= 0:
                try:  # noqa: SIM105 (see _run_locked)
                    flock(fd, UNLOCK)
                except OSError:
                    pass

    def _decode(self, value: memoryview | bytes | None, decode: Decode) -> Any:
        """The front-end's value of ``value``, or None (absent or refused)."""
        if value is None:
            return None
        try:
            # The record matched its key digest, position and crc32.
            return decode(value)
        except CodecVersionError:
            return None  # written by another release (rolling upgrade): a plain miss
        except CodecError as exc:
            # The record passed its crc, so this is a codec bug or a foreign writer.
            logger.error("shmcache %r: undecodable entry treated as a miss: %s",
                         self._name, exc)
            return None

    def _result(self, arena: Arena, value: memoryview | None, decode: Decode) -> Any:
        decoded = self._decode(value, decode)
        self._count(_arena.SLOT_MISSES if decoded is None else _arena.SLOT_HITS)
        if self._counters.view is None:
            self._maybe_flush(arena)
        return decoded

    def short_of_space(self) -> bool:
        """Is at least half the data space taken by live entries?

        Front-ends compress values only then: compression makes room (1.1-1.7x the
        entries per MiB for 0.3-2 KB answers) but costs every hit of a compressed
        value 2-6 µs, which a segment with room to spare need not pay.
        """
        return self._arena.counter(_arena.W_USED) >= self._compress_from_bytes

    def fits(self, payload_length: int) -> bool:
        """Does a payload of this many bytes fit in one record of the segment?"""
        arena = self._arena
        return arena.record_bytes(payload_length) <= arena.max_record_bytes

    @property
    def max_payload_bytes(self) -> int:
        """The largest payload one entry of this segment can hold."""
        return self._arena.max_record_bytes - _arena.RECORD_HEADER_BYTES

    def expiry(self, ttl: float | None = None) -> float:
        """The expiry (unix seconds, 0: none) of an entry written now.

        Args:
            ttl: Seconds; None: this engine's ``ttl``.
        """
        ttl_s = self._ttl if ttl is None else ttl
        return time.time() + ttl_s if ttl_s is not None else 0.0

    def skip(self, kind: str, message: str, *args: object) -> None:
        """Count a skipped write and warn (at most once per interval per kind)."""
        self._skip(kind, message, *args)

    def skip_too_large(self, payload_length: int) -> None:
        """Count and warn about a value too large for one entry."""
        self._skip(
            "too-large",
            "the value takes %d bytes; the largest entry this segment takes is %d "
            "(create it with a larger size_bytes)",
            payload_length, self.max_payload_bytes,
        )

    def _store_locked(
        self,
        arena: Arena,
        items: Sequence[Prepared],
        caller: CallerKey | None,
        pid: int | None = None,
    ) -> None:
        # No try/finally around end(): a write cut short must leave the busy word
        # set, so the next lock holder repairs it (see Arena.begin).
        arena.begin()
        for item in items:
            arena.store(*item)
        if self._counters.pending:
            self._flush_locked(arena)
        elif self._remote is not None:
            self._flush_remote_locked()
        arena.end()
        if caller is not None and self._coalescer is not None:
            # Stored: the waiters find it now.  The caller's other leases end too.
            self._coalescer.release_locked(caller, pid)

    def _delete_locked(self, arena: Arena, digests: Sequence[bytes]) -> int:
        arena.begin()
        removed = sum(arena.delete(digest) for digest in digests)
        self._flush_locked(arena)
        arena.end()
        return removed

    def _clear_locked(
        self, arena: Arena, tag: int | None, event: _remote.ClearEvent | None = None
    ) -> None:
        arena.begin()
        if tag is None:
            arena.clear()
        else:
            removed = arena.clear_llm_string(tag)
            logger.debug("shmcache %r: cleared %d entries", self._name, removed)
        words = self._arena_words
        # Remote fills that asked Redis before this clear are dropped (_fill_locked).
        words[_remote.W_LOCAL_CLEARS] = (words[_remote.W_LOCAL_CLEARS] + 1) & U64_MASK
        if event is not None:
            self._note_clear_locked(event)
        self._flush_locked(arena)
        arena.end()

    def timeout_error(self, action: str) -> LockTimeoutError:
        holder = self.lock_holder()
        who = (
            f"process {holder} holds it (if it is stopped, `kill -CONT {holder}`; if it "
            "hangs, end it: the kernel then frees the lock)"
            if holder
            else "another process holds it"
        )
        return LockTimeoutError(
            f"could not {action} cache {self._name!r} within lock_timeout="
            f"{self._lock_timeout}s: {who}; retry, or raise lock_timeout"
        )

    async def _acquire_async(self, fd: int) -> bool:
        """Take the lock without blocking the event loop (bounded by lock_timeout)."""
        lock = self._lock
        if lock.try_acquire_fd(fd):
            return True
        if fd < 0:
            return False
        deadline = time.monotonic() + self._lock_timeout
        backoff = _ASYNC_FIRST_BACKOFF_S
        while True:
            await asyncio.sleep(backoff)
            if lock.try_acquire_fd(fd):
                return True
            if time.monotonic() >= deadline:
                return False
            backoff = min(backoff * 2, _ASYNC_MAX_BACKOFF_S)

    @staticmethod
    def _find_repaired(arena: Arena, digest: bytes) -> memoryview | None:
        arena.repair()
        found = arena.find_locked(digest, time.time())
        # The view must not outlive the lock: copy the (already crc-checked) bytes.
        return None if found is None else memoryview(bytes(found))

    # -- reads --------------------------------------------------------------------

    def get(self, digest: bytes, tag: int, decode: Decode, decode_untrusted: Decode) -> Any:
        """The decoded value stored under ``digest``, or None.

        A miss with coalescing makes this caller the computing caller of the key
        (None), or waits for the one computing it.  With a remote tier a local miss
        asks Redis; a value found there is stored here with its remaining TTL.

        Args:
            digest: The key's 32-byte digest.
            tag: The key's clear tag (what :meth:`clear` removes it by); only the
                remote tier reads it (its keys carry it), so without one any int.
            decode: Decodes a local (crc-checked) payload; CodecError: a miss.
            decode_untrusted: Decodes a payload from Redis; CodecError: a miss.

        Raises:
            CacheClosedError: the engine was closed.
        """
        try:
            if self._mapped is None:
                self._open_arena()  # raises CacheClosedError
            arena = self._arena
            found: memoryview | Contended | None = arena.find(digest, time.time())
            if found is None:
                if self._coalescer is not None:
                    return self._coalesced_miss(arena, digest, tag, decode, decode_untrusted)
                if self._remote is not None:
                    return self._drive(
                        self._remote_flow(arena, digest, tag, None, decode_untrusted)
                    )
                counters = self._counters
                counts = counters.view
                if counts is not None and counters.pid == _getpid():
                    # The common miss, kept short.
                    counts[_arena.SLOT_MISSES] = (counts[_arena.SLOT_MISSES] + 1) & U64_MASK
                    return None
            elif type(found) is memoryview:
                # The common hit, kept short: _result does the same with more calls.
                try:
                    value = decode(found)
                except CodecError:
                    value = None
                counters = self._counters
                counts = counters.view
                if value is not None and counts is not None and counters.pid == _getpid():
                    counts[_arena.SLOT_HITS] = (counts[_arena.SLOT_HITS] + 1) & U64_MASK
                    return value
            else:
                # A writer kept changing this bucket: read under the lock (bounded wait).
                found = self._run_locked(self._find_repaired, arena, digest)[1]
            assert not isinstance(found, Contended)
            return self._result(arena, found, decode)
        except ValueError as exc:
            self.raise_if_closed(exc)  # close() in another thread released the views
            raise

    async def aget(
        self, digest: bytes, tag: int, decode: Decode, decode_untrusted: Decode
    ) -> Any:
        """Async :meth:`get`: lock-free, so a hit runs inline with no thread hop."""
        try:
            arena = self._open_arena()
            found: memoryview | Contended | None = arena.find(digest, time.time())
            if found is None:
                if self._coalescer is not None:
                    return await self._acoalesced_miss(arena, digest, tag, decode, decode_untrusted)
                if self._remote is not None:
                    return await self._adrive(
                        self._remote_flow(arena, digest, tag, None, decode_untrusted)
                    )
            if found is CONTENDED:
                found = (await self._arun_locked(self._find_repaired, arena, digest))[1]
            assert not isinstance(found, Contended)
            return self._result(arena, found, decode)
        except ValueError as exc:
            self.raise_if_closed(exc)  # close() in another thread released the views
            raise

    # -- coalescing ---------------------------------------------------------------

    def _poll(self, arena: Arena, digest: bytes) -> memoryview | None:
        found = arena.find(digest, time.time())
        return found if isinstance(found, memoryview) else None

    def _settle(
        self,
        value: memoryview | bytes | None,
        waited: bool,
        decode: Decode,
        pid: int | None = None,
    ) -> Any:
        decoded = self._decode(value, decode)
        if decoded is None:
            self._count(_arena.SLOT_MISSES, pid)
        else:
            self._count(_arena.SLOT_HITS, pid)
            if waited:
                self._count(_arena.SLOT_COALESCED, pid)
        return decoded

    def _coalesced_miss(
        self, arena: Arena, digest: bytes, tag: int, decode: Decode, decode_untrusted: Decode
    ) -> Any:
        """A miss with coalescing: compute (None), or wait for the computing caller."""
        coalescer = self._coalescer
        assert coalescer is not None
        # One getpid per locked step, not one per helper (each is a syscall).  A fork
        # child keeps only the forking thread; the pid is read again after each wait,
        # the one place this call gives other code (a signal handler) much time.
        pid = _getpid()
        if self._counters.pid != pid:
            self._counters.slot_view()  # a fork made from C: become this process's own owner
        caller = caller_key()
        if coalescer.holds(caller, digest, pid):
            # our own lease: a retry, or generate([p, p])
            return self._settle(None, False, decode, pid)
        waited_on: Lease | None = None  # the computing caller we wait for, and until when
        patience = 0
        waited = False
        while True:
            # The first step is usually one compiled call (lock, look, lease).
            step = coalescer.claim_fast(digest, caller, pid) if waited_on is None else None
            done = step is not None
            if step is None:
                done, step = self._run_locked(
                    coalescer.step_locked, digest, caller, waited_on, patience, pid, pid=pid
                )
            if not done or step is None or step.kind == "uncoalesced":
                if self._mapped is None:
                    return None  # closed by another thread while we waited
                self._count(_arena.SLOT_UNCOALESCED, pid)
                if self._remote is not None:
                    return self._drive(
                        self._remote_flow(arena, digest, tag, None, decode_untrusted)
                    )
                return self._settle(None, False, decode, pid)
            if step.kind == "hit":
                return self._settle(step.value, waited, decode, pid)
            if step.kind == "own":
                if self._remote is not None:  # this host's computing caller asks Redis
                    return self._drive(
                        self._remote_flow(arena, digest, tag, caller, decode_untrusted)
                    )
                return self._settle(None, False, decode, pid)
            assert step.lease is not None
            waited = True
            if waited_on is None or not same_holder(step.lease, waited_on):
                # A new computing caller: our coalesce_timeout starts again for it.
                waited_on, patience = step.lease, coalescer.patience_deadline_ns()
            value = coalescer.wait(step.lease, patience, lambda: self._poll(arena, digest))
            pid = _getpid()
            if self._counters.pid != pid:
                self._counters.slot_view()
            if value is not None:
                return self._settle(value, True, decode, pid)
            # The lease ended without a value: take it over, or wait for the new owner.

    async def _acoalesced_miss(
        self, arena: Arena, digest: bytes, tag: int, decode: Decode, decode_untrusted: Decode
    ) -> Any:
        """:meth:`_coalesced_miss` for coroutines (waits with ``asyncio.sleep``)."""
        coalescer = self._coalescer
        assert coalescer is not None
        pid = _getpid()
        if self._counters.pid != pid:
            self._counters.slot_view()
        caller = caller_key()
        if coalescer.holds(caller, digest, pid):
            return self._settle(None, False, decode)
        waited_on: Lease | None = None
        patience = 0
        waited = False
        while True:
            # Never waits for the lock: a busy one sends it to the awaited step.
            step = coalescer.claim_fast(digest, caller, pid) if waited_on is None else None
            done = step is not None
            if step is None:
                done, step = await self._arun_locked(
                    coalescer.step_locked, digest, caller, waited_on, patience
                )
            if not done or step is None or step.kind == "uncoalesced":
                if self._mapped is None:
                    return None
                self._count(_arena.SLOT_UNCOALESCED)
                if self._remote is not None:
                    return await self._adrive(
                        self._remote_flow(arena, digest, tag, None, decode_untrusted)
                    )
                return self._settle(None, False, decode)
            if step.kind == "hit":
                return self._settle(step.value, waited, decode)
            if step.kind == "own":
                coalescer.watch_task(caller)  # a cancelled or failed task frees its waiters
                if self._remote is not None:
                    self._watch_remote_task(caller)
                    return await self._adrive(
                        self._remote_flow(arena, digest, tag, caller, decode_untrusted)
                    )
                return self._settle(None, False, decode)
            assert step.lease is not None
            waited = True
            if waited_on is None or not same_holder(step.lease, waited_on):
                waited_on, patience = step.lease, coalescer.patience_deadline_ns()
            value = await coalescer.await_value(
                step.lease, patience, lambda: self._poll(arena, digest)
            )
            if value is not None:
                return self._settle(value, True, decode)

    def release_leases(self) -> None:
        """End the calling thread's/task's leases (what ``on_llm_error`` does).

        Call it when a model call that followed a missing lookup failed outside
        LangChain's callbacks, so the callers waiting for it go on at once.
        """
        if self._coalescer is not None and self._mapped is not None:
            self._coalescer.release(caller_key())
            caller = LEASE_CALLER.get()  # the run's caller, when we run in a copy of it
            if caller is not None:
                self._coalescer.release(caller)
            if self._remote is not None:
                self._end_remote_leases(caller_key())
                if caller is not None:
                    self._end_remote_leases(caller)

    # -- writes -------------------------------------------------------------------

    def caller_leases(self) -> CallerKey | None:
        """The calling thread's/task's key when it holds leases, else None.

        Taken before a write is prepared: the write ends those leases, whether it
        stores or is skipped (:meth:`put`, :meth:`end_leases`).
        """
        self._open_arena()
        coalescer = self._coalescer
        if coalescer is None:
            return None
        pid = _getpid()
        if self._counters.pid != pid:
            self._counters.slot_view()
        caller = caller_key()
        return caller if coalescer.has_leases(caller, pid) else None

    def end_leases(self, caller: CallerKey | None) -> None:
        """A write was skipped: its caller's leases (local and remote) end all the same."""
        if caller is not None and self._coalescer is not None:
            self._coalescer.release(caller)
        if self._remote is not None:
            self._end_remote_leases(caller_key())

    def put(self, items: Sequence[Prepared], caller: CallerKey | None = None) -> bool:
        """Store entries (each replacing its key's), under one lock hold.

        Every payload must fit (:meth:`fits`).  The caller's leases end either way.

        Returns:
            False if the lock was not had within ``lock_timeout`` (nothing stored).
        """
        try:
            arena = self._open_arena()
            pid = _getpid()  # once: the lock, the arena and the lease registry need it
            if not self._run_locked(self._store_locked, arena, items, caller, pid, pid=pid)[0]:
                self.end_leases(caller)
                return False
            remote = self._remote
            if remote is not None:  # then the other hosts (bounded by remote_timeout)
                puts, others = self._remote_put_args(items)
                for put in puts:
                    remote.put(*put)
                remote.release(others)
            return True
        except ValueError as exc:
            self.raise_if_closed(exc)  # close() in another thread released the views
            raise

    async def aput(self, items: Sequence[Prepared], caller: CallerKey | None = None) -> bool:
        """Async :meth:`put`; waits for the lock without blocking the event loop."""
        try:
            arena = self._open_arena()
            if not (await self._arun_locked(self._store_locked, arena, items, caller))[0]:
                self.end_leases(caller)
                return False
            remote = self._remote
            if remote is not None:  # in a worker thread: the loop never waits for Redis
                puts, others = self._remote_put_args(items)
                for put in puts:
                    await remote.run(remote.put, *put)
                if others:
                    await remote.run(remote.release, others)
            return True
        except ValueError as exc:
            self.raise_if_closed(exc)  # close() in another thread released the views
            raise

    def delete(self, digests: Sequence[bytes]) -> int:
        """Remove the entries of these keys; returns how many there were.

        Raises:
            LockTimeoutError: the lock was not had within ``lock_timeout``.
        """
        try:
            arena = self._open_arena()
            done, removed = self._run_locked(self._delete_locked, arena, digests)
            if not done:
                raise self.timeout_error("delete from")
            return removed or 0
        except ValueError as exc:
            self.raise_if_closed(exc)  # close() in another thread released the views
            raise

    async def adelete(self, digests: Sequence[bytes]) -> int:
        """Async :meth:`delete`."""
        try:
            arena = self._open_arena()
            done, removed = await self._arun_locked(self._delete_locked, arena, digests)
            if not done:
                raise self.timeout_error("delete from")
            return removed or 0
        except ValueError as exc:
            self.raise_if_closed(exc)  # close() in another thread released the views
            raise

    def clear(self, tag: int | None = None) -> None:
        """Remove every entry, or with ``tag`` only the entries stored under it.

        The change is seen by every process of the host at once.  With a remote tier
        the remote entries go first, then every other host's segment follows within
        about a second.  A clear that cannot reach Redis is kept and made once Redis
        answers again (while this process lives).

        Raises:
            LockTimeoutError: the lock was not had within ``lock_timeout``.
            CacheClosedError: the engine was closed.
        """
        arena = self._open_arena()
        event = None
        if self._remote is not None:
            event = self._remote.clear(tag)
        if not self._run_locked(self._clear_locked, arena, tag, event)[0]:
            raise self.timeout_error("clear")

    async def aclear(self, tag: int | None = None) -> None:
        """Async :meth:`clear`; waits for the lock without blocking the event loop."""
        arena = self._open_arena()
        event = None
        remote = self._remote
        if remote is not None:
            result = await remote.run(remote.clear, tag)
            if isinstance(result, _remote.ClearEvent):
                event = result
            elif result is FAILED:  # not even tried (breaker open): keep it for later
                remote.defer_clear(tag)
        if not (await self._arun_locked(self._clear_locked, arena, tag, event))[0]:
            raise self.timeout_error("clear")

    def scan(self) -> Iterator[tuple[int, bytes]]:
        """``(tag, payload)`` of every live entry, read under the lock in short steps.

        Entries written or removed while the scan runs may or may not be seen.

        Raises:
            LockTimeoutError: the lock was not had within ``lock_timeout``.
        """
        arena = self._open_arena()
        step = _SCAN_STEP_BUCKETS
        for start in range(0, arena.n_buckets, step):
            done, found = self._run_locked(arena.scan, start, start + step, time.time())
            if not done:
                raise self.timeout_error("read")
            yield from found or ()

    # -- statistics and lifetime ------------------------------------------------------

    def stats(self) -> CacheStats:
        """Return the segment's counters, summed over all processes.

        Hits, misses and skips of every process show at once (each instance counts
        into its own slot in the segment), including those of processes that have
        since died or ended by ``os._exit``.
        """
        counts = self._open_arena().counts()
        # What this instance has not published yet (only without an owner slot, or
        # remote events waiting for the lock).
        self._counters.add_pending(counts)
        if self._remote is not None:
            for name, extra in zip(
                ("remote_hits", "remote_misses", "remote_errors"),
                self._remote.pending_counts(),
                strict=True,
            ):
                counts[name] += extra
        return CacheStats(**counts)

    def lock_holder(self) -> int | None:
        """The pid that the writer lock's current holder recorded, or None.

        For diagnostics (the CLI names it when the lock is not had): a process in
        another pid namespace records a pid that may mean nothing here.
        """
        pid = self._open_arena().lock_holder()
        return pid or None

    def check(self) -> list[str]:
        """Verify the whole segment (what ``shmcache check`` runs).

        What a writer killed mid-write left half-done is repaired first and is not
        reported: only real damage is.  The lock is held in short steps (about
        10 ms each), so live writers are never held up for long.

        Returns:
            A description of each problem found; empty when the segment is sound.

        Raises:
            LockTimeoutError: the lock was not had within ``lock_timeout``.
        """
        arena = self._open_arena()
        problems: list[str] = []
        plan = arena.verify_plan()
        for step in plan:
            done, found = self._run_locked(step)
            if not done:
                raise self.timeout_error("check")
            problems.extend(found or ())
        done, found = self._run_locked(LeaseTable(self._arena_words).problems)
        if not done:
            raise self.timeout_error("check")
        problems.extend(found or ())
        return problems

    def flush(self) -> bool:
        """Publish this process's pending hit/miss/skip counts now.

        Counts normally go straight to this instance's slot in the segment; they
        wait in the process only while every slot is taken.

        Returns:
            True if they were published, False if the lock was not had in time.
        """
        arena = self._open_arena()
        if self._counters.view is not None and not (
            self._counters.pending or self._remote_pending()
        ):
            return True
        return self._run_locked(self._flush_repaired, arena)[0]

    def close(self) -> None:
        """Detach this process from the segment (idempotent).

        Pending counts are published first (if the lock is had within
        ``lock_timeout``).  The segment itself stays for the other processes.
        """
        mapped = self._mapped
        if mapped is None:
            return
        try:
            remote = self._remote
            if remote is not None:
                # Other hosts' waiters go on at once; then stop the poller (it uses
                # the mapping) before the mapping goes.
                for caller in list(self._remote_leases):
                    self._end_remote_leases(caller, in_loop=False)
                remote.close()
            if (
                self._counters.pending or self._holds_leases()
                or self._remote_pending()
            ):
                self._run_locked(self._detach_locked, self._arena)
        finally:
            self._mapped = None
            _OPEN_ENGINES.discard(self)
            self._counters.active = False
            self._counters.release()  # the mapping cannot close while viewed
            self._arena.release()
            self._finalizer.detach()
            self._resources.release()  # the slot (its counts stay), lock fds, fd
            with contextlib.suppress(BufferError):
                mapped.mapping.close()

    def _holds_leases(self) -> bool:
        coalescer = self._coalescer
        return coalescer is not None and coalescer.holds_any()

    def _detach_locked(self, arena: Arena) -> None:
        self._flush_repaired(arena)
        if self._coalescer is not None and self._counters.pid == _getpid():
            self._coalescer.release_all_locked()  # waiters go on at once

    def unlink(self) -> None:
        """Remove the segment file (before or after :meth:`close`).

        Processes already attached keep using the old segment until they close;
        to empty a live cache for everyone use :meth:`clear` instead.
        """
        directory, base = os.path.split(self._path)
        for path in (
            self._path,
            os.path.join(directory, f".{base}.lock"),
            _owners.owners_path(self._path),
        ):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def reopen_args(self) -> dict[str, Any]:
        """What re-creates this engine elsewhere (a pickle carries it; never content)."""
        self._open_arena()  # a closed engine does not come back to life in a pickle
        remote = None if self._remote is None else self._remote.spec.reduce()
        return {
            "name": self._name, "directory": self._directory_arg, "ttl": self._ttl,
            "lock_timeout": self._lock_timeout, "size_bytes": self._requested_size,
            "coalesce": self._coalescer is not None,
            "coalesce_timeout": self._coalesce_timeout, "remote": remote,
            "remote_timeout": self._remote_timeout,
        }


def _after_fork_in_child() -> None:
    # The parent's slot and pending counts are the parent's, not the child's.
    for cache in list(_OPEN_ENGINES):
        cache._counters.reset()
        cache._resources.slot = -1
        if cache._coalescer is not None:
            cache._coalescer.forget_all()
        cache._remote_leases = {}  # the parent's callers' (the tier resets itself)
        cache._remote_watched = set()


def _release_leases_of_current_caller() -> None:
    """LangChain reported a failed model call: its caller's waiters go on now."""
    for cache in list(_OPEN_ENGINES):
        cache.release_leases()


def _flush_at_exit() -> None:
    for cache in list(_OPEN_ENGINES):
        try:
            cache.close()
        except (OSError, ShmCacheError):  # exit must go on whatever happens here
            logger.debug("could not close %r at exit", cache, exc_info=True)


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_flush_at_exit)
_callbacks.install(_release_leases_of_current_caller)

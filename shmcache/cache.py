"""``SharedMemoryCache``: a LangChain ``BaseCache`` shared by every process on the host."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import math
import os
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Final, TypeVar

from langchain_core.caches import BaseCache
from langchain_core.outputs import Generation

from . import _arena, _callbacks, _owners
from ._arena import CONTENDED, U64_MASK, Arena, Contended, Geometry
from ._coalesce import LEASE_CALLER, Coalescer, caller_key, same_holder
from ._codec import (
    CodecError,
    CodecVersionError,
    UnencodableValueError,
    decode_verified,
    encode_generations,
)
from ._errors import CacheClosedError, InvalidArgumentError, LockTimeoutError, ShmCacheError
from ._keys import key_digest, llm_string_hash
from ._leases import Lease, LeaseTable
from ._lock import UNLOCK, SegmentLock, flock
from ._segment import (
    MappedFile,
    check_name,
    open_or_create,
    resolve_directory,
    segment_path,
)
from ._stats import CacheStats

__all__ = ["DEFAULT_LOCK_TIMEOUT_S", "DEFAULT_SIZE_BYTES", "SharedMemoryCache"]

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
# Hit/miss counts go to this instance's owner slot in the segment at once.  Only while
# every slot is taken do they wait in the process, flushed under the lock at writes,
# at close, and at least this often while the cache is in use.
_FLUSH_INTERVAL_S: Final = 1.0
# The same kind of skipped-update warning is logged at most once in this interval.
_WARNING_INTERVAL_S: Final = 10.0
_ASYNC_FIRST_BACKOFF_S: Final = 50e-6
_ASYNC_MAX_BACKOFF_S: Final = 2e-3

# Caches open in this process: counts are flushed at exit and reset in fork children.
_OPEN_CACHES: weakref.WeakSet[SharedMemoryCache] = weakref.WeakSet()
# Open instances by what their pickle carries, so unpickling in a process where that
# cache is already open reuses it instead of opening fds and a slot per task.
_BY_SETTINGS: weakref.WeakValueDictionary[tuple[object, ...], SharedMemoryCache] = (
    weakref.WeakValueDictionary()
)
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


def _check_seconds(name: str, value: object) -> float:
    """Validate a positive, finite number of seconds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, not {type(value).__name__}")
    if not (value > 0 and math.isfinite(value)):
        raise InvalidArgumentError(
            f"{name} must be a finite number > 0 seconds, got {value!r}"
        )
    return float(value)


def _check_key(prompt: object, llm_string: object) -> None:
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, not {type(prompt).__name__}")
    if not isinstance(llm_string, str):
        raise TypeError(f"llm_string must be a str, not {type(llm_string).__name__}")


class SharedMemoryCache(BaseCache):
    """A LangChain LLM cache whose entries live in one shared-memory segment.

    Every process of this user that opens the same ``name`` (in the same
    ``directory``) shares the cache: gunicorn workers, multiprocessing pools and
    separate programs alike.  An instance made before ``fork`` keeps working in the
    child, and instances pickle (by name) for ``spawn``.

    Args:
        name: Cache name: 1-64 characters of ``[A-Za-z0-9._-]``, not starting with ``.``.
        size_bytes: Segment size, fixed when the segment is created (default 32 MiB,
            minimum 1 MiB).  An existing segment keeps its size.
        ttl: Seconds an entry stays valid after it is written; None: until evicted.
        directory: Where segment files live; default ``/dev/shm/shmcache-<uid>``.
            A directory on disk makes the cache persist across reboots.
        lock_timeout: The longest any call waits for another process, in seconds.
        coalesce: Concurrent identical misses (any process, thread or asyncio task
            of this user on the host): one caller computes, the others wait for its
            value.  Open caches that only peek (monitoring) with ``coalesce=False``.
        coalesce_timeout: The longest a lookup waits for one computing caller, in
            seconds (finite, > 0).

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: an argument is out of range.
        ShmCacheError: the segment cannot be opened (its subclasses say why).

    Example:
        >>> from langchain_core.globals import set_llm_cache
        >>> set_llm_cache(SharedMemoryCache("myapp"))  # doctest: +SKIP
    """

    # This process's slot in the segment's counter table (None until claimed).
    _counts: memoryview | None

    def __init__(
        self,
        name: str,
        *,
        size_bytes: int = _DEFAULT_SIZE,
        ttl: float | None = None,
        directory: str | os.PathLike[str] | None = None,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT_S,
        coalesce: bool = True,
        coalesce_timeout: float = DEFAULT_COALESCE_TIMEOUT_S,
    ) -> None:
        self._name = check_name(name)
        if not isinstance(coalesce, bool):
            raise TypeError(f"coalesce must be a bool, not {type(coalesce).__name__}")
        self._coalesce_timeout = _check_seconds("coalesce_timeout", coalesce_timeout)
        if isinstance(size_bytes, bool) or not isinstance(size_bytes, int):
            raise TypeError(f"size_bytes must be an int, not {type(size_bytes).__name__}")
        if size_bytes < MIN_SIZE_BYTES:
            raise InvalidArgumentError(
                f"size_bytes must be at least {MIN_SIZE_BYTES} (1 MiB), got {size_bytes}"
            )
        self._ttl = None if ttl is None else _check_seconds("ttl", ttl)
        self._lock_timeout = _check_seconds("lock_timeout", lock_timeout)
        self._requested_size = size_bytes
        self._directory_arg = None if directory is None else os.fspath(directory)
        directory_path = resolve_directory(directory, create=True)
        self._path = segment_path(directory_path, self._name, _arena.FORMAT_VERSION)
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
        self._mapped: MappedFile | None = mapped
        self._resources = _Resources(mapped.fd, self._lock, owner_file)
        # Dropped without close(): give back the fds and the owner slot.
        self._finalizer = weakref.finalize(self, self._resources.release)
        self._coalescer = Coalescer(self, self._coalesce_timeout) if coalesce else None
        actual = self._arena.geometry.size_bytes
        if not mapped.created and actual != size_bytes and type(size_bytes) is not _DefaultSize:
            logger.warning(
                "segment %s already exists with size_bytes=%d; ignoring size_bytes=%d "
                "(remove it with `%s` to change its size)",
                self._path, actual, size_bytes, self._cli_command("rm"),
            )
        # Opening takes no lock: what a dead writer left is repaired by the next
        # writer, and the owner slot is claimed (lock-free) at the first count.
        self._reset_local_counts()
        self._last_warning: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        # (prompt, llm_string, digest) of this instance's last miss.
        self._last_miss: tuple[str | None, str | None, bytes] = (None, None, b"")
        _OPEN_CACHES.add(self)
        _BY_SETTINGS[self._settings_key()] = self

    def _settings_key(self) -> tuple[object, ...]:
        return (
            self._path, self._ttl, self._lock_timeout, self._coalescer is not None,
            self._coalesce_timeout,
        )

    def _read_geometry(self, mapped: MappedFile) -> Geometry:
        hint = f"remove it with `{self._cli_command('rm')}` and re-open the cache"
        return _arena.read_geometry(mapped.mapping, self._path, hint)

    def _cli_command(self, verb: str) -> str:
        directory = "" if self._directory_arg is None else f" --directory {self._directory_arg}"
        return f"shmcache {verb} {self._name}{directory}"

    def _reset_local_counts(self) -> None:
        # Counts go to an owner slot, claimed at the first count (see _counts_view).
        # Only while every slot is taken do they wait here, flushed under the lock.
        counts = getattr(self, "_counts", None)
        if counts is not None:
            counts.release()
        self._counts: memoryview | None = None
        self._counts_pid = 0
        self._hits = 0
        self._misses = 0
        self._skipped = 0
        self._next_claim = 0.0
        self._next_flush = 0.0

    def _counts_view(self) -> memoryview | None:
        """This instance's owner-slot view, claiming a slot for this process if needed.

        The pid check catches forks made from C (uWSGI), which run no at-fork hooks:
        the child must not count into its parent's slot.
        """
        counts = self._counts
        if counts is not None and self._counts_pid == _getpid():
            return counts
        if self._mapped is None:
            return None
        if counts is not None:  # inherited across a fork: the parent's slot
            self._reset_local_counts()
            self._resources.slot = -1
            if self._coalescer is not None:
                self._coalescer.forget_all()  # the parent's leases stay the parent's
        now = time.monotonic()
        if now < self._next_claim:
            return None
        resources = self._resources
        slot = resources.owner_file.claim(_arena.PROCESS_SLOTS, prefer=_getpid())
        if slot is None:
            self._next_claim = now + _FLUSH_INTERVAL_S
            logger.warning(
                "shmcache %r: all %d owner slots are in use; counting in the process "
                "(flushed under the lock)", self._name, _arena.PROCESS_SLOTS,
            )
            return None
        resources.slot, resources.slot_pid = slot, _getpid()
        counts = self._arena.owner_slot(slot)
        counts[_arena.SLOT_GENERATION] = (counts[_arena.SLOT_GENERATION] + 1) & U64_MASK
        counts[_arena.SLOT_PID] = _getpid()
        self._counts, self._counts_pid = counts, _getpid()
        return counts

    def _count(self, slot_word: int) -> None:
        counts = self._counts
        if counts is None or self._counts_pid != _getpid():
            counts = self._counts_view()
        if counts is not None:
            counts[slot_word] = (counts[slot_word] + 1) & U64_MASK
        elif slot_word == _arena.SLOT_HITS:
            self._hits += 1
        elif slot_word == _arena.SLOT_MISSES:
            self._misses += 1
        elif slot_word == _arena.SLOT_SKIPPED:
            self._skipped += 1
        # (coalescing counts need a slot: without one nothing is coalesced)

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
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._mapped is None

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"SharedMemoryCache({self._name!r}, path={self._path!r}, {state})"

    # -- helpers ----------------------------------------------------------------

    def _open_arena(self) -> Arena:
        if self._mapped is None:
            raise CacheClosedError(
                f"cache {self._name!r} is closed; create a new SharedMemoryCache to use it"
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

    def _skip_lock_timeout(self) -> None:
        self._skip("lock-timeout", "lock not had within lock_timeout=%ss", self._lock_timeout)

    def _flush_locked(self, arena: Arena) -> None:
        """*Locked.* Move counts kept in the process into the segment."""
        if self._hits or self._misses or self._skipped:
            hits, misses, skipped = self._hits, self._misses, self._skipped
            self._hits = self._misses = self._skipped = 0
            counts = self._counts_view()
            if counts is not None:
                counts[_arena.SLOT_HITS] = (counts[_arena.SLOT_HITS] + hits) & U64_MASK
                counts[_arena.SLOT_MISSES] = (counts[_arena.SLOT_MISSES] + misses) & U64_MASK
                counts[_arena.SLOT_SKIPPED] = (counts[_arena.SLOT_SKIPPED] + skipped) & U64_MASK
            else:
                arena.add_counter(_arena.W_HITS, hits)
                arena.add_counter(_arena.W_MISSES, misses)
                arena.add_counter(_arena.W_SKIPPED, skipped)
        self._next_flush = time.monotonic() + _FLUSH_INTERVAL_S

    def _maybe_flush(self, arena: Arena) -> None:
        if self._counts is not None or time.monotonic() < self._next_flush:
            return
        self._next_flush = time.monotonic() + _FLUSH_INTERVAL_S
        self._run_locked(self._flush_repaired, arena, timeout_s=0.0)  # never wait for it

    def _flush_repaired(self, arena: Arena) -> None:
        arena.repair()
        self._flush_locked(arena)

    def _run_locked(
        self, fn: Callable[..., _T], *args: Any, timeout_s: float | None = None
    ) -> tuple[bool, _T | None]:
        """Run ``fn(*args)`` holding the writer lock, waiting at most ``timeout_s``.

        Returns ``(False, None)`` when the lock was not had in time.  The acquire is
        inside the ``try`` and the release is the first C call of the ``finally``,
        so an exception raised at any bytecode (KeyboardInterrupt, a signal
        handler's) never leaves the lock held; a write it cut short leaves the
        segment's busy word set and is repaired by the next lock holder.
        """
        fd = self._lock.thread_fd()
        words = self._arena_words
        held = False
        try:
            held = self._lock.acquire_fd(
                fd, self._lock_timeout if timeout_s is None else timeout_s
            )
            if not held:
                return False, None
            words[_arena.W_LOCK_PID] = _getpid()
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
        fd = self._lock.thread_fd()
        words = self._arena_words
        held = False
        try:
            held = await self._acquire_async(fd)
            if not held:
                return False, None
            words[_arena.W_LOCK_PID] = _getpid()
            return True, fn(*args)
        finally:
            if held:
                words[_arena.W_LOCK_PID] = 0
            if fd >= 0:
                try:  # noqa: SIM105 (see _run_locked)
                    flock(fd, UNLOCK)
                except OSError:
                    pass

    def _decode(self, value: memoryview | bytes | None) -> list[Generation] | None:
        if value is None:
            return None
        try:
            # The record matched its key digest, position and crc32.
            return decode_verified(value)
        except CodecVersionError:
            return None  # written by another release (rolling upgrade): a plain miss
        except CodecError as exc:
            # The record passed its crc, so this is a codec bug or a foreign writer.
            logger.error("shmcache %r: undecodable entry treated as a miss: %s",
                         self._name, exc)
            return None

    def _result(self, arena: Arena, value: memoryview | None) -> list[Generation] | None:
        generations = self._decode(value)
        self._count(_arena.SLOT_MISSES if generations is None else _arena.SLOT_HITS)
        if self._counts is None:
            self._maybe_flush(arena)
        return generations

    def _prepare(
        self, prompt: str, llm_string: str, return_val: Sequence[Generation]
    ) -> tuple[bytes, int, bytes, float] | None:
        """Validate and encode an update; None if it is skipped."""
        _check_key(prompt, llm_string)
        if type(return_val) is not list and (  # LangChain passes a list: skip the ABC check
            isinstance(return_val, (str, bytes)) or not isinstance(return_val, Sequence)
        ):
            raise TypeError(
                f"return_val must be a sequence of Generation, not {type(return_val).__name__}"
            )
        try:
            payload = encode_generations(return_val)
        except UnencodableValueError as exc:
            # The codec refuses anything but generations: sort out the caller's type
            # error from a value that is merely not storable (checked only here).
            for generation in return_val:
                if not isinstance(generation, Generation):
                    raise TypeError(
                        "return_val must be a sequence of Generation; it holds a "
                        f"{type(generation).__name__}"
                    ) from None
            self._skip("unencodable", "%s", exc)
            return None
        arena = self._arena
        if arena.record_bytes(len(payload)) > arena.max_record_bytes:
            self._skip(
                "too-large",
                "the value takes %d bytes; the largest entry this segment takes is %d "
                "(create it with a larger size_bytes)",
                len(payload), arena.max_record_bytes - _arena.RECORD_HEADER_BYTES,
            )
            return None
        expires = time.time() + self._ttl if self._ttl is not None else 0.0
        # LangChain updates with the very str objects it just missed with: reuse
        # that digest (identity, not equality: it costs nothing and cannot be wrong).
        prompt_seen, llm_string_seen, digest = self._last_miss
        if prompt_seen is not prompt or llm_string_seen is not llm_string:
            digest = key_digest(prompt, llm_string)
        return digest, llm_string_hash(llm_string), payload, expires

    def _store_locked(
        self,
        arena: Arena,
        prepared: tuple[bytes, int, bytes, float],
        caller: tuple[int, int] | None,
    ) -> None:
        # No try/finally around end(): a write cut short must leave the busy word
        # set, so the next lock holder repairs it (see Arena.begin).
        arena.begin()
        arena.store(*prepared)
        if self._hits or self._misses or self._skipped:
            self._flush_locked(arena)
        arena.end()
        if caller is not None and self._coalescer is not None:
            # Stored: the waiters find it now.  The caller's other leases end too.
            self._coalescer.release_locked(caller)

    def _update_caller(self) -> tuple[int, int] | None:
        """The caller whose leases an update ends, or None when it holds none."""
        coalescer = self._coalescer
        if coalescer is None:
            return None
        if self._counts_pid != _getpid():
            self._counts_view()
        caller = caller_key()
        return caller if coalescer.has_leases(caller) else None

    def _end_leases(self, caller: tuple[int, int] | None) -> None:
        """An update was skipped: its caller's leases end all the same."""
        if caller is not None and self._coalescer is not None:
            self._coalescer.release(caller)

    def _clear_locked(self, arena: Arena, llm_string: str | None) -> None:
        arena.begin()
        if llm_string is None:
            arena.clear()
        else:
            removed = arena.clear_llm_string(llm_string_hash(llm_string))
            logger.debug("shmcache %r: cleared %d entries", self._name, removed)
        self._flush_locked(arena)
        arena.end()

    @staticmethod
    def _clear_target(kwargs: dict[str, Any]) -> str | None:
        unknown = set(kwargs) - {"llm_string"}
        if unknown:
            raise TypeError(
                f"clear() got unexpected keyword argument(s) {sorted(unknown)}; "
                "only llm_string= is accepted"
            )
        if "llm_string" not in kwargs:
            return None
        llm_string = kwargs["llm_string"]
        if not isinstance(llm_string, str):
            raise TypeError(f"llm_string must be a str, not {type(llm_string).__name__}")
        return llm_string

    def _timeout_error(self, action: str) -> LockTimeoutError:
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

    # -- BaseCache API ------------------------------------------------------------

    def lookup(self, prompt: str, llm_string: str) -> list[Generation] | None:
        """Return the generations stored for ``(prompt, llm_string)``, or None.

        Each hit returns a new list of new objects, equal to what was stored.

        Raises:
            TypeError: ``prompt`` or ``llm_string`` is not a ``str``.
            CacheClosedError: the cache was closed.
        """
        if self._mapped is None:
            self._open_arena()  # raises CacheClosedError
        if not (isinstance(prompt, str) and isinstance(llm_string, str)):
            _check_key(prompt, llm_string)  # raises TypeError
        arena = self._arena
        digest = key_digest(prompt, llm_string)
        found: memoryview | Contended | None = arena.find(digest, time.time())
        if found is None:
            self._last_miss = (prompt, llm_string, digest)  # update() comes next
            if self._coalescer is not None:
                return self._coalesced_miss(arena, digest)
            counts = self._counts
            if counts is not None and self._counts_pid == _getpid():
                # The common miss, kept short.
                counts[_arena.SLOT_MISSES] = (counts[_arena.SLOT_MISSES] + 1) & U64_MASK
                return None
        if found is CONTENDED:
            # A writer kept changing this bucket: read under the lock (bounded wait).
            found = self._run_locked(self._find_repaired, arena, digest)[1]
        assert not isinstance(found, Contended)
        return self._result(arena, found)

    async def alookup(self, prompt: str, llm_string: str) -> list[Generation] | None:
        """Async :meth:`lookup`: lock-free, so it runs inline with no thread hop."""
        arena = self._open_arena()
        _check_key(prompt, llm_string)
        digest = key_digest(prompt, llm_string)
        found: memoryview | Contended | None = arena.find(digest, time.time())
        if found is None:
            self._last_miss = (prompt, llm_string, digest)  # aupdate() comes next
            if self._coalescer is not None:
                return await self._acoalesced_miss(arena, digest)
        if found is CONTENDED:
            found = (await self._arun_locked(self._find_repaired, arena, digest))[1]
        assert not isinstance(found, Contended)
        return self._result(arena, found)

    # -- coalescing ---------------------------------------------------------------

    def _poll(self, arena: Arena, digest: bytes) -> memoryview | None:
        found = arena.find(digest, time.time())
        return found if isinstance(found, memoryview) else None

    def _settle(self, value: memoryview | bytes | None, waited: bool) -> list[Generation] | None:
        generations = self._decode(value)
        if generations is None:
            self._count(_arena.SLOT_MISSES)
        else:
            self._count(_arena.SLOT_HITS)
            if waited:
                self._count(_arena.SLOT_COALESCED)
        return generations

    def _coalesced_miss(self, arena: Arena, digest: bytes) -> list[Generation] | None:
        """A miss with coalescing: compute (None), or wait for the computing caller."""
        coalescer = self._coalescer
        assert coalescer is not None
        if self._counts_pid != _getpid():
            self._counts_view()  # a fork made from C: become this process's own owner
        caller = caller_key()
        if coalescer.holds(caller, digest):
            return self._settle(None, False)  # our own lease: a retry, or generate([p, p])
        waited_on: Lease | None = None  # the computing caller we wait for, and until when
        patience = 0
        waited = False
        while True:
            done, step = self._run_locked(
                coalescer.step_locked, digest, caller, waited_on, patience
            )
            if not done or step is None or step.kind == "uncoalesced":
                if self._mapped is None:
                    return None  # closed by another thread while we waited
                self._count(_arena.SLOT_UNCOALESCED)
                return self._settle(None, False)
            if step.kind == "hit":
                return self._settle(step.value, waited)
            if step.kind == "own":
                return self._settle(None, False)
            assert step.lease is not None
            waited = True
            if waited_on is None or not same_holder(step.lease, waited_on):
                # A new computing caller: our coalesce_timeout starts again for it.
                waited_on, patience = step.lease, coalescer.patience_deadline_ns()
            value = coalescer.wait(step.lease, patience, lambda: self._poll(arena, digest))
            if value is not None:
                return self._settle(value, True)
            # The lease ended without a value: take it over, or wait for the new owner.

    async def _acoalesced_miss(self, arena: Arena, digest: bytes) -> list[Generation] | None:
        """:meth:`_coalesced_miss` for coroutines (waits with ``asyncio.sleep``)."""
        coalescer = self._coalescer
        assert coalescer is not None
        if self._counts_pid != _getpid():
            self._counts_view()
        caller = caller_key()
        if coalescer.holds(caller, digest):
            return self._settle(None, False)
        waited_on: Lease | None = None
        patience = 0
        waited = False
        while True:
            done, step = await self._arun_locked(
                coalescer.step_locked, digest, caller, waited_on, patience
            )
            if not done or step is None or step.kind == "uncoalesced":
                if self._mapped is None:
                    return None
                self._count(_arena.SLOT_UNCOALESCED)
                return self._settle(None, False)
            if step.kind == "hit":
                return self._settle(step.value, waited)
            if step.kind == "own":
                coalescer.watch_task(caller)  # a cancelled or failed task frees its waiters
                return self._settle(None, False)
            assert step.lease is not None
            waited = True
            if waited_on is None or not same_holder(step.lease, waited_on):
                waited_on, patience = step.lease, coalescer.patience_deadline_ns()
            value = await coalescer.await_value(
                step.lease, patience, lambda: self._poll(arena, digest)
            )
            if value is not None:
                return self._settle(value, True)

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

    def update(self, prompt: str, llm_string: str, return_val: Sequence[Generation]) -> None:
        """Store ``return_val`` for ``(prompt, llm_string)``, replacing any entry.

        A value that cannot be stored (empty, not losslessly encodable, too large)
        or a lock not had within ``lock_timeout`` is skipped with one warning on the
        ``shmcache`` logger and counted in ``stats().skipped``; the cache is left as
        it was.

        Raises:
            TypeError: non-``str`` keys, or ``return_val`` not a sequence of Generation.
            CacheClosedError: the cache was closed.
        """
        arena = self._open_arena()
        caller = self._update_caller()
        prepared = self._prepare(prompt, llm_string, return_val)
        if prepared is None:
            self._end_leases(caller)
            return
        if not self._run_locked(self._store_locked, arena, prepared, caller)[0]:
            self._skip_lock_timeout()
            self._end_leases(caller)

    async def aupdate(
        self, prompt: str, llm_string: str, return_val: Sequence[Generation]
    ) -> None:
        """Async :meth:`update`; waits for the lock without blocking the event loop."""
        arena = self._open_arena()
        caller = self._update_caller()
        prepared = self._prepare(prompt, llm_string, return_val)
        if prepared is None:
            self._end_leases(caller)
            return
        if not (await self._arun_locked(self._store_locked, arena, prepared, caller))[0]:
            self._skip_lock_timeout()
            self._end_leases(caller)

    def clear(self, **kwargs: Any) -> None:
        """Remove every entry, or with ``llm_string=s`` only the entries stored under s.

        The change is seen by every process at once.

        Raises:
            TypeError: an unknown keyword, or a non-``str`` llm_string.
            LockTimeoutError: the lock was not had within ``lock_timeout``.
            CacheClosedError: the cache was closed.
        """
        arena = self._open_arena()
        llm_string = self._clear_target(kwargs)
        if not self._run_locked(self._clear_locked, arena, llm_string)[0]:
            raise self._timeout_error("clear")

    async def aclear(self, **kwargs: Any) -> None:
        """Async :meth:`clear`; waits for the lock without blocking the event loop."""
        arena = self._open_arena()
        llm_string = self._clear_target(kwargs)
        if not (await self._arun_locked(self._clear_locked, arena, llm_string))[0]:
            raise self._timeout_error("clear")

    # -- statistics and lifetime ------------------------------------------------------

    def stats(self) -> CacheStats:
        """Return the segment's counters, summed over all processes.

        Hits, misses and skips of every process show at once (each instance counts
        into its own slot in the segment), including those of processes that have
        since died or ended by ``os._exit``.
        """
        arena = self._open_arena()
        hits, misses, skipped, coalesced, timeouts, uncoalesced = arena.process_totals()
        return CacheStats(
            hits=arena.counter(_arena.W_HITS) + hits + self._hits,
            misses=arena.counter(_arena.W_MISSES) + misses + self._misses,
            updates=arena.counter(_arena.W_UPDATES),
            evictions=arena.counter(_arena.W_EVICTIONS),
            skipped=arena.counter(_arena.W_SKIPPED) + skipped + self._skipped,
            entries=arena.counter(_arena.W_ENTRIES),
            used_bytes=arena.counter(_arena.W_USED),
            size_bytes=arena.geometry.size_bytes,
            coalesced=coalesced,
            coalesce_timeouts=timeouts,
            uncoalesced=uncoalesced,
        )

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
                raise self._timeout_error("check")
            problems.extend(found or ())
        done, found = self._run_locked(LeaseTable(self._arena_words).problems)
        if not done:
            raise self._timeout_error("check")
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
        if self._counts is not None and not (self._hits or self._misses or self._skipped):
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
            if self._hits or self._misses or self._skipped or self._holds_leases():
                self._run_locked(self._detach_locked, self._arena)
        finally:
            self._mapped = None
            _OPEN_CACHES.discard(self)
            if _BY_SETTINGS.get(self._settings_key()) is self:
                del _BY_SETTINGS[self._settings_key()]
            if self._counts is not None:
                self._counts.release()  # the mapping cannot close while viewed
                self._counts = None
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
        if self._coalescer is not None and self._counts_pid == _getpid():
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

    def __enter__(self) -> SharedMemoryCache:
        self._open_arena()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Pickles by name, never by content: the receiver attaches to the segment.
        self._open_arena()  # a closed cache does not come back to life in a pickle
        return (
            _reopen,
            (self._name, self._directory_arg, self._ttl, self._lock_timeout,
             self._requested_size, self._coalescer is not None, self._coalesce_timeout),
        )


def _reopen(
    name: str,
    directory: str | None,
    ttl: float | None,
    lock_timeout: float,
    size_bytes: int = _DEFAULT_SIZE,
    coalesce: bool = True,
    coalesce_timeout: float = DEFAULT_COALESCE_TIMEOUT_S,
) -> SharedMemoryCache:
    # Where the same cache is already open here (a pool worker that receives it
    # with every task), reuse that instance: no new fds, no new owner slot.
    with contextlib.suppress(OSError, ShmCacheError, TypeError, ValueError):
        path = segment_path(
            resolve_directory(directory, create=False), check_name(name), _arena.FORMAT_VERSION
        )
        ttl_s = None if ttl is None else float(ttl)
        key = (path, ttl_s, float(lock_timeout), coalesce, float(coalesce_timeout))
        existing = _BY_SETTINGS.get(key)
        if existing is not None and not existing.closed:
            return existing
    return SharedMemoryCache(
        name, size_bytes=size_bytes, ttl=ttl, directory=directory, lock_timeout=lock_timeout,
        coalesce=coalesce, coalesce_timeout=coalesce_timeout,
    )


def _after_fork_in_child() -> None:
    # The parent's slot and pending counts are the parent's, not the child's.
    for cache in list(_OPEN_CACHES):
        cache._reset_local_counts()
        cache._resources.slot = -1
        if cache._coalescer is not None:
            cache._coalescer.forget_all()


def _release_leases_of_current_caller() -> None:
    """LangChain reported a failed model call: its caller's waiters go on now."""
    for cache in list(_OPEN_CACHES):
        cache.release_leases()


def _flush_at_exit() -> None:
    for cache in list(_OPEN_CACHES):
        try:
            cache.close()
        except (OSError, ShmCacheError):  # exit must go on whatever happens here
            logger.debug("could not close %r at exit", cache, exc_info=True)


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_flush_at_exit)
_callbacks.install(_release_leases_of_current_caller)

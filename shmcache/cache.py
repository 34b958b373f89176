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
from collections.abc import Sequence
from typing import Any, Final

from langchain_core.caches import BaseCache
from langchain_core.outputs import Generation

from . import _arena
from ._arena import CONTENDED, U64_MASK, Arena, Contended, Geometry
from ._codec import (
    CodecError,
    CodecVersionError,
    UnencodableValueError,
    decode_verified,
    encode_generations,
)
from ._errors import CacheClosedError, LockTimeoutError, ShmCacheError
from ._keys import key_digest, llm_string_hash
from ._lock import SegmentLock
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
# Hit/miss counts are kept in the process and added to the shared counters at
# writes, at close, and at least this often while the cache is in use.
_FLUSH_INTERVAL_S: Final = 1.0
# The same kind of skipped-update warning is logged at most once in this interval.
_WARNING_INTERVAL_S: Final = 10.0
_ASYNC_FIRST_BACKOFF_S: Final = 50e-6
_ASYNC_MAX_BACKOFF_S: Final = 2e-3

# Caches open in this process: counts are flushed at exit and reset in fork children.
_OPEN_CACHES: weakref.WeakSet[SharedMemoryCache] = weakref.WeakSet()


def _check_seconds(name: str, value: object) -> float:
    """Validate a positive, finite number of seconds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, not {type(value).__name__}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0 seconds, got {value!r}")
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
    ) -> None:
        self._name = check_name(name)
        if isinstance(size_bytes, bool) or not isinstance(size_bytes, int):
            raise TypeError(f"size_bytes must be an int, not {type(size_bytes).__name__}")
        if size_bytes < MIN_SIZE_BYTES:
            raise ValueError(
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
        except BaseException:
            if arena is not None:
                arena.release()  # the mapping cannot close while viewed
            mapped.close()
            raise
        self._arena = arena
        self._mapped: MappedFile | None = mapped
        actual = self._arena.geometry.size_bytes
        if not mapped.created and actual != size_bytes and type(size_bytes) is not _DefaultSize:
            logger.warning(
                "segment %s already exists with size_bytes=%d; ignoring size_bytes=%d "
                "(remove it with `%s` to change its size)",
                self._path, actual, size_bytes, self._cli_command("rm"),
            )
        self._reset_local_counts()
        if self._lock.acquire(self._lock_timeout):
            try:
                self._arena.repair()
                self._counts = self._arena.claim_process_slot(os.getpid())
            finally:
                self._lock.release()
        self._last_warning: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        # (prompt, llm_string, digest) of this instance's last miss.
        self._last_miss: tuple[str | None, str | None, bytes] = (None, None, b"")
        _OPEN_CACHES.add(self)

    def _read_geometry(self, mapped: MappedFile) -> Geometry:
        hint = f"remove it with `{self._cli_command('rm')}` and re-open the cache"
        return _arena.read_geometry(mapped.mapping, self._path, hint)

    def _cli_command(self, verb: str) -> str:
        directory = "" if self._directory_arg is None else f" --directory {self._directory_arg}"
        return f"shmcache {verb} {self._name}{directory}"

    def _reset_local_counts(self) -> None:
        # Until this process has a slot in the segment's counter table (see
        # _arena), counts wait here and are flushed under the lock.
        self._counts = None
        self._hits = 0
        self._misses = 0
        self._skipped = 0
        self._next_flush = 0.0  # the first count tries to claim a slot at once

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
        counts = self._counts
        if counts is not None:
            counts[_arena.SLOT_SKIPPED] = (counts[_arena.SLOT_SKIPPED] + 1) & U64_MASK
        else:
            self._skipped += 1
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
        if self._counts is None:
            self._counts = arena.claim_process_slot(os.getpid())
        if self._hits or self._misses or self._skipped:
            hits, misses, skipped = self._hits, self._misses, self._skipped
            self._hits = self._misses = self._skipped = 0
            counts = self._counts
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
        if self._lock.try_acquire():  # never wait just to publish counts
            try:
                arena.repair()
                self._flush_locked(arena)
            finally:
                self._lock.release()

    def _result(self, arena: Arena, value: memoryview | None) -> list[Generation] | None:
        generations = None
        if value is not None:
            try:
                # The record matched its key digest, position and crc32.
                generations = decode_verified(value)
            except CodecVersionError:
                pass  # written by another release (rolling upgrade): a plain miss
            except CodecError as exc:
                # The record passed its crc, so this is a codec bug or a foreign writer.
                logger.error("shmcache %r: undecodable entry treated as a miss: %s",
                             self._name, exc)
        counts = self._counts
        if counts is not None:
            slot = _arena.SLOT_MISSES if generations is None else _arena.SLOT_HITS
            counts[slot] = (counts[slot] + 1) & U64_MASK
        else:
            if generations is None:
                self._misses += 1
            else:
                self._hits += 1
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

    def _store_locked(self, arena: Arena, prepared: tuple[bytes, int, bytes, float]) -> None:
        arena.begin()
        try:
            arena.store(*prepared)
            if self._counts is None or self._hits or self._misses or self._skipped:
                self._flush_locked(arena)
        finally:
            arena.end()

    def _clear_locked(self, arena: Arena, llm_string: str | None) -> None:
        arena.begin()
        try:
            if llm_string is None:
                arena.clear()
            else:
                removed = arena.clear_llm_string(llm_string_hash(llm_string))
                logger.debug("shmcache %r: cleared %d entries", self._name, removed)
            self._flush_locked(arena)
        finally:
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
        return LockTimeoutError(
            f"could not {action} cache {self._name!r}: another process held its lock for "
            f"more than lock_timeout={self._lock_timeout}s; retry, raise lock_timeout, or "
            f"check for a stopped process holding it (`{self._cli_command('check')}`)"
        )

    async def _acquire_async(self) -> bool:
        """Take the lock without blocking the event loop (bounded by lock_timeout)."""
        if self._lock.try_acquire():
            return True
        deadline = time.monotonic() + self._lock_timeout
        backoff = _ASYNC_FIRST_BACKOFF_S
        while True:
            await asyncio.sleep(backoff)
            if self._lock.try_acquire():
                return True
            if time.monotonic() >= deadline:
                return False
            backoff = min(backoff * 2, _ASYNC_MAX_BACKOFF_S)

    def _find_locked(self, arena: Arena, digest: bytes) -> memoryview | None:
        try:
            arena.repair()
            return arena.find_locked(digest, time.time())
        finally:
            self._lock.release()

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
        counts = self._counts
        if found is None and counts is not None:
            # The common miss, kept short.
            counts[_arena.SLOT_MISSES] = (counts[_arena.SLOT_MISSES] + 1) & U64_MASK
            return None
        if found is CONTENDED:
            # A writer kept changing this bucket: read under the lock (bounded wait).
            found = (
                self._find_locked(arena, digest)
                if self._lock.acquire(self._lock_timeout)
                else None
            )
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
        if found is CONTENDED:
            found = self._find_locked(arena, digest) if await self._acquire_async() else None
        assert not isinstance(found, Contended)
        return self._result(arena, found)

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
        prepared = self._prepare(prompt, llm_string, return_val)
        if prepared is None:
            return
        if not self._lock.acquire(self._lock_timeout):
            self._skip_lock_timeout()
            return
        try:
            self._store_locked(arena, prepared)
        finally:
            self._lock.release()

    async def aupdate(
        self, prompt: str, llm_string: str, return_val: Sequence[Generation]
    ) -> None:
        """Async :meth:`update`; waits for the lock without blocking the event loop."""
        arena = self._open_arena()
        prepared = self._prepare(prompt, llm_string, return_val)
        if prepared is None:
            return
        if not await self._acquire_async():
            self._skip_lock_timeout()
            return
        try:
            self._store_locked(arena, prepared)
        finally:
            self._lock.release()

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
        if not self._lock.acquire(self._lock_timeout):
            raise self._timeout_error("clear")
        try:
            self._clear_locked(arena, llm_string)
        finally:
            self._lock.release()

    async def aclear(self, **kwargs: Any) -> None:
        """Async :meth:`clear`; waits for the lock without blocking the event loop."""
        arena = self._open_arena()
        llm_string = self._clear_target(kwargs)
        if not await self._acquire_async():
            raise self._timeout_error("clear")
        try:
            self._clear_locked(arena, llm_string)
        finally:
            self._lock.release()

    # -- statistics and lifetime ------------------------------------------------------

    def stats(self) -> CacheStats:
        """Return the segment's counters, summed over all processes.

        They include everything this process did before the call, and other
        processes' counts once they closed or flushed (at least once a second
        while active).
        """
        arena = self._open_arena()
        hits, misses, skipped = arena.process_totals()
        return CacheStats(
            hits=arena.counter(_arena.W_HITS) + hits + self._hits,
            misses=arena.counter(_arena.W_MISSES) + misses + self._misses,
            updates=arena.counter(_arena.W_UPDATES),
            evictions=arena.counter(_arena.W_EVICTIONS),
            skipped=arena.counter(_arena.W_SKIPPED) + skipped + self._skipped,
            entries=arena.counter(_arena.W_ENTRIES),
            used_bytes=arena.counter(_arena.W_USED),
            size_bytes=arena.geometry.size_bytes,
        )

    def check(self) -> list[str]:
        """Verify the whole segment under the lock (what ``shmcache check`` runs).

        What a writer killed mid-write left half-done is repaired first and is not
        reported: only real damage is.

        Returns:
            A description of each problem found; empty when the segment is sound.

        Raises:
            LockTimeoutError: the lock was not had within ``lock_timeout``.
        """
        arena = self._open_arena()
        if not self._lock.acquire(self._lock_timeout):
            raise self._timeout_error("check")
        try:
            return arena.verify()
        finally:
            self._lock.release()

    def flush(self) -> bool:
        """Publish this process's pending hit/miss/skip counts now.

        Counts normally go straight to this process's slot in the segment; they
        wait in the process only while every slot is taken.

        Returns:
            True if they were published, False if the lock was not had in time.
        """
        arena = self._open_arena()
        if not self._lock.acquire(self._lock_timeout):
            return False
        try:
            arena.repair()
            self._flush_locked(arena)
        finally:
            self._lock.release()
        return True

    def close(self) -> None:
        """Detach this process from the segment (idempotent).

        Pending counts are published first (if the lock is had within
        ``lock_timeout``).  The segment itself stays for the other processes.
        """
        mapped = self._mapped
        if mapped is None:
            return
        try:
            self._detach_counts()
        finally:
            self._mapped = None
            _OPEN_CACHES.discard(self)
            if self._counts is not None:
                self._counts.release()  # the mapping cannot close while viewed
                self._counts = None
            self._arena.release()
            self._lock.close()
            mapped.close()

    def _detach_counts(self) -> None:
        """Fold this process's counts into the shared counters and free its slot."""
        if not (self._counts is not None or self._hits or self._misses or self._skipped):
            return
        if not self._lock.acquire(self._lock_timeout):
            return  # a claimed slot stays and is still summed; it is freed later
        try:
            self._arena.repair()
            self._flush_locked(self._arena)
            if self._counts is not None:
                self._arena.free_process_slot(self._counts)
                self._counts = None
        finally:
            self._lock.release()

    def unlink(self) -> None:
        """Remove the segment file (before or after :meth:`close`).

        Processes already attached keep using the old segment until they close;
        to empty a live cache for everyone use :meth:`clear` instead.
        """
        directory, base = os.path.split(self._path)
        for path in (self._path, os.path.join(directory, f".{base}.lock")):
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
             self._requested_size),
        )


def _reopen(
    name: str,
    directory: str | None,
    ttl: float | None,
    lock_timeout: float,
    size_bytes: int = _DEFAULT_SIZE,
) -> SharedMemoryCache:
    return SharedMemoryCache(
        name, size_bytes=size_bytes, ttl=ttl, directory=directory, lock_timeout=lock_timeout
    )


def _after_fork_in_child() -> None:
    # The parent's pending counts are the parent's to publish, not the child's.
    for cache in list(_OPEN_CACHES):
        cache._reset_local_counts()


def _flush_at_exit() -> None:
    for cache in list(_OPEN_CACHES):
        try:
            cache.close()
        except (OSError, ShmCacheError):  # exit must go on whatever happens here
            logger.debug("could not close %r at exit", cache, exc_info=True)


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_flush_at_exit)

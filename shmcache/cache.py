"""``SharedMemoryCache``: a LangChain ``BaseCache`` shared by every process on the host.

A thin front-end over :class:`~shmcache._engine.Engine`: it turns
``(prompt, llm_string)`` into a key digest and an llm_string tag, and generations
into codec bytes and back.  Segments, counters, leases and the remote tier are the
engine's.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Sequence
from typing import Any, Final

from langchain_core.caches import BaseCache
from langchain_core.outputs import Generation

from . import _arena
from ._arena import Arena
from ._codec import UnencodableValueError, decode_generations, decode_verified, encode_generations
from ._engine import (
    _DEFAULT_SIZE,
    DEFAULT_COALESCE_TIMEOUT_S,
    DEFAULT_LOCK_TIMEOUT_S,
    DEFAULT_REMOTE_TIMEOUT_S,
    DEFAULT_SIZE_BYTES,
    MIN_SIZE_BYTES,
    Engine,
)
from ._entries import Prepared
from ._errors import ShmCacheError
from ._keys import key_digest, llm_string_hash
from ._segment import check_name, resolve_directory, segment_path
from ._stats import CacheStats

__all__ = ["DEFAULT_LOCK_TIMEOUT_S", "DEFAULT_SIZE_BYTES", "MIN_SIZE_BYTES", "SharedMemoryCache"]

_KIND: Final = "llm"
# Open instances by what their pickle carries, so unpickling in a process where that
# cache is already open reuses it instead of opening fds and a slot per task.
_BY_SETTINGS: weakref.WeakValueDictionary[tuple[object, ...], SharedMemoryCache] = (
    weakref.WeakValueDictionary()
)


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
        remote: None, a ``redis://``, ``rediss://`` or ``unix://`` URL, or a redis-py
            client (``redis.Redis`` or ``RedisCluster``): a tier every host shares
            behind this host's segment (extra ``shmcache[redis]``).  Lookups try the
            segment, then Redis; updates and clears reach both; coalescing spans
            hosts.  Nothing is contacted at open, and a Redis that is down or slow
            never raises out of a cache call.
        remote_timeout: The longest one remote call may take before it counts as
            failed, in seconds (finite, > 0); after a failure the remote is skipped
            until a background probe gets an answer.

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: an argument is out of range, or ``remote`` has another scheme.
        ShmCacheError: the segment cannot be opened (its subclasses say why), or
            ``remote`` is set and the ``redis`` package is missing.

    Example:
        >>> from langchain_core.globals import set_llm_cache
        >>> set_llm_cache(SharedMemoryCache("myapp"))  # doctest: +SKIP
    """

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
        remote: object = None,
        remote_timeout: float = DEFAULT_REMOTE_TIMEOUT_S,
    ) -> None:
        self._engine = engine = Engine(
            name, kind=_KIND, owner=type(self).__name__, size_bytes=size_bytes, ttl=ttl,
            directory=directory, lock_timeout=lock_timeout, coalesce=coalesce,
            coalesce_timeout=coalesce_timeout, remote=remote, remote_timeout=remote_timeout,
        )
        self._has_remote = engine.has_remote  # fixed at open
        # (prompt, llm_string, digest) of this instance's last miss.
        self._last_miss: tuple[str | None, str | None, bytes] = (None, None, b"")
        _BY_SETTINGS[engine._settings_key()] = self

    # -- properties -------------------------------------------------------------

    @property
    def name(self) -> str:
        """The cache name."""
        return self._engine.name

    @property
    def path(self) -> str:
        """The segment file's path."""
        return self._engine.path

    @property
    def ttl(self) -> float | None:
        """Seconds entries written by this instance stay valid (None: no expiry)."""
        return self._engine.ttl

    @property
    def lock_timeout(self) -> float:
        """The longest any call waits for another process, in seconds."""
        return self._engine.lock_timeout

    @property
    def coalesce(self) -> bool:
        """True when concurrent identical misses are coalesced."""
        return self._engine.coalesce

    @property
    def coalesce_timeout(self) -> float:
        """The longest a lookup waits for one computing caller, in seconds."""
        return self._engine.coalesce_timeout

    @property
    def remote_timeout(self) -> float:
        """The longest one remote call may take, in seconds."""
        return self._engine.remote_timeout

    @property
    def remote(self) -> str | None:
        """Where the remote tier is (no password), or None without one."""
        return self._engine.remote

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._engine.closed

    def __repr__(self) -> str:
        return repr(self._engine)

    # -- BaseCache API ------------------------------------------------------------

    def lookup(self, prompt: str, llm_string: str) -> list[Generation] | None:
        """Return the generations stored for ``(prompt, llm_string)``, or None.

        Each hit returns a new list of new objects, equal to what was stored.  With a
        remote tier, a local miss asks Redis (each call bounded by ``remote_timeout``,
        skipped while Redis is known to be down); a value found there is stored in
        this host's segment with its remaining TTL.

        Raises:
            TypeError: ``prompt`` or ``llm_string`` is not a ``str``.
            CacheClosedError: the cache was closed.
        """
        if not (isinstance(prompt, str) and isinstance(llm_string, str)):
            self._engine._open_arena()  # a closed cache says so first
            _check_key(prompt, llm_string)  # raises TypeError
        digest = key_digest(prompt, llm_string)
        engine = self._engine
        # The tag matters only to the remote tier (its keys carry it).
        tag = llm_string_hash(llm_string) if self._has_remote else 0
        found: list[Generation] | None = engine.get(
            digest, tag, decode_verified, decode_generations
        )
        if found is None:
            self._last_miss = (prompt, llm_string, digest)  # update() comes next
        return found

    async def alookup(self, prompt: str, llm_string: str) -> list[Generation] | None:
        """Async :meth:`lookup`: lock-free, so it runs inline with no thread hop."""
        self._engine._open_arena()
        _check_key(prompt, llm_string)
        digest = key_digest(prompt, llm_string)
        engine = self._engine
        tag = llm_string_hash(llm_string) if self._has_remote else 0
        found: list[Generation] | None = await engine.aget(
            digest, tag, decode_verified, decode_generations
        )
        if found is None:
            self._last_miss = (prompt, llm_string, digest)  # aupdate() comes next
        return found

    def _prepare(
        self, prompt: str, llm_string: str, return_val: Sequence[Generation]
    ) -> Prepared | None:
        """Validate and encode an update; None if it is skipped."""
        _check_key(prompt, llm_string)
        if type(return_val) is not list and (  # LangChain passes a list: skip the ABC check
            isinstance(return_val, (str, bytes)) or not isinstance(return_val, Sequence)
        ):
            raise TypeError(
                f"return_val must be a sequence of Generation, not {type(return_val).__name__}"
            )
        engine = self._engine
        try:
            payload = encode_generations(return_val, compress=engine.short_of_space())
        except UnencodableValueError as exc:
            # The codec refuses anything but generations: sort out the caller's type
            # error from a value that is merely not storable (checked only here).
            for generation in return_val:
                if not isinstance(generation, Generation):
                    raise TypeError(
                        "return_val must be a sequence of Generation; it holds a "
                        f"{type(generation).__name__}"
                    ) from None
            engine.skip("unencodable", "%s", exc)
            return None
        if not engine.fits(len(payload)):
            payload = encode_generations(return_val)  # a big value: compressed, it may fit
        if not engine.fits(len(payload)):
            engine.skip_too_large(len(payload))
            return None
        # LangChain updates with the very str objects it just missed with: reuse
        # that digest (identity, not equality: it costs nothing and cannot be wrong).
        prompt_seen, llm_string_seen, digest = self._last_miss
        if prompt_seen is not prompt or llm_string_seen is not llm_string:
            digest = key_digest(prompt, llm_string)
        return Prepared(digest, llm_string_hash(llm_string), payload, engine.expiry())

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
        engine = self._engine
        caller = engine.caller_leases()
        prepared = self._prepare(prompt, llm_string, return_val)
        if prepared is None:
            engine.end_leases(caller)
        elif not engine.put((prepared,), caller):
            engine.skip_lock_timeout()

    async def aupdate(
        self, prompt: str, llm_string: str, return_val: Sequence[Generation]
    ) -> None:
        """Async :meth:`update`; waits for the lock without blocking the event loop."""
        engine = self._engine
        caller = engine.caller_leases()
        prepared = self._prepare(prompt, llm_string, return_val)
        if prepared is None:
            engine.end_leases(caller)
        elif not await engine.aput((prepared,), caller):
            engine.skip_lock_timeout()

    @staticmethod
    def _clear_tag(kwargs: dict[str, Any]) -> int | None:
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
        return llm_string_hash(llm_string)

    def clear(self, **kwargs: Any) -> None:
        """Remove every entry, or with ``llm_string=s`` only the entries stored under s.

        The change is seen by every process of the host at once.  With a remote tier
        the remote entries go first, then every other host's segment follows within
        about a second.  A clear that cannot reach Redis is kept and made once Redis
        answers again (while this process lives).

        Raises:
            TypeError: an unknown keyword, or a non-``str`` llm_string.
            LockTimeoutError: the lock was not had within ``lock_timeout``.
            CacheClosedError: the cache was closed.
        """
        self._engine._open_arena()
        self._engine.clear(self._clear_tag(kwargs))

    async def aclear(self, **kwargs: Any) -> None:
        """Async :meth:`clear`; waits for the lock without blocking the event loop."""
        self._engine._open_arena()
        await self._engine.aclear(self._clear_tag(kwargs))

    # -- leases, statistics and lifetime --------------------------------------------

    def release_leases(self) -> None:
        """End the calling thread's/task's leases (what ``on_llm_error`` does).

        Call it when a model call that followed a missing lookup failed outside
        LangChain's callbacks, so the callers waiting for it go on at once.
        """
        self._engine.release_leases()

    def stats(self) -> CacheStats:
        """Return the segment's counters, summed over all processes.

        Hits, misses and skips of every process show at once (each instance counts
        into its own slot in the segment), including those of processes that have
        since died or ended by ``os._exit``.
        """
        return self._engine.stats()

    def lock_holder(self) -> int | None:
        """The pid that the writer lock's current holder recorded, or None.

        For diagnostics (the CLI names it when the lock is not had): a process in
        another pid namespace records a pid that may mean nothing here.
        """
        return self._engine.lock_holder()

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
        return self._engine.check()

    def flush(self) -> bool:
        """Publish this process's pending hit/miss/skip counts now.

        Returns:
            True if they were published, False if the lock was not had in time.
        """
        return self._engine.flush()

    def close(self) -> None:
        """Detach this process from the segment (idempotent).

        Pending counts are published first (if the lock is had within
        ``lock_timeout``).  The segment itself stays for the other processes.
        """
        engine = self._engine
        if not engine.closed and _BY_SETTINGS.get(engine._settings_key()) is self:
            del _BY_SETTINGS[engine._settings_key()]
        engine.close()

    def unlink(self) -> None:
        """Remove the segment file (before or after :meth:`close`).

        Processes already attached keep using the old segment until they close;
        to empty a live cache for everyone use :meth:`clear` instead.
        """
        self._engine.unlink()

    def __enter__(self) -> SharedMemoryCache:
        self._engine._open_arena()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Pickles by name, never by content: the receiver attaches to the segment.
        a = self._engine.reopen_args()
        return (
            _reopen,
            (a["name"], a["directory"], a["ttl"], a["lock_timeout"], a["size_bytes"],
             a["coalesce"], a["coalesce_timeout"], a["remote"], a["remote_timeout"]),
        )

    # -- internals that tests and tools reach ---------------------------------------

    @property
    def _arena(self) -> Arena:
        return self._engine._arena

    @property
    def _arena_words(self) -> memoryview:
        return self._engine._arena_words

    @property
    def _lock(self) -> Any:
        return self._engine._lock

    @property
    def _coalescer(self) -> Any:
        return self._engine._coalescer

    @property
    def _remote(self) -> Any:
        return self._engine._remote

    def _open_arena(self) -> Arena:
        return self._engine._open_arena()

    def _run_locked(self, fn: Any, *args: Any, timeout_s: float | None = None) -> Any:
        return self._engine._run_locked(fn, *args, timeout_s=timeout_s)

    def _remote_state(self) -> tuple[int, int]:
        return self._engine._remote_state()


def _reopen(
    name: str,
    directory: str | None,
    ttl: float | None,
    lock_timeout: float,
    size_bytes: int = _DEFAULT_SIZE,
    coalesce: bool = True,
    coalesce_timeout: float = DEFAULT_COALESCE_TIMEOUT_S,
    remote: str | None = None,
    remote_timeout: float = DEFAULT_REMOTE_TIMEOUT_S,
) -> SharedMemoryCache:
    # Where the same cache is already open here (a pool worker that receives it
    # with every task), reuse that instance: no new fds, no new owner slot.
    with contextlib.suppress(OSError, ShmCacheError, TypeError, ValueError):
        path = segment_path(
            resolve_directory(directory, create=False), check_name(name),
            _arena.FORMAT_VERSION, _KIND,
        )
        key = Engine.settings_key_for(
            path, ttl, lock_timeout, coalesce, coalesce_timeout, remote, remote_timeout
        )
        existing = _BY_SETTINGS.get(key)
        if existing is not None and not existing.closed:
            return existing
    return SharedMemoryCache(
        name, size_bytes=size_bytes, ttl=ttl, directory=directory, lock_timeout=lock_timeout,
        coalesce=coalesce, coalesce_timeout=coalesce_timeout, remote=remote,
        remote_timeout=remote_timeout,
    )

"""``SharedMemoryNodeCache``: LangGraph's node cache, shared by every process on the host.

Give it to ``graph.compile(cache=...)`` and a node with a ``CachePolicy`` runs once
per distinct input for the whole host: every gunicorn, uvicorn or uWSGI worker and
every pool process that opens the same name sees the others' results.  A thin
front-end over :class:`~shmcache._engine.Engine` (kind ``"nodes"``: its own segment
file); values go through the cache's ``serde`` (LangGraph's ``JsonPlusSerializer``
without pickle by default), never through pickle of ours.

Keys are exact: a key's digest frames every namespace part and the key with their
lengths, so ``("a", "b:c")`` and ``("a:b", "c")`` are different entries (LangGraph
issues #8660, #8851), and ``clear([ns])`` removes the entries of exactly ``ns``, not
of its children or of namespaces that merely share a prefix.

Payload of an entry (before the shared compression envelope, ``_compress.pack``)::

    byte 0       n, the length of the serializer's type name (u8)
    bytes 1..n   the type name (ASCII), then the serialized bytes

Requires the optional extra ``shmcache[langgraph]``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Final, Generic, TypeVar

from . import _compress
from ._engine import _DEFAULT_SIZE, DEFAULT_LOCK_TIMEOUT_S, Engine
from ._entries import Prepared
from ._errors import CodecError, InvalidArgumentError, ShmCacheError
from ._keys import namespace_hash, node_key_digest
from ._stats import CacheStats

try:
    from langgraph.cache.base import BaseCache, FullKey, Namespace
    from langgraph.checkpoint.serde.base import SerializerProtocol
except ImportError as exc:  # pragma: no cover - exercised only without the extra

    class LangGraphMissingError(ShmCacheError, ImportError):
        """``langgraph`` is not installed."""

    raise LangGraphMissingError(
        "shmcache.langgraph needs LangGraph: pip install 'shmcache[langgraph]'"
    ) from exc

__all__ = ["SharedMemoryNodeCache"]

_KIND: Final = "nodes"
_MAX_TYPE_NAME_BYTES: Final = 255
ValueT = TypeVar("ValueT")


def _check_namespace(namespace: object) -> tuple[str, ...]:
    if not isinstance(namespace, tuple) or not all(isinstance(p, str) for p in namespace):
        raise TypeError(f"a namespace must be a tuple of str, not {namespace!r:.80}")
    return namespace


def _check_key(full_key: object) -> tuple[tuple[str, ...], str]:
    if not isinstance(full_key, tuple) or len(full_key) != 2:
        raise TypeError(f"cache keys must be (namespace, key) tuples, not {full_key!r:.80}")
    namespace, key = full_key
    if not isinstance(key, str):
        raise TypeError(f"a cache key's key must be a str, not {type(key).__name__}")
    return _check_namespace(namespace), key


def _check_ttl(ttl: object) -> float | None:
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
        raise TypeError(f"ttl must be a number of seconds or None, not {type(ttl).__name__}")
    if not (ttl >= 0 and math.isfinite(ttl)):
        raise InvalidArgumentError(f"ttl must be a finite number >= 0 seconds, got {ttl!r}")
    return float(ttl)


class SharedMemoryNodeCache(BaseCache[ValueT], Generic[ValueT]):
    """A LangGraph ``BaseCache`` whose entries live in one shared-memory segment.

    Args:
        name: Cache name: 1-64 characters of ``[A-Za-z0-9._-]``, not starting with ``.``.
        size_bytes: Segment size, fixed when the segment is created (default 32 MiB,
            minimum 1 MiB); entries not read since written are evicted first.
        directory: Where segment files live; default ``/dev/shm/shmcache-<uid>``.
        lock_timeout: The longest any call waits for another process, in seconds.
        serde: How values become bytes (default: LangGraph's ``JsonPlusSerializer``
            with ``pickle_fallback=False``).  Every process must use the same one.

    Each entry's TTL is the one LangGraph passes (from the node's ``CachePolicy``).
    A value that cannot be stored (not serializable, larger than the segment's
    largest entry, or the lock not had in time) is skipped with a warning on the
    ``shmcache`` logger and counted in ``stats().skipped``: a graph run never fails
    because of its cache.

    Example:
        >>> from langgraph.types import CachePolicy
        >>> builder.add_node("expensive", fn, cache_policy=CachePolicy(ttl=600))  # doctest: +SKIP
        >>> graph = builder.compile(cache=SharedMemoryNodeCache("myapp"))  # doctest: +SKIP
    """

    def __init__(
        self,
        name: str,
        *,
        size_bytes: int = _DEFAULT_SIZE,
        directory: str | os.PathLike[str] | None = None,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT_S,
        serde: SerializerProtocol | None = None,
    ) -> None:
        super().__init__(serde=serde)
        self._engine = Engine(
            name, kind=_KIND, owner=type(self).__name__, size_bytes=size_bytes,
            directory=directory, lock_timeout=lock_timeout, coalesce=False,
        )

    @property
    def name(self) -> str:
        """The cache name."""
        return self._engine.name

    @property
    def path(self) -> str:
        """The segment file's path."""
        return self._engine.path

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._engine.closed

    def __repr__(self) -> str:
        return repr(self._engine)

    # -- values ---------------------------------------------------------------------

    def _decode(self, payload: memoryview | bytes) -> tuple[Any]:
        """The stored value in a 1-tuple (a stored None is a hit, not a miss)."""
        data = memoryview(_compress.unpack(payload))
        if not data:
            raise CodecError("node-cache entry is empty")
        n = data[0]
        if 1 + n > len(data):
            raise CodecError("node-cache entry shorter than its type name")
        try:
            type_name = bytes(data[1 : 1 + n]).decode("ascii")
            return (self.serde.loads_typed((type_name, bytes(data[1 + n :]))),)
        except Exception as exc:  # the serializer's own errors, whatever their type
            raise CodecError(f"node-cache value does not load: {exc!r:.200}") from None

    def _encode(self, value: Any) -> bytes | None:
        try:
            type_name, data = self.serde.dumps_typed(value)
            name = type_name.encode("ascii")
        except Exception as exc:  # the serializer refuses it: skipped, never raised
            self._engine.skip("unserializable", "%s: %s", type(value).__name__, exc)
            return None
        if len(name) > _MAX_TYPE_NAME_BYTES:
            self._engine.skip("unserializable", "type name %r is too long", type_name)
            return None
        entry = bytes([len(name)]) + name + data
        payload = _compress.pack(entry, compress=self._engine.short_of_space())
        if not self._engine.fits(len(payload)):
            payload = _compress.pack(entry)  # a big value: compressed, it may fit
        return payload

    # -- BaseCache API ----------------------------------------------------------------

    def _digests(self, keys: Sequence[FullKey]) -> list[tuple[FullKey, bytes]]:
        self._engine._open_arena()
        return [(key, node_key_digest(*_check_key(key))) for key in keys]

    def get(self, keys: Sequence[FullKey]) -> dict[FullKey, ValueT]:
        """The values found for ``keys`` (keys not stored or expired are absent).

        Raises:
            TypeError: a key is not a ``(tuple of str, str)``.
            CacheClosedError: the cache was closed.
        """
        engine = self._engine
        decode = self._decode
        found: dict[FullKey, ValueT] = {}
        for key, digest in self._digests(keys):
            boxed = engine.get(digest, 0, decode, decode)
            if boxed is not None:
                found[key] = boxed[0]
        return found

    async def aget(self, keys: Sequence[FullKey]) -> dict[FullKey, ValueT]:
        """Async :meth:`get`: lock-free reads, inline on the event loop."""
        engine = self._engine
        decode = self._decode
        found: dict[FullKey, ValueT] = {}
        for key, digest in self._digests(keys):
            boxed = await engine.aget(digest, 0, decode, decode)
            if boxed is not None:
                found[key] = boxed[0]
        return found

    def _prepare(self, pairs: Mapping[FullKey, tuple[ValueT, int | None]]) -> list[Prepared]:
        engine = self._engine
        engine._open_arena()
        checked = []
        for key, entry in pairs.items():  # every key and ttl checked before any write
            namespace, name = _check_key(key)
            if not isinstance(entry, tuple) or len(entry) != 2:
                raise TypeError(f"set() takes {{key: (value, ttl)}}, not {entry!r:.80}")
            checked.append((namespace, name, entry[0], _check_ttl(entry[1])))
        items = []
        for namespace, name, value, ttl in checked:
            if ttl == 0:
                continue  # expired as written: nothing to store
            payload = self._encode(value)
            if payload is None:
                continue
            if not engine.fits(len(payload)):
                engine.skip_too_large(len(payload))
                continue
            expires = 0.0 if ttl is None else engine.expiry(ttl)
            items.append(Prepared(
                node_key_digest(namespace, name), namespace_hash(namespace), payload, expires
            ))
        return items

    def set(self, pairs: Mapping[FullKey, tuple[ValueT, int | None]]) -> None:
        """Store each ``key: (value, ttl)`` (ttl in seconds; None: until evicted).

        Raises:
            TypeError: a key is not a ``(tuple of str, str)``, or a ttl not a number.
            ValueError: a ttl is negative or not finite.
        """
        items = self._prepare(pairs)
        if items and not self._engine.put(items):
            self._engine.skip_lock_timeout()

    async def aset(self, pairs: Mapping[FullKey, tuple[ValueT, int | None]]) -> None:
        """Async :meth:`set`; waits for the lock without blocking the event loop."""
        items = self._prepare(pairs)
        if items and not await self._engine.aput(items):
            self._engine.skip_lock_timeout()

    @staticmethod
    def _tags(namespaces: Sequence[Namespace] | None) -> list[int] | None:
        if namespaces is None:
            return None
        if (
            isinstance(namespaces, tuple) and namespaces
            and all(isinstance(p, str) for p in namespaces)
        ):
            # clear(("a", "b")) would otherwise clear namespaces "a" and "b".
            raise TypeError(
                "namespaces must be a sequence of namespaces: clear([ns]), not clear(ns)"
            )
        return [namespace_hash(_check_namespace(ns)) for ns in namespaces]

    def clear(self, namespaces: Sequence[Namespace] | None = None) -> None:
        """Remove the entries of exactly these namespaces; None: every entry; []: none.

        Raises:
            TypeError: a namespace is not a tuple of str.
            LockTimeoutError: the lock was not had within ``lock_timeout``.
        """
        self._engine._open_arena()
        tags = self._tags(namespaces)
        if tags is None:
            self._engine.clear(None)
        for tag in tags or ():
            self._engine.clear(tag)

    async def aclear(self, namespaces: Sequence[Namespace] | None = None) -> None:
        """Async :meth:`clear`."""
        self._engine._open_arena()
        tags = self._tags(namespaces)
        if tags is None:
            await self._engine.aclear(None)
        for tag in tags or ():
            await self._engine.aclear(tag)

    # -- statistics and lifetime ----------------------------------------------------

    def stats(self) -> CacheStats:
        """The segment's counters, summed over all processes (hits/misses: ``get``)."""
        return self._engine.stats()

    def close(self) -> None:
        """Detach this process from the segment (idempotent)."""
        self._engine.close()

    def unlink(self) -> None:
        """Remove the segment file (processes attached keep the old one until closed)."""
        self._engine.unlink()

    def __enter__(self) -> SharedMemoryNodeCache[ValueT]:
        self._engine._open_arena()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # By name, never by content.  LangGraph's default serializer does not pickle
        # (and needs not: the receiver makes its own); another one travels as itself.
        a = self._engine.reopen_args()
        serde = None if self.serde is BaseCache.serde else self.serde
        return (_reopen, (a["name"], a["directory"], a["lock_timeout"], a["size_bytes"],
                          serde))


def _reopen(
    name: str, directory: str | None, lock_timeout: float, size_bytes: int,
    serde: SerializerProtocol | None,
) -> SharedMemoryNodeCache[Any]:
    return SharedMemoryNodeCache(
        name, size_bytes=size_bytes, directory=directory, lock_timeout=lock_timeout,
        serde=serde,
    )

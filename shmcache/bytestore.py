"""``SharedMemoryByteStore``: a LangChain ``ByteStore`` shared by every process on the host.

A thin front-end over :class:`~shmcache._engine.Engine` (kind ``"bytes"``: its own
segment file, so an LLM cache of the same name never collides with it).  Each entry
stores its key beside its value, so :meth:`~SharedMemoryByteStore.yield_keys` can
list them; the value bytes come back exactly as stored.  Behind
``CacheBackedEmbeddings.from_bytes_store`` it makes every process of the host embed
each text once.

Payload of an entry (before the shared compression envelope, ``_compress.pack``)::

    bytes 0..3  n, the key's UTF-8 length (u32, little-endian)
    bytes 4..   the key (UTF-8, lone surrogates kept), then the value
"""

from __future__ import annotations

import contextlib
import os
import struct
import weakref
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, Final

from langchain_core.stores import ByteStore

from . import _arena, _compress
from ._engine import _DEFAULT_SIZE, DEFAULT_LOCK_TIMEOUT_S, Engine
from ._entries import Prepared
from ._errors import CodecError, ShmCacheError, ValueTooLargeError
from ._keys import store_key_digest
from ._segment import check_name, resolve_directory, segment_path
from ._stats import CacheStats

__all__ = ["SharedMemoryByteStore"]

_KIND: Final = "bytes"
_KEY_LENGTH: Final = struct.Struct("<I")
_BY_SETTINGS: weakref.WeakValueDictionary[tuple[object, ...], SharedMemoryByteStore] = (
    weakref.WeakValueDictionary()
)


def _key_bytes(key: object) -> bytes:
    if not isinstance(key, str):
        raise TypeError(f"keys must be str, not {type(key).__name__}")
    return key.encode("utf-8", "surrogatepass")


def _split(payload: memoryview | bytes) -> tuple[str, memoryview]:
    """``(key, value view)`` of a stored payload (after the compression envelope)."""
    data = _compress.unpack(payload)
    view = memoryview(data)
    if len(view) < _KEY_LENGTH.size:
        raise CodecError("byte-store entry shorter than its key length")
    (n,) = _KEY_LENGTH.unpack_from(view)
    end = _KEY_LENGTH.size + n
    if end > len(view):
        raise CodecError("byte-store entry shorter than its key")
    try:
        key = bytes(view[_KEY_LENGTH.size : end]).decode("utf-8", "surrogatepass")
    except UnicodeDecodeError as exc:
        raise CodecError(f"byte-store key is not UTF-8: {exc}") from None
    return key, view[end:]


class _ValueOf:
    """Decoder for one key: its value, if the entry really is that key's."""

    __slots__ = ("_key",)

    def __init__(self, key: str) -> None:
        self._key = key

    def __call__(self, payload: memoryview | bytes) -> bytes:
        key, value = _split(payload)
        if key != self._key:  # a 256-bit digest collision: never seen, never returned
            raise CodecError("byte-store entry holds another key")
        return bytes(value)


class SharedMemoryByteStore(ByteStore):
    """A LangChain ``ByteStore`` whose entries live in one shared-memory segment.

    Every process of this user that opens the same ``name`` (in the same
    ``directory``) shares the store.  Values are ``bytes``, stored exactly; the
    segment has a fixed size, so entries may be evicted like cache entries (the
    ones not read since written first).  Works across ``fork`` and pickles by name.

    Args:
        name: Store name: 1-64 characters of ``[A-Za-z0-9._-]``, not starting with ``.``.
        size_bytes: Segment size, fixed when the segment is created (default 32 MiB,
            minimum 1 MiB).
        ttl: Seconds an entry stays valid after it is written; None: until evicted.
        directory: Where segment files live; default ``/dev/shm/shmcache-<uid>``.
        lock_timeout: The longest any call waits for another process, in seconds.

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: an argument is out of range.
        ShmCacheError: the segment cannot be opened (its subclasses say why).

    Example:
        >>> from langchain_classic.embeddings import CacheBackedEmbeddings
        >>> store = SharedMemoryByteStore("embeddings")  # doctest: +SKIP
        >>> embedder = CacheBackedEmbeddings.from_bytes_store(
        ...     model, store, namespace=model.model)  # doctest: +SKIP
    """

    def __init__(
        self,
        name: str,
        *,
        size_bytes: int = _DEFAULT_SIZE,
        ttl: float | None = None,
        directory: str | os.PathLike[str] | None = None,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT_S,
    ) -> None:
        self._engine = engine = Engine(
            name, kind=_KIND, owner=type(self).__name__, size_bytes=size_bytes, ttl=ttl,
            directory=directory, lock_timeout=lock_timeout, coalesce=False,
        )
        _BY_SETTINGS[engine._settings_key()] = self

    @property
    def name(self) -> str:
        """The store name."""
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

    # -- reads ----------------------------------------------------------------------

    def _key_list(self, keys: Sequence[str]) -> list[str]:
        """``keys`` as a list (any iterable works, as with LangChain's own stores)."""
        self._engine._open_arena()  # a closed store says so before a type error
        if isinstance(keys, (str, bytes)):
            raise TypeError("keys must be a sequence of str, not a single str")
        return list(keys)

    def _digests(self, keys: Sequence[str]) -> list[bytes]:
        keys = self._key_list(keys)
        digests = []
        for key in keys:
            _key_bytes(key)
            digests.append(store_key_digest(key))
        return digests

    def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        """The values of ``keys`` (None for each key not stored).

        Raises:
            TypeError: a key is not a ``str``.
            CacheClosedError: the store was closed.
        """
        engine = self._engine
        keys = self._key_list(keys)
        return [
            engine.get(digest, 0, decode, decode)
            for digest, decode in zip(self._digests(keys), map(_ValueOf, keys), strict=True)
        ]

    async def amget(self, keys: Sequence[str]) -> list[bytes | None]:
        """Async :meth:`mget`: lock-free reads, inline on the event loop."""
        engine = self._engine
        keys = self._key_list(keys)
        return [
            await engine.aget(digest, 0, decode, decode)
            for digest, decode in zip(self._digests(keys), map(_ValueOf, keys), strict=True)
        ]

    # -- writes ---------------------------------------------------------------------

    def _prepare(self, key_value_pairs: Sequence[tuple[str, bytes]]) -> list[Prepared]:
        """Validate and encode every pair before any is written."""
        engine = self._engine
        engine._open_arena()
        items = []
        expires = engine.expiry()
        short = engine.short_of_space()  # compress only then (see Engine.short_of_space)
        for pair in key_value_pairs:
            if not isinstance(pair, tuple) or len(pair) != 2:
                raise TypeError(f"key_value_pairs must hold (key, value) tuples, not {pair!r:.80}")
            key, value = pair
            key_data = _key_bytes(key)
            if type(value) is not bytes:
                raise TypeError(f"values must be bytes, not {type(value).__name__}")
            entry = _KEY_LENGTH.pack(len(key_data)) + key_data + value
            payload = _compress.pack(entry, compress=short)
            if not engine.fits(len(payload)) and not short:
                payload = _compress.pack(entry)  # a big value: compressed, it may fit
            if not engine.fits(len(payload)):
                raise ValueTooLargeError(
                    f"the value of key {key!r:.80} takes {len(payload)} bytes; the largest "
                    f"entry of store {self.name!r} is {engine.max_payload_bytes} bytes "
                    f"(open it with a larger size_bytes, after `{engine.cli_command('rm')}`)"
                )
            items.append(Prepared(store_key_digest(key), 0, payload, expires))
        return items

    def mset(self, key_value_pairs: Sequence[tuple[str, bytes]]) -> None:
        """Store each ``(key, value)``, replacing existing values.

        Every pair is checked first: a bad one writes nothing of the batch.

        Raises:
            TypeError: a key is not a ``str`` or a value not ``bytes``.
            ValueTooLargeError: a value is larger than the segment's largest entry
                (a ``ShmCacheError`` and ``ValueError``).
            LockTimeoutError: the lock was not had within ``lock_timeout``.
            CacheClosedError: the store was closed.
        """
        items = self._prepare(key_value_pairs)
        if items and not self._engine.put(items):
            raise self._engine.timeout_error("write to")

    async def amset(self, key_value_pairs: Sequence[tuple[str, bytes]]) -> None:
        """Async :meth:`mset`; waits for the lock without blocking the event loop."""
        items = self._prepare(key_value_pairs)
        if items and not await self._engine.aput(items):
            raise self._engine.timeout_error("write to")

    def mdelete(self, keys: Sequence[str]) -> None:
        """Remove ``keys`` (missing keys are ignored).

        Raises:
            TypeError: a key is not a ``str``.
            LockTimeoutError: the lock was not had within ``lock_timeout``.
        """
        digests = self._digests(keys)
        if digests:
            self._engine.delete(digests)

    async def amdelete(self, keys: Sequence[str]) -> None:
        """Async :meth:`mdelete`."""
        digests = self._digests(keys)
        if digests:
            await self._engine.adelete(digests)

    def clear(self) -> None:
        """Remove every entry, for every process of the host."""
        self._engine.clear(None)

    # -- keys -----------------------------------------------------------------------

    def yield_keys(self, *, prefix: str | None = None) -> Iterator[str]:
        """The stored keys (those starting with ``prefix``, if given), in no order.

        The segment is read under the lock in short steps; keys written or removed
        meanwhile may or may not be listed.

        Raises:
            TypeError: ``prefix`` is not a ``str`` or None.
        """
        if prefix is not None and not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str or None, not {type(prefix).__name__}")
        for _, payload in self._engine.scan():
            try:
                key, _ = _split(payload)
            except CodecError:
                continue  # another release's entry: not one of ours to list
            if prefix is None or key.startswith(prefix):
                yield key

    async def ayield_keys(self, *, prefix: str | None = None) -> AsyncIterator[str]:
        """Async :meth:`yield_keys` (each step holds the lock ~1 ms)."""
        for key in self.yield_keys(prefix=prefix):
            yield key

    # -- statistics and lifetime ----------------------------------------------------

    def stats(self) -> CacheStats:
        """The segment's counters, summed over all processes (hits/misses: ``mget``)."""
        return self._engine.stats()

    def close(self) -> None:
        """Detach this process from the segment (idempotent)."""
        engine = self._engine
        if not engine.closed and _BY_SETTINGS.get(engine._settings_key()) is self:
            del _BY_SETTINGS[engine._settings_key()]
        engine.close()

    def unlink(self) -> None:
        """Remove the segment file (processes attached keep the old one until closed)."""
        self._engine.unlink()

    def __enter__(self) -> SharedMemoryByteStore:
        self._engine._open_arena()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # By name, never by content: the receiver attaches to the segment.
        a = self._engine.reopen_args()
        return (_reopen, (a["name"], a["directory"], a["ttl"], a["lock_timeout"],
                          a["size_bytes"]))


def _reopen(
    name: str,
    directory: str | None,
    ttl: float | None,
    lock_timeout: float,
    size_bytes: int = _DEFAULT_SIZE,
) -> SharedMemoryByteStore:
    # A pool worker that gets the store with every task reuses the open instance.
    with contextlib.suppress(OSError, ShmCacheError, TypeError, ValueError):
        path = segment_path(
            resolve_directory(directory, create=False), check_name(name),
            _arena.FORMAT_VERSION, _KIND,
        )
        existing = _BY_SETTINGS.get(Engine.settings_key_for(path, ttl, lock_timeout))
        if existing is not None and not existing.closed:
            return existing
    return SharedMemoryByteStore(
        name, size_bytes=size_bytes, ttl=ttl, directory=directory, lock_timeout=lock_timeout
    )

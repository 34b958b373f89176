"""``BaseCache`` adapters over generic key-value stores, for comparison with shmcache.

Every adapter uses the same key — the sha256 digest of the length-framed prompt and
llm_string — and the same value encoding — ``pickle`` of the list of generations at
the highest protocol — so the stores are compared on storage and transport alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
from collections.abc import MutableMapping, Sequence
from typing import Any, Final

from langchain_core.caches import RETURN_VAL_TYPE, BaseCache
from langchain_core.outputs import Generation

PICKLE_PROTOCOL: Final = pickle.HIGHEST_PROTOCOL


def cache_key(prompt: str, llm_string: str) -> bytes:
    """sha256 over ``len(prompt) | prompt | llm_string`` (UTF-8, surrogates kept)."""
    p = prompt.encode("utf-8", "surrogatepass")
    h = hashlib.sha256(len(p).to_bytes(8, "little"))
    h.update(p)
    h.update(llm_string.encode("utf-8", "surrogatepass"))
    return h.digest()


def encode(return_val: Sequence[Generation]) -> bytes:
    """Pickle the generations as a ``list``."""
    return pickle.dumps(list(return_val), PICKLE_PROTOCOL)


class KVCache(BaseCache):
    """Base class: subclasses provide ``_get``/``_put``/``_clear`` on bytes."""

    def _get(self, key: bytes) -> Any:
        """Return the stored bytes (or a buffer) for ``key``, or ``None``."""
        raise NotImplementedError

    def _put(self, key: bytes, value: bytes) -> None:
        raise NotImplementedError

    def _clear(self) -> None:
        raise NotImplementedError

    def lookup(self, prompt: str, llm_string: str) -> RETURN_VAL_TYPE | None:
        """Fetch and unpickle; ``None`` on a miss."""
        raw = self._get(cache_key(prompt, llm_string))
        return None if raw is None else pickle.loads(raw)

    def update(self, prompt: str, llm_string: str, return_val: RETURN_VAL_TYPE) -> None:
        """Pickle and store, replacing any previous value."""
        self._put(cache_key(prompt, llm_string), encode(return_val))

    def clear(self, **kwargs: Any) -> None:
        """Remove every entry."""
        self._clear()

    def close(self) -> None:
        """Release resources held by this process (default: nothing)."""


class DiskCacheAdapter(KVCache):
    """``diskcache.Cache`` (SQLite index in WAL mode + files for big values).

    Its defaults are already the documented fast settings: ``sqlite_synchronous=1``
    (NORMAL), WAL journal, ``statistics=0``, and the ``least-recently-stored`` eviction
    policy, which — unlike ``least-recently-used`` — does not write on reads.
    """

    def __init__(self, directory: str) -> None:
        import diskcache

        self._cache = diskcache.Cache(directory, eviction_policy="least-recently-stored")

    def _get(self, key: bytes) -> Any:
        return self._cache.get(key)

    def _put(self, key: bytes, value: bytes) -> None:
        self._cache.set(key, value)

    def _clear(self) -> None:
        self._cache.clear()

    def close(self) -> None:
        """Close the SQLite connection of this process."""
        self._cache.close()


class MappingAdapter(KVCache):
    """Any ``MutableMapping`` — here a ``multiprocessing.Manager().dict()`` proxy.

    Every operation is a round trip over a socket to the manager's server process.
    """

    def __init__(self, mapping: MutableMapping[bytes, bytes]) -> None:
        self._map = mapping

    def _get(self, key: bytes) -> Any:
        return self._map.get(key)

    def _put(self, key: bytes, value: bytes) -> None:
        self._map[key] = value

    def _clear(self) -> None:
        self._map.clear()


class LmdbAdapter(KVCache):
    """One py-lmdb ``Environment`` per process, one transaction per operation.

    Args:
        path: Environment directory (shared by all processes).
        map_size: Maximum size of the memory map, in bytes.
        fast: ``False`` opens with the defaults (``sync=True``: each commit is fsync'd).
            ``True`` applies what the py-lmdb docs list for speed: ``sync=False,
            metasync=False`` (no fsync at commit), ``writemap=True`` (write through the
            shared map instead of ``malloc``'d pages + ``pwrite``), ``map_async=True``
            (with writemap: asynchronous flushes), ``readahead=False`` (random access),
            and reads with ``buffers=True`` (zero-copy: ``pickle.loads`` reads straight
            from the map inside the read transaction).
    """

    def __init__(self, path: str, map_size: int, *, fast: bool) -> None:
        import lmdb

        self._fast = fast
        if fast:
            self._env = lmdb.open(
                path,
                map_size=map_size,
                sync=False,
                metasync=False,
                writemap=True,
                map_async=True,
                readahead=False,
                max_spare_txns=4,
            )
        else:
            self._env = lmdb.open(path, map_size=map_size)

    def lookup(self, prompt: str, llm_string: str) -> RETURN_VAL_TYPE | None:
        """Read inside the transaction so that the buffer stays valid while unpickling."""
        key = cache_key(prompt, llm_string)
        with self._env.begin(buffers=self._fast) as txn:
            raw = txn.get(key)
            return None if raw is None else pickle.loads(raw)

    def _put(self, key: bytes, value: bytes) -> None:
        with self._env.begin(write=True) as txn:
            txn.put(key, value)

    def _clear(self) -> None:
        with self._env.begin(write=True) as txn:
            txn.drop(self._env.open_db(), delete=False)

    def close(self) -> None:
        """Close this process's environment handle."""
        self._env.close()


class WarpCacheAdapter(KVCache):
    """warp-cache's Rust shared-memory backend (``SharedCachedFunction``) used as a store.

    warp-cache is a memoizing decorator; its shared backend keeps fixed-size slots in an
    mmap'd file under ``/dev/shm`` (seqlock readers, SIEVE eviction).  ``get``/``set``
    take the wrapped function's arguments as the key: we pass the 32-byte digest.  Slot
    limits (``max_key_size``/``max_value_size``) must fit the serialized key and value,
    else ``set`` silently skips (counted in ``cache_info().oversize_skips``).
    """

    def __init__(self, shm_name: str, max_entries: int, max_value_bytes: int) -> None:
        from warp_cache._warp_cache_rs import SharedCachedFunction

        self._fn = SharedCachedFunction(
            _never_called,
            max_entries,
            max_key_size=128,
            max_value_size=max_value_bytes,
            shm_name=shm_name,
        )

    def _get(self, key: bytes) -> Any:
        return self._fn.get(key)

    def _put(self, key: bytes, value: bytes) -> None:
        self._fn.set(value, key)

    def _clear(self) -> None:
        self._fn.cache_clear()

    def oversize_skips(self) -> int:
        """Values that did not fit ``max_value_size`` and were dropped."""
        return int(self._fn.cache_info().oversize_skips)


def _never_called(key: bytes) -> bytes:
    """The function warp-cache memoizes; the benchmark only uses ``get``/``set``."""
    raise LookupError(key)


def warp_cache_files(shm_name: str) -> list[str]:
    """Files warp-cache's shared backend creates for ``shm_name``."""
    return [f"/dev/shm/{shm_name}.data", f"/dev/shm/{shm_name}.lock"]


def remove_files(paths: Sequence[str]) -> None:
    """Best-effort removal of files we created."""
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

"""Shared fixtures: every cache a test opens lives in its own temp directory and is
closed and unlinked at teardown, so no test leaves a segment behind."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _samples import CacheFactory

from shmcache import SharedMemoryCache


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    """A segment directory that does not exist yet (the cache creates it 0700)."""
    return tmp_path / "segments"


@pytest.fixture
def make_cache(cache_dir: Path) -> Iterator[CacheFactory]:
    """Open caches in ``cache_dir``; all are closed and unlinked at teardown."""
    opened: list[SharedMemoryCache] = []

    def factory(name: str = "test", **kwargs: Any) -> SharedMemoryCache:
        kwargs.setdefault("directory", cache_dir)
        kwargs.setdefault("size_bytes", 1 << 20)
        cache = SharedMemoryCache(name, **kwargs)
        opened.append(cache)
        return cache

    yield factory
    for cache in opened:
        cache.close()
        cache.unlink()


@pytest.fixture
def cache(make_cache: CacheFactory) -> SharedMemoryCache:
    """An empty 1 MiB cache."""
    return make_cache()

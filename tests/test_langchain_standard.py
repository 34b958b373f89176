"""LangChain's own conformance suites for BaseCache, run against SharedMemoryCache."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from langchain_core.caches import BaseCache
from langchain_tests.integration_tests import AsyncCacheTestSuite, SyncCacheTestSuite

from shmcache import SharedMemoryCache


class TestSharedMemoryCacheSync(SyncCacheTestSuite):
    @pytest.fixture
    def cache(self, tmp_path: Path) -> Iterator[BaseCache]:
        cache = SharedMemoryCache("standard", directory=tmp_path, size_bytes=1 << 20)
        yield cache
        cache.close()
        cache.unlink()


class TestSharedMemoryCacheAsync(AsyncCacheTestSuite):
    @pytest.fixture
    async def cache(self, tmp_path: Path) -> AsyncIterator[BaseCache]:
        cache = SharedMemoryCache("standard-async", directory=tmp_path, size_bytes=1 << 20)
        yield cache
        cache.close()
        cache.unlink()

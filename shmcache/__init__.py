"""shmcache: LangChain caches in shared memory, shared by every process on the host.

Example:
    >>> from langchain_core.globals import set_llm_cache
    >>> from shmcache import SharedMemoryCache
    >>> set_llm_cache(SharedMemoryCache("myapp"))  # doctest: +SKIP
"""

from __future__ import annotations

from ._errors import (
    CacheClosedError,
    InvalidArgumentError,
    LockTimeoutError,
    SegmentCorruptError,
    SegmentDirectoryError,
    SegmentFormatError,
    SegmentNotFoundError,
    SegmentOpenError,
    SegmentPermissionError,
    SegmentReplacedError,
    SegmentSpaceError,
    ShmCacheError,
    ValueTooLargeError,
)
from ._stats import CacheStats
from .bytestore import SharedMemoryByteStore
from .cache import DEFAULT_LOCK_TIMEOUT_S, DEFAULT_SIZE_BYTES, MIN_SIZE_BYTES, SharedMemoryCache

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_LOCK_TIMEOUT_S",
    "DEFAULT_SIZE_BYTES",
    "MIN_SIZE_BYTES",
    "CacheClosedError",
    "CacheStats",
    "InvalidArgumentError",
    "LockTimeoutError",
    "SegmentCorruptError",
    "SegmentDirectoryError",
    "SegmentFormatError",
    "SegmentNotFoundError",
    "SegmentOpenError",
    "SegmentPermissionError",
    "SegmentReplacedError",
    "SegmentSpaceError",
    "SharedMemoryByteStore",
    "SharedMemoryCache",
    "ShmCacheError",
    "ValueTooLargeError",
    "__version__",
]

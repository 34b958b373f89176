"""Error types raised by shmcache.

Every error of ours derives from :class:`ShmCacheError` and also from the builtin
that fits it, so callers can catch either.  Messages say what was wrong and what to
do about it (which argument to change, which command to run).
"""

from __future__ import annotations

__all__ = [
    "CacheClosedError",
    "CodecError",
    "CodecVersionError",
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
    "ShmCacheError",
    "ValueTooLargeError",
]


class ShmCacheError(Exception):
    """Base class of every error raised by shmcache."""


class InvalidArgumentError(ShmCacheError, ValueError):
    """An argument has the right type but a value out of range (name, size, timeout, ...).

    The message names the argument, the limit and what to pass instead.
    """


class CacheClosedError(ShmCacheError, ValueError):
    """The cache was used after :meth:`SharedMemoryCache.close`."""


class LockTimeoutError(ShmCacheError, TimeoutError):
    """Another process held the segment lock for longer than ``lock_timeout``."""


class CodecError(ShmCacheError, ValueError):
    """The bytes are not a valid encoding (damaged, truncated, or not ours).

    Readers treat it as a miss.  Defined here, not in a codec, because the engine
    handles it for every front-end (``shmcache._codec`` re-exports it).
    """


class CodecVersionError(CodecError):
    """The bytes were written by another codec format or langchain-core field layout.

    Not damage: treat the entry as a miss (a process with this layout may rewrite it).
    """


class ValueTooLargeError(ShmCacheError, ValueError):
    """A value is larger than the largest entry the segment takes."""


class SegmentPermissionError(ShmCacheError, PermissionError):
    """The segment file or its directory is not private to the current user."""


class SegmentCorruptError(ShmCacheError, ValueError):
    """The segment's header is damaged; the message names the command that fixes it."""


class SegmentFormatError(SegmentCorruptError):
    """The file is not a shmcache segment of this format version."""


class SegmentSpaceError(ShmCacheError, OSError):
    """The segment could not be created: not enough space in its directory."""


class SegmentReplacedError(ShmCacheError, FileNotFoundError):
    """The segment file this process had open was removed or replaced by another."""


class SegmentDirectoryError(ShmCacheError, NotADirectoryError):
    """``directory=`` (or one of its parents) exists but is not a directory.

    The message names the path that was given and the part of it that is not a
    directory.
    """


class SegmentNotFoundError(ShmCacheError, FileNotFoundError):
    """A cache (or the directory it should be in) does not exist where it was looked for."""


class SegmentOpenError(ShmCacheError, OSError):
    """Any other OS error while opening or creating a segment (read-only file system,
    name too long, no mmap support, ...).

    ``errno`` is the OS error's; the message names the path that was given and what to do.
    """

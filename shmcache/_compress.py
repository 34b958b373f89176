"""Bounded zstd compression of stored values, safe on hostile bytes.

One job: turn a payload into fewer bytes when that pays, and back, with every length
bounded before anything is allocated.  The LLM cache codec (``_codec.py``) and the
other front-ends (e.g. a byte store) store what :func:`pack` returns and read it back
with :func:`unpack`; the codec, which has a format byte of its own, uses the two
halves directly (:func:`compress_body`, :func:`decompress_body`).

Envelope written by :func:`pack` (all integers little-endian)::

    byte 0      method: 0 = stored as is, 1 = zstd (any other value is refused)
    method 0    bytes 1..   the payload itself
    method 1    bytes 1..4  n, the payload's length (u32): 1 <= n <= MAX_UNPACKED_BYTES
                            and n <= MAX_RATIO * (length of the frame)
                bytes 5..   exactly one zstd frame that states its content size, equal
                            to n; no dictionary, no checksum, nothing after it

The zstd *body* (method 1 without its method byte) is what :func:`compress_body`
returns and :func:`decompress_body` reads.  A later method (a dictionary shared by a
segment, say) takes a new method byte; readers of this module refuse it, so writers
must not use it before every reader knows it (the codec bumps its format byte).

When it compresses (measured in ``benchmarks/results/compression.md``):

* from :data:`MIN_COMPRESS_BYTES` on: below it zstd rarely saves an eighth of the
  bytes without a dictionary (of sample LLM values: 0 % at 160 B, 4 % at 200 B,
  ~60 % at 256 B, 90 % at 307 B) and trying costs ~5 µs per update;
* only if the body is at most 7/8 of the payload (:data:`MAX_KEPT_EIGHTHS`): a
  smaller saving is not worth the decompression on every hit (+3 µs at 0.3 KiB to
  +7 µs at 4 KiB on a 7-10 µs hit);
* only if the payload is at most :data:`MAX_RATIO` times the frame: a reader refuses
  bodies that expand more (below), so such a (rare, pathological) value is stored as is;
* at zstd level :data:`ZSTD_LEVEL`: at these sizes level 1 compresses as well as 3
  (within 1 %) and faster; decompression costs the same.

Decompression never trusts the bytes: ``n`` is checked against the caller's bound
(at most :data:`MAX_UNPACKED_BYTES`) and against :data:`MAX_RATIO` times the frame's
length before zstd is called, so a small value never turns into much memory (msgpack
can make a Python object of every byte it reads); the frame must state its
content size and it must equal ``n`` (python-zstandard allocates whatever size a
frame states: ``max_output_size`` does not bound such frames); it is decompressed
with ``max_output_size=n``, trailing bytes refused, and the output length checked.
Every failure raises :class:`CompressedDataError` (a :class:`CodecError`): a miss to
the caller, never another exception and never an allocation beyond ``n``.

Threads and processes: zstd contexts are not safe to share between threads, so each
thread has its own compressor and decompressor (``threading.local``, made on first use,
~20 µs once).  A forked child drops them all (``os.register_at_fork``) and makes new
ones; even where fork hooks do not run (a fork from C, as uWSGI does), the forking
thread's own contexts were idle at the fork, and other threads' contexts are
unreachable in the child.
"""

from __future__ import annotations

import os
import struct
import threading
from typing import Final

import zstandard

from shmcache._errors import CodecError

__all__ = [
    "MAX_KEPT_EIGHTHS",
    "MAX_RATIO",
    "MAX_UNPACKED_BYTES",
    "METHOD_RAW",
    "METHOD_ZSTD",
    "MIN_COMPRESS_BYTES",
    "ZSTD_LEVEL",
    "CodecError",
    "CompressedDataError",
    "compress_body",
    "decompress_body",
    "is_enabled",
    "pack",
    "set_enabled",
    "unpack",
]

METHOD_RAW: Final = 0
"""Envelope method byte: the payload follows as is."""
METHOD_ZSTD: Final = 1
"""Envelope method byte: a zstd body (length, frame) follows."""

MIN_COMPRESS_BYTES: Final = 256
"""Payloads shorter than this many bytes are never compressed."""
MAX_KEPT_EIGHTHS: Final = 7
"""A compressed body is kept only if it takes at most this many eighths of the payload."""
ZSTD_LEVEL: Final = 1
"""zstd compression level."""
MAX_RATIO: Final = 32
"""Most payload bytes per byte of zstd frame, written or read.

Measured LLM payloads compress 1.5-3x; a frame that claims more is refused unread.
"""
MAX_UNPACKED_BYTES: Final = 64 * 1024 * 1024
"""Largest payload ever compressed, and the most bytes a decompression may produce.

Larger payloads are stored as they are; a body stating more is refused unread.
"""

_LENGTH: Final = struct.Struct("<I")
_BODY_HEADER_BYTES: Final = _LENGTH.size
_RAW_PREFIX: Final = bytes([METHOD_RAW])
_ZSTD_PREFIX: Final = bytes([METHOD_ZSTD])


class CompressedDataError(CodecError):
    """A compressed value is malformed, lies about its length, or exceeds the bound."""


class _Contexts(threading.local):
    """One zstd compressor and decompressor per thread (contexts are not thread-safe)."""

    def __init__(self) -> None:
        self.compressor = zstandard.ZstdCompressor(
            level=ZSTD_LEVEL,
            write_checksum=False,  # records and remote values carry their own crc32
            write_content_size=True,  # the reader requires it (see decompress_body)
            write_dict_id=False,
        )
        self.decompressor = zstandard.ZstdDecompressor()


_contexts = _Contexts()
_enabled = True


def _after_fork_in_child() -> None:
    """Give a forked child fresh contexts (none inherited from the parent's threads)."""
    global _contexts
    _contexts = _Contexts()


os.register_at_fork(after_in_child=_after_fork_in_child)


def set_enabled(flag: bool) -> None:
    """Turn compression on or off for this process (on by default).

    Meant for benchmarks and tests.  Reading is unaffected: compressed values are
    always decompressed.

    Args:
        flag: ``True`` to compress where it pays, ``False`` to store payloads as is.

    Raises:
        TypeError: ``flag`` is not a bool.
    """
    global _enabled
    if type(flag) is not bool:
        raise TypeError(f"flag must be a bool, not {type(flag).__name__}")
    _enabled = flag


def is_enabled() -> bool:
    """Return whether :func:`pack` and :func:`compress_body` compress."""
    return _enabled


def compress_body(payload: bytes, *, compress: bool = True) -> bytes | None:
    """Compress ``payload`` if that pays.

    Args:
        payload: The bytes to store.
        compress: False: return None at once (the caller's segment has room to
            spare, so compression would only cost its hits time).

    Returns:
        The zstd body (``n`` as u32, then the frame), or None when compression is off,
        the payload is shorter than :data:`MIN_COMPRESS_BYTES` or longer than
        :data:`MAX_UNPACKED_BYTES`, or the body would not save an eighth of it, or
        the payload is more than :data:`MAX_RATIO` times the frame.
    """
    size = len(payload)
    if not (compress and _enabled) or size < MIN_COMPRESS_BYTES or size > MAX_UNPACKED_BYTES:
        return None
    frame = _contexts.compressor.compress(payload)
    if (_BODY_HEADER_BYTES + len(frame)) * 8 > size * MAX_KEPT_EIGHTHS:
        return None
    if size > len(frame) * MAX_RATIO:
        return None  # a reader would refuse it
    return _LENGTH.pack(size) + frame


def _refuse(reason: str) -> CompressedDataError:
    return CompressedDataError(f"not a valid compressed value: {reason}")


def decompress_body(
    body: bytes | memoryview, max_bytes: int = MAX_UNPACKED_BYTES
) -> bytes:
    """Decompress a body written by :func:`compress_body`, bounded.

    Args:
        body: The zstd body (untrusted).
        max_bytes: The most bytes the caller accepts (capped at
            :data:`MAX_UNPACKED_BYTES`), e.g. the largest entry its segment holds.

    Returns:
        The payload: exactly the recorded length, never more.

    Raises:
        CompressedDataError: The body is truncated or malformed; its recorded length
            is zero, beyond the bound, or more than :data:`MAX_RATIO` times the
            frame; its frame does not state its content size or states another
            one, holds bytes after the frame, or does not decompress to exactly
            the recorded length.
    """
    try:
        view = memoryview(body)
        if view.nbytes <= _BODY_HEADER_BYTES:
            raise _refuse(f"{view.nbytes} bytes, too short for a compressed body")
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        (size,) = _LENGTH.unpack_from(view)
        limit = min(max_bytes, MAX_UNPACKED_BYTES)
        if not 0 < size <= limit:
            raise _refuse(f"recorded length {size} is outside 1..{limit}")
        frame = view[_BODY_HEADER_BYTES:]
        if size > frame.nbytes * MAX_RATIO:
            raise _refuse(
                f"recorded length {size} is more than {MAX_RATIO} times the "
                f"{frame.nbytes}-byte frame"
            )
        try:
            stated = zstandard.frame_content_size(frame)
        except zstandard.ZstdError as exc:
            raise _refuse(f"no zstd frame header ({exc})") from None
        if stated != size:
            # -1: the frame does not state its size.  A frame stating more than the
            # recorded length would make python-zstandard allocate what it states.
            raise _refuse(f"the frame states {stated} bytes, the record {size}")
        try:
            # decompress(data, max_output_size, read_across_frames, allow_extra_data),
            # by position: keyword parsing costs ~0.2 µs of a ~2 µs call.
            out = _contexts.decompressor.decompress(frame, size, False, False)
        except zstandard.ZstdError as exc:
            raise _refuse(str(exc)) from None
        if len(out) != size:
            raise _refuse(f"decompressed to {len(out)} bytes, recorded {size}")
        return out
    except CompressedDataError:
        raise
    except Exception as exc:  # a buffer that is not one, MemoryError, ...
        raise _refuse(f"{type(exc).__name__}: {exc}") from exc


def pack(payload: bytes, *, compress: bool = True) -> bytes:
    """Wrap ``payload`` in the envelope, compressed where that pays.

    Args:
        payload: The bytes to store.
        compress: False: store it as is (see :func:`compress_body`).

    Returns:
        The envelope: a method byte, then the payload as is or its zstd body.
    """
    body = compress_body(payload, compress=compress)
    if body is None:
        return _RAW_PREFIX + payload
    return _ZSTD_PREFIX + body


def unpack(
    data: bytes | memoryview, max_bytes: int = MAX_UNPACKED_BYTES
) -> bytes | memoryview:
    """Read an envelope written by :func:`pack` (untrusted bytes welcome).

    Args:
        data: The envelope; a ``memoryview`` (into shared memory, say) is fine.
        max_bytes: The most bytes a compressed value may decompress to (capped at
            :data:`MAX_UNPACKED_BYTES`).  Values stored as is are bounded by ``data``.

    Returns:
        The payload: a ``memoryview`` of ``data`` (no copy) if it was stored as is,
        else new ``bytes``.  Copy a view before ``data``'s buffer changes.

    Raises:
        CompressedDataError: Empty data, an unknown method byte, or a bad body (see
            :func:`decompress_body`).
    """
    try:
        view = memoryview(data)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
    except (TypeError, ValueError) as exc:
        raise _refuse(f"{type(exc).__name__}: {exc}") from exc
    if not view.nbytes:
        raise _refuse("empty")
    method = view[0]
    if method == METHOD_RAW:
        return view[1:]
    if method == METHOD_ZSTD:
        return decompress_body(view[1:], max_bytes)
    raise _refuse(f"unknown method byte {method}")

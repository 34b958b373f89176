"""Tests for the compression envelope (``shmcache._compress``).

Round trips, when it compresses, and hostile bodies: decompression bombs (a frame
stating a huge size, a ratio bomb), frames without a content size, recorded lengths
that lie in both directions, truncations, trailing bytes, garbage, unknown method
bytes, zero and huge lengths.  Each check of ``decompress_body`` has a test here that
fails if that check is removed (the bombs also measure the memory they allocate).
Then compressed values through a real ``SharedMemoryCache``, threads and a fork.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import struct
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import zstandard
from _samples import CacheFactory, chat_generation
from hypothesis import given, settings
from hypothesis import strategies as st
from langchain_core.outputs import Generation

from shmcache import SharedMemoryCache, _compress
from shmcache._codec import CodecError, decode_verified, encode_generations
from shmcache._compress import (
    MAX_RATIO,
    MAX_UNPACKED_BYTES,
    METHOD_RAW,
    METHOD_ZSTD,
    MIN_COMPRESS_BYTES,
    CompressedDataError,
    compress_body,
    decompress_body,
    pack,
    set_enabled,
    unpack,
)
from shmcache._errors import ShmCacheError

MIB = 1 << 20
CHILD_TIMEOUT_S = 60
LLM = "llm"

WORDS = [
    *("the", "a", "model", "answer", "weather", "Paris", "cache", "request", "token"),
    *("of", "to", "in", "is", "for", "with", "that", "this", "on", "as", "be", "are"),
    *("by", "from", "it", "an", "or", "which", "you", "can", "will", "more", "than"),
    *("shared", "memory"),
]


def text(seed: int, n_bytes: int) -> bytes:
    """English-ish text (compresses about 2x, like LLM answers)."""
    rng = random.Random(seed)
    out = " ".join(rng.choice(WORDS) for _ in range(n_bytes // 3))
    return out.encode()[:n_bytes]


@pytest.fixture(autouse=True)
def _compression_on() -> Iterator[None]:
    set_enabled(True)
    yield
    set_enabled(True)


def zstd_body(payload: bytes, **kwargs: Any) -> bytes:
    """A body made by hand: recorded length, then a frame of ``payload``."""
    frame = zstandard.ZstdCompressor(write_checksum=False, **kwargs).compress(payload)
    return struct.pack("<I", len(payload)) + frame


def frame_stating(size: int, payload: bytes) -> bytes:
    """A frame of ``payload`` whose header states ``size`` as its content size."""
    frame = zstandard.ZstdCompressor(write_content_size=False, write_checksum=False).compress(
        payload
    )
    descriptor = frame[4]
    assert descriptor & 0xE3 == 0  # no size, not single-segment, no dict id, no checksum
    # Set the 8-byte content size flag; the size goes after the window descriptor.
    out = frame[:4] + bytes([descriptor | 0xC0]) + frame[5:6] + size.to_bytes(8, "little")
    out += frame[6:]
    assert zstandard.frame_content_size(out) == size
    return out


def peak_bytes(fn: Callable[[], object]) -> int:
    """Peak traced allocation while ``fn`` runs (it must raise CompressedDataError)."""
    tracemalloc.start()
    try:
        with pytest.raises(CompressedDataError):
            fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


PAYLOAD = text(1, 2000)


# --------------------------------------------------------------------------- round trips


@settings(max_examples=200, deadline=None)
@given(
    payload=st.one_of(
        st.binary(max_size=3000),
        st.builds(text, st.integers(0, 10**6), st.integers(0, 8000)),
    ),
    enabled=st.booleans(),
)
def test_pack_round_trips(payload: bytes, enabled: bool) -> None:
    set_enabled(enabled)
    packed = pack(payload)
    assert bytes(unpack(packed)) == payload
    assert bytes(unpack(memoryview(packed))) == payload
    assert bytes(unpack(bytearray(packed))) == payload
    if packed[0] == METHOD_ZSTD:
        assert enabled
        assert len(packed) <= 1 + len(payload) * 7 // 8
        assert decompress_body(packed[1:]) == payload
    else:
        assert packed == bytes([METHOD_RAW]) + payload


def test_compressible_text_is_compressed_from_the_threshold() -> None:
    big = text(2, 4096)
    packed = pack(big)
    assert packed[0] == METHOD_ZSTD
    assert len(packed) < 0.7 * len(big)
    (recorded,) = struct.unpack_from("<I", packed, 1)
    assert recorded == len(big)
    assert zstandard.frame_content_size(packed[5:]) == len(big)
    assert zstandard.get_frame_parameters(packed[5:]).has_checksum is False
    short = text(3, MIN_COMPRESS_BYTES - 1)
    assert pack(short) == bytes([METHOD_RAW]) + short
    assert compress_body(short) is None


def test_incompressible_bytes_are_stored_as_is() -> None:
    noise = random.Random(4).randbytes(4096)
    assert pack(noise) == bytes([METHOD_RAW]) + noise
    assert compress_body(noise) is None


def test_a_body_saving_less_than_an_eighth_is_not_kept() -> None:
    # Half noise, half text: zstd saves a little, not an eighth.
    mixed = random.Random(5).randbytes(1500) + text(5, 500)
    frame = zstandard.ZstdCompressor(level=_compress.ZSTD_LEVEL, write_checksum=False).compress(
        mixed
    )
    assert len(frame) + 4 < len(mixed)  # it does save something
    assert compress_body(mixed) is None


def test_values_expanding_more_than_max_ratio_are_stored_as_is() -> None:
    zeros = b"\x00" * 100_000
    assert pack(zeros)[0] == METHOD_RAW
    just_in = text(6, 4000)
    assert pack(just_in)[0] == METHOD_ZSTD


def test_set_enabled_turns_compression_off_not_reading() -> None:
    big = text(7, 3000)
    packed = pack(big)
    set_enabled(False)
    assert not _compress.is_enabled()
    assert pack(big) == bytes([METHOD_RAW]) + big
    assert compress_body(big) is None
    assert unpack(packed) == big  # still read
    with pytest.raises(TypeError):
        set_enabled(1)  # type: ignore[arg-type]
    assert not _compress.is_enabled()


def test_payloads_beyond_the_maximum_are_stored_as_is(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_compress, "MAX_UNPACKED_BYTES", 1000)
    big = text(8, 1001)
    assert pack(big) == bytes([METHOD_RAW]) + big


def test_unpack_of_a_raw_value_is_a_view_without_copy() -> None:
    data = bytes([METHOD_RAW]) + b"payload"
    out = unpack(data)
    assert isinstance(out, memoryview)
    assert out.obj is data
    assert out == b"payload"
    assert unpack(bytes([METHOD_RAW])) == b""


def test_errors_are_codec_errors() -> None:
    assert issubclass(CompressedDataError, CodecError)
    assert issubclass(CompressedDataError, ShmCacheError)
    assert issubclass(CompressedDataError, ValueError)
    assert _compress.CodecError is CodecError


# --------------------------------------------------------------------------- hostile bodies


def test_recorded_length_beyond_the_bound_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    body = zstd_body(PAYLOAD)
    assert decompress_body(body) == PAYLOAD
    with pytest.raises(CompressedDataError, match=r"outside 1\.\.1999"):
        decompress_body(body, max_bytes=len(PAYLOAD) - 1)
    with pytest.raises(CompressedDataError, match="outside"):
        unpack(bytes([METHOD_ZSTD]) + body, max_bytes=len(PAYLOAD) - 1)
    # The module maximum caps whatever bound a caller passes.
    monkeypatch.setattr(_compress, "MAX_UNPACKED_BYTES", len(PAYLOAD) - 1)
    with pytest.raises(CompressedDataError, match="outside"):
        decompress_body(body, max_bytes=1 << 40)


@pytest.mark.parametrize("recorded", [0xFFFFFFFF, MAX_UNPACKED_BYTES + 1, 1 << 31])
def test_huge_recorded_lengths_are_refused(recorded: int) -> None:
    body = struct.pack("<I", recorded) + frame_stating(recorded, PAYLOAD)
    assert peak_bytes(lambda: decompress_body(body)) < MIB


def test_zero_length_is_refused() -> None:
    body = zstd_body(b"")
    assert zstandard.frame_content_size(body[4:]) == 0
    with pytest.raises(CompressedDataError, match="recorded length 0"):
        decompress_body(body)


def test_frame_stating_a_huge_size_behind_a_small_recorded_length_is_refused_unallocated() -> None:
    # python-zstandard would allocate the 48 MiB the frame states, whatever
    # max_output_size says: the stated size must equal the recorded one.
    body = struct.pack("<I", len(PAYLOAD)) + frame_stating(48 * MIB, PAYLOAD)
    assert peak_bytes(lambda: decompress_body(body)) < MIB


def test_frame_without_content_size_is_refused() -> None:
    body = zstd_body(PAYLOAD, write_content_size=False)
    assert zstandard.frame_content_size(body[4:]) == -1
    with pytest.raises(CompressedDataError, match="states -1 bytes"):
        decompress_body(body)


@pytest.mark.parametrize("delta", [-1, 1, -1000, 1000])
def test_recorded_length_lying_either_way_is_refused(delta: int) -> None:
    body = bytearray(zstd_body(PAYLOAD))
    struct.pack_into("<I", body, 0, len(PAYLOAD) + delta)
    with pytest.raises(CompressedDataError, match="the frame states"):
        decompress_body(bytes(body))


@pytest.mark.parametrize("delta", [-1, 1])
def test_frame_stating_a_size_it_does_not_hold_is_refused(delta: int) -> None:
    size = len(PAYLOAD) + delta
    body = struct.pack("<I", size) + frame_stating(size, PAYLOAD)
    with pytest.raises(CompressedDataError):
        decompress_body(body)


def test_ratio_bomb_is_refused_before_decompressing() -> None:
    # A genuine frame: 4 MiB of zeros in ~100 bytes.  Nothing this module writes
    # expands more than MAX_RATIO times, so nothing that does is read.
    zeros = b"\x00" * (4 * MIB)
    body = zstd_body(zeros)
    assert len(zeros) > MAX_RATIO * len(body)
    assert peak_bytes(lambda: decompress_body(body)) < MIB


def test_output_of_another_length_is_refused() -> None:
    body = zstd_body(PAYLOAD)

    class Short:
        def decompress(self, frame: Any, *args: Any, **kwargs: Any) -> bytes:
            return PAYLOAD[:-1]

    saved = _compress._contexts.decompressor
    _compress._contexts.decompressor = Short()  # type: ignore[assignment]
    try:
        with pytest.raises(CompressedDataError, match="decompressed to 1999 bytes"):
            decompress_body(body)
    finally:
        _compress._contexts.decompressor = saved
    assert decompress_body(body) == PAYLOAD


@pytest.mark.parametrize("tail", [b"\x00", b"garbage", None], ids=["nul", "garbage", "frame"])
def test_bytes_after_the_frame_are_refused(tail: bytes | None) -> None:
    body = zstd_body(PAYLOAD)
    extra = tail if tail is not None else body[4:]  # a second, valid frame
    with pytest.raises(CompressedDataError, match="unused data"):
        decompress_body(body + extra)


def test_every_truncation_is_refused() -> None:
    packed = pack(PAYLOAD)
    assert packed[0] == METHOD_ZSTD
    for length in range(len(packed)):
        with pytest.raises(CompressedDataError):
            unpack(packed[:length])
        with pytest.raises(CompressedDataError):
            unpack(memoryview(packed)[:length])


def test_frame_naming_a_dictionary_is_refused() -> None:
    samples = [text(seed, 200 + seed % 400) for seed in range(300)]
    dictionary = zstandard.train_dictionary(2048, samples)
    body = zstd_body(PAYLOAD, dict_data=dictionary, write_dict_id=True)
    with pytest.raises(CompressedDataError, match="Dictionary mismatch"):
        decompress_body(body)


def test_skippable_frame_is_refused() -> None:
    skippable = struct.pack("<II", 0x184D2A50, 8) + b"\x00" * 8
    with pytest.raises(CompressedDataError, match="states 0 bytes"):
        decompress_body(struct.pack("<I", 8) + skippable)


@pytest.mark.parametrize("method", [2, 3, 0x28, 0x80, 0xFF])
def test_unknown_method_byte_is_refused(method: int) -> None:
    with pytest.raises(CompressedDataError, match=f"unknown method byte {method}"):
        unpack(bytes([method]) + pack(PAYLOAD)[1:])


@pytest.mark.parametrize(
    "data",
    [b"", bytes([METHOD_ZSTD]), bytes([METHOD_ZSTD]) + b"\x10\x00\x00\x00"],
    ids=["empty", "method only", "length only"],
)
def test_too_short_is_refused(data: bytes) -> None:
    with pytest.raises(CompressedDataError):
        unpack(data)


@pytest.mark.parametrize(
    "data",
    [None, 5, "text", object(), memoryview(b"\x01" * 64)[::2]],
    ids=["none", "int", "str", "object", "strided memoryview"],
)
def test_non_buffers_are_refused(data: Any) -> None:
    with pytest.raises(CompressedDataError):
        unpack(data)
    with pytest.raises(CompressedDataError):
        decompress_body(data)


@settings(max_examples=300, deadline=None)
@given(garbage=st.binary(max_size=600))
def test_garbage_behind_a_method_byte_is_refused_or_bounded(garbage: bytes) -> None:
    for data in (
        bytes([METHOD_ZSTD]) + garbage,
        # Past the magic number, so that zstd itself gets to see it.
        bytes([METHOD_ZSTD]) + garbage[:4] + b"\x28\xb5\x2f\xfd" + garbage[4:],
    ):
        try:
            out = unpack(data)
        except CompressedDataError:
            continue
        (recorded,) = struct.unpack_from("<I", data, 1)
        assert len(out) == recorded


@settings(max_examples=200, deadline=None)
@given(position=st.integers(0, 10**6), flip=st.integers(1, 255))
def test_byte_flips_are_refused_or_keep_the_recorded_length(position: int, flip: int) -> None:
    packed = bytearray(pack(PAYLOAD))
    position %= len(packed)
    packed[position] ^= flip
    try:
        out = unpack(bytes(packed))
    except CompressedDataError:
        return
    assert len(out) == struct.unpack_from("<I", packed, 1)[0] or packed[0] == METHOD_RAW


# --------------------------------------------------------------------------- threads and fork


def test_threads_compress_and_decompress_concurrently() -> None:
    payloads = [text(seed, 300 + 37 * seed) for seed in range(40)]
    expected = [pack(p) for p in payloads]
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def work() -> None:
        try:
            start.wait()
            for _ in range(50):
                for payload, packed in zip(payloads, expected, strict=True):
                    assert pack(payload) == packed
                    assert unpack(packed) == payload
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def _child_contexts_and_round_trip(parent_contexts_id: int) -> tuple[bool, bool]:
    fresh = id(_compress._contexts) != parent_contexts_id
    payload = text(9, 3000)
    return fresh, unpack(pack(payload)) == payload


def test_forked_child_gets_fresh_contexts() -> None:
    pack(PAYLOAD)  # contexts in use in the parent
    with multiprocessing.get_context("fork").Pool(1) as pool:
        fresh, ok = pool.apply(_child_contexts_and_round_trip, (id(_compress._contexts),))
    assert fresh and ok


# --------------------------------------------------------------------------- through a cache


def answers(n: int, size: int = 1500) -> list[list[Generation]]:
    return [[chat_generation(text(i, size).decode())] for i in range(n)]


def fill_past_half(cache: SharedMemoryCache) -> None:
    """Store filler entries until the segment compresses new values (half full)."""
    i = 0
    while not cache._engine.short_of_space():
        cache.update(f"filler {i}", LLM, [Generation(text=text(i, 2000).decode())])
        i += 1
        assert i < 100_000, "the segment never got half full"


def test_compressed_values_come_back_equal_from_a_cache(make_cache: CacheFactory) -> None:
    cache = make_cache("compressed", size_bytes=MIB)
    fill_past_half(cache)
    values = answers(20)
    assert all(encode_generations(v)[0] == 2 for v in values)  # all compressed
    short = [Generation(text="short")]
    for i, value in enumerate(values):
        cache.update(f"p{i}", LLM, value)
    cache.update("short", LLM, short)
    for i, value in enumerate(values):
        first, second = cache.lookup(f"p{i}", LLM), cache.lookup(f"p{i}", LLM)
        assert first == value
        assert first is not second and first[0] is not second[0]  # type: ignore[index]
    assert cache.lookup("short", LLM) == short


def test_compression_stores_more_entries_per_byte(make_cache: CacheFactory) -> None:
    """A full segment keeps more entries with compression than without."""
    values = answers(1500)  # ~3x what a 1 MiB segment holds uncompressed
    kept = {}
    for flag in (True, False):
        set_enabled(flag)
        cache = make_cache(f"space-{flag}", size_bytes=MIB)
        for i, value in enumerate(values):
            cache.update(f"p{i}", LLM, value)
        kept[flag] = [i for i, v in enumerate(values) if cache.lookup(f"p{i}", LLM) == v]
        assert cache.stats().entries >= len(kept[flag]) > 0
    assert len(kept[True]) > 1.25 * len(kept[False]), {k: len(v) for k, v in kept.items()}


def test_uncompressed_entries_read_back_with_compression_on(make_cache: CacheFactory) -> None:
    cache = make_cache("mixed")
    values = answers(5)
    set_enabled(False)
    for i, value in enumerate(values):
        cache.update(f"p{i}", LLM, value)
    set_enabled(True)
    assert all(cache.lookup(f"p{i}", LLM) == v for i, v in enumerate(values))


def _child_update_and_lookup(cache: SharedMemoryCache, n: int) -> list[bool]:
    got = [cache.lookup(f"parent {i}", LLM) == v for i, v in enumerate(answers(n, 2500))]
    for i, value in enumerate(answers(n, 1200)):
        cache.update(f"child {i}", LLM, value)
    return got


def test_compressed_values_cross_a_fork(make_cache: CacheFactory) -> None:
    cache = make_cache("forked", size_bytes=MIB)
    fill_past_half(cache)
    n = 10
    for i, value in enumerate(answers(n, 2500)):
        cache.update(f"parent {i}", LLM, value)
    with multiprocessing.get_context("fork").Pool(1) as pool:
        seen = pool.apply(_child_update_and_lookup, (cache, n))
    assert seen == [True] * n
    for i, value in enumerate(answers(n, 1200)):
        assert cache.lookup(f"child {i}", LLM) == value


def test_a_segment_with_room_stores_values_as_they_are(make_cache: CacheFactory) -> None:
    """Compression only once live entries take half the data space: until then a hit
    pays no decompression."""
    cache = make_cache("peek", size_bytes=MIB)
    value = answers(1, 3000)[0]
    plain = encode_generations(value, compress=False)
    assert plain[0] == 1 and encode_generations(value)[0] == 2
    cache.update("p", LLM, value)
    with open(cache.path, "rb") as f:
        assert plain in f.read()  # the segment holds the plain bytes
    assert cache.lookup("p", LLM) == value


def test_codec_records_in_a_half_full_cache_are_compressed(make_cache: CacheFactory) -> None:
    cache = make_cache("peek", size_bytes=MIB)
    fill_past_half(cache)
    value = answers(1, 3000)[0]
    payload = encode_generations(value)
    assert payload[0] == 2
    assert decode_verified(payload) == value
    cache.update("p", LLM, value)
    with open(cache.path, "rb") as f:
        assert payload in f.read()  # the segment holds the compressed bytes
    assert cache.lookup("p", LLM) == value
    assert os.path.getsize(cache.path) == MIB


def test_a_value_that_fits_only_compressed_is_stored(make_cache: CacheFactory) -> None:
    cache = make_cache("big", size_bytes=MIB)
    largest = cache._engine.max_payload_bytes
    value = [Generation(text=text(7, largest + largest // 4).decode())]
    assert len(encode_generations(value, compress=False)) > largest
    assert len(encode_generations(value)) < largest
    cache.update("big", LLM, value)  # the segment is empty: plain would not fit
    assert cache.lookup("big", LLM) == value
    assert cache.stats().skipped == 0

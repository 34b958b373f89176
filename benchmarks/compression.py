"""Compression study: does compressing shmcache values pay, with what, and from what size?

Run from the repository root::

    python -m benchmarks.compression --quick     # ~20 s
    python -m benchmarks.compression             # ~1-2 min
    python -m benchmarks.compression --out /tmp/compression

What is compressed is what shmcache stores: the msgpack body of
``shmcache._codec.encode_generations`` (compression off) for LLM-like values
(``benchmarks/traces.py``), at nominal sizes of 0.3, 0.6, 1, 2 and 4 KiB, in a mix of
five kinds:

* ``answer`` (40 %): a ``ChatGeneration`` whose ``AIMessage`` holds English-ish prose,
  with OpenAI-style usage and response metadata and a run id;
* ``tool`` (20 %): the same with one or two tool calls (JSON-ish arguments) and a short
  content;
* ``json`` (15 %): structured output, the content a JSON document;
* ``code`` (15 %): an answer holding a fenced Python snippet (seeded identifiers);
* ``plain`` (10 %): a plain ``Generation`` (completion models).

Below ~0.6 KiB a chat value with full metadata does not fit, so the small sizes use
"lean" chat values (a model name and finish reason only, like local models report).

Codecs: zlib levels 1 and 6 (raw deflate, ``wbits=-15``: the record has its own crc32,
so the zlib header and adler32 would be 6 wasted bytes), zstandard levels 1 and 3,
and both with a dictionary trained (``zstandard.train_dictionary``) on a *separate*
sample of payloads (other seeds, all sizes) — a dictionary that a segment would store
once and share.  zlib gets the same dictionary as a preset ``zdict`` (its last 32 KiB)
for comparison.  Decompression is always **bounded** as a segment reader must do it:
zstd after checking the frame's content size against the recorded length (with
python-zstandard, ``decompress(max_output_size=n)`` does *not* bound a frame that
states a larger content size: it allocates what the frame says), zlib through
``decompressobj`` with ``max_length``; every round trip is checked byte for byte.

Times are per call: ``perf_counter_ns`` around batches of 100 calls; every codec's
compression and decompression is timed once per round, the order shuffled each round,
and each figure is the median over rounds of the round's median batch (the machine
is shared: a burst of load lands in one round of one figure, not in a ratio).

Then what shmcache ships (``shmcache._compress``: zstd level ``ZSTD_LEVEL``, kept from
``MIN_COMPRESS_BYTES`` on when it saves an eighth): its size and record ratios, the
share of values it compresses, and, in one process, side by side, round after round
(the order of "on" and "off" alternating), a real ``SharedMemoryCache``'s ``update``
and ``lookup`` hit µs with compression on and off (``_compress.set_enabled``), each
the median over rounds of per-round medians.  Last, entries per MiB: a segment of
fixed size filled with twice what it holds, on and off; and what a dictionary stored
in the segment would add (estimated from the dictionary codec's record sizes, less
the dictionary's own bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
import uuid
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from benchmarks import traces

SIZES: Final = (307, 614, 1024, 2048, 4096)
"""Nominal payload sizes: 0.3, 0.6, 1, 2 and 4 KiB."""
MIX: Final = (("answer", 0.4), ("tool", 0.2), ("json", 0.15), ("code", 0.15), ("plain", 0.1))
ENTRIES_SEGMENT_BYTES: Final = 4 * 1024 * 1024
"""Segment size of the entries-per-MiB measurement."""
RECORD_HEADER_BYTES_FALLBACK: Final = 72
_BATCH: Final = 100
_LEAN_BELOW_BYTES: Final = 640
DICT_BYTES: Final = 16 * 1024
"""Trained dictionary size: 16 KiB (32 and 64 KiB measured ~1-2 points better)."""


# -- payloads ---------------------------------------------------------------------------


def _lean_chat(seed: int, content: str) -> list[Any]:
    from langchain_core.messages import AIMessage
    from langchain_core.outputs import ChatGeneration

    message = AIMessage(
        content=content, response_metadata={"model_name": "llama3.1:8b", "finish_reason": "stop"}
    )
    return [ChatGeneration(message=message)]


_CODE_NAMES: Final = (
    "items",
    "total",
    "order",
    "customer",
    "rate",
    "result",
    "config",
    "path",
    "rows",
    "session",
    "cache",
    "retry",
    "payload",
    "status",
    "limit",
    "offset",
    "user",
    "token",
)
_CODE_LINES: Final = (
    "    {a} = {b}.get({q}{c}{q}, {n})",
    "    for {a} in {b}:",
    "        if {a}.{c} > {n}:",
    "            {b}.append({a})",
    "    return {a}",
    "    {a} = [{b} for {b} in {c} if {b}]",
    "    logger.info({q}{a} %s{q}, {b})",
    "    with open({a}, {q}r{q}) as {b}:",
    "        {a} = json.load({b})",
    "    raise ValueError(f{q}bad {a}: {{{b}!r}}{q})",
    "    {a} += {b} * {n}",
    "    # {c}: {word}",
)


def code_text(seed: int, n_chars: int) -> str:
    """A short answer holding a fenced Python snippet, exactly ``n_chars`` characters."""
    rng = random.Random(seed)
    intro = traces.english_text(seed, min(120, max(1, n_chars // 5)))
    lines = [intro, "", "```python"]
    while sum(map(len, lines)) + len(lines) < n_chars:
        name = "_".join(rng.sample(_CODE_NAMES, 2))
        args = ", ".join(rng.sample(_CODE_NAMES, rng.randint(1, 3)))
        lines.append(f"\ndef {name}({args}):")
        for _ in range(rng.randint(3, 8)):
            a, b, c = rng.sample(_CODE_NAMES, 3)
            lines.append(
                rng.choice(_CODE_LINES).format(
                    a=a,
                    b=b,
                    c=c,
                    n=rng.randrange(100),
                    q='"',
                    word=traces.english_text(rng.randrange(1 << 30), 24),
                )
            )
    return ("\n".join(lines)[: max(0, n_chars - 4)] + "\n```")[:n_chars]


def _value(kind: str, seed: int, chars: int, lean: bool) -> list[Any]:
    from langchain_core.outputs import Generation

    rng = random.Random(seed)
    if kind == "code":
        if lean:
            return _lean_chat(seed, code_text(seed, chars))
        return traces.chat_value(seed, chars, prose=code_text(seed, chars))
    if kind == "plain":
        return [
            Generation(
                text=traces.english_text(seed, chars),
                generation_info={"finish_reason": "stop", "logprobs": None},
            )
        ]
    if lean:
        if kind == "json":
            content = json.dumps(
                {
                    "label": rng.choice(["refund", "shipping", "other"]),
                    "confidence": round(rng.random(), 3),
                    "reason": traces.english_text(seed, max(1, chars - 70)),
                }
            )
            return _lean_chat(seed, content[:chars] if len(content) > chars else content)
        return _lean_chat(seed, traces.english_text(seed, chars))
    if kind == "tool":
        return traces.chat_value(seed, chars, tool_calls=1 + seed % 2)
    if kind == "json":
        return traces.chat_value(seed, chars, json_content=True)
    return traces.chat_value(seed, chars)


def _plain_encoding(value: list[Any]) -> bytes:
    """``encode_generations`` with compression off: the bytes a codec compresses."""
    from shmcache._codec import encode_generations

    try:
        from shmcache import _compress
    except ImportError:  # a release before compression
        return encode_generations(value)
    enabled = _compress.is_enabled()
    _compress.set_enabled(False)
    try:
        return encode_generations(value)
    finally:
        _compress.set_enabled(enabled)


def payload(kind: str, seed: int, target: int) -> bytes:
    """An uncompressed ``encode_generations`` payload of ``kind``, about ``target`` long."""
    lean = target < _LEAN_BELOW_BYTES
    chars = max(1, target // 2)
    data = _plain_encoding(_value(kind, seed, chars, lean))
    for _ in range(4):  # the overhead is ~constant: two or three corrections converge
        miss = target - len(data)
        if abs(miss) <= max(8, target // 50):
            break
        chars = max(1, chars + miss)
        data = _plain_encoding(_value(kind, seed, chars, lean))
    return data


def sample(target: int, n: int, seed0: int) -> list[bytes]:
    """``n`` payloads of about ``target`` bytes in the :data:`MIX` proportions."""
    out: list[bytes] = []
    for j, (kind, share) in enumerate(MIX):
        k = max(1, round(n * share))
        out += [payload(kind, seed0 * 16 + j * 100_003 + i, target) for i in range(k)]
    return out


def training_sample(n_per_size: int, sizes: Sequence[int] = SIZES) -> list[bytes]:
    """Payloads for dictionary training: other seeds than the measured samples."""
    out: list[bytes] = []
    for target in sizes:
        out += sample(target, n_per_size, seed0=1_000_000 + target)
    return out


# -- codecs -------------------------------------------------------------------------------


@dataclass
class Codec:
    """A compressor and a bounded decompressor."""

    name: str
    compress: Callable[[bytes], bytes]
    decompress: Callable[[bytes, int], bytes]
    extra_bytes: int = 0
    """Bytes stored once per segment (a dictionary)."""


def _zlib(level: int, zdict: bytes | None = None) -> Codec:
    def compress(data: bytes) -> bytes:
        c = (
            zlib.compressobj(level, zlib.DEFLATED, -15, zdict=zdict)
            if zdict
            else zlib.compressobj(level, zlib.DEFLATED, -15)
        )
        return c.compress(data) + c.flush()

    def decompress(data: bytes, limit: int) -> bytes:
        d = zlib.decompressobj(-15, zdict=zdict) if zdict else zlib.decompressobj(-15)
        out = d.decompress(data, limit)
        if d.unconsumed_tail or not d.eof:
            raise ValueError("longer than recorded, or truncated")
        return out

    name = f"zlib-{level}" + ("+dict" if zdict else "")
    return Codec(name, compress, decompress, len(zdict) if zdict else 0)


def _zstd(level: int, dictionary: Any = None) -> Codec:
    import zstandard

    if dictionary is None:
        c = zstandard.ZstdCompressor(level=level, write_checksum=False)
        d = zstandard.ZstdDecompressor()
    else:
        # The segment knows its dictionary: no need to name it in every frame.
        c = zstandard.ZstdCompressor(
            level=level, dict_data=dictionary, write_checksum=False, write_dict_id=False
        )
        d = zstandard.ZstdDecompressor(dict_data=dictionary)

    def decompress(data: bytes, limit: int) -> bytes:
        # max_output_size bounds nothing when the frame states its own content size
        # (python-zstandard then allocates what the frame says): check that first.
        # With the size checked, libzstd refuses to write past it.
        if not 0 <= zstandard.frame_content_size(data) <= limit:
            raise ValueError("frame content size missing or beyond the recorded length")
        return d.decompress(data)

    name = f"zstd-{level}" + ("+dict" if dictionary is not None else "")
    return Codec(
        name, c.compress, decompress, len(dictionary.as_bytes()) if dictionary is not None else 0
    )


def codecs(train: list[bytes], dict_bytes: int = DICT_BYTES) -> list[Codec]:
    """Every codec of the study (the dictionary trained on ``train``)."""
    out = [_zlib(1), _zlib(6)]
    try:
        import zstandard
    except ImportError:
        return out
    dictionary = zstandard.train_dictionary(dict_bytes, list[Any](train))
    raw = dictionary.as_bytes()
    out += [_zstd(1), _zstd(3), _zstd(1, dictionary), _zstd(3, dictionary), _zlib(6, raw[-32768:])]
    return out


# -- timing ---------------------------------------------------------------------------------


def _per_call_us(fn: Callable[[Any], Any], items: Sequence[Any], rounds: int) -> float:
    """Median over batches of the per-call time, in µs."""
    times: list[float] = []
    for _ in range(rounds):
        for start in range(0, len(items), _BATCH):
            batch = items[start : start + _BATCH]
            t0 = time.perf_counter_ns()
            for item in batch:
                fn(item)
            times.append((time.perf_counter_ns() - t0) / len(batch) / 1000)
    return statistics.median(times)


def _interleaved_us(
    jobs: dict[str, tuple[Callable[[Any], Any], Sequence[Any]]], rounds: int, seed: int
) -> dict[str, float]:
    """:func:`_per_call_us` of several jobs, measured round by round in shuffled order.

    Each figure is the median over rounds of that round's median batch, so a burst of
    load from other programs lands in one round of one job, not in one job's figure.
    """
    rng = random.Random(seed)
    names = list(jobs)
    per_round: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        rng.shuffle(names)
        for name in names:
            fn, items = jobs[name]
            per_round[name].append(_per_call_us(fn, items, 1))
    return {name: statistics.median(times) for name, times in per_round.items()}


def _record_bytes() -> Callable[[int], int]:
    try:
        from shmcache import _arena

        header = int(_arena.RECORD_HEADER_BYTES)
    except (ImportError, AttributeError):
        header = RECORD_HEADER_BYTES_FALLBACK
    return lambda n: (header + n + 7) // 8 * 8


def codec_jobs(
    codec: Codec, payloads: list[bytes]
) -> dict[str, tuple[Callable[[Any], Any], Sequence[Any]]]:
    """The timed calls of one codec: ``<name> compress`` and ``<name> decompress``."""
    pairs = [(codec.compress(p), len(p)) for p in payloads]
    return {
        f"{codec.name} compress": (codec.compress, payloads),
        f"{codec.name} decompress": (lambda cp: codec.decompress(*cp), pairs),
    }


def measure_codec(
    codec: Codec, payloads: list[bytes], rounds: int, *, timed: bool = True
) -> dict[str, Any]:
    """Size ratio and µs of one codec on one sample (round trips verified).

    With ``timed=False`` the µs are left out (see :func:`_interleaved_us`).
    """
    compressed = [codec.compress(p) for p in payloads]
    for raw, comp in zip(payloads, compressed, strict=True):
        if codec.decompress(comp, len(raw)) != raw:
            raise AssertionError(f"{codec.name}: round trip changed the bytes")
    record = _record_bytes()
    raw_total = sum(map(len, payloads))
    comp_total = sum(map(len, compressed))
    pairs = list(zip(compressed, (len(p) for p in payloads), strict=True))
    out: dict[str, Any] = {
        "raw_bytes_mean": raw_total / len(payloads),
        "compressed_bytes_mean": comp_total / len(payloads),
        "size_ratio": comp_total / raw_total,
        # What the log stores: record header + (compressed) value, 8-byte aligned. A real
        # record would fall back to the raw bytes when compression does not shrink them.
        "record_ratio": sum(
            record(min(len(c), len(p))) for c, p in zip(compressed, payloads, strict=True)
        )
        / sum(record(len(p)) for p in payloads),
    }
    if timed:
        out["compress_us"] = _per_call_us(codec.compress, payloads, rounds)
        out["decompress_us"] = _per_call_us(lambda cp: codec.decompress(*cp), pairs, rounds)
    return out


def _shipped() -> Any:
    """``shmcache._compress`` (None in a release before compression)."""
    try:
        from shmcache import _compress
    except ImportError:
        return None
    return _compress


def shipped_jobs(payloads: list[bytes]) -> dict[str, tuple[Callable[[Any], Any], Sequence[Any]]]:
    """The timed calls of the shipped codec (none in a release before compression)."""
    compress = _shipped()
    if compress is None:
        return {}
    compress.set_enabled(True)
    bodies = [b for b in (compress.compress_body(p[5:]) for p in payloads) if b is not None]
    jobs: dict[str, tuple[Callable[[Any], Any], Sequence[Any]]] = {
        "shipped compress": (lambda p: compress.compress_body(p[5:]), payloads)
    }
    if bodies:
        jobs["shipped decompress"] = (compress.decompress_body, bodies)
    return jobs


def measure_shipped(
    payloads: list[bytes], rounds: int, *, timed: bool = True
) -> dict[str, Any] | None:
    """What shmcache ships (``_compress``: threshold, saving rule, envelope) on a sample.

    The payload is an encoding; the codec keeps its 5-byte header and replaces the rest
    by a compressed body when :func:`shmcache._compress.compress_body` says it pays.
    """
    compress = _shipped()
    if compress is None:
        return None
    compress.set_enabled(True)
    bodies = [compress.compress_body(p[5:]) for p in payloads]
    stored = [p if b is None else p[:5] + b for p, b in zip(payloads, bodies, strict=True)]
    pairs = [b for b in bodies if b is not None]
    for raw, body in zip(payloads, bodies, strict=True):
        if body is not None and compress.decompress_body(body) != raw[5:]:
            raise AssertionError("shipped codec: round trip changed the bytes")
    record = _record_bytes()
    out: dict[str, Any] = {
        "compressed_share": len(pairs) / len(payloads),
        "size_ratio": sum(map(len, stored)) / sum(map(len, payloads)),
        "record_ratio": sum(record(len(s)) for s in stored) / sum(record(len(p)) for p in payloads),
        "record_bytes_mean": sum(record(len(s)) for s in stored) / len(stored),
        "max_expansion": max(
            (len(r) - 5) / (len(b) - 4)
            for r, b in zip(payloads, bodies, strict=True)
            if b is not None
        )
        if pairs
        else 0.0,
    }
    if timed:
        jobs = shipped_jobs(payloads)
        out["compress_us"] = _per_call_us(jobs["shipped compress"][0], payloads, rounds)
        out["decompress_us"] = (
            _per_call_us(compress.decompress_body, pairs, rounds) if pairs else 0.0
        )
    return out


def _scratch_dir() -> str:
    import tempfile

    base = "/dev/shm" if Path("/dev/shm").is_dir() else None
    return tempfile.mkdtemp(prefix="shmcache-compression-", dir=base)


def _open_cache(directory: str, size_bytes: int) -> Any:
    from shmcache import SharedMemoryCache

    return SharedMemoryCache(
        f"cmp-{uuid.uuid4().hex[:12]}",
        size_bytes=size_bytes,
        directory=directory,
        coalesce=False,
    )


def _timed_batches(
    fn: Callable[[str, Any, Any], None], items: Sequence[Any], caches: dict[str, Any], rng: Any
) -> dict[str, list[float]]:
    """Per-call µs of ``fn(flag, cache, item)`` per batch, the flags interleaved.

    Each batch of items runs once per flag, back to back and in a random order, so
    that load from other programs falls on both alike.
    """
    compress = _shipped()
    times: dict[str, list[float]] = {flag: [] for flag in caches}
    flags = list(caches)
    batch = _BATCH // 2
    for start in range(0, len(items), batch):
        chunk = items[start : start + batch]
        rng.shuffle(flags)
        for flag in flags:
            if compress is not None:
                compress.set_enabled(flag == "on")
            cache = caches[flag]
            t0 = time.perf_counter_ns()
            for item in chunk:
                fn(flag, cache, item)
            times[flag].append((time.perf_counter_ns() - t0) / len(chunk) / 1000)
    return times


def measure_cache_paths(payloads: list[bytes], rounds: int) -> dict[str, Any]:
    """Hit and update µs of a real SharedMemoryCache, compression on and off.

    Side by side in this process: each round opens two fresh caches, one written with
    compression on and one with it off, and interleaves batches of ``update`` (every
    value) and then of ``lookup`` hits (every key, shuffled) between them; a round's
    figure is its median batch, the result the median over rounds.  ``hit_us`` (the
    reference of the rule of thumb) is the hit with compression off.
    """
    import shutil

    from shmcache._codec import decode_generations

    compress = _shipped()
    flags = ["off"] if compress is None else ["on", "off"]
    values = [decode_generations(p) for p in payloads]
    keys = [f"prompt {i}" for i in range(len(values))]
    pairs = list(zip(keys, values, strict=True))
    llm = "llm"
    rng = random.Random(len(payloads))
    directory = _scratch_dir()
    per_round: dict[str, dict[str, list[float]]] = {
        f: {"hit_us": [], "update_us": [], "used_bytes": []} for f in flags
    }

    def update(flag: str, cache: Any, kv: tuple[str, Any]) -> None:
        cache.update(kv[0], llm, kv[1])

    def lookup(flag: str, cache: Any, key: str) -> None:
        cache.lookup(key, llm)

    try:
        for _ in range(max(rounds, 3)):
            caches = {f: _open_cache(directory, 16 << 20) for f in flags}
            try:
                updates = _timed_batches(update, pairs, caches, rng)
                order = keys[:]
                rng.shuffle(order)
                for cache in caches.values():
                    if cache.stats().entries != len(values):
                        raise AssertionError("a value was not stored")
                    if any(cache.lookup(key, llm) is None for key in order):
                        raise AssertionError("a stored value missed")
                hits = _timed_batches(lookup, order, caches, rng)
                for f, cache in caches.items():
                    per_round[f]["update_us"].append(statistics.median(updates[f]))
                    per_round[f]["hit_us"].append(statistics.median(hits[f]))
                    per_round[f]["used_bytes"].append(cache.stats().used_bytes)
            finally:
                for cache in caches.values():
                    cache.close()
                    cache.unlink()
    finally:
        if compress is not None:
            compress.set_enabled(True)
        shutil.rmtree(directory, ignore_errors=True)
    out = {
        f: {k: statistics.median(v) for k, v in figures.items()} for f, figures in per_round.items()
    }
    return {"hit_us": out["off"]["hit_us"], "cache": out}


def measure_entries(
    payloads: list[bytes], segment_bytes: int = ENTRIES_SEGMENT_BYTES
) -> dict[str, Any]:
    """Entries a segment of ``segment_bytes`` holds, compression on and off.

    The segment gets twice what it holds (distinct keys, the sample's values in turn);
    what it holds at the end is counted (``stats().entries``).
    """
    import shutil

    from shmcache._codec import decode_generations

    compress = _shipped()
    values = [decode_generations(p) for p in payloads]
    record = _record_bytes()
    mean_record = sum(record(len(p)) for p in payloads) / len(payloads)
    n_updates = int(2 * segment_bytes / mean_record)
    directory = _scratch_dir()
    out: dict[str, Any] = {"segment_bytes": segment_bytes, "updates": n_updates}
    try:
        for flag in ("on", "off"):
            if compress is None and flag == "on":
                continue
            if compress is not None:
                compress.set_enabled(flag == "on")
            cache = _open_cache(directory, segment_bytes)
            try:
                for i in range(n_updates):
                    cache.update(f"prompt {i}", "llm", values[i % len(values)])
                stats = cache.stats()
                out[flag] = {
                    "entries": stats.entries,
                    "entries_per_mib": stats.entries / (segment_bytes / 2**20),
                    "used_bytes": stats.used_bytes,
                    "skipped": stats.skipped,
                }
            finally:
                cache.close()
                cache.unlink()
    finally:
        if compress is not None:
            compress.set_enabled(True)
        shutil.rmtree(directory, ignore_errors=True)
    return out


# -- the study ------------------------------------------------------------------------------


def run(
    *,
    n_per_size: int,
    n_train_per_size: int,
    rounds: int,
    sizes: Sequence[int] = SIZES,
    hit_path: bool = True,
    entries: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measure every codec at every size; returns the results (see :func:`render`)."""
    started = time.perf_counter()
    train = training_sample(n_train_per_size, sizes)
    all_codecs = codecs(train)
    log(
        f"{len(train)} training payloads, {len(all_codecs)} codecs "
        f"[{time.perf_counter() - started:.1f} s]"
    )
    compress = _shipped()
    results: dict[str, Any] = {
        "sizes": list(sizes),
        "n_per_size": n_per_size,
        "rounds": rounds,
        "train_payloads": len(train),
        "dict_bytes": DICT_BYTES,
        "mix": dict(MIX),
        "environment": _environment(),
        "shipped": None
        if compress is None
        else {
            "level": compress.ZSTD_LEVEL,
            "min_bytes": compress.MIN_COMPRESS_BYTES,
            "max_kept_eighths": compress.MAX_KEPT_EIGHTHS,
            "max_ratio": compress.MAX_RATIO,
        },
        "rows": [],
    }
    for target in sizes:
        payloads = sample(target, n_per_size, seed0=target)
        row: dict[str, Any] = {
            "size": target,
            "payload_bytes_mean": sum(map(len, payloads)) / len(payloads),
            "codecs": {},
        }
        if hit_path:
            row.update(measure_cache_paths(payloads, rounds))
        jobs = shipped_jobs(payloads)
        for codec in all_codecs:
            row["codecs"][codec.name] = measure_codec(codec, payloads, rounds, timed=False)
            jobs.update(codec_jobs(codec, payloads))
        times = _interleaved_us(jobs, rounds, seed=target)
        for codec in all_codecs:
            row["codecs"][codec.name]["compress_us"] = times[f"{codec.name} compress"]
            row["codecs"][codec.name]["decompress_us"] = times[f"{codec.name} decompress"]
        row["shipped"] = measure_shipped(payloads, rounds, timed=False)
        if row["shipped"] is not None:
            row["shipped"]["compress_us"] = times["shipped compress"]
            row["shipped"]["decompress_us"] = times.get("shipped decompress", 0.0)
        if entries:
            row["entries"] = measure_entries(payloads)
        results["rows"].append(row)
        log(f"{target} B [{time.perf_counter() - started:.1f} s]")
    results["recommendation"] = recommend(results)
    return results


def recommend(results: dict[str, Any]) -> dict[str, Any]:
    """A rule of thumb from the figures: the codec to use and the size it starts at.

    A codec "pays" at a size when it cuts the record (header included) by at least 15 %
    while adding at most 25 % to the hit (decompress µs / hit µs; 3 µs where no hit was
    measured).  The chosen codec is the one that pays at the most sizes, ties broken by
    the bytes it saves.
    """
    pays: dict[str, list[int]] = {}
    saved: dict[str, float] = {}
    for row in results["rows"]:
        budget_us = 0.25 * row.get("hit_us", 12.0)
        for name, c in row["codecs"].items():
            ok = c["record_ratio"] <= 0.85 and c["decompress_us"] <= budget_us
            if ok:
                pays.setdefault(name, []).append(row["size"])
            saved[name] = saved.get(name, 0.0) + (1 - c["record_ratio"])
    if not pays:
        return {"codec": None, "from_bytes": None, "pays_at": {}}
    best = max(pays, key=lambda n: (len(pays[n]), saved[n]))
    return {"codec": best, "from_bytes": min(pays[best]), "pays_at": pays}


def render(results: dict[str, Any]) -> str:
    """Markdown tables."""
    env = results["environment"]
    lines = [
        "# Compression of shmcache payloads",
        "",
        f"zstandard {env.get('zstandard', 'not installed')} (libzstd {env.get('libzstd', '-')}),"
        f" zlib {env['zlib']}, Python {env['python']}, {env.get('cpu', '?')}; "
        f"{results['n_per_size']} payloads per "
        f"size ({', '.join(f'{k} {v:.0%}' for k, v in results['mix'].items())}); "
        f"dictionary {results['dict_bytes'] // 1024} KiB trained on {results['train_payloads']} "
        f"other payloads; medians of {results.get('rounds', '?')} rounds.  Command: "
        "`python -m benchmarks.compression`.",
        *(["", results["note"]] if results.get("note") else []),
        "",
        "## Codecs",
        "",
        "size ratio = compressed / raw payload; record ratio = log bytes per entry with / "
        "without compression (72 B record header, 8-byte alignment; raw kept if smaller); µs "
        "per call (decompression bounded by the recorded length).",
        "",
    ]
    names = list(results["rows"][0]["codecs"])
    has_hit = "hit_us" in results["rows"][0]
    lines += ["| payload | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for row in results["rows"]:
        cells = [
            f"{row['codecs'][n]['size_ratio']:.2f} / {row['codecs'][n]['decompress_us']:.1f}"
            for n in names
        ]
        lines.append(f"| {row['payload_bytes_mean']:.0f} B | " + " | ".join(cells) + " |")
    lines += ["", "(cells: size ratio / decompress µs)", ""]
    lines += [
        "| payload | codec | size ratio | record ratio | compress µs | decompress µs |"
        + (" shmcache hit µs (off) |" if has_hit else ""),
        "|---:|---|---:|---:|---:|---:|" + ("---:|" if has_hit else ""),
    ]
    for row in results["rows"]:
        for i, name in enumerate(names):
            c = row["codecs"][name]
            extra = ""
            if has_hit:
                extra = f" {row['hit_us']:.1f} |" if i == 0 else " |"
            lines.append(
                f"| {row['payload_bytes_mean']:.0f} | {name} | {c['size_ratio']:.2f} "
                f"| {c['record_ratio']:.2f} | {c['compress_us']:.1f} "
                f"| {c['decompress_us']:.1f} |" + extra
            )
    rec = results["recommendation"]
    lines.append("")
    if rec["codec"]:
        lines.append(
            f"Rule of thumb (record -15 % or better for at most +25 % of the hit): "
            f"**{rec['codec']}**, from {rec['from_bytes']} B payloads; pays at: "
            + "; ".join(f"{k}: {', '.join(map(str, v))}" for k, v in sorted(rec["pays_at"].items()))
        )
    else:
        lines.append("Rule of thumb: no codec pays at these sizes.")
    lines += _render_shipped(results)
    return "\n".join(lines)


def _render_shipped(results: dict[str, Any]) -> list[str]:
    """The tables of what shmcache ships: ratios, cache µs on/off, entries per MiB."""
    shipped = results.get("shipped")
    rows = results["rows"]
    if not shipped or rows[0].get("shipped") is None:
        return []
    lines = [
        "",
        f"## What shmcache ships: zstd-{shipped['level']} from {shipped['min_bytes']} B, "
        f"kept if at most {shipped['max_kept_eighths']}/8 of the body, "
        f"expansion at most {shipped['max_ratio']}x",
        "",
        "Encoding = what `encode_generations` returns (5-byte header + body, or header + "
        "4-byte length + zstd frame); µs of `compress_body` / `decompress_body` alone.",
        "",
        "| payload | compressed | size ratio | record ratio | max expansion | compress µs "
        "| decompress µs |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        s = row["shipped"]
        lines.append(
            f"| {row['payload_bytes_mean']:.0f} B | {s['compressed_share']:.0%} "
            f"| {s['size_ratio']:.2f} | {s['record_ratio']:.2f} | {s['max_expansion']:.1f}x "
            f"| {s['compress_us']:.1f} | {s['decompress_us']:.1f} |"
        )
    if "cache" in rows[0] and "on" in rows[0]["cache"]:
        lines += [
            "",
            "A real `SharedMemoryCache` (16 MiB segment, this process), compression on vs off "
            "side by side: two fresh caches per round, batches of 50 calls interleaved "
            "between them (random order): `update` of every value, then a `lookup` hit of "
            "every key (shuffled); per call, median batch per round, median of rounds.",
            "",
            "| payload | hit µs off | hit µs on | hit on/off | update µs off | update µs on "
            "| update on/off | log bytes on/off |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in rows:
            on, off = row["cache"]["on"], row["cache"]["off"]
            lines.append(
                f"| {row['payload_bytes_mean']:.0f} B | {off['hit_us']:.1f} | {on['hit_us']:.1f} "
                f"| {on['hit_us'] / off['hit_us']:.2f} | {off['update_us']:.1f} "
                f"| {on['update_us']:.1f} | {on['update_us'] / off['update_us']:.2f} "
                f"| {on['used_bytes'] / off['used_bytes']:.2f} |"
            )
    lines += _render_entries(results)
    lines += _render_summary(results)
    return lines


def _render_entries(results: dict[str, Any]) -> list[str]:
    """Entries per MiB on/off, and the estimate with a segment dictionary."""
    rows = results["rows"]
    lines: list[str] = []
    if "entries" in rows[0] and "on" in rows[0]["entries"]:
        seg = rows[0]["entries"]["segment_bytes"]
        dict_bytes = results["dict_bytes"]
        lines += [
            "",
            f"Entries per MiB: a {seg // 2**20} MiB segment given twice what it holds "
            "(distinct keys), `stats().entries` at the end / segment MiB.  Last column: "
            f"the estimate with zstd-1 and a {dict_bytes // 1024} KiB dictionary stored in "
            "the segment (same share of values compressed, records of the dictionary "
            "codec's size, the dictionary's bytes taken from the log; bytes only: where "
            "the index, not the log, limits short entries, fewer).",
            "",
            "| payload | entries/MiB off | entries/MiB on | on/off | est. with dictionary |",
            "|---:|---:|---:|---:|---:|",
        ]
        for row in rows:
            e = row["entries"]
            est = _dictionary_estimate(row, seg, dict_bytes)
            lines.append(
                f"| {row['payload_bytes_mean']:.0f} B | {e['off']['entries_per_mib']:.0f} "
                f"| {e['on']['entries_per_mib']:.0f} "
                f"| {e['on']['entries'] / e['off']['entries']:.2f} | {est:.0f} |"
            )
    return lines


def _render_summary(results: dict[str, Any]) -> list[str]:
    """The reading of the shipped figures, in numbers from this run."""
    rows = results["rows"]
    if not all("cache" in r and "on" in r["cache"] and "entries" in r for r in rows):
        return []
    hit_extra = [r["cache"]["on"]["hit_us"] - r["cache"]["off"]["hit_us"] for r in rows]
    upd_extra = [r["cache"]["on"]["update_us"] - r["cache"]["off"]["update_us"] for r in rows]
    gain = [r["entries"]["on"]["entries"] / r["entries"]["off"]["entries"] for r in rows]
    z1 = [r["codecs"]["zstd-1"] for r in rows]
    z3 = [r["codecs"]["zstd-3"] for r in rows]
    zl = [r["codecs"]["zlib-6"] for r in rows]
    return [
        "",
        "## Reading",
        "",
        f"* zstd-1 vs zstd-3: size ratios within "
        f"{max(abs(a['size_ratio'] - b['size_ratio']) for a, b in zip(z1, z3, strict=True)):.2f}"
        f" at every size; zstd-1 compresses in "
        f"{min(a['compress_us'] / b['compress_us'] for a, b in zip(z1, z3, strict=True)):.2f}-"
        f"{max(a['compress_us'] / b['compress_us'] for a, b in zip(z1, z3, strict=True)):.2f}x "
        "the time; decompression costs the same.  zlib-6 decompresses "
        f"{min(c['decompress_us'] / a['decompress_us'] for a, c in zip(z1, zl, strict=True)):.1f}-"
        f"{max(c['decompress_us'] / a['decompress_us'] for a, c in zip(z1, zl, strict=True)):.1f}x"
        " slower than zstd-1 for a size ratio at most "
        f"{max(a['size_ratio'] - c['size_ratio'] for a, c in zip(z1, zl, strict=True)):.2f}"
        " better: zstd-1 it is.",
        f"* Compression on: a hit costs {min(hit_extra):+.1f} to {max(hit_extra):+.1f} µs, "
        f"an update {min(upd_extra):+.1f} to {max(upd_extra):+.1f} µs; a segment holds "
        f"{min(gain):.2f}-{max(gain):.2f}x the entries.  A miss costs a model call "
        "(0.1-10 s): a few µs per hit pay for themselves as soon as a full cache keeps "
        "one more answer per ~10^4-10^6 hits.",
        "* A dictionary kept in the segment would add most at 0.3-1 KiB (last column of "
        "the entries table) and decompress faster (its entropy tables are prebuilt), "
        "for its bytes once per segment and a trained, versioned dictionary every writer "
        "and reader shares: left for a format that owns the segment header.",
    ]


def _dictionary_estimate(row: dict[str, Any], segment_bytes: int, dict_bytes: int) -> float:
    """Entries per MiB with a segment dictionary, scaled from the measured "on" figure."""
    on = row["entries"]["on"]["entries"]
    shipped_record = row["shipped"]["record_ratio"]
    dict_record = min(row["codecs"]["zstd-1+dict"]["record_ratio"], 1.0)
    scale = shipped_record / dict_record * (segment_bytes - dict_bytes) / segment_bytes
    return on * scale / (segment_bytes / 2**20)


def _environment() -> dict[str, Any]:
    import platform

    env: dict[str, Any] = {"python": platform.python_version(), "zlib": zlib.ZLIB_RUNTIME_VERSION}
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line for line in f if line.startswith("model name"))
        env["cpu"] = f"{model.split(':', 1)[1].strip()}, {os.cpu_count()} CPUs"
    except (OSError, StopIteration):
        env["cpu"] = f"{platform.machine()}, {os.cpu_count()} CPUs"
    try:
        import zstandard

        env["zstandard"] = zstandard.__version__
        env["libzstd"] = ".".join(map(str, zstandard.ZSTD_VERSION))
    except ImportError:
        pass
    return env


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.compression", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="fewer payloads and rounds")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).parent / "results",
        help="writes compression.md and compression.json here",
    )
    parser.add_argument("--note", default="", help="a line added under the report's header")
    args = parser.parse_args(argv)
    n, n_train, rounds = (100, 200, 3) if args.quick else (400, 600, 9)
    results = run(
        n_per_size=n,
        n_train_per_size=n_train,
        rounds=rounds,
        log=lambda s: print(s, file=sys.stderr, flush=True),
    )
    results["note"] = args.note
    report = render(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compression.md").write_text(report + "\n")
    (args.out / "compression.json").write_text(json.dumps(results, indent=1) + "\n")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Compression study: does compressing shmcache values pay, with what, and from what size?

Run from the repository root::

    python -m benchmarks.compression --quick     # a few seconds
    python -m benchmarks.compression             # ~30 s
    python -m benchmarks.compression --out /tmp/compression

What is compressed is what shmcache stores: the msgpack payload of
``shmcache._codec.encode_generations`` for LLM-like values (``benchmarks/traces.py``),
at nominal sizes of 0.3, 0.5, 1, 2 and 4 KiB, in a mix of four kinds:

* ``answer`` (50 %): a ``ChatGeneration`` whose ``AIMessage`` holds English-ish prose,
  with OpenAI-style usage and response metadata and a run id;
* ``tool`` (20 %): the same with one or two tool calls (JSON-ish arguments) and a short
  content;
* ``json`` (20 %): structured output, the content a JSON document;
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

Times are medians over batches of ``perf_counter_ns`` around 100 calls, per call.
Next to them: the hit cost of the same payloads in a real SharedMemoryCache as it
stores them now (``lookup`` of a stored key, decode included), so the extra
decompression µs can be read against what a hit costs.
"""

from __future__ import annotations

import argparse
import json
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

SIZES: Final = (307, 512, 1024, 2048, 4096)
"""Nominal payload sizes: 0.3, 0.5, 1, 2 and 4 KiB."""
MIX: Final = (("answer", 0.5), ("tool", 0.2), ("json", 0.2), ("plain", 0.1))
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


def _value(kind: str, seed: int, chars: int, lean: bool) -> list[Any]:
    from langchain_core.outputs import Generation

    rng = random.Random(seed)
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


def payload(kind: str, seed: int, target: int) -> bytes:
    """An ``encode_generations`` payload of ``kind`` whose length is close to ``target``."""
    from shmcache._codec import encode_generations

    lean = target < _LEAN_BELOW_BYTES
    chars = max(1, target // 2)
    data = encode_generations(_value(kind, seed, chars, lean))
    for _ in range(4):  # the overhead is ~constant: two or three corrections converge
        miss = target - len(data)
        if abs(miss) <= max(8, target // 50):
            break
        chars = max(1, chars + miss)
        data = encode_generations(_value(kind, seed, chars, lean))
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


def _record_bytes() -> Callable[[int], int]:
    try:
        from shmcache import _arena

        header = int(_arena.RECORD_HEADER_BYTES)
    except (ImportError, AttributeError):
        header = RECORD_HEADER_BYTES_FALLBACK
    return lambda n: (header + n + 7) // 8 * 8


def measure_codec(codec: Codec, payloads: list[bytes], rounds: int) -> dict[str, Any]:
    """Size ratio and µs of one codec on one sample (round trips verified)."""
    compressed = [codec.compress(p) for p in payloads]
    for raw, comp in zip(payloads, compressed, strict=True):
        if codec.decompress(comp, len(raw)) != raw:
            raise AssertionError(f"{codec.name}: round trip changed the bytes")
    record = _record_bytes()
    raw_total = sum(map(len, payloads))
    comp_total = sum(map(len, compressed))
    pairs = list(zip(compressed, (len(p) for p in payloads), strict=True))
    return {
        "raw_bytes_mean": raw_total / len(payloads),
        "compressed_bytes_mean": comp_total / len(payloads),
        "size_ratio": comp_total / raw_total,
        # What the log stores: record header + (compressed) value, 8-byte aligned. A real
        # record would fall back to the raw bytes when compression does not shrink them.
        "record_ratio": sum(
            record(min(len(c), len(p))) for c, p in zip(compressed, payloads, strict=True)
        )
        / sum(record(len(p)) for p in payloads),
        "compress_us": _per_call_us(codec.compress, payloads, rounds),
        "decompress_us": _per_call_us(lambda cp: codec.decompress(*cp), pairs, rounds),
    }


def measure_hit_path(payloads: list[bytes], rounds: int) -> dict[str, float]:
    """µs of a shmcache hit (``lookup`` of a stored key) on these payloads, as stored now."""
    import tempfile

    from shmcache import SharedMemoryCache
    from shmcache._codec import decode_generations

    values = [decode_generations(p) for p in payloads]
    directory = tempfile.mkdtemp(prefix="shmcache-compression-", dir="/dev/shm")
    cache = SharedMemoryCache(
        f"cmp-{uuid.uuid4().hex[:12]}", size_bytes=8 << 20, directory=directory, coalesce=False
    )
    try:
        llm = "llm"
        keys = [f"prompt {i}" for i in range(len(values))]
        for key, value in zip(keys, values, strict=True):
            cache.update(key, llm, value)
        if any(cache.lookup(key, llm) is None for key in keys):
            raise AssertionError("a stored payload missed")
        hit_us = _per_call_us(lambda k: cache.lookup(k, llm), keys, rounds)
    finally:
        cache.close()
        cache.unlink()
        import shutil

        shutil.rmtree(directory, ignore_errors=True)
    return {"hit_us": hit_us}


# -- the study ------------------------------------------------------------------------------


def run(
    *,
    n_per_size: int,
    n_train_per_size: int,
    rounds: int,
    sizes: Sequence[int] = SIZES,
    hit_path: bool = True,
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
    results: dict[str, Any] = {
        "sizes": list(sizes),
        "n_per_size": n_per_size,
        "train_payloads": len(train),
        "dict_bytes": DICT_BYTES,
        "mix": dict(MIX),
        "environment": _environment(),
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
            row.update(measure_hit_path(payloads, rounds))
        for codec in all_codecs:
            row["codecs"][codec.name] = measure_codec(codec, payloads, rounds)
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
        f" zlib {env['zlib']}, Python {env['python']}; {results['n_per_size']} payloads per "
        f"size ({', '.join(f'{k} {v:.0%}' for k, v in results['mix'].items())}); "
        f"dictionary {results['dict_bytes'] // 1024} KiB trained on {results['train_payloads']} "
        "other payloads.",
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
        + (" shmcache hit µs |" if has_hit else ""),
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
    return "\n".join(lines)


def _environment() -> dict[str, Any]:
    import platform

    env: dict[str, Any] = {"python": platform.python_version(), "zlib": zlib.ZLIB_RUNTIME_VERSION}
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
    args = parser.parse_args(argv)
    n, n_train, rounds = (100, 200, 3) if args.quick else (400, 600, 7)
    results = run(
        n_per_size=n,
        n_train_per_size=n_train,
        rounds=rounds,
        log=lambda s: print(s, file=sys.stderr, flush=True),
    )
    report = render(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compression.md").write_text(report + "\n")
    (args.out / "compression.json").write_text(json.dumps(results, indent=1) + "\n")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

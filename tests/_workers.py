"""Functions run in child processes by the multi-process tests.

They live in their own module so ``spawn`` and ``forkserver`` children can import
them by name.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any

from langchain_core.outputs import Generation

from shmcache import SharedMemoryCache


def lookup_text(cache: SharedMemoryCache, prompt: str, llm_string: str) -> str | None:
    """Look one entry up (in the child) and return its first text, or None."""
    found = cache.lookup(prompt, llm_string)
    return None if found is None else found[0].text


def write_and_close(cache: SharedMemoryCache, prompt: str, text: str, lookups: int) -> int:
    """Store an entry, look it up ``lookups`` times, close; return the child's pid."""
    cache.update(prompt, "llm", [Generation(text=text)])
    for _ in range(lookups):
        cache.lookup(prompt, "llm")
    cache.lookup("never stored", "llm")
    cache.close()
    return os.getpid()


def open_by_name_and_write(name: str, directory: str, prompt: str, text: str) -> None:
    """Open the cache by name in a fresh process and store one entry."""
    with SharedMemoryCache(name, directory=directory, size_bytes=1 << 20) as cache:
        cache.update(prompt, "llm", [Generation(text=text)])


def invoke_chat_model(name: str, directory: str, count_file: str, prompt: str) -> dict[str, Any]:
    """Invoke a CountingChatModel with the shared cache; return its answer's fields."""
    from _samples import CountingChatModel

    with SharedMemoryCache(name, directory=directory, size_bytes=1 << 20) as cache:
        model = CountingChatModel(count_file=count_file, cache=cache)
        message = model.invoke(prompt)
        return {
            "content": message.content,
            "tool_calls": message.tool_calls,  # type: ignore[attr-defined]
            "type": type(message).__name__,
        }


def expected_text(key: int, writer: int, seq: int) -> str:
    """The value a racing writer stores: its identity and a length that varies."""
    return f"key={key} writer={writer} seq={seq} " + "x" * ((key * 131 + seq * 17) % 3000)


def parse_text(text: str) -> tuple[int, int, int]:
    """Recover ``(key, writer, seq)`` from a value, checking the padding exactly."""
    head, _, _ = text.partition(" x")
    fields = dict(part.split("=") for part in head.split())
    key, writer, seq = int(fields["key"]), int(fields["writer"]), int(fields["seq"])
    if text != expected_text(key, writer, seq):
        raise AssertionError(f"torn or foreign value: {text[:80]!r}")
    return key, writer, seq


def racing_writer(cache: SharedMemoryCache, writer: int, keys: int, seconds: float) -> int:
    """Overwrite random keys until the deadline; return how many updates it made."""
    rng = random.Random(writer)
    deadline = time.monotonic() + seconds
    seq = 0
    while time.monotonic() < deadline:
        key = rng.randrange(keys)
        cache.update(f"prompt {key}", "llm", [Generation(text=expected_text(key, writer, seq))])
        seq += 1
    return seq


def checking_reader(cache: SharedMemoryCache, keys: int, seconds: float) -> tuple[int, int]:
    """Read random keys until the deadline, checking each value belongs to its key.

    Returns:
        ``(values verified, misses)``; a wrong value raises AssertionError.
    """
    rng = random.Random(os.getpid())
    deadline = time.monotonic() + seconds
    verified = misses = 0
    while time.monotonic() < deadline:
        key = rng.randrange(keys)
        found = cache.lookup(f"prompt {key}", "llm")
        if found is None:
            misses += 1
            continue
        assert len(found) == 1 and type(found[0]) is Generation
        got_key, _, _ = parse_text(found[0].text)
        assert got_key == key, f"value of key {got_key} returned for key {key}"
        verified += 1
    return verified, misses


def endless_writer(name: str, directory: str, ready_fd: int) -> None:
    """Write forever (until killed); signals readiness after its first update."""
    cache = SharedMemoryCache(name, directory=directory, size_bytes=1 << 20)
    rng = random.Random(os.getpid())
    seq = 0
    while True:
        key = rng.randrange(50)
        cache.update(f"prompt {key}", "llm", [Generation(text=expected_text(key, 9, seq))])
        if seq == 0:
            os.write(ready_fd, b"1")
        seq += 1

"""Damage to the segment file never makes the cache hang, crash or answer wrong."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from _hardening_helpers import HEAD_WORD_BYTE, poke, run_in_child
from langchain_core.outputs import Generation

from shmcache import SharedMemoryCache

LOCK_TIMEOUT_S = 0.3


def _filled_cache(directory: Path) -> SharedMemoryCache:
    cache = SharedMemoryCache(
        "dmg", directory=directory, size_bytes=1 << 20, lock_timeout=LOCK_TIMEOUT_S
    )
    for i in range(20):
        cache.update(f"p{i}", "llm", [Generation(text=f"value {i}")])
    return cache


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "head", [1 << 44, (1 << 64) - 16], ids=["bit-flip-high-byte", "near-u64-max"]
)
def test_update_after_damaged_head_word_returns(tmp_path: Path, head: int) -> None:
    """An update after the head word was overwritten returns within a few seconds.

    Regression test: a damaged head once made the next update walk ~head/log_size
    laps holding the writer lock.  Now ``repair()`` restarts damaged log bounds.
    """
    cache = _filled_cache(tmp_path)
    try:
        poke(cache.path, HEAD_WORD_BYTE, head.to_bytes(8, "little"))

        def writer() -> int:
            logging.disable(logging.WARNING)
            cache.update("new", "llm", [Generation(text="fresh")])
            got = cache.lookup("new", "llm")
            return 0 if got in (None, [Generation(text="fresh")]) else 3

        assert run_in_child(writer, deadline_s=5.0) == 0
    finally:
        cache.close()
        cache.unlink()

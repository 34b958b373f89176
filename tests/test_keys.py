"""Entry keys: stable across processes, unambiguous, total over str."""

from __future__ import annotations

import subprocess
import sys

from hypothesis import given
from hypothesis import strategies as st

from shmcache._keys import DIGEST_BYTES, key_digest, llm_string_hash, split_digest


def test_digest_is_the_same_in_another_process() -> None:
    code = (
        "from shmcache._keys import key_digest, llm_string_hash;"
        "print(key_digest('p\\ud800', 'l').hex(), llm_string_hash('l'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout.split()
    assert out == [key_digest("p\ud800", "l").hex(), str(llm_string_hash("l"))]


def test_framing_separates_prompt_from_llm_string() -> None:
    assert key_digest("ab", "c") != key_digest("a", "bc")
    assert key_digest("", "abc") != key_digest("abc", "")


@given(st.text(), st.text(), st.text(), st.text())
def test_distinct_keys_have_distinct_digests(p1: str, l1: str, p2: str, l2: str) -> None:
    d1, d2 = key_digest(p1, l1), key_digest(p2, l2)
    assert len(d1) == DIGEST_BYTES
    assert (d1 == d2) == ((p1, l1) == (p2, l2))


@given(st.binary(min_size=DIGEST_BYTES, max_size=DIGEST_BYTES))
def test_tag_is_never_zero(digest: bytes) -> None:
    tag, _ = split_digest(digest)
    assert tag != 0 and tag < 2**64


def test_lone_surrogates_do_not_collide() -> None:
    assert key_digest("\ud800", "") != key_digest("\udc00", "")
    assert key_digest("\ud83d\ude00", "") != key_digest("\U0001f600", "")

"""Shared, process-independent keys for cache entries.

Python's ``hash()`` is salted per process, so every key that other processes must
agree on is derived from SHA-256 here instead.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from typing import Any, Final

__all__ = [
    "DIGEST_BYTES",
    "key_digest",
    "llm_string_hash",
    "namespace_hash",
    "node_key_digest",
    "split_digest",
    "store_key_digest",
]

DIGEST_BYTES: Final = 32
_TWO_U64: Final = struct.Struct("<QQ")


def _utf8(text: str) -> bytes:
    # "surrogatepass" makes every str encodable (lone surrogates included) while
    # staying injective, so two different strings never share bytes.
    return text.encode("utf-8", "surrogatepass")


# SHA-256 states already fed one llm_string: an app uses a handful of model
# configurations, each ~0.5-1 KB, so hashing each once and copying the state halves
# the cost of a key.  Bounded: emptied when it grows past this many.
_PREFIX_STATES: dict[str, Any] = {}
_PREFIX_STATES_MAX: Final = 256


def key_digest(prompt: str, llm_string: str) -> bytes:
    """Return the 256-bit digest that identifies the entry ``(prompt, llm_string)``.

    The llm_string's byte length is framed in front, so ``("ab", "c")`` and
    ``("a", "bc")`` never collide.
    """
    state = _PREFIX_STATES.get(llm_string)
    if state is None:
        llm_bytes = _utf8(llm_string)
        state = hashlib.sha256(len(llm_bytes).to_bytes(8, "little") + llm_bytes)
        if len(_PREFIX_STATES) >= _PREFIX_STATES_MAX:
            _PREFIX_STATES.clear()
        _PREFIX_STATES[llm_string] = state
    digest = state.copy()
    digest.update(_utf8(prompt))
    return digest.digest()


@functools.lru_cache(maxsize=256)  # an app uses a handful of model configurations
def llm_string_hash(llm_string: str) -> int:
    """Return a 64-bit hash of ``llm_string``, used by ``clear(llm_string=...)``."""
    return int.from_bytes(hashlib.sha256(b"llm\x00" + _utf8(llm_string)).digest()[:8], "little")


def store_key_digest(key: str) -> bytes:
    """Return the digest of a byte store's ``key`` (its own domain: no LLM key matches)."""
    return hashlib.sha256(b"bytes\x00" + _utf8(key)).digest()


def _framed(domain: bytes, parts: tuple[str, ...]) -> bytes:
    # The part count and each part's byte length go in front of it, so no two
    # different tuples share bytes: ("a", "b:c") vs ("a:b", "c"), ("a|b",) vs ("a", "b").
    chunks = [domain, len(parts).to_bytes(8, "little")]
    for part in parts:
        data = _utf8(part)
        chunks.append(len(data).to_bytes(8, "little"))
        chunks.append(data)
    return b"".join(chunks)


def node_key_digest(namespace: tuple[str, ...], key: str) -> bytes:
    """Return the digest of a LangGraph node cache key ``(namespace, key)``."""
    return hashlib.sha256(_framed(b"nodes\x00", (*namespace, key))).digest()


def namespace_hash(namespace: tuple[str, ...]) -> int:
    """Return a 64-bit hash of a node cache namespace, used by ``clear(namespaces)``."""
    digest = hashlib.sha256(_framed(b"namespace\x00", namespace)).digest()
    return int.from_bytes(digest[:8], "little")


def split_digest(digest: bytes) -> tuple[int, int]:
    """Split a key digest into ``(tag, bucket_seed)``.

    The tag is never 0, because 0 marks an empty index slot.
    """
    tag, seed = _TWO_U64.unpack_from(digest)
    return tag | 1, seed

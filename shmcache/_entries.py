"""What the engine stores and how a read turns it back into a front-end's value.

The engine knows entries only as bytes by key digest; the front-ends (LLM cache,
byte store, node cache) make :class:`Prepared` entries and hand :data:`Decode`
functions to reads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

__all__ = ["Decode", "Prepared"]

# A read's decoders: trusted bytes (crc-checked, from this release's writers), and
# untrusted bytes (from Redis).  Both raise CodecError for bytes they refuse.
Decode = Callable[[memoryview | bytes], Any]


class Prepared(NamedTuple):
    """One entry ready to store: key digest, tag, payload bytes, expiry (0: none).

    ``tag`` is the 64-bit hash an entry is cleared by (the LLM cache's llm_string,
    the node cache's namespace).
    """

    digest: bytes
    tag: int
    payload: bytes
    expires: float

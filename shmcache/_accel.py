"""Which fast paths are compiled: the optional ``shmcache._speedups`` extension.

The extension holds C versions of hot paths with the exact semantics of their
pure-Python twins: the lock-free lookup (``Arena.find``), the common first step of
a coalesced miss (``Coalescer.claim_fast``: the writer lock tried once, the lookup,
a free lease entry taken as ``LeaseTable.take`` writes it), the codec's check
that a free-form dict or list comes back exactly as stored (``plain_tree``: a yes
ends the check, a no lets the Python check find and name what is wrong), and the
hit path's rebuild of objects from an unpacked value (``rebuild``, ``decode_plain``)
and an update's checked payload (``flatten``): the common shapes; None lets the
Python codec decide and name what is wrong.  The
Python versions stay the reference and run wherever the extension is absent: a
machine without a compiler (the build is optional), a platform the C code does not support, or
``SHMCACHE_PURE_PYTHON=1`` in the environment (read once, at import).  Processes
with and without it share segments freely: both follow one protocol.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Final

__all__ = [
    "PURE_PYTHON_ENV", "Finder", "FinderType", "compiled", "decode_plain", "flatten", "plain_tree",
    "rebuild",
]

logger = logging.getLogger("shmcache")

PURE_PYTHON_ENV: Final = "SHMCACHE_PURE_PYTHON"

if TYPE_CHECKING:
    from ._speedups import Finder as FinderType
else:
    FinderType = object

Finder: type[FinderType] | None = None
plain_tree: Callable[[object, int, int, type], bool] | None = None
_Table = tuple[object, ...]
rebuild: Callable[[object, _Table, _Table], list[object] | None] | None = None
_Encoders = Mapping[type, object]
flatten: Callable[[object, _Encoders, _Encoders, type, int], list[object] | None] | None = None
decode_plain: (
    Callable[[object, bytes, Callable[..., object], Callable[..., object], _Table, _Table],
             list[object] | None]
    | None
) = None
if os.environ.get(PURE_PYTHON_ENV, "") not in ("", "0"):
    logger.debug("shmcache: %s is set, using the pure-Python paths", PURE_PYTHON_ENV)
else:
    try:
        from ._speedups import Finder, decode_plain, flatten, plain_tree, rebuild
    except ImportError as exc:  # no compiler at install time, or another platform
        logger.debug("shmcache: compiled paths unavailable (%s); using pure Python", exc)


def compiled() -> bool:
    """Are the compiled paths in use in this process?"""
    return Finder is not None

"""This process's counts for one engine: an owner slot in the segment, or the process.

Every open engine counts its hits, misses, skips and coalescing events into an owner
slot of the segment's header (``_arena.py``), claimed lock-free at the first count
and proven alive by a kernel lock (``_owners.py``): counting takes no lock, and the
counts of a process that dies are already in the segment.  Only while all slots are
taken do hits, misses and skips wait in the process; the engine then flushes them
under the writer lock (at writes, at close, and at least once a second).

The pid check on every slow path catches forks made from C (uWSGI), which run no
at-fork hooks: a child must never count into its parent's slot.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Final, Protocol

from . import _arena
from ._arena import U64_MASK, Arena

__all__ = ["FLUSH_INTERVAL_S", "Counters"]

logger = logging.getLogger("shmcache")

# Counts kept in the process are flushed at least this often while the engine is used;
# a process that found every slot taken tries to claim one again this often.
FLUSH_INTERVAL_S: Final = 1.0
_getpid = os.getpid


class _SlotHolder(Protocol):
    """Where the claimed slot is recorded, so a finalizer can give it back."""

    slot: int
    slot_pid: int

    @property
    def owner_file(self) -> _OwnerFile: ...


class _OwnerFile(Protocol):
    def claim(self, slots: int, prefer: int) -> int | None: ...


class Counters:
    """The counts one engine makes in this process.

    Args:
        arena: The segment's arena (its owner table).
        holder: Records the claimed slot (and frees it when the engine goes).
        name: The cache name, for the log.
        on_slow_path: Called with ``inherited=True`` when the slot turns out to be a
            parent's (a fork): the engine forgets the parent's leases; with
            ``False`` before every claim attempt.
    """

    def __init__(
        self,
        arena: Arena,
        holder: _SlotHolder,
        name: str,
        on_slow_path: Callable[[bool], None],
    ) -> None:
        self._arena = arena
        self._holder = holder
        self._name = name
        self._on_slow_path = on_slow_path
        self.view: memoryview | None = None
        self.pid = 0
        # False once the engine closed: nothing is claimed any more.
        self.active = True
        self.reset()

    def reset(self) -> None:
        """Forget the slot and the pending counts (a fork child's are its parent's)."""
        view = self.view
        if view is not None:
            view.release()
        self.view = None
        self.pid = 0
        self.hits = 0
        self.misses = 0
        self.skipped = 0
        self._next_claim = 0.0
        self.next_flush = 0.0

    def release(self) -> None:
        """Drop the view of the slot (the mapping cannot close while it is viewed)."""
        if self.view is not None:
            self.view.release()
            self.view = None

    @property
    def pending(self) -> bool:
        """Counts wait in the process (every slot was taken)."""
        return bool(self.hits or self.misses or self.skipped)

    @property
    def slot(self) -> int:
        """The claimed owner slot, or -1."""
        return self._holder.slot

    def slot_view(self, pid: int | None = None) -> memoryview | None:
        """This process's owner-slot view, claiming a slot if needed (None: none free).

        ``pid``: this process's pid when the caller already read it in this call.
        """
        view = self.view
        if view is not None and self.pid == (_getpid() if pid is None else pid):
            return view
        if not self.active:
            return None
        if view is not None:  # inherited across a fork: the parent's slot
            self.reset()
            self._holder.slot = -1
            self._on_slow_path(True)
        self._on_slow_path(False)
        now = time.monotonic()
        if now < self._next_claim:
            return None
        holder = self._holder
        slot = holder.owner_file.claim(_arena.PROCESS_SLOTS, prefer=_getpid())
        if slot is None:
            self._next_claim = now + FLUSH_INTERVAL_S
            logger.warning(
                "shmcache %r: all %d owner slots are in use; counting in the process "
                "(flushed under the lock)", self._name, _arena.PROCESS_SLOTS,
            )
            return None
        holder.slot, holder.slot_pid = slot, _getpid()
        view = self._arena.owner_slot(slot)
        view[_arena.SLOT_GENERATION] = (view[_arena.SLOT_GENERATION] + 1) & U64_MASK
        view[_arena.SLOT_PID] = _getpid()
        self.view, self.pid = view, _getpid()
        return view

    def count(self, slot_word: int, pid: int | None = None) -> None:
        """Add one to a slot word (``_arena.SLOT_HITS``, ...).

        ``pid``: this process's pid when the caller already read it in this call
        (a getpid is a syscall; a hot path reads it once).
        """
        view = self.view
        if view is None or self.pid != (_getpid() if pid is None else pid):
            view = self.slot_view(pid)
        if view is not None:
            view[slot_word] = (view[slot_word] + 1) & U64_MASK
        elif slot_word == _arena.SLOT_HITS:
            self.hits += 1
        elif slot_word == _arena.SLOT_MISSES:
            self.misses += 1
        elif slot_word == _arena.SLOT_SKIPPED:
            self.skipped += 1
        # (coalescing counts need a slot: without one nothing is coalesced)

    def flush_locked(self, arena: Arena) -> None:
        """*Locked.* Move counts kept in the process into the segment."""
        if self.pending:
            hits, misses, skipped = self.hits, self.misses, self.skipped
            self.hits = self.misses = self.skipped = 0
            view = self.slot_view()
            if view is not None:
                view[_arena.SLOT_HITS] = (view[_arena.SLOT_HITS] + hits) & U64_MASK
                view[_arena.SLOT_MISSES] = (view[_arena.SLOT_MISSES] + misses) & U64_MASK
                view[_arena.SLOT_SKIPPED] = (view[_arena.SLOT_SKIPPED] + skipped) & U64_MASK
            else:
                arena.add_counter(_arena.W_HITS, hits)
                arena.add_counter(_arena.W_MISSES, misses)
                arena.add_counter(_arena.W_SKIPPED, skipped)
        self.next_flush = time.monotonic() + FLUSH_INTERVAL_S

    def flush_due(self) -> bool:
        """Counts wait in the process and the last flush is a flush interval old."""
        if self.view is not None or time.monotonic() < self.next_flush:
            return False
        self.next_flush = time.monotonic() + FLUSH_INTERVAL_S
        return True

    def add_pending(self, counts: dict[str, int]) -> None:
        """Add what waits in the process to a ``stats()`` dict."""
        counts["hits"] += self.hits
        counts["misses"] += self.misses
        counts["skipped"] += self.skipped

    def generation(self) -> int:
        """The claimed slot's generation (names this owner in leases), or 0."""
        view = self.view
        return 0 if view is None else int(view[_arena.SLOT_GENERATION])

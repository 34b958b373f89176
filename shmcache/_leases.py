"""The lease table: at most one computing caller per missing key, host-wide.

A lookup that misses takes a *lease* on its key (under the writer lock); other
lookups of the key, from any process, thread or task, find the lease and wait for
the value instead of calling the model too.  The table lives in the segment header
after the owner slots.  Each entry is four 64-bit words:

    tag       the key's 64-bit index tag (odd); 0 = free
    owner     (owner slot + 1) << 32 | the slot's generation (low 32 bits)
    deadline  CLOCK_MONOTONIC ns at which the lease lapses (coalesce_timeout)
    caller    a token of the owning thread/task (diagnostics only)

Writers hold the segment's writer lock.  Readers (waiters) read without it: they
read the tag, the other words, then the tag again.  An owner is alive while its
owner slot's liveness lock is held (see ``_owners.py``) *and* the slot still has
the generation the lease names, so a lease of a dead process — even one whose pid
was reused, or that lived in another pid namespace — is taken over, never waited
for.  A writer killed while writing an entry leaves either a free entry or one whose
owner is dead: both are safe.

Keys hash to a window of ``WINDOW`` entries; when a window is full the key goes
uncoalesced (the caller is told, counts it, and calls the model) — never blocked.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, NamedTuple

from . import _arena

__all__ = ["FIRST_WORD", "LEASE_ENTRIES", "WINDOW", "Lease", "LeaseTable", "owner_word"]

_ENTRY_WORDS: Final = 4
# _speedups.c (Finder.claim) writes entries with this same layout.
FIRST_WORD: Final = _arena.LEASE_TABLE_BYTE // 8
LEASE_ENTRIES: Final = (_arena.HEADER_BYTES // 8 - FIRST_WORD) // _ENTRY_WORDS
WINDOW: Final = 16
_TAG: Final = 0
_OWNER: Final = 1
_DEADLINE: Final = 2
_CALLER: Final = 3
_GENERATION_MASK: Final = 0xFFFFFFFF


def owner_word(slot: int, generation: int) -> int:
    """The owner word naming owner slot ``slot`` at ``generation``."""
    return ((slot + 1) << 32) | (generation & _GENERATION_MASK)


class Lease(NamedTuple):
    """A consistent snapshot of one lease entry."""

    entry: int
    tag: int
    owner: int
    caller: int
    deadline_ns: int

    @property
    def slot(self) -> int:
        """The owner slot, or -1 for a damaged owner word."""
        return (self.owner >> 32) - 1

    @property
    def generation(self) -> int:
        return self.owner & _GENERATION_MASK


class LeaseTable:
    """Lease operations on a mapped segment's header words."""

    def __init__(self, words: memoryview) -> None:
        self._words = words

    def _window(self, tag: int) -> range:
        # Windows never wrap, so one strided read gets a window's tags.
        start = (tag >> 1) % (LEASE_ENTRIES - WINDOW + 1)
        return range(start, start + WINDOW)

    def _window_tags(self, tag: int) -> tuple[int, list[int]]:
        """(first entry, the window's tags) in one strided read."""
        start = (tag >> 1) % (LEASE_ENTRIES - WINDOW + 1)
        base = FIRST_WORD + start * _ENTRY_WORDS
        return start, self._words[base : base + WINDOW * _ENTRY_WORDS : _ENTRY_WORDS].tolist()

    def _base(self, index: int) -> int:
        return FIRST_WORD + (index % LEASE_ENTRIES) * _ENTRY_WORDS

    def find(self, tag: int) -> Lease | None:
        """The live entry for ``tag``, read without the lock; None if there is none."""
        start, tags = self._window_tags(tag)
        if tag not in tags:
            return None
        lease = self.read(start + tags.index(tag))
        return lease if lease is not None and lease.tag == tag else None

    def read(self, index: int) -> Lease | None:
        """A consistent snapshot of entry ``index`` (None while it is being rewritten)."""
        words = self._words
        base = self._base(index)
        for _ in range(4):
            tag = words[base + _TAG]
            owner = words[base + _OWNER]
            caller = words[base + _CALLER]
            deadline = words[base + _DEADLINE]
            if (
                words[base + _TAG] == tag
                and words[base + _OWNER] == owner
                and words[base + _CALLER] == caller
            ):
                return Lease(index, int(tag), int(owner), int(caller), int(deadline))
        return None

    def take(
        self,
        tag: int,
        owner: int,
        deadline_ns: int,
        caller: int,
        now_ns: int = 0,
        alive: Callable[[Lease], bool] | None = None,
    ) -> int:
        """*Locked.* Give ``tag``'s lease to ``owner`` (replacing a lapsed one).

        When the key's window is full, an entry of another key whose lease lapsed
        (its deadline passed ``now_ns``, or ``alive`` says its owner is dead) is
        reused: leases that processes left behind (killed, or exited without
        updating) would otherwise fill windows for good and turn coalescing off.

        Returns:
            The entry index, or -1 when every entry of the key's window is live.
        """
        words = self._words
        start, tags = self._window_tags(tag)
        if tag in tags:
            free = start + tags.index(tag)
        elif 0 in tags:
            free = start + tags.index(0)
        else:
            free = self._lapsed(start, now_ns, alive)
            if free < 0:
                return -1
            # Freed first, as release() does: no reader pairs the old key's tag with
            # the new owner while the entry is rewritten.
            words[self._base(free) + _TAG] = 0
        base = self._base(free)
        hook = _arena.step_hook
        if words[base + _TAG] == tag:
            # A takeover: the new owner first, so no reader pairs the old owner with
            # the new deadline and waits past the old one's death.
            words[base + _OWNER] = owner
            words[base + _CALLER] = caller
            words[base + _DEADLINE] = deadline_ns
        else:
            words[base + _OWNER] = owner
            words[base + _DEADLINE] = deadline_ns
            words[base + _CALLER] = caller
            if hook:
                hook(11)
            words[base + _TAG] = tag  # published last: a reader sees a whole lease
        words[base + _CALLER] = caller
        if hook:
            hook(12)
        return free % LEASE_ENTRIES

    def _lapsed(self, start: int, now_ns: int, alive: Callable[[Lease], bool] | None) -> int:
        """*Locked.* An entry of the window at ``start`` whose lease lapsed, or -1."""
        leases = [self.read(i) for i in range(start, start + WINDOW)]
        for lease in leases:
            if lease is not None and lease.deadline_ns <= now_ns:
                return lease.entry
        if alive is not None:
            for lease in leases:
                if lease is not None and not alive(lease):
                    return lease.entry
        return -1

    def release(self, index: int, tag: int, owner: int, caller: int) -> bool:
        """*Locked.* Free entry ``index`` if it still is ``tag``'s lease of ``owner``'s
        ``caller``."""
        words = self._words
        base = self._base(index)
        if (
            words[base + _TAG] != tag
            or words[base + _OWNER] != owner
            or words[base + _CALLER] != caller
        ):
            return False  # lapsed and taken over meanwhile: no longer ours
        words[base + _TAG] = 0  # freed first: a reader sees it free, never half-new
        if _arena.step_hook:
            _arena.step_hook(13)
        words[base + _OWNER] = 0
        words[base + _DEADLINE] = 0
        words[base + _CALLER] = 0
        return True

    def problems(self) -> list[str]:
        """*Locked.* Entries no writer of ours could have left (for ``check``)."""
        words = self._words
        found: list[str] = []
        for i in range(LEASE_ENTRIES):
            base = FIRST_WORD + i * _ENTRY_WORDS
            tag = words[base + _TAG]
            if not tag:
                continue
            slot = (words[base + _OWNER] >> 32) - 1
            if not tag & 1:
                found.append(f"lease {i} has an impossible key tag {tag:#x}")
            elif not 0 <= slot < _arena.PROCESS_SLOTS:
                found.append(f"lease {i} names owner slot {slot}, outside the table")
            elif i not in self._window(tag):
                found.append(f"lease {i} is outside its key's window")
        return found

"""The arena: one mapped segment holding a hash index and a circular record log.

Layout (all integers little-endian)::

    [header 16 KiB][index: n_buckets x 256 B][log: circular, log_size bytes]

* The **header** holds the immutable geometry (covered by a crc32, so damage is
  detected at open) followed by shared 64-bit words: log head and tail, the pid of
  a writer in progress and of the lock holder, the statistics counters, and a table
  of owner slots (one per open cache instance, see ``_owners.py``).
* The **index** is set-associative with two choices: a key's digest names two
  buckets of ``SLOTS_PER_BUCKET`` slots, and the key goes in the first that has room
  (short answers fill 8-way buckets unevenly long before the log is full;
  two choices keep the index usable to ~95 % load); each slot holds a 64-bit tag, the record's log
  position, its length and a hash of its llm_string (for ``clear(llm_string=)``).
  Each bucket has a version word, odd while a writer changes it (a seqlock).
* The **log** holds records back to back at monotonically growing positions
  (``offset = position % log_size``).  Each record carries its own position, the
  full 256-bit key digest and a crc32 of itself.  New records go at the head; when
  the log is full, records are taken from the tail: no fragmentation, no free lists.
* **Eviction keeps what is read** (CLOCK, a.k.a. FIFO-reinsertion): each index
  slot has a reference byte that a reader sets, without a lock, on a hit (test
  before set, so a hot entry costs no write).  A writer that meets a referenced,
  live record at the tail re-appends it at the head and clears the byte, instead of
  dropping it; unreferenced records go, oldest first.  The copy work is bounded per
  write (``_REINSERT_MAX_BYTES``); past it the oldest record goes whatever its byte
  says.

Concurrency (see ``_lock.py`` for the writer lock):

* Writers hold the exclusive lock.  Before overwriting any log bytes a writer moves
  the tail past them; it writes a record completely before moving the head over it,
  and points an index slot at a record only after that.
* Readers take no lock.  They read a slot under its bucket's seqlock, copy the
  record, then check that the tail has not passed it (so the bytes were not being
  overwritten) and that its magic, position, digest and crc match.  Anything else
  is a miss, so no reader can accept a torn, foreign or half-written record.  A
  reader that keeps meeting an odd version falls back to the lock.
* A writer killed mid-write leaves its pid in the header's busy word.  The next
  lock holder repairs what it may have left half-done (odd bucket versions, slots
  pointing behind the tail, counters) before doing anything else.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

from ._errors import SegmentCorruptError, SegmentFormatError
from ._keys import split_digest

__all__ = ["FORMAT_VERSION", "HEADER_BYTES", "MIN_SIZE_BYTES", "Arena", "Geometry"]

logger = logging.getLogger("shmcache")

# 2: owner slots proven alive by kernel locks (format 1 trusted pid numbers).
FORMAT_VERSION: Final = 2
MAGIC: Final = b"SHMCACHE"
HEADER_BYTES: Final = 65536
MIN_SIZE_BYTES: Final = 1 << 20

# Geometry: magic, version, header bytes, size, buckets, slots/bucket, bucket bytes,
# index offset, log offset, log size, creation time; then a crc32 of those bytes.
_GEOMETRY: Final = struct.Struct("<8sIIQQIIQQQQ")
_GEOMETRY_CRC: Final = struct.Struct("<I")

# Shared 64-bit words in the header, by index into the segment viewed as u64s.
_W_HEAD: Final = 32
_W_TAIL: Final = 33
_W_BUSY: Final = 34  # pid of the writer in progress, 0 when none
W_HITS: Final = 35
W_MISSES: Final = 36
W_UPDATES: Final = 37
W_EVICTIONS: Final = 38
W_SKIPPED: Final = 39
W_ENTRIES: Final = 40
W_USED: Final = 41
# pid of the process holding the writer lock (0: none), for error messages and the
# CLI.  Informational only: a pid from another pid namespace may mean nothing here.
W_LOCK_PID: Final = 42
# Records re-appended at the head because they were read (CLOCK), for benchmarks.
W_REINSERTED: Final = 43
# Words 120-126 belong to the remote tier (_remote.py): its counters, the clear log
# this host follows and the host's poll schedule.  Nothing else may use them.
W_REMOTE_HITS: Final = 120
W_REMOTE_MISSES: Final = 121
W_REMOTE_ERRORS: Final = 122
W_CLEAR_EPOCH: Final = 123
W_CLEAR_SEQ: Final = 124
W_LOCAL_CLEARS: Final = 125
W_NEXT_POLL_NS: Final = 126

# Owner slots: a table of [pid, hits, misses, skipped, generation, ...] in the header,
# one per open cache instance.  A slot is written only by the instance that holds its
# liveness lock (_owners.py), so counting takes no lock and is exact even when the
# process later dies.  A new owner keeps adding to the counts a dead one left, so
# nothing ever needs folding; stats() sums the table.
_PROCESS_TABLE_WORD: Final = 128
# A slot fills a 64-byte cache line, so two processes counting never share a line.
_PROCESS_SLOT_WORDS: Final = 8
PROCESS_SLOTS: Final = 512
SLOT_PID: Final = 0
SLOT_HITS: Final = 1
SLOT_MISSES: Final = 2
SLOT_SKIPPED: Final = 3
SLOT_GENERATION: Final = 4  # bumped at each claim: names one owner for leases
SLOT_COALESCED: Final = 5
SLOT_COALESCE_TIMEOUTS: Final = 6
SLOT_UNCOALESCED: Final = 7
_COUNTED_SLOT_WORDS: Final = (SLOT_HITS, SLOT_MISSES, SLOT_SKIPPED, SLOT_COALESCED,
                              SLOT_COALESCE_TIMEOUTS, SLOT_UNCOALESCED)
# The rest of the header, after the owner table, is free for the lease table.
LEASE_TABLE_BYTE: Final = (_PROCESS_TABLE_WORD + PROCESS_SLOTS * _PROCESS_SLOT_WORDS) * 8

SLOTS_PER_BUCKET: Final = 8
BUCKET_BYTES: Final = 256
_BUCKET_WORDS: Final = BUCKET_BYTES // 8
# Within a bucket, in u64 words: version, tags[8], positions[8], llm hashes[8];
# then record lengths as u32[8] at byte 200, reference bytes u8[8] at byte 232.
_TAGS_AT: Final = 1
_POS_AT: Final = 9
_LLM_AT: Final = 17
_LENS_AT_BYTE: Final = 200
_REFS_AT_BYTE: Final = 232
# The most bytes of read records one write re-appends at the head before it evicts
# the oldest regardless: bounds one update's copy work (~1-3 ms at most) while a
# live set that fits survives churn.  CLOCK amortises it: a record is re-appended at
# most once per hit, and every re-append frees as much as it takes.
_REINSERT_MAX_BYTES: Final = 1 << 20
_EIGHT_U64: Final = struct.Struct(f"<{SLOTS_PER_BUCKET}Q")
_EIGHT_U32: Final = struct.Struct(f"<{SLOTS_PER_BUCKET}I")
_TWO_U64: Final = struct.Struct("<QQ")
_THREE_U64: Final = struct.Struct("<QQQ")
# Index space is sized for entries averaging this many log bytes: a 1 KB answer
# takes ~1.2 KB of log, a short one ~400 B; two-choice buckets fill to ~95 %.
_LOG_BYTES_PER_SLOT: Final = 384

# Record: magic, crc32 (of everything after it), position, record length, value
# length, expiry (unix seconds, 0 = never), llm_string hash, key digest.
_RECORD: Final = struct.Struct("<IIQIIdQ32s")
RECORD_HEADER_BYTES: Final = _RECORD.size
_RECORD_MAGIC: Final = 0x31434552  # b"REC1"
_PAD_MAGIC: Final = 0x31444150  # b"PAD1": the rest of the lap is unused
_U32: Final = struct.Struct("<I")
_RECORD_POSITION: Final = struct.Struct("<Q")  # at byte 8 of a record
_ALIGN: Final = 8
# Record lengths are stored as u32.
_MAX_RECORD_BYTES: Final = (1 << 32) - _ALIGN
# check() holds the writer lock at most about this long at a time.
VERIFY_STEP_S: Final = 0.01
# A reader retries the lock-free path this often before falling back to the lock.
_SEQLOCK_TRIES: Final = 16
# Positions stay far below 2**64 (centuries of writes at any real rate); one above
# this can only be damage.
_MAX_POSITION: Final = 1 << 62
# Shared words are incremented modulo 2**64: a damaged word near the top must wrap,
# not raise out of a lookup or an update.
U64_MASK: Final = (1 << 64) - 1
# Linux never hands out a pid above this (PID_MAX_LIMIT); a bigger one is damage.
_MAX_PID: Final = 1 << 22


# Test-only fault injection: tests set this (in a throw-away child process) to a
# callable that gets each write step's number and may, e.g., SIGKILL the process.
# Steps: 1 write begun, 2 room made (tail moved), 3 record header written, 4 value
# written, 5 head published, 6 slot half-written (bucket version odd), 7 indexed;
# re-appending a read record (CLOCK): 8 old copy behind the tail, 9 new copy
# published (slot not yet moved); leases (_leases.py): 11, 12 taken, 13 released.
step_hook: Callable[[int], None] | None = None


@dataclass
class _Pending:
    """A read record taken from the tail, on its way to the head."""

    record: bytearray
    position: int  # where it was
    digest: bytes
    bucket: int
    slot: int


class Contended:
    """Returned by :meth:`Arena.find` when a bucket kept changing under the reader."""


CONTENDED: Final = Contended()


@dataclass(frozen=True)
class Geometry:
    """The immutable shape of a segment."""

    size_bytes: int
    n_buckets: int
    index_offset: int
    log_offset: int
    log_size: int
    created_ns: int

    @classmethod
    def for_size(cls, size_bytes: int) -> Geometry:
        """Split ``size_bytes`` into header, index and log."""
        n_buckets = max(1, (size_bytes - HEADER_BYTES) // (_LOG_BYTES_PER_SLOT * SLOTS_PER_BUCKET))
        log_offset = HEADER_BYTES + n_buckets * BUCKET_BYTES
        log_size = (size_bytes - log_offset) // _ALIGN * _ALIGN
        return cls(size_bytes, n_buckets, HEADER_BYTES, log_offset, log_size, time.time_ns())

    @property
    def max_record_bytes(self) -> int:
        """The largest record (header included) one entry may take."""
        return min(self.log_size // 2, _MAX_RECORD_BYTES)


def _pid_alive(pid: int) -> bool:
    """Best-effort, for log messages only (pids from other namespaces mislead)."""
    if not 0 < pid <= _MAX_PID:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, under another user
    return True


def _warn_damaged(position: int) -> bool:
    logger.warning("damaged record at log position %d: skipping the rest of its lap", position)
    return True


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def initialise(mapping: mmap.mmap, geometry: Geometry) -> None:
    """Write the header of a new, zero-filled segment."""
    packed = _GEOMETRY.pack(
        MAGIC, FORMAT_VERSION, HEADER_BYTES, geometry.size_bytes, geometry.n_buckets,
        SLOTS_PER_BUCKET, BUCKET_BYTES, geometry.index_offset, geometry.log_offset,
        geometry.log_size, geometry.created_ns,
    )
    mapping[: len(packed)] = packed
    _GEOMETRY_CRC.pack_into(mapping, len(packed), zlib.crc32(packed))
    words = memoryview(mapping).cast("Q")
    try:
        # Positions start at one full lap, so position 0 never names a record.
        words[_W_HEAD] = geometry.log_size
        words[_W_TAIL] = geometry.log_size
    finally:
        words.release()


def read_geometry(mapping: mmap.mmap, path: str, fix_hint: str) -> Geometry:
    """Parse and verify a segment's header.

    Raises:
        SegmentFormatError: not a shmcache segment of this format version.
        SegmentCorruptError: the header is damaged.
    """
    (magic, version, header_bytes, size_bytes, n_buckets, slots, bucket_bytes,
     index_offset, log_offset, log_size, created_ns) = _GEOMETRY.unpack_from(mapping)
    if magic != MAGIC or version != FORMAT_VERSION:
        raise SegmentFormatError(
            f"{path} is not a shmcache segment of format {FORMAT_VERSION}; {fix_hint}"
        )
    (crc,) = _GEOMETRY_CRC.unpack_from(mapping, _GEOMETRY.size)
    expected = Geometry(size_bytes, n_buckets, index_offset, log_offset, log_size, created_ns)
    sane = (
        crc == zlib.crc32(mapping[: _GEOMETRY.size])
        and header_bytes == HEADER_BYTES
        and slots == SLOTS_PER_BUCKET
        and bucket_bytes == BUCKET_BYTES
        and size_bytes - size_bytes % 8 == len(mapping)  # see mapped_length()
        and index_offset == HEADER_BYTES
        and log_offset == HEADER_BYTES + n_buckets * BUCKET_BYTES
        and log_size > 0
        and log_size % _ALIGN == 0
        and log_offset + log_size <= size_bytes
    )
    if not sane:
        raise SegmentCorruptError(f"the header of segment {path} is damaged; {fix_hint}")
    return expected


class Arena:
    """Index and log operations on a mapped segment.

    Methods marked *locked* must be called with the segment's writer lock held;
    the others are lock-free and safe against concurrent writers.
    """

    def __init__(self, mapping: mmap.mmap, geometry: Geometry) -> None:
        self.geometry = geometry
        self._mm = mapping
        self._words = memoryview(mapping).cast("Q")
        self.words = self._words  # shared 64-bit words, for the lock-holder word
        self._bytes = memoryview(mapping)
        self._halves = memoryview(mapping).cast("I")
        self._n_buckets = geometry.n_buckets
        self._index_word = geometry.index_offset // 8
        self._log_offset = geometry.log_offset
        self._log_size = geometry.log_size
        self.max_record_bytes = geometry.max_record_bytes
        # The header as verified at open: check() compares the live one with it.
        self._header = bytes(mapping[: _GEOMETRY.size + _GEOMETRY_CRC.size])
        self._prefault(0, geometry.log_offset)

    def _prefault(self, start: int, end: int) -> None:
        """Map the pages of ``[start, end)`` into this process now.

        A new process's first touch of each page costs a page fault; the index is
        6 % of the segment and every lookup reads it, so its faults are taken once
        here (~0.1 ms per MiB) rather than one per lookup.  Log pages fault lazily.
        """
        view = memoryview(self._mm)
        try:
            for offset in range(start, end, mmap.PAGESIZE):
                view[offset]  # the read is the point: it maps the page
        finally:
            view.release()

    def release(self) -> None:
        """Drop the views on the mapping so it can be closed."""
        self._words.release()
        self._halves.release()
        self._bytes.release()

    # -- shared words ---------------------------------------------------------

    def counter(self, word: int) -> int:
        """Read one shared counter."""
        return int(self._words[word])

    def add_counter(self, word: int, delta: int) -> None:
        """*Locked.* Add ``delta`` (may be negative) to a shared counter."""
        self._words[word] = max(0, self._words[word] + delta) & U64_MASK

    # -- owner slots -------------------------------------------------------------

    def owner_slot(self, slot: int) -> memoryview:
        """A view of owner slot ``slot`` (words ``SLOT_*``); release it when done."""
        base = _PROCESS_TABLE_WORD + slot * _PROCESS_SLOT_WORDS
        return self._words[base : base + _PROCESS_SLOT_WORDS]

    def process_totals(self) -> tuple[int, ...]:
        """Sum each counted slot word (``hits, misses, skipped, coalesced,
        coalesce_timeouts, uncoalesced``) over the owner table."""
        table = self._words[
            _PROCESS_TABLE_WORD : _PROCESS_TABLE_WORD + PROCESS_SLOTS * _PROCESS_SLOT_WORDS
        ]
        try:
            return tuple(sum(table[w::_PROCESS_SLOT_WORDS]) for w in _COUNTED_SLOT_WORDS)
        finally:
            table.release()

    def counts(self) -> dict[str, int]:
        """Every counter of :class:`~shmcache.CacheStats`, as the segment holds them now.

        The one place that sums the header words and the owner table, for
        ``stats()`` and the CLI alike (an instance adds what it has pending).
        """
        hits, misses, skipped, coalesced, timeouts, uncoalesced = self.process_totals()
        words = self._words
        return {
            "hits": int(words[W_HITS]) + hits,
            "misses": int(words[W_MISSES]) + misses,
            "updates": int(words[W_UPDATES]),
            "evictions": int(words[W_EVICTIONS]),
            "skipped": int(words[W_SKIPPED]) + skipped,
            "entries": int(words[W_ENTRIES]),
            "used_bytes": int(words[W_USED]),
            "size_bytes": self.geometry.size_bytes,
            "coalesced": coalesced,
            "coalesce_timeouts": timeouts,
            "uncoalesced": uncoalesced,
            "remote_hits": int(words[W_REMOTE_HITS]),
            "remote_misses": int(words[W_REMOTE_MISSES]),
            "remote_errors": int(words[W_REMOTE_ERRORS]),
        }

    def lock_holder(self) -> int:
        """The pid recorded by the writer lock's holder (0: none recorded)."""
        return int(self._words[W_LOCK_PID])

    # -- lock-free reads ------------------------------------------------------

    def _buckets(self, digest: bytes) -> tuple[int, int]:
        """The key's two candidate buckets (as word indexes; distinct when n > 1)."""
        _, seed, seed2 = _THREE_U64.unpack_from(digest)
        n = self._n_buckets
        first = seed % n
        second = seed2 % n
        if second == first:
            second = (first + 1) % n
        return (
            self._index_word + first * _BUCKET_WORDS,
            self._index_word + second * _BUCKET_WORDS,
        )

    def find(self, digest: bytes, now: float) -> memoryview | Contended | None:
        """Look up ``digest`` without the lock.

        Returns:
            The stored value bytes, None for a miss (absent, expired, overwritten,
            damaged), or ``CONTENDED`` when the caller should retry under the lock.
        """
        tag, seed, seed2 = _THREE_U64.unpack_from(digest)
        tag |= 1  # as split_digest(), inlined: this is the hot path
        n = self._n_buckets
        bucket = self._index_word + (seed % n) * _BUCKET_WORDS
        tags = _EIGHT_U64.unpack_from(self._mm, (bucket + _TAGS_AT) * 8)
        if tag not in tags:
            second = seed2 % n
            if second == seed % n:
                second = (second + 1) % n
            bucket = self._index_word + second * _BUCKET_WORDS
            tags = _EIGHT_U64.unpack_from(self._mm, (bucket + _TAGS_AT) * 8)
            if tag not in tags:
                return None  # absence needs no consistency check
        # A key keeps its slot while it is replaced; should the slot be reused for
        # another key meanwhile, the record's digest check turns it into a miss.
        i = tags.index(tag)
        words = self._words
        for _ in range(_SEQLOCK_TRIES):
            version = words[bucket]
            if version & 1:
                continue
            position = words[bucket + _POS_AT + i]
            length = self._halves[(bucket * 8 + _LENS_AT_BYTE) // 4 + i]
            if words[bucket] == version:
                found = self._read_record(position, length, digest, now)
                if found is not None:
                    ref = bucket * 8 + _REFS_AT_BYTE + i
                    if not self._bytes[ref]:  # test before set: hot keys write nothing
                        self._bytes[ref] = 1
                return found
        return CONTENDED

    def find_locked(self, digest: bytes, now: float) -> memoryview | None:
        """*Locked.* Look up ``digest`` with no writer running."""
        tag, _ = split_digest(digest)
        for bucket in self._buckets(digest):
            tags = _EIGHT_U64.unpack_from(self._mm, (bucket + _TAGS_AT) * 8)
            if tag in tags:
                break
        else:
            return None
        i = tags.index(tag)
        position = self._words[bucket + _POS_AT + i]
        length = self._halves[(bucket * 8 + _LENS_AT_BYTE) // 4 + i]
        return self._read_record(position, length, digest, now)

    def _read_record(
        self, position: int, length: int, digest: bytes, now: float
    ) -> memoryview | None:
        words = self._words
        offset = position % self._log_size
        if (
            position < words[_W_TAIL]
            or position + length > words[_W_HEAD]
            or length < RECORD_HEADER_BYTES
            or offset + length > self._log_size
        ):
            return None
        start = self._log_offset + offset
        record = self._mm[start : start + length]
        if position < words[_W_TAIL]:
            return None  # a writer reclaimed these bytes while we copied them
        magic, crc, stored_position, stored_length, value_length, expires, _, stored_digest = (
            _RECORD.unpack_from(record)
        )
        if (
            magic != _RECORD_MAGIC
            or stored_position != position
            or stored_length != length
            or stored_digest != digest
            or RECORD_HEADER_BYTES + value_length > length
        ):
            return None
        view = memoryview(record)
        end = RECORD_HEADER_BYTES + value_length
        if zlib.crc32(view[8:end]) != crc:
            return None
        if expires and expires <= now:
            return None
        return view[RECORD_HEADER_BYTES:end]

    # -- locked writes --------------------------------------------------------

    def record_bytes(self, value_length: int) -> int:
        """Log bytes taken by a value of ``value_length`` bytes."""
        return _align(RECORD_HEADER_BYTES + value_length)

    def begin(self) -> None:
        """*Locked.* Repair what a dead writer left, then mark a write in progress.

        Callers call :meth:`end` only when the write completed: a write cut short by
        an exception (a KeyboardInterrupt, say) leaves the busy word set, so the next
        lock holder repairs whatever it left half-done.
        """
        self.repair()
        # getpid, not a cached pid: servers that fork from C run no at-fork hooks.
        self._words[_W_BUSY] = os.getpid()
        if step_hook:
            step_hook(1)

    def repair(self) -> None:
        """*Locked.* Repair what a dead writer left half-done, or damaged log bounds."""
        words = self._words
        tail, head = words[_W_TAIL], words[_W_HEAD]
        if words[_W_BUSY] or not (
            self._log_size <= tail <= head <= tail + self._log_size and head < _MAX_POSITION
        ):
            self._recover()

    def end(self) -> None:
        """*Locked.* Mark the write finished."""
        self._words[_W_BUSY] = 0

    def store(self, digest: bytes, llm_hash: int, value: bytes, expires: float) -> None:
        """*Locked*, between :meth:`begin` and :meth:`end`. Append a record and index it.

        The caller has checked ``record_bytes(len(value)) <= max_record_bytes``.
        """
        words = self._words
        hook = step_hook  # read once: this is the write path
        length = _align(RECORD_HEADER_BYTES + len(value))
        self._make_room(length, time.time())  # may re-append read records at the head
        position = words[_W_HEAD]
        offset = position % self._log_size
        if offset + length > self._log_size:
            # Not enough room before the end of the lap: mark the rest unused.
            _U32.pack_into(self._mm, self._log_offset + offset, _PAD_MAGIC)
            position += self._log_size - offset
            offset = 0
        if hook:
            hook(2)
        body = _RECORD.pack(
            _RECORD_MAGIC, 0, position, length, len(value), expires, llm_hash, digest
        )
        crc = zlib.crc32(value, zlib.crc32(memoryview(body)[8:]))
        start = self._log_offset + offset
        self._mm[start : start + RECORD_HEADER_BYTES] = body
        _U32.pack_into(self._mm, start + 4, crc)
        if hook:
            hook(3)
        self._mm[start + RECORD_HEADER_BYTES : start + RECORD_HEADER_BYTES + len(value)] = value
        if hook:
            hook(4)
        words[_W_HEAD] = position + length  # publish: the record is complete
        if hook:
            hook(5)
        self._index(digest, llm_hash, position, length)
        words[W_UPDATES] = (words[W_UPDATES] + 1) & U64_MASK
        if hook:
            hook(7)

    def _room_limit(self, length: int) -> int:
        """The tail position that lets a ``length``-byte record go at the head."""
        head = self._words[_W_HEAD]
        offset = head % self._log_size
        pad = self._log_size - offset if offset + length > self._log_size else 0
        return head + pad + length - self._log_size

    def _make_room(self, length: int, now: float) -> None:
        """Free the log for a ``length``-byte record at the head (CLOCK eviction).

        A live record at the tail that was read since it was written (or since it
        last survived a pass) is re-appended at the head instead of dropped.  One that
        fits only after padding the head's lap waits in ``pending`` (its slot already
        behind the tail: a miss for readers meanwhile) until the tail has passed the
        bytes the pad would cover, which takes less than one more record.
        """
        words = self._words
        tail = words[_W_TAIL]
        warned = False
        budget = _REINSERT_MAX_BYTES
        pending: list[_Pending] = []
        if self._room_limit(length) - tail > self._log_size:
            # Everything goes anyway (only damage gets here: repair() bounds the log).
            self._wipe_index()
            words[_W_TAIL] = self._room_limit(length)
            return
        while True:
            while pending and self._append_copy(pending[0]):
                pending.pop(0)
            head = words[_W_HEAD]
            limit = self._room_limit(length)
            if pending:
                limit = max(limit, head - head % self._log_size)  # where a pad may go
            if tail >= limit:
                break
            if tail >= head:
                words[_W_TAIL] = tail = max(limit, head)
                continue
            offset = tail % self._log_size
            lap_end = tail + (self._log_size - offset)
            start = self._log_offset + offset
            (magic,) = _U32.unpack_from(self._mm, start)
            if magic == _PAD_MAGIC or self._log_size - offset < RECORD_HEADER_BYTES:
                tail = lap_end
            elif magic == _RECORD_MAGIC:
                _, _, position, rec_length, _, expires, _, digest = _RECORD.unpack_from(
                    self._mm, start
                )
                if (
                    position != tail
                    or rec_length < RECORD_HEADER_BYTES
                    or tail + rec_length > lap_end
                ):
                    warned = warned or _warn_damaged(tail)
                    tail = lap_end
                else:
                    taken = (
                        self._take_referenced(start, position, rec_length, digest)
                        if budget >= rec_length and not (expires and expires <= now)
                        else None
                    )
                    if taken is None:
                        self._unindex(digest, position)
                    else:
                        budget -= rec_length
                        pending.append(taken)
                    tail += rec_length
            else:
                warned = warned or _warn_damaged(tail)
                tail = lap_end
            # The tail moves before any byte behind it is overwritten (readers check it).
            words[_W_TAIL] = min(tail, words[_W_HEAD])
            if pending and step_hook:
                step_hook(8)
        for left in pending:  # could not be placed (damage only): evicted after all
            self._unindex(left.digest, left.position)
        if words[_W_TAIL] < self._room_limit(length):
            words[_W_TAIL] = self._room_limit(length)

    def _take_referenced(
        self, start: int, position: int, length: int, digest: bytes
    ) -> _Pending | None:
        """The record at ``position`` if it is live and was read; else None (evict it)."""
        for bucket in self._buckets(digest):
            positions = _EIGHT_U64.unpack_from(self._mm, (bucket + _POS_AT) * 8)
            if position in positions:
                break
        else:
            return None  # overwritten or removed: dead space
        i = positions.index(position)
        if not self._bytes[bucket * 8 + _REFS_AT_BYTE + i]:
            return None
        return _Pending(bytearray(self._mm[start : start + length]), position, digest, bucket, i)

    def _append_copy(self, item: _Pending) -> bool:
        """*Locked.* Write a taken record at the head and point its slot at it.

        Order, for readers and for a writer killed at any step: the tail passed the
        old copy first (readers reject it), the new copy is written and published by
        the head, and only then does the slot point at it.  Killed in between, the
        slot points behind the tail (a miss; ``repair`` drops it) or the new copy is
        unindexed dead space.

        Returns:
            False when it does not fit yet (the head's lap would need a pad over
            bytes the tail has not passed).
        """
        words = self._words
        record = item.record
        length = len(record)
        head = words[_W_HEAD]
        offset = head % self._log_size
        if offset + length > self._log_size:
            lap_end = head + (self._log_size - offset)
            if lap_end - self._log_size > words[_W_TAIL]:
                return False  # the pad would cover live bytes
            _U32.pack_into(self._mm, self._log_offset + offset, _PAD_MAGIC)
            words[_W_HEAD] = head = lap_end
            offset = 0
        if head + length > words[_W_TAIL] + self._log_size:
            return False
        _RECORD_POSITION.pack_into(record, 8, head)
        value_end = RECORD_HEADER_BYTES + _U32.unpack_from(record, 20)[0]
        _U32.pack_into(record, 4, zlib.crc32(memoryview(record)[8:value_end]))
        dest = self._log_offset + offset
        self._mm[dest : dest + length] = record
        words[_W_HEAD] = head + length
        if step_hook:
            step_hook(9)
        bucket, i = item.bucket, item.slot
        if words[bucket + _POS_AT + i] == item.position:
            version = words[bucket] | 1
            words[bucket] = version
            words[bucket + _POS_AT + i] = head
            self._bytes[bucket * 8 + _REFS_AT_BYTE + i] = 0  # it survived this pass
            words[bucket] = (version + 1) & U64_MASK
        words[W_REINSERTED] = (words[W_REINSERTED] + 1) & U64_MASK
        return True

    def _unindex(self, digest: bytes, position: int) -> None:
        """Drop the slot that points at the evicted record at ``position``, if any."""
        for bucket in self._buckets(digest):
            positions = _EIGHT_U64.unpack_from(self._mm, (bucket + _POS_AT) * 8)
            if position in positions:
                break
        else:
            return
        if position in positions:
            self._clear_slot(bucket, positions.index(position))
            self.add_counter(W_EVICTIONS, 1)

    def _clear_slot(self, bucket: int, i: int) -> None:
        words = self._words
        lens_at = (bucket * 8 + _LENS_AT_BYTE) // 4
        version = words[bucket] | 1
        words[bucket] = version
        if words[bucket + _TAGS_AT + i]:
            self.add_counter(W_ENTRIES, -1)
            self.add_counter(W_USED, -self._halves[lens_at + i])
        words[bucket + _TAGS_AT + i] = 0
        words[bucket + _POS_AT + i] = 0
        words[bucket + _LLM_AT + i] = 0
        self._halves[lens_at + i] = 0
        self._bytes[bucket * 8 + _REFS_AT_BYTE + i] = 0
        words[bucket] = (version + 1) & U64_MASK

    def _index(self, digest: bytes, llm_hash: int, position: int, length: int) -> None:
        words = self._words
        tag = (_TWO_U64.unpack_from(digest)[0]) | 1  # as split_digest(), inlined
        first, second = self._buckets(digest)
        tags = _EIGHT_U64.unpack_from(self._mm, (first + _TAGS_AT) * 8)
        other = _EIGHT_U64.unpack_from(self._mm, (second + _TAGS_AT) * 8)
        new_entries = 1
        if tag in tags or tag in other:
            bucket = first if tag in tags else second
            i = (tags if tag in tags else other).index(tag)
            # Replacing: the old record becomes dead space.
            self.add_counter(W_USED, -self._halves[(bucket * 8 + _LENS_AT_BYTE) // 4 + i])
            new_entries = 0
        elif 0 in tags or 0 in other:
            # The first bucket while it has room (so where a key lives is predictable),
            # else the second: a key is crowded out only when both are full.
            bucket = first if 0 in tags else second
            i = (tags if bucket == first else other).index(0)
        else:
            # Both full: drop their oldest entry not read since written (or since it
            # last survived an eviction pass); if all were read, their oldest.
            bucket, i = self._bucket_victim(first, second)
            self._clear_slot(bucket, i)
            self.add_counter(W_EVICTIONS, 1)
        lens_at = (bucket * 8 + _LENS_AT_BYTE) // 4
        version = words[bucket] | 1
        words[bucket] = version
        words[bucket + _POS_AT + i] = position
        self._bytes[bucket * 8 + _REFS_AT_BYTE + i] = 0  # written: not read since
        if step_hook:
            step_hook(6)
        words[bucket + _LLM_AT + i] = llm_hash
        self._halves[lens_at + i] = length
        words[bucket + _TAGS_AT + i] = tag
        words[bucket] = (version + 1) & U64_MASK
        words[W_ENTRIES] = (words[W_ENTRIES] + new_entries) & U64_MASK
        words[W_USED] = (words[W_USED] + length) & U64_MASK

    def _bucket_victim(self, first: int, second: int) -> tuple[int, int]:
        candidates = []
        for bucket in (first, second):
            positions = _EIGHT_U64.unpack_from(self._mm, (bucket + _POS_AT) * 8)
            refs_at = bucket * 8 + _REFS_AT_BYTE
            for k, position in enumerate(positions):
                candidates.append((bool(self._bytes[refs_at + k]), position, bucket, k))
        _, _, bucket, i = min(candidates)
        return bucket, i

    def clear(self) -> None:
        """*Locked*, between :meth:`begin` and :meth:`end`. Remove every entry."""
        words = self._words
        # Moving the tail to the head invalidates every record for readers at once;
        # the index is then wiped at leisure.
        words[_W_TAIL] = words[_W_HEAD]
        self._wipe_index()

    def _wipe_index(self) -> None:
        """*Locked.* Empty every index slot (readers then find nothing)."""
        start = self.geometry.index_offset
        self._mm[start : self.geometry.log_offset] = bytes(self.geometry.log_offset - start)
        self._words[W_ENTRIES] = 0
        self._words[W_USED] = 0

    def clear_llm_string(self, llm_hash: int) -> int:
        """*Locked*, between :meth:`begin` and :meth:`end`. Remove entries of one llm_string.

        Returns:
            How many entries were removed.
        """
        removed = 0
        for b in range(self._n_buckets):
            bucket = self._index_word + b * _BUCKET_WORDS
            hashes = _EIGHT_U64.unpack_from(self._mm, (bucket + _LLM_AT) * 8)
            if llm_hash not in hashes:
                continue
            tags = _EIGHT_U64.unpack_from(self._mm, (bucket + _TAGS_AT) * 8)
            for i in range(SLOTS_PER_BUCKET):
                if hashes[i] == llm_hash and tags[i]:
                    self._clear_slot(bucket, i)
                    removed += 1
        return removed

    def delete(self, digest: bytes) -> bool:
        """*Locked*, between :meth:`begin` and :meth:`end`. Remove one key's entry.

        Returns:
            True if the key had an entry (its record becomes dead log space).
        """
        tag, _ = split_digest(digest)
        for bucket in self._buckets(digest):
            tags = _EIGHT_U64.unpack_from(self._mm, (bucket + _TAGS_AT) * 8)
            if tag in tags:
                self._clear_slot(bucket, tags.index(tag))
                return True
        return False

    @property
    def n_buckets(self) -> int:
        """How many index buckets the segment has (for :meth:`scan` in chunks)."""
        return self._n_buckets

    def scan(self, start: int, stop: int, now: float) -> list[tuple[int, bytes]]:
        """*Locked.* The live entries indexed in buckets ``[start, stop)``.

        Returns:
            ``(llm_hash, value bytes)`` of each entry that is present, unexpired and
            passes its record checks, in index order.
        """
        found: list[tuple[int, bytes]] = []
        for b in range(max(start, 0), min(stop, self._n_buckets)):
            bucket = self._index_word + b * _BUCKET_WORDS
            tags = _EIGHT_U64.unpack_from(self._mm, (bucket + _TAGS_AT) * 8)
            for i, tag in enumerate(tags):
                if not tag:
                    continue
                position = self._words[bucket + _POS_AT + i]
                length = self._halves[(bucket * 8 + _LENS_AT_BYTE) // 4 + i]
                record = self._record_at(position, length, now)
                if record is not None:
                    found.append((self._words[bucket + _LLM_AT + i], record))
        return found

    def _record_at(self, position: int, length: int, now: float) -> bytes | None:
        """The value of the record at ``position`` if it is intact, whatever its key."""
        offset = position % self._log_size
        words = self._words
        if (
            position < words[_W_TAIL]
            or position + length > words[_W_HEAD]
            or length < RECORD_HEADER_BYTES
            or offset + length > self._log_size
        ):
            return None
        start = self._log_offset + offset
        digest = bytes(self._mm[start + _RECORD.size - 32 : start + _RECORD.size])
        found = self._read_record(position, length, digest, now)
        return None if found is None else bytes(found)

    # -- recovery and verification -------------------------------------------

    def _slot_problem(self, bucket: int, i: int, tail: int, head: int) -> str | None:
        """Why slot ``i`` of ``bucket`` does not point at a valid record, or None."""
        words = self._words
        position = words[bucket + _POS_AT + i]
        length = self._halves[(bucket * 8 + _LENS_AT_BYTE) // 4 + i]
        if not tail <= position < head:
            return f"points at log position {position}, outside [{tail}, {head})"
        if position + length > head:
            return f"points at a record at log position {position} that ends past the head"
        offset = position % self._log_size
        if length < RECORD_HEADER_BYTES or offset + length > self._log_size:
            return f"has impossible length {length}"
        start = self._log_offset + offset
        record = self._mm[start : start + length]
        magic, crc, stored_position, stored_length, value_length, _, llm, digest = (
            _RECORD.unpack_from(record)
        )
        tag, _ = split_digest(digest)
        if magic != _RECORD_MAGIC or stored_position != position or stored_length != length:
            return f"points at log position {position}, which holds no such record"
        if RECORD_HEADER_BYTES + value_length > length or zlib.crc32(
            memoryview(record)[8 : RECORD_HEADER_BYTES + value_length]
        ) != crc:
            return f"points at a damaged record (crc mismatch) at log position {position}"
        if tag != words[bucket + _TAGS_AT + i] or bucket not in self._buckets(digest):
            return f"does not match the key of its record at log position {position}"
        if llm != words[bucket + _LLM_AT + i]:
            return f"has a wrong llm_string hash for its record at log position {position}"
        return None

    def _resync_slot(self, bucket: int, i: int) -> None:
        """*Locked.* Take a half-written slot's length and llm hash from its record.

        A writer replacing a key points the slot at the new, complete record before
        it writes the slot's other fields; if it died in between, the record tells
        what the rest should be (and :meth:`_slot_problem` still checks it all).
        """
        words = self._words
        position = words[bucket + _POS_AT + i]
        offset = position % self._log_size
        if self._log_size - offset < RECORD_HEADER_BYTES:
            return
        magic, _, stored_position, length, _, _, llm, _ = _RECORD.unpack_from(
            self._mm, self._log_offset + offset
        )
        if (
            magic == _RECORD_MAGIC
            and stored_position == position
            and RECORD_HEADER_BYTES <= length <= self._log_size - offset
        ):
            self._halves[(bucket * 8 + _LENS_AT_BYTE) // 4 + i] = length
            words[bucket + _LLM_AT + i] = llm

    def _recover(self) -> None:
        """*Locked.* Undo the half-done work of a writer that died holding the lock."""
        words = self._words
        tail, head = words[_W_TAIL], words[_W_HEAD]
        if self._log_size <= tail <= head <= tail + self._log_size and head < _MAX_POSITION:
            busy = int(words[_W_BUSY])
            if busy == os.getpid() or _pid_alive(busy):
                logger.info(
                    "a write by pid %d was interrupted; repairing the segment index", busy
                )
            else:
                logger.warning(
                    "a writer (pid %d) died mid-write; repairing the segment index", busy
                )
        else:
            # Damaged log bounds: restart the log empty. Every slot then lies outside
            # [tail, head) and is dropped below, so no reader follows one.
            logger.warning("damaged log bounds (tail %d, head %d); emptying the cache", tail, head)
            tail = head = tail if self._log_size <= tail < _MAX_POSITION else self._log_size
            words[_W_TAIL] = tail
            words[_W_HEAD] = head
        entries = used = 0
        for b in range(self._n_buckets):
            bucket = self._index_word + b * _BUCKET_WORDS
            suspect = bool(words[bucket] & 1)
            for i in range(SLOTS_PER_BUCKET):
                if not words[bucket + _TAGS_AT + i]:
                    continue
                position = words[bucket + _POS_AT + i]
                bad = not tail <= position < head
                if not bad and suspect:
                    self._resync_slot(bucket, i)
                    bad = self._slot_problem(bucket, i, tail, head) is not None
                if bad:
                    self._clear_slot(bucket, i)
                else:
                    entries += 1
                    used += self._halves[(bucket * 8 + _LENS_AT_BYTE) // 4 + i]
            if words[bucket] & 1:
                words[bucket] = (words[bucket] + 1) & U64_MASK
        words[W_ENTRIES] = entries
        words[W_USED] = used
        words[_W_BUSY] = 0

    def verify_plan(self) -> Iterator[Callable[[], list[str]]]:
        """Steps that together check the whole segment; run each one *locked*.

        Each step holds the lock for about ``VERIFY_STEP_S`` at most, so writers
        are never held up for long even on a segment of gigabytes.  Writers may run
        between steps: the log walk then resumes from the current tail, and the
        entry counters are compared with the index only if nothing was written
        while it was scanned.

        Yields:
            Callables returning the problems found by that step.
        """
        words = self._words
        state: dict[str, int] = {}
        stamp: list[tuple[int, ...]] = []

        def header_step() -> list[str]:
            problems: list[str] = []
            if self._mm[: len(self._header)] != self._header:
                problems.append(
                    "the segment header (geometry) changed or is damaged; no new process "
                    "can open it: remove it with `shmcache rm NAME`"
                )
            tail, head = words[_W_TAIL], words[_W_HEAD]
            if not self._log_size <= tail <= head <= tail + self._log_size < _MAX_POSITION:
                problems.append(
                    f"log tail {tail} and head {head} are inconsistent (the cache was emptied)"
                )
            self.repair()  # what a dead writer left half-done is not damage
            state["position"] = words[_W_TAIL]
            state["end"] = words[_W_HEAD]
            return problems

        yield header_step
        # The log, from the tail to the head seen above, in bounded steps.
        while True:
            def log_step() -> list[str]:
                problems, position = self._verify_log(
                    max(state["position"], int(words[_W_TAIL])),
                    min(state["end"], int(words[_W_HEAD])),
                    time.monotonic() + VERIFY_STEP_S,
                )
                state["position"] = position
                return problems

            yield log_step
            if state["position"] >= min(state["end"], int(words[_W_HEAD])):
                break
        state["bucket"] = 0
        state["entries"] = state["used"] = 0
        while state["bucket"] < self._n_buckets:
            def index_step() -> list[str]:
                problems: list[str] = []
                if state["bucket"] == 0:
                    stamp[:] = [self._write_stamp()]
                tail, head = words[_W_TAIL], words[_W_HEAD]
                deadline = time.monotonic() + VERIFY_STEP_S
                b = state["bucket"]
                while b < self._n_buckets:
                    bucket = self._index_word + b * _BUCKET_WORDS
                    if words[bucket] & 1:
                        problems.append(f"bucket {b} is marked as being written")
                    for i in range(SLOTS_PER_BUCKET):
                        if not words[bucket + _TAGS_AT + i]:
                            continue
                        problem = self._slot_problem(bucket, i, tail, head)
                        if problem:
                            problems.append(f"index bucket {b} slot {i} {problem}")
                        state["entries"] += 1
                        state["used"] += self._halves[(bucket * 8 + _LENS_AT_BYTE) // 4 + i]
                    b += 1
                    if b % 64 == 0 and time.monotonic() > deadline:
                        break
                state["bucket"] = b
                entries, used = state["entries"], state["used"]
                if b >= self._n_buckets and [self._write_stamp()] == stamp and (
                    entries != words[W_ENTRIES] or used != words[W_USED]
                ):
                    problems.append(
                        f"counters say {words[W_ENTRIES]} entries / {words[W_USED]} bytes, "
                        f"the index holds {entries} / {used}"
                    )
                return problems

            yield index_step

    def _write_stamp(self) -> tuple[int, ...]:
        """Changes whenever anything is written, evicted or cleared."""
        words = self._words
        return (words[W_UPDATES], words[W_EVICTIONS], words[_W_TAIL], words[_W_HEAD],
                words[W_ENTRIES], words[W_USED])

    def verify(self) -> list[str]:
        """*Locked.* Check the whole segment in one go; return the problems found."""
        problems: list[str] = []
        for step in self.verify_plan():
            problems.extend(step())
        return problems

    def _verify_log(self, tail: int, head: int, deadline: float) -> tuple[list[str], int]:
        """Check records from ``tail`` towards ``head`` until done or ``deadline``.

        Returns:
            The problems found and the position reached.
        """
        problems: list[str] = []
        if tail >= head:  # nothing left (or writers moved the tail past it meanwhile)
            return problems, tail
        position = tail
        checked = 0
        while position < head:
            checked += 1
            if checked % 256 == 0 and time.monotonic() > deadline:
                return problems, position
            offset = position % self._log_size
            lap_end = position + (self._log_size - offset)
            start = self._log_offset + offset
            (magic,) = _U32.unpack_from(self._mm, start)
            if magic == _PAD_MAGIC:
                position = lap_end
                continue
            fields = _RECORD.unpack_from(self._mm, start) if lap_end - position >= (
                RECORD_HEADER_BYTES) else None
            if fields is None or magic != _RECORD_MAGIC or fields[2] != position or not (
                RECORD_HEADER_BYTES + fields[4] <= fields[3] <= lap_end - position
            ):
                problems.append(f"log position {position} holds no valid record")
                position = lap_end
                continue
            length, value_length = fields[3], fields[4]
            body = self._mm[start + 8 : start + RECORD_HEADER_BYTES + value_length]
            if zlib.crc32(body) != fields[1]:
                problems.append(f"record at log position {position} fails its crc")
            position += length
        if position > head:
            problems.append(f"the last record ends at log position {position}, past the head")
        return problems, position

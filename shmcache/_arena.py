"""The arena: one mapped segment holding a hash index and a circular record log.

Layout (all integers little-endian)::

    [header 64 KiB][index: n_buckets x 256 B][small log: log_size B][main log]

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
* The **log** is two circular logs side by side: the *small* (probation) log, where
  new records go (``log_offset``, ``log_size``: 5 % of the data space, right after
  the index), and the *main* log (the rest of the segment).  Each holds records
  back to back at monotonically growing positions (``offset = position % its
  size``; main-log positions start above ``_MAIN_BASE``, so a position names its
  log) and has its own head and tail (the small log's are the header's first).
  Each record carries its own position, the full 256-bit key digest and a crc32 of
  itself.  New records go at a head; room is made at a tail: no fragmentation, no
  free lists.
* **Eviction keeps what is read** (S3-FIFO, SOSP '23, on two logs): each index slot
  has a 2-bit frequency that a reader bumps, without a lock, on a hit (test before
  set, up to 3: a hot entry costs no write).  A new key goes to the small log, the
  probation FIFO.  At the small log's tail, a record read at least twice moves to the
  main log; one that was not is dropped and leaves a *ghost* in its index slot (its
  tag with the low bit clear, which no lookup matches, and no record); a key written
  again while its ghost is fresh goes straight to the main log.  At the main log's
  tail (CLOCK with frequency) a record with a non-zero frequency is re-appended at
  the main head with its frequency decremented; the others go, oldest first.  While
  the main log has room (filling up, after a clear), unread small-log records move
  there too, flagged *probation*, so nothing is evicted before the data space is
  full; a probation record meets the small log's rules when it reaches the main
  tail, and while the main tail is one, an unread small-log record moves in rather
  than go (the older unread one goes first).  The copy work per write is bounded
  (``_REINSERT_MAX_BYTES``); past it records go whatever their frequency says.

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
  pointing behind the tail, counters) before doing anything else.  Every write step
  has a number for ``step_hook`` (the crash tests kill a writer at each one).
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

from . import _accel
from ._errors import SegmentCorruptError, SegmentFormatError
from ._keys import split_digest

__all__ = ["FORMAT_VERSION", "HEADER_BYTES", "MIN_SIZE_BYTES", "Arena", "Geometry"]

logger = logging.getLogger("shmcache")

# Format history (the file name carries the version, so old segments are left alone):
# 1: one FIFO log, pids as owner liveness;  2: owner slots proven alive by kernel
# locks, CLOCK reference bytes, two-choice index;  3: S3-FIFO on a small and a main
# log, 2-bit frequencies, ghost slots, probation flags.
FORMAT_VERSION: Final = 3
MAGIC: Final = b"SHMCACHE"
HEADER_BYTES: Final = 65536
MIN_SIZE_BYTES: Final = 1 << 20
# A log below this can only come from a damaged or foreign header.
_MIN_LOG_BYTES: Final = 4096

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
# Records re-appended at the main head because they were read, or moved there from
# the small log (S3-FIFO), for benchmarks and tests.
W_REINSERTED: Final = 43
# The main log's head and tail; _W_HEAD/_W_TAIL are the small (probation) log's,
# where new records go.
_W_MAIN_HEAD: Final = 44
_W_MAIN_TAIL: Final = 45
# Bytes of records ever stored (not moved): the clock that ages ghost slots.
_W_CLOCK: Final = 46
W_GHOST_HITS: Final = 47  # stores that went straight to the main log on a fresh ghost
W_PROMOTED: Final = 48  # small-log records moved to the main log
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
# then record lengths as u32[8] at byte 200, frequencies u8[8] at byte 232 (bumped
# by readers), flags u8[8] at byte 240 (writers only).
_TAGS_AT: Final = 1
_POS_AT: Final = 9
_LLM_AT: Final = 17
_LENS_AT_BYTE: Final = 200
_REFS_AT_BYTE: Final = 232
_FLAGS_AT_BYTE: Final = 240
# Flag: the record has not earned a place in the main log yet (it sits there only
# because the main log had room); at the main tail it is treated as a small-log one.
_PROBATION: Final = 1
# A reader bumps a slot's frequency up to this (2 bits, as S3-FIFO).
_FREQ_MAX: Final = 3
# A ghost slot: the key's tag with the low bit clear (live tags have it set, so no
# lookup matches a ghost), position 0, the clock when it was evicted in the llm-hash
# word and a check value in the length (so check() sees damage to ghosts too).
_GHOST_CHECK: Final = struct.Struct("<QQ")
# A ghost is fresh while fewer than this many data spaces' worth of records were
# stored after it (S3-FIFO keeps ghosts of about as many entries as the main log;
# measured: 0.5 costs one-hit-heavy traffic ~1 % more model calls, 1.5-2 costs
# Zipf traffic 0.5-1 % more).
_GHOST_WINDOW: Final = 0.9
# A small-log record read at least this often moves to the main log, where it
# starts with frequency 0 (as libCacheSim's S3-FIFO; measured against keeping its
# frequency and promoting after one read: fewer model calls on every workload of
# benchmarks/hitratio.py but one-hit-heavy ones, where it is even).
_PROMOTE_MIN_FREQ: Final = 2
# The small log's share of the data space, and the largest record it takes as a
# share of its size (bigger ones go to the main log on probation).  S3-FIFO uses
# 10 %; measured with benchmarks/hitratio.py --quick, 5 % makes 0.3-1.5 % fewer
# model calls on every workload (3 % and 20 %: more).
_SMALL_SHARE: Final = 0.05
_SMALL_RECORD_DIVISOR: Final = 16
# Main-log positions live above this (small-log positions stay below it).
_MAIN_BASE: Final = 1 << 62
# The most bytes one write copies (records re-appended at the main head, or moved
# there from the small log) before it evicts regardless: bounds one update's copy
# work (~1-3 ms at most) while a live set that fits survives churn.  Amortised, a
# record is copied at most once per hit (and once on leaving the small log), and
# every copy frees as much as it takes.
_REINSERT_MAX_BYTES: Final = 1 << 20
# How many dead records a write skips at the main tail to see what comes next.
_PEEK_MAX_RECORDS: Final = 64
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
# Positions stay far below 2**64 (centuries of writes at any real rate); a small-log
# position above this (a main-log one above _MAIN_BASE + this) can only be damage.
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
# re-appending a read record at the main head: 8 old copy behind the tail, 9 new
# copy published (slot not yet moved); leases (_leases.py): 11, 12 taken, 13
# released; leaving the small log (S3-FIFO): 14 copy published at the main head
# (slot still on the small copy), 15 slot moved to the main copy (small tail not
# yet past the old one), 16 ghost half-written (bucket version odd), 17 ghost
# written (the evicted record not yet behind its tail).
step_hook: Callable[[int], None] | None = None


@dataclass
class _Pending:
    """A read record taken from the tail, on its way to the head."""

    record: bytearray
    position: int  # where it was
    digest: bytes
    bucket: int
    slot: int
    freq: int  # its frequency once re-appended


@dataclass(frozen=True)
class _Region:
    """One of the two circular logs."""

    name: str
    head_word: int
    tail_word: int
    base: int  # byte offset of its first byte in the segment
    size: int
    first: int  # its first position (one lap above its base position)
    limit: int  # positions at or above this can only be damage

    def offset(self, position: int) -> int:
        return position % self.size

    def sane(self, tail: int, head: int) -> bool:
        """Whether ``tail`` and ``head`` can be this log's bounds."""
        return self.first <= tail <= head <= tail + self.size and head < self.limit


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
        """Split ``size_bytes`` into header, index, small log and main log.

        ``log_offset``/``log_size`` name the small (probation) log, where new
        records go; the main log fills the rest of the segment after it.
        """
        n_buckets = max(1, (size_bytes - HEADER_BYTES) // (_LOG_BYTES_PER_SLOT * SLOTS_PER_BUCKET))
        log_offset = HEADER_BYTES + n_buckets * BUCKET_BYTES
        data_bytes = (size_bytes - log_offset) // _ALIGN * _ALIGN
        small = int(data_bytes * _SMALL_SHARE) // _ALIGN * _ALIGN
        return cls(size_bytes, n_buckets, HEADER_BYTES, log_offset, small, time.time_ns())

    @property
    def main_offset(self) -> int:
        """Where the main log starts: right after the small log."""
        return self.log_offset + self.log_size

    @property
    def main_size(self) -> int:
        """Bytes of the main log (the rest of the segment after the small log)."""
        return max(0, (self.size_bytes - self.main_offset) // _ALIGN * _ALIGN)

    @property
    def data_bytes(self) -> int:
        """Bytes of both logs: the space records take."""
        return self.log_size + self.main_size

    @property
    def max_record_bytes(self) -> int:
        """The largest record (header included) one entry may take."""
        return min(self.data_bytes // 2, self.main_size, _MAX_RECORD_BYTES)


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


def _ghost_check(tag: int, stamp: int) -> int:
    """The length word of a ghost slot: odd, so never a record length."""
    return zlib.crc32(_GHOST_CHECK.pack(tag, stamp)) | 1


def _main_start(main_size: int) -> int:
    """The main log's first position: a lap boundary above ``_MAIN_BASE``."""
    return (_MAIN_BASE // main_size + 1) * main_size


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
        words[_W_MAIN_HEAD] = words[_W_MAIN_TAIL] = _main_start(geometry.main_size)
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
        and log_size >= _MIN_LOG_BYTES
        and expected.main_size >= _MIN_LOG_BYTES
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
        self._small = _Region(
            "small", _W_HEAD, _W_TAIL, geometry.log_offset, geometry.log_size,
            geometry.log_size, _MAX_POSITION,
        )
        self._main = _Region(
            "main", _W_MAIN_HEAD, _W_MAIN_TAIL, geometry.main_offset, geometry.main_size,
            _main_start(geometry.main_size), _MAIN_BASE + _MAX_POSITION,
        )
        self._regions = (self._main, self._small)
        # For the lock-free path: (tail word, head word, base, size) by log.
        self._main_t = (_W_MAIN_TAIL, _W_MAIN_HEAD, self._main.base, self._main.size)
        self._small_t = (_W_TAIL, _W_HEAD, self._small.base, self._small.size)
        self._small_max_record = geometry.log_size // _SMALL_RECORD_DIVISOR
        self._ghost_window = int(geometry.data_bytes * _GHOST_WINDOW)
        self._budget = _REINSERT_MAX_BYTES
        self.max_record_bytes = geometry.max_record_bytes
        # The header as verified at open: check() compares the live one with it.
        self._header = bytes(mapping[: _GEOMETRY.size + _GEOMETRY_CRC.size])
        self._prefault(0, geometry.log_offset)
        # The lock-free lookup: the compiled one when built (a C call with no Python
        # frame in between), else find_python; both follow the same protocol.
        self._finder = self._compiled_finder(mapping)
        self.find: Callable[[bytes, float], memoryview | Contended | None] = (
            self.find_python
            if self._finder is None
            else self._finder.find  # type: ignore[assignment]  # returns CONTENDED as given
        )

    def _compiled_finder(self, mapping: mmap.mmap) -> _accel.FinderType | None:
        if _accel.Finder is None:
            return None
        try:
            return _accel.Finder(
                mapping, self._n_buckets, self._index_word, self._main_t, self._small_t,
                CONTENDED,
            )
        except (TypeError, ValueError, BufferError) as exc:  # a read-only mapping
            logger.debug("shmcache: compiled lookup not used for this mapping (%s)", exc)
            return None

    def compiled_claim(
        self, first_word: int, entries: int, window: int
    ) -> Callable[..., memoryview | int | None] | None:
        """The compiled coalesced-miss step over this mapping, or None where not built.

        ``first_word``, ``entries``, ``window``: the lease table's layout
        (``_leases.py``).  See ``Coalescer.claim_fast`` for what it decides.
        """
        if self._finder is None:
            return None
        self._finder.set_leases(W_LOCK_PID, first_word, entries, window)
        return self._finder.claim

    def _region_of(self, position: int) -> _Region:
        return self._main if position >= _MAIN_BASE else self._small

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
        if self._finder is not None:
            self._finder.release()
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

    def find_python(self, digest: bytes, now: float) -> memoryview | Contended | None:
        """Look up ``digest`` without the lock (``self.find`` is this or its C twin).

        Returns:
            The stored value bytes, None for a miss (absent, expired, overwritten,
            damaged), or ``CONTENDED`` when the caller should retry under the lock.
        """
        tag, seed, seed2 = _THREE_U64.unpack_from(digest)
        tag |= 1  # as split_digest(), inlined: this is the hot path
        n = self._n_buckets
        mm = self._mm
        bucket = self._index_word + (seed % n) * _BUCKET_WORDS
        tags = _EIGHT_U64.unpack_from(mm, (bucket + _TAGS_AT) * 8)
        if tag not in tags:  # ghosts have the low bit clear: they never match
            second = seed2 % n
            if second == seed % n:
                second = (second + 1) % n
            bucket = self._index_word + second * _BUCKET_WORDS
            tags = _EIGHT_U64.unpack_from(mm, (bucket + _TAGS_AT) * 8)
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
            if words[bucket] != version:
                continue
            # _read_record, inlined (the hot path): which log, then its checks.
            tail_word, head_word, base, size = (
                self._main_t if position >= _MAIN_BASE else self._small_t
            )
            offset = position % size
            if (
                position < words[tail_word]
                or position + length > words[head_word]
                or length < RECORD_HEADER_BYTES
                or offset + length > size
            ):
                return None
            start = base + offset
            record = mm[start : start + length]
            if position < words[tail_word]:
                return None  # a writer reclaimed these bytes while we copied them
            magic, crc, stored_position, stored_length, value_length, expires, _, stored = (
                _RECORD.unpack_from(record)
            )
            end = RECORD_HEADER_BYTES + value_length
            if (
                magic != _RECORD_MAGIC
                or stored_position != position
                or stored_length != length
                or stored != digest
                or end > length
            ):
                return None
            view = memoryview(record)
            if zlib.crc32(view[8:end]) != crc or (expires and expires <= now):
                return None
            ref = bucket * 8 + _REFS_AT_BYTE + i
            freq = self._bytes[ref]
            if freq < _FREQ_MAX:  # test before set: hot keys write nothing
                self._bytes[ref] = freq + 1
            return view[RECORD_HEADER_BYTES:end]
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
        region = self._region_of(position)
        offset = position % region.size
        if (
            position < words[region.tail_word]
            or position + length > words[region.head_word]
            or length < RECORD_HEADER_BYTES
            or offset + length > region.size
        ):
            return None
        start = region.base + offset
        record = self._mm[start : start + length]
        if position < words[region.tail_word]:
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
        # The lock holder's pid, which it recorded when it took the lock (a fresh
        # getpid then, never a cached one: servers that fork from C run no at-fork
        # hooks); a caller that did not record it gets getpid() here.
        words = self._words
        words[_W_BUSY] = words[W_LOCK_PID] or os.getpid()
        if step_hook:
            step_hook(1)

    def _bounds_sane(self) -> bool:
        words = self._words
        return all(r.sane(words[r.tail_word], words[r.head_word]) for r in self._regions)

    def repair(self) -> None:
        """*Locked.* Repair what a dead writer left half-done, or damaged log bounds."""
        if self._words[_W_BUSY] or not self._bounds_sane():
            self._recover()

    def end(self) -> None:
        """*Locked.* Mark the write finished."""
        self._words[_W_BUSY] = 0

    def store(self, digest: bytes, llm_hash: int, value: bytes, expires: float) -> None:
        """*Locked*, between :meth:`begin` and :meth:`end`. Append a record and index it.

        A new key goes to the small log; a key whose ghost is fresh (it was evicted
        from the small log not long ago: S3-FIFO's second chance) goes to the main
        log, and so does (on probation) a record too big for the small log, or any
        record while the main log has room.

        The caller has checked ``record_bytes(len(value)) <= max_record_bytes``.
        """
        words = self._words
        hook = step_hook  # read once: this is the write path
        length = _align(RECORD_HEADER_BYTES + len(value))
        now = time.time()
        self._budget = _REINSERT_MAX_BYTES
        flags = 0
        if self._fresh_ghost(digest):
            region = self._main
            words[W_GHOST_HITS] = (words[W_GHOST_HITS] + 1) & U64_MASK
        elif length > self._small_max_record or (
            self._room_limit(self._main, length) <= words[self._main.tail_word]
        ):
            # Too big for the small log, or the main log has room (filling up): it
            # would move there on probation when it left the small log, so it goes
            # there at once (measured: filling a segment cost every update a second
            # copy of its record, ~+80 % update µs; hit ratio the same within 0.5 %).
            region, flags = self._main, _PROBATION
        else:
            region = self._small
        words[_W_CLOCK] = (words[_W_CLOCK] + length) & U64_MASK
        if region is self._small:
            self._make_room_small(length, now)  # may move records to the main log
        else:
            self._make_room_main(length, now)  # may re-append read records
        position, start = self._claim(region, length)
        if hook:
            hook(2)
        body = _RECORD.pack(
            _RECORD_MAGIC, 0, position, length, len(value), expires, llm_hash, digest
        )
        crc = zlib.crc32(value, zlib.crc32(memoryview(body)[8:]))
        self._mm[start : start + RECORD_HEADER_BYTES] = body
        _U32.pack_into(self._mm, start + 4, crc)
        if hook:
            hook(3)
        self._mm[start + RECORD_HEADER_BYTES : start + RECORD_HEADER_BYTES + len(value)] = value
        if hook:
            hook(4)
        words[region.head_word] = position + length  # publish: the record is complete
        if hook:
            hook(5)
        self._index(digest, llm_hash, position, length, flags)
        words[W_UPDATES] = (words[W_UPDATES] + 1) & U64_MASK
        if hook:
            hook(7)

    def _claim(self, region: _Region, length: int) -> tuple[int, int]:
        """Where a ``length``-byte record goes at ``region``'s head (padding the lap
        when it does not fit before its end): its position and byte offset.  Room
        was made (:meth:`_room_limit`); the head moves when the record is complete."""
        head = self._words[region.head_word]
        offset = head % region.size
        if offset + length > region.size:
            # Not enough room before the end of the lap: mark the rest unused.
            _U32.pack_into(self._mm, region.base + offset, _PAD_MAGIC)
            head += region.size - offset
            offset = 0
        return head, region.base + offset

    def _room_limit(self, region: _Region, length: int) -> int:
        """The tail position that lets a ``length``-byte record go at the head."""
        head = self._words[region.head_word]
        offset = head % region.size
        pad = region.size - offset if offset + length > region.size else 0
        return head + pad + length - region.size

    def _slot_of(self, digest: bytes, position: int) -> tuple[int, int] | None:
        """The index slot that points at the record at ``position``, if any."""
        for bucket in self._buckets(digest):
            positions = _EIGHT_U64.unpack_from(self._mm, (bucket + _POS_AT) * 8)
            if position in positions:
                return bucket, positions.index(position)
        return None  # overwritten or removed: dead space

    def _tail_record(
        self, region: _Region, tail: int
    ) -> tuple[int, tuple[int, int, float, bytes] | None]:
        """What lies at ``tail``: ``(next position, (start, length, expires, digest))``
        for an intact record header, ``(next, None)`` for a pad, damage or the lap's
        end (damage is logged; the rest of its lap is skipped)."""
        offset = tail % region.size
        lap_end = tail + (region.size - offset)
        if region.size - offset < RECORD_HEADER_BYTES:
            return lap_end, None
        start = region.base + offset
        (magic,) = _U32.unpack_from(self._mm, start)
        if magic == _PAD_MAGIC:
            return lap_end, None
        if magic == _RECORD_MAGIC:
            _, _, position, length, _, expires, _, digest = _RECORD.unpack_from(self._mm, start)
            if position == tail and RECORD_HEADER_BYTES <= length <= lap_end - tail:
                return tail + length, (start, length, expires, digest)
        _warn_damaged(tail)
        return lap_end, None

    def _make_room_small(self, length: int, now: float) -> None:
        """Free the small log for a ``length``-byte record at its head (S3-FIFO).

        Each live record at the tail leaves the small log: to the main log when it
        was read (frequency kept, less the hit that earned the move), or when the
        main log has room or its own tail is on probation (then flagged probation:
        nothing goes before the data space is full, and unread records go oldest
        first); else it is evicted, leaving a ghost.  A move writes the copy and
        points the slot at it before the small tail passes the original, so the key
        never misses meanwhile.
        """
        small, words = self._small, self._words
        if self._room_limit(small, length) - words[small.tail_word] > small.size:
            # Everything goes anyway (only damage gets here: repair() bounds the log).
            self._wipe_index()
            words[small.tail_word] = self._room_limit(small, length)
            return
        while True:
            tail, head = words[small.tail_word], words[small.head_word]
            limit = self._room_limit(small, length)
            if tail >= limit:
                return
            if tail >= head:
                words[small.tail_word] = max(limit, head)
                return
            after, found = self._tail_record(small, tail)
            if found is not None:
                start, rec_length, expires, digest = found
                slot = self._slot_of(digest, tail)
                if slot is not None:
                    bucket, i = slot
                    freq = self._bytes[bucket * 8 + _REFS_AT_BYTE + i]
                    if expires and expires <= now:
                        self._evict(bucket, i)
                    elif self._budget < rec_length:
                        self._ghost(bucket, i)  # this write copied enough
                    elif freq >= _PROMOTE_MIN_FREQ:
                        self._move_to_main(start, tail, rec_length, bucket, i, 0, 0, now)
                    elif (flags := self._main_takes(rec_length)) is not None:
                        self._move_to_main(start, tail, rec_length, bucket, i, flags, 0, now)
                    else:
                        self._ghost(bucket, i)
            words[small.tail_word] = min(after, head)

    def _main_takes(self, length: int) -> int | None:
        """Whether an unread small-log record moves to the main log, and its flags.

        It moves on probation while the main log has room (filling up: nothing is
        evicted before the data space is full), and as a main-log record when the
        main tail is a probation record: that one is older and unread too, so it goes
        first, and the probation records left over from filling drain within one
        lap (moving this one on probation would keep them forever: measured, a fifth
        of the main log stayed unread probation records, +1-2 % model calls).
        Otherwise it does not move (None).
        """
        main, words = self._main, self._words
        tail, head = words[main.tail_word], words[main.head_word]
        if self._room_limit(main, length) <= tail:
            return _PROBATION
        for _ in range(_PEEK_MAX_RECORDS):
            if tail >= head:
                return _PROBATION
            after, found = self._tail_record(main, tail)
            if found is not None:
                slot = self._slot_of(found[3], tail)
                if slot is not None:
                    bucket, i = slot
                    if self._bytes[bucket * 8 + _FLAGS_AT_BYTE + i] & _PROBATION:
                        return 0
                    return None
            tail = after
        return None

    def _move_to_main(
        self, start: int, position: int, length: int, bucket: int, i: int, flags: int,
        freq: int, now: float,
    ) -> None:
        """*Locked.* Copy the small-log record at ``position`` to the main head and
        point its slot (``bucket``, ``i``) at the copy.

        Order, for readers and for a writer killed at any step: the copy is written
        and published by the main head while the original is still valid, then the
        slot moves to it (under the bucket's seqlock); the small tail passes the
        original only after that (the caller).  Killed in between, the copy is
        unindexed dead space, or the original is.
        """
        self._budget -= length
        record = bytearray(self._mm[start : start + length])
        self._make_room_main(length, now)
        main, words = self._main, self._words
        new_position, dest = self._claim(main, length)
        _RECORD_POSITION.pack_into(record, 8, new_position)
        value_end = RECORD_HEADER_BYTES + _U32.unpack_from(record, 20)[0]
        _U32.pack_into(record, 4, zlib.crc32(memoryview(record)[8:value_end]))
        self._mm[dest : dest + length] = record
        words[main.head_word] = new_position + length
        if step_hook:
            step_hook(14)
        if words[bucket + _POS_AT + i] == position:  # else removed meanwhile (damage)
            version = words[bucket] | 1
            words[bucket] = version
            words[bucket + _POS_AT + i] = new_position
            self._bytes[bucket * 8 + _REFS_AT_BYTE + i] = freq
            self._bytes[bucket * 8 + _FLAGS_AT_BYTE + i] = flags
            words[bucket] = (version + 1) & U64_MASK
        words[W_PROMOTED] = (words[W_PROMOTED] + 1) & U64_MASK
        words[W_REINSERTED] = (words[W_REINSERTED] + 1) & U64_MASK
        if step_hook:
            step_hook(15)

    def _make_room_main(self, length: int, now: float) -> None:
        """Free the main log for a ``length``-byte record at its head (CLOCK with a
        2-bit frequency).

        A live record at the tail with a non-zero frequency is re-appended at the
        head with its frequency decremented instead of dropped; the others go (a
        probation one leaves a ghost).  One that fits only after padding the head's
        lap waits in ``pending`` (its slot already behind the tail: a miss for
        readers meanwhile) until the tail has passed the bytes the pad would cover,
        which takes less than one more record.
        """
        main, words = self._main, self._words
        tail = words[main.tail_word]
        pending: list[_Pending] = []
        if self._room_limit(main, length) - tail > main.size:
            # Everything goes anyway (only damage gets here: repair() bounds the log).
            self._wipe_index()
            words[main.tail_word] = self._room_limit(main, length)
            return
        while True:
            while pending and self._append_copy(pending[0]):
                pending.pop(0)
            head = words[main.head_word]
            limit = self._room_limit(main, length)
            if pending:
                limit = max(limit, head - head % main.size)  # where a pad may go
            if tail >= limit:
                break
            if tail >= head:
                words[main.tail_word] = tail = max(limit, head)
                continue
            after, found = self._tail_record(main, tail)
            if found is not None:
                start, rec_length, expires, digest = found
                slot = self._slot_of(digest, tail)
                if slot is not None:
                    bucket, i = slot
                    freq = self._bytes[bucket * 8 + _REFS_AT_BYTE + i]
                    if expires and expires <= now:
                        self._evict(bucket, i)
                    elif freq and self._budget >= rec_length:
                        self._budget -= rec_length
                        pending.append(_Pending(
                            bytearray(self._mm[start : start + rec_length]), tail, digest,
                            bucket, i, freq - 1,
                        ))
                    elif self._bytes[bucket * 8 + _FLAGS_AT_BYTE + i] & _PROBATION:
                        self._ghost(bucket, i)
                    else:
                        self._evict(bucket, i)
            tail = after
            # The tail moves before any byte behind it is overwritten (readers check it).
            words[main.tail_word] = min(tail, words[main.head_word])
            if pending and step_hook:
                step_hook(8)
        for left in pending:  # could not be placed (damage only): evicted after all
            self._unindex(left.digest, left.position)
        if words[main.tail_word] < self._room_limit(main, length):
            words[main.tail_word] = self._room_limit(main, length)

    def _append_copy(self, item: _Pending) -> bool:
        """*Locked.* Write a taken record at the main head and point its slot at it.

        Order, for readers and for a writer killed at any step: the tail passed the
        old copy first (readers reject it), the new copy is written and published by
        the head, and only then does the slot point at it.  Killed in between, the
        slot points behind the tail (a miss; ``repair`` drops it) or the new copy is
        unindexed dead space.

        Returns:
            False when it does not fit yet (the head's lap would need a pad over
            bytes the tail has not passed).
        """
        main, words = self._main, self._words
        record = item.record
        length = len(record)
        head = words[main.head_word]
        offset = head % main.size
        if offset + length > main.size:
            lap_end = head + (main.size - offset)
            if lap_end - main.size > words[main.tail_word]:
                return False  # the pad would cover live bytes
            _U32.pack_into(self._mm, main.base + offset, _PAD_MAGIC)
            words[main.head_word] = head = lap_end
            offset = 0
        if head + length > words[main.tail_word] + main.size:
            return False
        _RECORD_POSITION.pack_into(record, 8, head)
        value_end = RECORD_HEADER_BYTES + _U32.unpack_from(record, 20)[0]
        _U32.pack_into(record, 4, zlib.crc32(memoryview(record)[8:value_end]))
        dest = main.base + offset
        self._mm[dest : dest + length] = record
        words[main.head_word] = head + length
        if step_hook:
            step_hook(9)
        bucket, i = item.bucket, item.slot
        if words[bucket + _POS_AT + i] == item.position:
            version = words[bucket] | 1
            words[bucket] = version
            words[bucket + _POS_AT + i] = head
            self._bytes[bucket * 8 + _REFS_AT_BYTE + i] = item.freq  # survived this pass
            self._bytes[bucket * 8 + _FLAGS_AT_BYTE + i] = 0  # earned its place
            words[bucket] = (version + 1) & U64_MASK
        words[W_REINSERTED] = (words[W_REINSERTED] + 1) & U64_MASK
        return True

    def _unindex(self, digest: bytes, position: int) -> None:
        """Drop the slot that points at the evicted record at ``position``, if any."""
        slot = self._slot_of(digest, position)
        if slot is not None:
            self._evict(*slot)

    def _evict(self, bucket: int, i: int) -> None:
        self._clear_slot(bucket, i)
        self.add_counter(W_EVICTIONS, 1)

    def _ghost(self, bucket: int, i: int) -> None:
        """*Locked.* Evict the entry of slot ``i`` and leave its ghost there."""
        words = self._words
        tag = words[bucket + _TAGS_AT + i]
        ghost = tag ^ 1
        if not tag & 1 or not ghost:
            self._evict(bucket, i)
            return
        lens_at = (bucket * 8 + _LENS_AT_BYTE) // 4
        version = words[bucket] | 1
        words[bucket] = version
        self.add_counter(W_ENTRIES, -1)
        self.add_counter(W_USED, -self._halves[lens_at + i])
        words[bucket + _TAGS_AT + i] = ghost
        words[bucket + _POS_AT + i] = 0
        if step_hook:
            step_hook(16)
        stamp = words[_W_CLOCK]
        words[bucket + _LLM_AT + i] = stamp
        self._halves[lens_at + i] = _ghost_check(ghost, stamp)
        self._bytes[bucket * 8 + _REFS_AT_BYTE + i] = 0
        self._bytes[bucket * 8 + _FLAGS_AT_BYTE + i] = 0
        words[bucket] = (version + 1) & U64_MASK
        self.add_counter(W_EVICTIONS, 1)
        if step_hook:
            step_hook(17)

    def _fresh_ghost(self, digest: bytes) -> bool:
        """Whether ``digest`` has a ghost that is still fresh (and no live entry)."""
        tag = (_TWO_U64.unpack_from(digest)[0]) | 1
        ghost = tag ^ 1
        if not ghost:
            return False
        words = self._words
        for bucket in self._buckets(digest):
            tags = _EIGHT_U64.unpack_from(self._mm, (bucket + _TAGS_AT) * 8)
            if tag in tags:
                return False
            if ghost in tags:
                stamp = words[bucket + _LLM_AT + tags.index(ghost)]
                return (words[_W_CLOCK] - stamp) & U64_MASK <= self._ghost_window
        return False

    def _clear_slot(self, bucket: int, i: int) -> None:
        words = self._words
        lens_at = (bucket * 8 + _LENS_AT_BYTE) // 4
        version = words[bucket] | 1
        words[bucket] = version
        if words[bucket + _TAGS_AT + i] & 1:
            self.add_counter(W_ENTRIES, -1)
            self.add_counter(W_USED, -self._halves[lens_at + i])
        words[bucket + _TAGS_AT + i] = 0
        words[bucket + _POS_AT + i] = 0
        words[bucket + _LLM_AT + i] = 0
        self._halves[lens_at + i] = 0
        self._bytes[bucket * 8 + _REFS_AT_BYTE + i] = 0
        self._bytes[bucket * 8 + _FLAGS_AT_BYTE + i] = 0
        words[bucket] = (version + 1) & U64_MASK

    def _index(
        self, digest: bytes, llm_hash: int, position: int, length: int, flags: int
    ) -> None:
        words = self._words
        tag = (_TWO_U64.unpack_from(digest)[0]) | 1  # as split_digest(), inlined
        ghost = tag ^ 1
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
        elif ghost and (ghost in tags or ghost in other):
            bucket = first if ghost in tags else second  # the key's own ghost
            i = (tags if bucket == first else other).index(ghost)
        elif 0 in tags or 0 in other:
            # The first bucket while it has room (so where a key lives is predictable),
            # else the second: a key is crowded out only when both are full.
            bucket = first if 0 in tags else second
            i = (tags if bucket == first else other).index(0)
        else:
            ghosts = [
                (words[b + _LLM_AT + k], b, k)
                for b, ts in ((first, tags), (second, other))
                for k, t in enumerate(ts)
                if not t & 1
            ]
            if ghosts:  # the oldest ghost makes way
                _, bucket, i = min(ghosts)
            else:
                # Both full: drop their oldest entry not read since written (or since
                # it last survived an eviction pass); if all were read, their oldest.
                bucket, i = self._bucket_victim(first, second)
                self._evict(bucket, i)
        lens_at = (bucket * 8 + _LENS_AT_BYTE) // 4
        version = words[bucket] | 1
        words[bucket] = version
        words[bucket + _POS_AT + i] = position
        self._bytes[bucket * 8 + _REFS_AT_BYTE + i] = 0  # written: not read since
        self._bytes[bucket * 8 + _FLAGS_AT_BYTE + i] = flags
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
        # Moving the tails to the heads invalidates every record for readers at once;
        # the index is then wiped at leisure.
        for region in self._regions:
            words[region.tail_word] = words[region.head_word]
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
                if hashes[i] == llm_hash and tags[i] & 1:
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
                if not tag & 1:
                    continue  # empty, or a ghost
                position = self._words[bucket + _POS_AT + i]
                length = self._halves[(bucket * 8 + _LENS_AT_BYTE) // 4 + i]
                record = self._record_at(position, length, now)
                if record is not None:
                    found.append((self._words[bucket + _LLM_AT + i], record))
        return found

    def _record_at(self, position: int, length: int, now: float) -> bytes | None:
        """The value of the record at ``position`` if it is intact, whatever its key."""
        region = self._region_of(position)
        offset = position % region.size
        words = self._words
        if (
            position < words[region.tail_word]
            or position + length > words[region.head_word]
            or length < RECORD_HEADER_BYTES
            or offset + length > region.size
        ):
            return None
        start = region.base + offset
        digest = bytes(self._mm[start + _RECORD.size - 32 : start + _RECORD.size])
        found = self._read_record(position, length, digest, now)
        return None if found is None else bytes(found)

    # -- recovery and verification -------------------------------------------

    def _bounds(self) -> dict[str, tuple[int, int]]:
        words = self._words
        return {r.name: (int(words[r.tail_word]), int(words[r.head_word])) for r in self._regions}

    def _slot_problem(
        self, bucket: int, i: int, bounds: dict[str, tuple[int, int]]
    ) -> str | None:
        """Why slot ``i`` of ``bucket`` is neither a ghost nor points at a valid
        record, or None (``bounds``: each log's tail and head)."""
        words = self._words
        tag = words[bucket + _TAGS_AT + i]
        position = words[bucket + _POS_AT + i]
        length = self._halves[(bucket * 8 + _LENS_AT_BYTE) // 4 + i]
        if not tag & 1:
            if position or length != _ghost_check(tag, words[bucket + _LLM_AT + i]):
                return "is a damaged ghost (an evicted key's trace)"
            return None
        region = self._region_of(position)
        tail, head = bounds[region.name]
        if not tail <= position < head:
            return f"points at log position {position}, outside [{tail}, {head})"
        if position + length > head:
            return f"points at a record at log position {position} that ends past the head"
        offset = position % region.size
        if length < RECORD_HEADER_BYTES or offset + length > region.size:
            return f"has impossible length {length}"
        start = region.base + offset
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
        region = self._region_of(position)
        offset = position % region.size
        if region.size - offset < RECORD_HEADER_BYTES:
            return
        magic, _, stored_position, length, _, _, llm, _ = _RECORD.unpack_from(
            self._mm, region.base + offset
        )
        if (
            magic == _RECORD_MAGIC
            and stored_position == position
            and RECORD_HEADER_BYTES <= length <= region.size - offset
        ):
            self._halves[(bucket * 8 + _LENS_AT_BYTE) // 4 + i] = length
            words[bucket + _LLM_AT + i] = llm

    def _recover(self) -> None:
        """*Locked.* Undo the half-done work of a writer that died holding the lock."""
        words = self._words
        if self._bounds_sane():
            busy = int(words[_W_BUSY])
            if busy == os.getpid() or _pid_alive(busy):
                logger.info(
                    "a write by pid %d was interrupted; repairing the segment index", busy
                )
            else:
                logger.warning(
                    "a writer (pid %d) died mid-write; repairing the segment index", busy
                )
        for region in self._regions:
            tail, head = words[region.tail_word], words[region.head_word]
            if not region.sane(tail, head):
                # Damaged log bounds: restart that log empty. Every slot into it then
                # lies outside [tail, head) and is dropped below: no reader follows one.
                logger.warning(
                    "damaged log bounds (%s log tail %d, head %d); emptying the cache",
                    region.name, tail, head,
                )
                tail = tail if region.first <= tail < region.limit else region.first
                words[region.tail_word] = words[region.head_word] = tail
        bounds = self._bounds()
        entries = used = 0
        for b in range(self._n_buckets):
            bucket = self._index_word + b * _BUCKET_WORDS
            suspect = bool(words[bucket] & 1)
            for i in range(SLOTS_PER_BUCKET):
                tag = words[bucket + _TAGS_AT + i]
                if not tag:
                    continue
                if not tag & 1:  # a ghost: keep it only if it is whole
                    if self._slot_problem(bucket, i, bounds) is not None:
                        self._clear_slot(bucket, i)
                    continue
                position = words[bucket + _POS_AT + i]
                tail, head = bounds[self._region_of(position).name]
                bad = not tail <= position < head
                if not bad and suspect:
                    self._resync_slot(bucket, i)
                    bad = self._slot_problem(bucket, i, bounds) is not None
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
        between steps: the log walks then resume from the current tails, and the
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
            for region in self._regions:
                tail, head = words[region.tail_word], words[region.head_word]
                if not region.sane(tail, head):
                    problems.append(
                        f"{region.name} log tail {tail} and head {head} are inconsistent "
                        "(the cache was emptied)"
                    )
            self.repair()  # what a dead writer left half-done is not damage
            for region in self._regions:
                state[region.name] = words[region.tail_word]
                state[region.name + " end"] = words[region.head_word]
            return problems

        yield header_step
        # Each log, from the tail to the head seen above, in bounded steps.
        for region in self._regions:
            while True:
                def log_step(region: _Region = region) -> list[str]:
                    problems, position = self._verify_log(
                        region,
                        max(state[region.name], int(words[region.tail_word])),
                        min(state[region.name + " end"], int(words[region.head_word])),
                        time.monotonic() + VERIFY_STEP_S,
                    )
                    state[region.name] = position
                    return problems

                yield log_step
                if state[region.name] >= min(
                    state[region.name + " end"], int(words[region.head_word])
                ):
                    break
        state["bucket"] = 0
        state["entries"] = state["used"] = 0
        while state["bucket"] < self._n_buckets:
            def index_step() -> list[str]:
                problems: list[str] = []
                if state["bucket"] == 0:
                    stamp[:] = [self._write_stamp()]
                bounds = self._bounds()
                deadline = time.monotonic() + VERIFY_STEP_S
                b = state["bucket"]
                while b < self._n_buckets:
                    bucket = self._index_word + b * _BUCKET_WORDS
                    if words[bucket] & 1:
                        problems.append(f"bucket {b} is marked as being written")
                    for i in range(SLOTS_PER_BUCKET):
                        tag = words[bucket + _TAGS_AT + i]
                        if not tag:
                            continue
                        problem = self._slot_problem(bucket, i, bounds)
                        if problem:
                            problems.append(f"index bucket {b} slot {i} {problem}")
                        if tag & 1:
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
                words[_W_MAIN_TAIL], words[_W_MAIN_HEAD], words[W_ENTRIES], words[W_USED])

    def verify(self) -> list[str]:
        """*Locked.* Check the whole segment in one go; return the problems found."""
        problems: list[str] = []
        for step in self.verify_plan():
            problems.extend(step())
        return problems

    def _verify_log(
        self, region: _Region, tail: int, head: int, deadline: float
    ) -> tuple[list[str], int]:
        """Check ``region``'s records from ``tail`` towards ``head`` until done or
        ``deadline``.

        Returns:
            The problems found and the position reached.
        """
        problems: list[str] = []
        if tail >= head:  # nothing left (or writers moved the tail past it meanwhile)
            return problems, tail
        position = tail
        checked = 0
        size = region.size
        while position < head:
            checked += 1
            if checked % 256 == 0 and time.monotonic() > deadline:
                return problems, position
            offset = position % size
            lap_end = position + (size - offset)
            start = region.base + offset
            (magic,) = _U32.unpack_from(self._mm, start)
            if magic == _PAD_MAGIC:
                position = lap_end
                continue
            fields = _RECORD.unpack_from(self._mm, start) if lap_end - position >= (
                RECORD_HEADER_BYTES) else None
            if fields is None or magic != _RECORD_MAGIC or fields[2] != position or not (
                RECORD_HEADER_BYTES + fields[4] <= fields[3] <= lap_end - position
            ):
                problems.append(f"{region.name} log position {position} holds no valid record")
                position = lap_end
                continue
            length, value_length = fields[3], fields[4]
            body = self._mm[start + 8 : start + RECORD_HEADER_BYTES + value_length]
            if zlib.crc32(body) != fields[1]:
                problems.append(f"record at {region.name} log position {position} fails its crc")
            position += length
        if position > head:
            problems.append(
                f"the last record ends at {region.name} log position {position}, past the head"
            )
        return problems, position

"""The remote tier as the engine uses it: remote reads, fills, Redis leases, clears.

A mixin of :class:`~shmcache._engine.Engine` (kept apart so each module has one job:
``_remote.py`` speaks to Redis, this module decides when and what the engine asks
it, ``_engine.py`` runs the local tier).  It uses the engine's lock runner,
counters, coalescer and arena; the attributes it needs are declared below.

A local miss that reaches Redis runs as a *flow*: a generator that yields its
blocking steps (remote calls, locked sections, pauses) to a driver, ``_drive`` for
sync reads and ``_adrive`` for async ones, so both share one logic and the async one
never blocks the loop (remote calls run in the tier's worker threads).  No remote
call is ever made holding the writer lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Generator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from . import _arena, _remote
from ._arena import U64_MASK, Arena
from ._coalesce import CallerKey, Coalescer, caller_key
from ._counters import Counters
from ._entries import Decode, Prepared
from ._errors import CodecError, CodecVersionError
from ._leases import Lease, owner_word
from ._remote import FAILED, TAKEN, ClearEvent, ClearPlan, Fetched, RemoteTier

if TYPE_CHECKING:
    from ._segment import MappedFile

__all__ = ["RemoteTierMixin"]

logger = logging.getLogger("shmcache")
_T = TypeVar("_T")


class _Call(NamedTuple):
    """A step of a remote flow: call the tier (sync: inline; async: a worker thread)."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]


class _Locked(NamedTuple):
    """A step of a remote flow: run ``fn(*args)`` under the writer lock."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]


class _Sleep(NamedTuple):
    """A step of a remote flow: pause (sync: ``time.sleep``; async: ``asyncio.sleep``)."""

    seconds: float


_Step = _Call | _Locked | _Sleep
_Flow = Generator[_Step, Any, Any]


class RemoteTierMixin:
    """The engine's remote-tier half (see the module docstring)."""

    _name: str
    _ttl: float | None
    _coalesce_timeout: float
    _arena: Arena
    _arena_words: memoryview
    _mapped: MappedFile | None
    _coalescer: Coalescer | None
    _counters: Counters
    _count: Callable[..., None]  # Counters.count(slot_word, pid=None)
    _remote: RemoteTier | None
    # Redis leases this instance's callers hold, by caller and key digest, and the
    # asyncio tasks watched for them.
    _remote_leases: dict[CallerKey, dict[bytes, str]]
    _remote_watched: set[int]

    if TYPE_CHECKING:

        @property
        def closed(self) -> bool: ...

        def _run_locked(
            self, fn: Callable[..., _T], *args: Any, timeout_s: float | None = None
        ) -> tuple[bool, _T | None]: ...

        async def _arun_locked(
            self, fn: Callable[..., _T], *args: Any
        ) -> tuple[bool, _T | None]: ...

        def _store_locked(
            self, arena: Arena, items: Sequence[Prepared], caller: CallerKey | None
        ) -> None: ...

        def _maybe_flush(self, arena: Arena) -> None: ...

    def _remote_flow(
        self, arena: Arena, digest: bytes, llm_hash: int, caller: CallerKey | None,
        decode: Decode,
    ) -> _Flow:
        """A local miss through the remote tier.

        Args:
            caller: This host's computing caller of the key (it holds the local lease):
                it also coordinates with the other hosts through the Redis lease.  None
                for a plain read (coalesce=False, or the miss went uncoalesced).

        Returns (as the generator's value):
            The generations found in Redis (also stored in the segment), or None: the
            caller computes the value (or the cache was closed meanwhile).
        """
        remote = self._remote
        assert remote is not None
        remote.ensure_started()
        words = self._arena_words
        clears = int(words[_remote.W_LOCAL_CLEARS])
        if caller is None:
            fetched = yield _Call(remote.fetch, (digest, llm_hash))
            found = yield from self._from_remote(
                arena, fetched, digest, llm_hash, None, clears, decode
            )
            return self._remote_miss(fetched) if found is None else self._remote_hit(found, False)
        # This host's computing caller: the value, else the lease of every host.
        token = self._lease_token()
        timeout_s = self._coalesce_timeout
        waited = False
        waiting_for: str | None = None
        patience = 0.0
        delay = _remote.LEASE_POLL_FIRST_S
        next_liveness = 0.0
        # Redis answered: (value or None, holder or None); FAILED: it did not.
        answer = yield _Call(remote.fetch_or_lease, (digest, llm_hash, token, timeout_s))
        while True:
            if not isinstance(answer, tuple):
                return self._remote_miss(answer)  # Redis failed: compute (uncoordinated)
            value, holder = answer
            found = yield from self._from_remote(
                arena, value, digest, llm_hash, caller, clears, decode
            )
            if found is not None:
                return self._remote_hit(found, waited)
            if holder is None:  # a value that failed its checks: the lease on its own
                holder = yield _Call(remote.take_lease, (digest, token, timeout_s))
            if holder is TAKEN:
                self._remote_leases.setdefault(caller, {})[digest] = token
                return self._remote_miss(None)
            if not isinstance(holder, str):
                return self._remote_miss(holder)
            # Another caller computes it (another host's, or a process here).
            now = time.monotonic()
            if holder != waiting_for:  # a new computing caller: our patience starts again
                waiting_for, patience = holder, now + timeout_s
            elif now >= patience:
                # Waited our own coalesce_timeout for it: take over (others follow us).
                self._count(_arena.SLOT_COALESCE_TIMEOUTS)
                yield _Call(remote.force_lease, (digest, token, timeout_s))
                self._remote_leases.setdefault(caller, {})[digest] = token
                return self._remote_miss(None)
            if now >= next_liveness:
                next_liveness = now + _remote.LEASE_LIVENESS_EVERY_S
                if self._holder_dead(holder):  # a dead process of this host: take it now
                    yield _Call(remote.release, ([(digest, holder)],))
                    answer = yield _Call(
                        remote.fetch_or_lease, (digest, llm_hash, token, timeout_s)
                    )
                    continue
            waited = True
            yield _Sleep(delay)
            delay = min(delay * 2, _remote.LEASE_POLL_MAX_S)
            if self._mapped is None:
                return None  # closed by another thread while we waited
            clears = int(words[_remote.W_LOCAL_CLEARS])
            polled = yield _Call(remote.poll, (digest, llm_hash))
            if not isinstance(polled, tuple):
                return self._remote_miss(polled)
            value, current = polled
            if isinstance(value, Fetched):
                answer = (value, None)
            elif current is not None:
                answer = (None, current)
            else:  # it ended without a value: take it, or follow whoever did
                answer = yield _Call(remote.fetch_or_lease, (digest, llm_hash, token, timeout_s))

    def _from_remote(
        self, arena: Arena, fetched: object, digest: bytes, llm_hash: int,
        caller: CallerKey | None, clears: int, decode: Decode,
    ) -> Generator[_Step, Any, Any]:
        """Decode a remote value (hostile-input checks) and store it in the segment."""
        if not isinstance(fetched, Fetched):
            return None
        remote = self._remote
        assert remote is not None
        try:
            decoded = decode(fetched.payload)
        except CodecVersionError:
            return None  # another release's layout (rolling upgrade): a plain miss
        except CodecError as exc:
            remote.warn_undecodable(digest, llm_hash, str(exc))
            return None
        remote.count_hit()
        fits = arena.record_bytes(len(fetched.payload)) <= arena.max_record_bytes
        prepared = Prepared(digest, llm_hash, fetched.payload, fetched.expires) if fits else None
        yield _Locked(self._fill_locked, (arena, digest, prepared, caller, clears))
        return decoded

    def _fill_locked(
        self,
        arena: Arena,
        digest: bytes,
        prepared: Prepared | None,
        caller: CallerKey | None,
        clears: int,
    ) -> None:
        """*Locked.* Store a remote value in the segment (with Redis' remaining TTL).

        Skipped when the segment was cleared since Redis was asked: the value may
        predate the clear.  The caller's local lease of the key ends (only that one:
        ``generate([p1, p2])`` may still compute p1).
        """
        if prepared is not None and self._arena_words[_remote.W_LOCAL_CLEARS] == clears:
            self._store_locked(arena, (prepared,), None)
        else:
            self._flush_remote_locked()
        coalescer = self._coalescer
        if caller is not None and coalescer is not None:
            held = coalescer._held.get(caller)
            lease = None if held is None else held.pop(digest, None)
            if lease is not None:
                coalescer._table.release(lease.entry, lease.tag, lease.owner, lease.token)
            if held is not None and not held:
                coalescer._held.pop(caller, None)

    def _remote_hit(self, decoded: Any, waited: bool) -> Any:
        self._count(_arena.SLOT_HITS)
        if waited:
            self._count(_arena.SLOT_COALESCED)
        return decoded

    def _remote_miss(self, outcome: object) -> None:
        """Count a lookup that Redis did not serve (its errors are counted already)."""
        remote = self._remote
        if remote is not None and outcome is not FAILED:
            remote.count_miss()
            self._remote_flush()
        self._count(_arena.SLOT_MISSES)
        if self._counters.view is None:
            self._maybe_flush(self._arena)
        return None

    def _drive(self, flow: _Flow) -> Any:
        """Run a remote flow for a sync caller."""
        result: Any = None
        while True:
            try:
                step = flow.send(result)
            except StopIteration as stop:
                return stop.value
            if type(step) is _Call:
                result = step.fn(*step.args)
            elif type(step) is _Locked:
                result = self._run_locked(step.fn, *step.args)
            else:
                assert type(step) is _Sleep
                time.sleep(step.seconds)
                result = None

    async def _adrive(self, flow: _Flow) -> Any:
        """Run a remote flow in a coroutine: remote calls in worker threads, pauses
        with ``asyncio.sleep``."""
        remote = self._remote
        assert remote is not None
        result: Any = None
        while True:
            try:
                step = flow.send(result)
            except StopIteration as stop:
                return stop.value
            if type(step) is _Call:
                result = await remote.run(step.fn, *step.args)
            elif type(step) is _Locked:
                result = await self._arun_locked(step.fn, *step.args)
            else:
                assert type(step) is _Sleep
                await asyncio.sleep(step.seconds)
                result = None

    def _lease_token(self) -> str:
        remote = self._remote
        assert remote is not None
        generation = self._counters.generation()
        return _remote.lease_token(remote.host_id, self._counters.slot, generation)

    def _holder_dead(self, token: str) -> bool:
        """Is the Redis lease holder a process of this host that is provably dead?"""
        parsed = _remote.parse_token(token)
        remote = self._remote
        coalescer = self._coalescer
        if parsed is None or remote is None or coalescer is None or parsed[0] != remote.host_id:
            return False  # another host's: its lease lapses with its PX
        _, slot, generation = parsed
        return not coalescer._owner_alive(Lease(0, 0, owner_word(slot, generation), 0, 0))

    def _remote_put_args(
        self, items: Sequence[Prepared]
    ) -> tuple[list[tuple[Any, ...]], list[tuple[bytes, str]]]:
        """What a write sends to Redis, and the caller's other Redis leases to end."""
        held = self._remote_leases.pop(caller_key(), None) or {}
        puts = []
        for digest, tag, payload, expires in items:
            token = held.pop(digest, None)
            puts.append((digest, tag, payload, expires, self._ttl, token))
        return puts, list(held.items())

    def _end_remote_leases(self, caller: CallerKey, in_loop: bool | None = None) -> None:
        """End a caller's Redis leases; from an event loop, in a worker thread."""
        remote = self._remote
        held = self._remote_leases.pop(caller, None)
        if remote is None or not held:
            return
        items = list(held.items())
        if in_loop is None:
            try:
                asyncio.get_running_loop()
                in_loop = True
            except RuntimeError:
                in_loop = False
        if in_loop:
            with contextlib.suppress(RuntimeError):  # shut down by close() meanwhile
                remote._executor_now().submit(remote.release, items)
        else:
            remote.release(items)

    def _watch_remote_task(self, caller: CallerKey) -> None:
        """A task that ends (cancelled, failed) without updating frees its Redis leases."""
        task = asyncio.current_task()
        if task is None or caller[1] in self._remote_watched:
            return
        self._remote_watched.add(caller[1])

        def done(_: object) -> None:
            self._remote_watched.discard(caller[1])
            if not self.closed:
                self._end_remote_leases(caller, in_loop=True)

        task.add_done_callback(done)

    def _remote_pending(self) -> bool:
        remote = self._remote
        return remote is not None and any(remote.pending_counts())

    def _flush_remote_locked(self) -> None:
        """*Locked.* Add this instance's pending remote counts to the header words.

        Remote events are counted under the writer lock, not in the owner slot (its
        eight words are all taken and the header has no room for a second per-slot
        table): each one already costs a network round trip (~50 µs), so the lock
        (~2 µs) is cheap, and it is tried at once after each event without waiting
        (_remote_flush), so the counts stay exact even for a process killed later.
        """
        remote = self._remote
        if remote is None:
            return
        words = self._arena_words
        for word, delta in zip(_remote.REMOTE_WORDS, remote.take_counts()):  # noqa: B905
            if delta:
                words[word] = (words[word] + delta) & U64_MASK

    # What the tier's poller thread calls (the RemoteHost protocol).

    def _remote_flush(self) -> None:
        if self._mapped is not None and self._remote_pending():
            self._run_locked(self._flush_remote_locked, timeout_s=0.0)

    def _remote_state(self) -> tuple[int, int]:
        words = self._arena_words
        return int(words[_remote.W_CLEAR_EPOCH]), int(words[_remote.W_CLEAR_SEQ])

    def _remote_poll_due(self, interval_ns: int) -> bool:
        words = self._arena_words
        now = time.monotonic_ns()
        due = int(words[_remote.W_NEXT_POLL_NS])
        if now < due <= now + 2 * interval_ns:
            return False  # another process of this host polls this turn
        words[_remote.W_NEXT_POLL_NS] = now + interval_ns
        return True

    def _remote_apply(self, plan: ClearPlan) -> None:
        if self._mapped is not None:
            self._run_locked(self._apply_clears_locked, self._arena, plan)

    def _apply_clears_locked(self, arena: Arena, plan: ClearPlan) -> None:
        """*Locked.* Apply the clears of other hosts, once for this host."""
        words = self._arena_words
        if self._remote_state() != plan.expected:
            return  # another process of the host got here first: it applied them
        arena.begin()
        if plan.full:
            arena.clear()
        else:
            for llm_hash in sorted(plan.llm_hashes):
                arena.clear_llm_string(llm_hash)
        if plan.clears_anything:
            words[_remote.W_LOCAL_CLEARS] = (words[_remote.W_LOCAL_CLEARS] + 1) & U64_MASK
            logger.debug("shmcache %r: applied clears up to %d of the remote tier",
                         self._name, plan.seq)
        words[_remote.W_CLEAR_EPOCH] = plan.epoch
        words[_remote.W_CLEAR_SEQ] = plan.seq
        arena.end()

    def _remote_own_clear(self, event: ClearEvent) -> None:
        if self._mapped is not None:
            self._run_locked(self._note_clear_locked, event)

    def _note_clear_locked(self, event: ClearEvent) -> None:
        """*Locked.* This process made (and applied here) the clear ``event``: the
        host's poller need not apply it again, if nothing before it is missing."""
        epoch, seq = self._remote_state()
        if (epoch == event.epoch and seq == event.seq - 1) or event.seq == 1:
            words = self._arena_words
            words[_remote.W_CLEAR_EPOCH] = event.epoch
            words[_remote.W_CLEAR_SEQ] = event.seq


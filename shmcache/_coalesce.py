"""Request coalescing: concurrent identical misses cost one model call.

The first lookup that misses a key becomes its *computing caller* and takes a lease
(``_leases.py``); lookups of the same key that arrive while the lease is live — from
any process, thread or asyncio task — wait for the value the computing caller's
update stores, polling the segment without any lock (sync: ``time.sleep``; async:
``asyncio.sleep``, so the loop is never blocked).

A *caller* is one thread, or one asyncio task: the pair (thread id, task).  A caller
never waits for its own lease (``BaseLLM.generate([p, p])`` looks every prompt up
before calling the model; a retry looks its key up again), not even through another
instance of the same cache: which caller holds which lease is kept per process and
segment, not per instance.

A lease ends when its caller next updates (any key, stored or skipped), when
LangChain reports the model call failed (``on_llm_error``), when the asyncio task
that took it ends (a cancelled ``ainvoke`` reports no error), when the instance
closes, when its process dies (its owner slot's kernel lock goes), or after
``coalesce_timeout``.  Then exactly one waiter takes the lease over and its lookup
returns None; the others go on waiting for it.  A waiter also takes over once it has
waited its *own* ``coalesce_timeout`` (the holder's may be longer, or damaged).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import weakref
from collections.abc import Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Final, Literal, NamedTuple

from . import _arena
from ._arena import CONTENDED, Contended
from ._keys import split_digest
from ._leases import FIRST_WORD, LEASE_ENTRIES, WINDOW, Lease, LeaseTable, owner_word

if TYPE_CHECKING:
    from ._engine import Engine

__all__ = ["Coalescer", "caller_key"]

_FIRST_POLL_S: Final = 0.0005
# The longest pause between two polls: waiters see a stored value within this.
_MAX_POLL_S: Final = 0.02
# How often a waiter asks the kernel whether the computing caller still lives.
_LIVENESS_EVERY_S: Final = 0.1
# Deadlines are u64 ns: a finite but huge coalesce_timeout is this long (30 years).
_MAX_TIMEOUT_NS: Final = 10**18

CallerKey = tuple[int, int]

# The caller that last took a lease in this context.  LangChain runs an async
# on_llm_error in a copy of the failing run's context, often in another task, so the
# handler finds the caller here rather than by asking which task is running.
LEASE_CALLER: ContextVar[CallerKey | None] = ContextVar("shmcache_lease_caller", default=None)


# asyncio's own C helper: None outside a running loop, where current_task() would
# raise (an exception costs ~0.4 µs on every sync miss and update).
_running_loop = asyncio._get_running_loop


def caller_key() -> CallerKey:
    """(thread id, id of the running asyncio task or 0): who is asking."""
    loop = _running_loop()
    task = None if loop is None else asyncio.current_task(loop)
    return threading.get_ident(), 0 if task is None else id(task)


def _token(caller: CallerKey) -> int:
    """A 64-bit token of a caller, stored in its leases (never 0)."""
    return (hash(caller) & _arena.U64_MASK) | 1


def same_holder(a: Lease, b: Lease) -> bool:
    """Do two snapshots name the same computing caller of the same key?"""
    return (a.entry, a.tag, a.owner, a.caller) == (b.entry, b.tag, b.owner, b.caller)


class _Held(NamedTuple):
    entry: int
    tag: int
    owner: int
    token: int


class _ProcessLeases:
    """Which caller of this process holds which lease, for one segment.

    Shared by every instance of the segment in the process, so a caller never waits
    for a lease it took through another instance and any instance's update ends it.
    Each caller touches only its own entry (task done-callbacks run in the loop's
    thread), and single dict operations are atomic under the GIL.
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.by_caller: dict[CallerKey, dict[bytes, _Held]] = {}


_REGISTRIES: dict[str, _ProcessLeases] = {}


def _registry(path: str, pid: int | None = None) -> _ProcessLeases:
    registry = _REGISTRIES.get(path)
    if registry is None or registry.pid != (os.getpid() if pid is None else pid):
        # New, or inherited across a fork (maybe one made from C): the parent's
        # leases stay the parent's.
        registry = _REGISTRIES[path] = _ProcessLeases()
    return registry


class Step(NamedTuple):
    """What the locked step decided for one missing lookup."""

    kind: Literal["hit", "own", "wait", "uncoalesced"]
    value: bytes | memoryview | None = None
    lease: Lease | None = None


_OWN: Final = Step("own")


class Coalescer:
    """The coalescing state of one cache instance in this process."""

    def __init__(self, cache: Engine, timeout_s: float) -> None:
        # A proxy, not a reference: no cycle, so an engine dropped without close()
        # is freed (and its fds released by its finalizer) at once, not at a GC pass.
        self._cache: Engine = weakref.proxy(cache)
        self.timeout_s = timeout_s
        self._timeout_ns = int(min(timeout_s, _MAX_TIMEOUT_NS / 1e9) * 1e9)
        self._table = LeaseTable(cache._arena_words)
        self._claim = cache._arena.compiled_claim(FIRST_WORD, LEASE_ENTRIES, WINDOW)
        self._path = cache.path
        self._watched_tasks: set[int] = set()

    @property
    def _held(self) -> dict[CallerKey, dict[bytes, _Held]]:
        return _registry(self._path).by_caller

    # -- who holds what -----------------------------------------------------------

    def holds(self, caller: CallerKey, digest: bytes, pid: int | None = None) -> bool:
        """Does ``caller`` hold ``digest``'s lease?  (``pid``: read by the caller.)"""
        held = _registry(self._path, pid).by_caller.get(caller)
        return held is not None and digest in held

    def has_leases(self, caller: CallerKey, pid: int | None = None) -> bool:
        return bool(_registry(self._path, pid).by_caller.get(caller))

    def holds_any(self) -> bool:
        """Does some caller hold a lease taken through this instance?"""
        mine = self._my_owner()
        return any(h.owner == mine for held in self._held.values() for h in held.values())

    def forget_all(self) -> None:
        """Forget task watches (a forked child's copy; the registry resets itself)."""
        self._watched_tasks = set()

    def release_locked(self, caller: CallerKey, pid: int | None = None) -> None:
        """*Locked.* End every lease ``caller`` holds (``pid``: read by the caller)."""
        held = _registry(self._path, pid).by_caller.pop(caller, None)
        if held:
            for lease in held.values():
                self._table.release(lease.entry, lease.tag, lease.owner, lease.token)

    def release_all_locked(self) -> None:
        """*Locked.* End every lease taken through this instance (at close)."""
        mine = self._my_owner()
        registry = self._held
        for caller, held in list(registry.items()):
            for digest, lease in list(held.items()):
                if lease.owner == mine:
                    self._table.release(lease.entry, lease.tag, lease.owner, lease.token)
                    held.pop(digest, None)
            if not held:
                registry.pop(caller, None)

    def release(self, caller: CallerKey) -> None:
        """End ``caller``'s leases, taking the lock (bounded by lock_timeout)."""
        if self._held.get(caller) and not self._cache.closed:
            done, _ = self._cache._run_locked(self.release_locked, caller)
            if not done:  # they lapse at their deadline; waiters stay bounded
                self._held.pop(caller, None)

    def _my_owner(self) -> int:
        cache = self._cache
        slot = cache._resources.slot
        counts = cache._counters.view
        if slot < 0 or counts is None:
            return -1
        return owner_word(slot, int(counts[_arena.SLOT_GENERATION]))

    # -- the locked decision --------------------------------------------------------

    def _owner_word(self, pid: int | None) -> int | None:
        """This instance's owner word (None: no owner slot to name us by)."""
        cache = self._cache
        counts = cache._counters.slot_view(pid)
        if counts is None:
            return None
        return owner_word(cache._resources.slot, int(counts[_arena.SLOT_GENERATION]))

    def _held_now(
        self, caller: CallerKey, digest: bytes, held: _Held, pid: int | None
    ) -> Step:
        """*Locked.* Note that ``caller`` now holds ``digest``'s lease ``held``."""
        _registry(self._path, pid).by_caller.setdefault(caller, {})[digest] = held
        LEASE_CALLER.set(caller)
        return _OWN

    def _owner_alive(self, lease: Lease) -> bool:
        slot = lease.slot
        if not 0 <= slot < _arena.PROCESS_SLOTS:
            return False
        cache = self._cache
        view = cache._arena.owner_slot(slot)
        try:
            generation = int(view[_arena.SLOT_GENERATION]) & 0xFFFFFFFF
        finally:
            view.release()
        if generation != lease.generation:
            return False  # the slot was claimed anew: its lease holder is gone
        if slot == cache._resources.slot:
            return True  # this very instance: alive by definition
        return cache._resources.owner_file.is_alive(slot)

    def patience_deadline_ns(self) -> int:
        """When a lookup that starts waiting now stops waiting for one caller."""
        return time.monotonic_ns() + self._timeout_ns

    def step_locked(
        self,
        digest: bytes,
        caller: CallerKey,
        waited_on: Lease | None,
        patience_ns: int,
        pid: int | None = None,
    ) -> Step:
        """*Locked.* Hit, become the computing caller, wait, or go uncoalesced.

        ``waited_on``/``patience_ns``: the lease the calling lookup has been waiting
        for, and when it will have waited its own coalesce_timeout for that one.
        ``pid``: this process's pid, when the caller read it in this call.
        """
        cache = self._cache
        arena = cache._arena
        # The lock-free lookup is the fast one (compiled where built); under the lock
        # it can only see CONTENDED where a dead writer left a bucket mid-change.
        found = arena.find(digest, time.time())
        if found is CONTENDED:
            found = arena.find_locked(digest, time.time())
        if found is not None:
            assert not isinstance(found, Contended)
            return Step("hit", bytes(found))
        me = self._owner_word(pid)
        if me is None:
            return Step("uncoalesced")  # no owner slot to name us by
        tag, _ = split_digest(digest)
        now = time.monotonic_ns()
        token = _token(caller)
        lease = self._table.find(tag)
        if lease is not None and not (lease.owner == me and lease.caller == token):
            # Another caller's lease (maybe another thread or task of this instance).
            alive = lease.owner == me or self._owner_alive(lease)
            patient = waited_on is None or not same_holder(lease, waited_on) or now < patience_ns
            if now < lease.deadline_ns and patient and alive:
                return Step("wait", lease=lease)
            if alive:
                cache._count(_arena.SLOT_COALESCE_TIMEOUTS)
        index = self._table.take(
            tag, me, now + self._timeout_ns, token, now_ns=now, alive=self._owner_alive
        )
        if index < 0:
            return Step("uncoalesced")
        return self._held_now(caller, digest, _Held(index, tag, me, token), pid)

    def claim_fast(self, digest: bytes, caller: CallerKey, pid: int) -> Step | None:
        """The common first step of a miss in one compiled call, or None.

        Where the extension is built, one C call tries the writer lock once (never
        waiting) and looks the key up; when it is still absent, has no lease, and its
        lease window has a free entry, the call takes that entry exactly as
        :meth:`step_locked` would (a third off a miss, measured).  None: nothing was
        decided or written (the lock was busy, a lease of the key exists, the window
        is full, a bucket was left mid-change, a crash test's step hook is set, no
        extension): run :meth:`step_locked`, which decides every case.
        """
        claim = self._claim
        if claim is None or _arena.step_hook is not None:
            return None
        me = self._owner_word(pid)
        if me is None:
            return None
        token = _token(caller)
        got = claim(
            self._cache._lock.thread_fd(pid), digest, time.time(), me,
            time.monotonic_ns() + self._timeout_ns, token, pid,
        )  # fmt: skip
        if got is None:
            return None
        if type(got) is int:
            held = _Held(got, split_digest(digest)[0], me, token)
            return self._held_now(caller, digest, held, pid)
        assert isinstance(got, memoryview)
        return Step("hit", got)

    def watch_task(self, caller: CallerKey) -> None:
        """End the task's leases when it finishes or is cancelled."""
        task = asyncio.current_task()
        if task is None or caller[1] in self._watched_tasks:
            return
        self._watched_tasks.add(caller[1])

        def done(_: object) -> None:
            self._watched_tasks.discard(caller[1])
            if not self._cache.closed:
                self.release(caller)

        task.add_done_callback(done)

    # -- waiting ---------------------------------------------------------------------

    def _still_waiting(self, lease: Lease, checked: list[float], patience_ns: int) -> bool:
        """Is the lease we wait for still live, and are we still willing? (lock-free)"""
        if self._cache.closed:
            return False
        if time.monotonic_ns() >= patience_ns:
            return False
        current = self._table.read(lease.entry)
        if current is None:
            return True  # being rewritten right now: look again next poll
        if not same_holder(current, lease):
            return False  # ended, or taken over by another waiter
        if time.monotonic_ns() >= current.deadline_ns:
            return False
        now = time.monotonic()
        if now - checked[0] >= _LIVENESS_EVERY_S:
            checked[0] = now
            return self._owner_alive(current)
        return True

    def wait(
        self, lease: Lease, patience_ns: int, poll: Callable[[], memoryview | None]
    ) -> memoryview | None:
        """Poll until the value appears (returned) or the lease ends (None)."""
        delay = _FIRST_POLL_S
        checked = [time.monotonic()]
        while True:
            time.sleep(delay)
            if not self._cache.closed:
                value = poll()
                if value is not None:
                    return value
            if not self._still_waiting(lease, checked, patience_ns):
                return None
            delay = min(delay * 2, _MAX_POLL_S)

    async def await_value(
        self, lease: Lease, patience_ns: int, poll: Callable[[], memoryview | None]
    ) -> memoryview | None:
        """:meth:`wait` for coroutines: sleeps with ``asyncio.sleep``."""
        delay = _FIRST_POLL_S
        checked = [time.monotonic()]
        while True:
            await asyncio.sleep(delay)
            if not self._cache.closed:
                value = poll()
                if value is not None:
                    return value
            if not self._still_waiting(lease, checked, patience_ns):
                return None
            delay = min(delay * 2, _MAX_POLL_S)


"""Exact statistics (issue 8, defect 4): every hit and miss is counted, whether the
process ends with ``os._exit`` (multiprocessing children), is a recycled pool
worker, or lives in another pid namespace sharing the segment directory (containers
with a shared IPC namespace) where pid numbers say nothing about liveness.

Also defect 5: a huge ``lock_timeout`` is accepted and works under contention.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import select
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import _robust_helpers as robust_helpers
import pytest
from _robust_helpers import (
    LLM,
    child_env,
    fork_child_counts,
    helper_command,
    hit_inherited_or_passed,
    hold_writer_lock,
    keep_updating,
    kill_process_group,
    parse_result,
    read_line,
)
from _samples import CacheFactory
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.outputs import Generation

from shmcache import SharedMemoryCache

PROMPT = "counted"
VALUE = "the counted value"


@contextlib.contextmanager
def _background_writers(cache: SharedMemoryCache, count: int) -> Iterator[None]:
    """``count`` fork processes re-storing the counted entry: the writer lock is busy
    all along, as in a server that also writes, and the entry is never evicted."""
    context = multiprocessing.get_context("fork")
    stop = context.Event()
    writers = [context.Process(target=keep_updating, args=(cache, PROMPT, VALUE, stop))
               for _ in range(count)]
    for writer in writers:
        writer.start()
    try:
        yield
    finally:
        stop.set()
        for writer in writers:
            writer.join(timeout=30)
            if writer.is_alive():
                writer.kill()
                writer.join(timeout=10)


def _stored(make_cache: CacheFactory, name: str, **kwargs: object) -> SharedMemoryCache:
    cache = make_cache(name, **kwargs)
    cache.update(PROMPT, LLM, [Generation(text=VALUE)])
    return cache


@pytest.mark.timeout(90)
def test_sixty_fork_children_ending_with_os_exit_are_counted_exactly(
    make_cache: CacheFactory,
) -> None:
    """60 multiprocessing ``fork`` children (which end with ``os._exit``), started
    together while another process keeps updating, 10 hits and 2 misses each: hits
    grow by exactly 600 and misses by 120."""
    cache = _stored(make_cache, "forked")
    context = multiprocessing.get_context("fork")
    with _background_writers(cache, 1):
        before = cache.stats()
        children = [
            context.Process(target=fork_child_counts, args=(cache, PROMPT, VALUE, 10, 2))
            for _ in range(60)
        ]
        try:
            for child in children:
                child.start()
            for child in children:
                child.join(timeout=60)
        finally:
            for child in children:
                if child.is_alive():
                    child.kill()
                    child.join(timeout=10)
        codes = [child.exitcode for child in children]
    after = cache.stats()
    counted = (after.hits - before.hits, after.misses - before.misses)
    print(f"60 fork children: expected hits 600 misses 120, counted {counted}")
    assert codes == [0] * 60
    assert counted == (600, 120)


@pytest.mark.timeout(90)
def test_recycled_pool_workers_are_counted_exactly(make_cache: CacheFactory) -> None:
    """A fork ``Pool`` with ``maxtasksperchild=1`` (a new worker per task) while two
    other processes keep updating: 60 tasks, two thirds using the instance the
    workers inherited and one third one passed pickled, 7 hits and 1 miss each:
    exactly 420 hits and 60 misses."""
    cache = _stored(make_cache, "recycled")
    robust_helpers.INHERITED[:] = [cache]
    try:
        with _background_writers(cache, 2):
            before = cache.stats()
            tasks = [(cache, i % 3 != 0, PROMPT, VALUE, 7, 1) for i in range(60)]
            with multiprocessing.get_context("fork").Pool(3, maxtasksperchild=1) as pool:
                good = pool.starmap(hit_inherited_or_passed, tasks, chunksize=1)
                pool.close()
                pool.join()
    finally:
        robust_helpers.INHERITED.clear()
    after = cache.stats()
    counted = (after.hits - before.hits, after.misses - before.misses)
    print(f"60 recycled workers: expected hits 420 misses 60, counted {counted}")
    assert good == [8] * 60
    assert counted == (420, 60)


def _unshare() -> str:
    found = shutil.which("unshare")
    if found is None:
        pytest.fail("unshare (util-linux) is not installed; .ci/run installs it")
    probe = subprocess.run([found, "--pid", "--fork", "true"], capture_output=True,
                           text=True, timeout=30, check=False)
    if probe.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"unshare --pid --fork fails in CI: {probe.stderr.strip()}")
        pytest.skip(f"cannot make a pid namespace here: {probe.stderr.strip()}")
    return found


NAMESPACES = 3
NS_HITS = 20_000
NS_MISSES = 2_000


@pytest.mark.timeout(90)
def test_processes_in_separate_pid_namespaces_are_counted_exactly(
    make_cache: CacheFactory, cache_dir: Path
) -> None:
    """3 "containers" (``unshare --pid --fork``) share the segment directory; in each,
    pid 1 forks the app process after using up a different number of pids, so each
    app's pid is dead or foreign in the others' namespaces.  The apps count
    concurrently: hits and misses add up exactly."""
    unshare = _unshare()
    cache = _stored(make_cache, "namespaces")
    before = cache.stats()
    containers: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(NAMESPACES):
            containers.append(subprocess.Popen(
                [unshare, "--pid", "--fork", "--kill-child",
                 *helper_command("namespace_container", "namespaces", str(cache_dir), 2 * i + 1,
                                 NS_HITS, NS_MISSES, PROMPT, VALUE)],
                env=child_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                bufsize=0, start_new_session=True,
            ))
        app_pids = []
        for container in containers:
            assert container.stdout is not None
            line = read_line(container.stdout, 60).decode()
            assert line.startswith("READY "), line
            app_pids.append(int(line.split()[1]))
        for container in containers:  # all start counting together
            assert container.stdin is not None
            container.stdin.write(b"go\n")
            container.stdin.close()
        results = []
        for container in containers:
            assert container.stdout is not None
            results.append(parse_result(read_line(container.stdout, 60).decode()))
            assert container.wait(timeout=60) == 0
    finally:
        for container in containers:
            kill_process_group(container)
    after = cache.stats()
    counted = (after.hits - before.hits, after.misses - before.misses)
    expected = (NAMESPACES * NS_HITS, NAMESPACES * NS_MISSES)
    print(f"{NAMESPACES} pid namespaces (app pids {app_pids}): expected {expected}, "
          f"counted {counted}")
    assert len(set(app_pids)) == NAMESPACES  # pid numbers differ between namespaces
    assert [r["good"] for r in results] == [NS_HITS + NS_MISSES] * NAMESPACES
    assert counted == expected


# -- defect 5: lock_timeout beyond threading.TIMEOUT_MAX ---------------------------

HUGE_TIMEOUT_S = 1e10
HOLD_S = 0.3  # how long the holder keeps the lock: the contention being tested


def _hold_in_thread(cache: SharedMemoryCache, held: threading.Event,
                    releasing: threading.Event) -> None:
    with hold_writer_lock(cache):
        held.set()
        time.sleep(HOLD_S)  # holding the lock is the stimulus, not a synchronisation
        releasing.set()


def _hold_in_child(cache: SharedMemoryCache, write_fd: int) -> None:
    with hold_writer_lock(cache):
        os.write(write_fd, b"H")
        time.sleep(HOLD_S)
        os.write(write_fd, b"R")  # before the release: the waiter cannot be earlier


@pytest.mark.timeout(60)
@pytest.mark.parametrize("holder", ["thread", "process"])
def test_huge_lock_timeout_waits_for_a_contended_lock(
    make_cache: CacheFactory, holder: str
) -> None:
    """``lock_timeout=1e10`` (beyond ``threading.TIMEOUT_MAX``) is accepted; a
    ``model.invoke`` and a ``clear()`` that meet the lock held by another thread or
    process wait for it and succeed, with no OverflowError."""
    cache = make_cache("huge", lock_timeout=HUGE_TIMEOUT_S)
    assert cache.lock_timeout == HUGE_TIMEOUT_S
    model = FakeListChatModel(responses=["the answer"], cache=cache)

    def contended(call: str) -> None:
        if holder == "thread":
            held, releasing = threading.Event(), threading.Event()
            thread = threading.Thread(target=_hold_in_thread, args=(cache, held, releasing))
            thread.start()
            try:
                assert held.wait(30)
                assert not releasing.is_set(), "the hold ended before the call: no contention"
                run(call)
                assert releasing.is_set(), f"{call} did not wait for the holder"
            finally:
                thread.join(timeout=30)
            return
        read_fd, write_fd = os.pipe()
        child = multiprocessing.get_context("fork").Process(
            target=_hold_in_child, args=(cache, write_fd)
        )
        child.start()
        try:
            os.close(write_fd)
            ready, _, _ = select.select([read_fd], [], [], 30)
            assert ready and os.read(read_fd, 1) == b"H"
            assert select.select([read_fd], [], [], 0)[0] == [], "no contention"
            run(call)
            assert os.read(read_fd, 1) == b"R", f"{call} did not wait for the holder"
            child.join(timeout=30)
            assert child.exitcode == 0
        finally:
            os.close(read_fd)
            if child.is_alive():
                child.kill()
                child.join(timeout=10)

    def run(call: str) -> None:
        if call == "invoke":
            assert model.invoke("a question").content == "the answer"
        else:
            cache.clear()

    skipped = cache.stats().skipped
    contended("invoke")  # a miss, then an update that waits for the lock
    assert cache.stats().skipped == skipped
    assert model.invoke("a question").content == "the answer"  # now a hit
    assert cache.stats().hits >= 1
    contended("clear")
    assert cache.stats().entries == 0

"""Shared by the coalescing tests (issue 9) and their child programs and WSGI apps.

* :class:`BurstChatModel`: a LangChain chat model whose every real call appends one
  JSON line to a file (``O_APPEND``), so calls made by any process on the host are
  counted by reading one file; a per-instance hook may block, record or raise inside
  the call.
* :func:`instrument_waits`: the one place that touches a shmcache internal — it
  notes each time a lookup starts waiting for another caller, so a test can release
  the computing caller once the others are *known* to wait (no sleeps).
* Small process helpers: bounded polls, line files, pipes with deadlines.

Everything here also runs in ``spawn`` children and in gunicorn/uWSGI workers, which
import it by name (``tests/coalesce_apps`` is put on their ``PYTHONPATH``).
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseChatModel
from langchain_core.load import dumps
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from pydantic import PrivateAttr

import shmcache
from shmcache import SharedMemoryCache

APPS_DIR: Final = Path(__file__).resolve().parent
TESTS_DIR: Final = APPS_DIR.parent


def expected_answer(prompt: str) -> str:
    """What :class:`BurstChatModel` answers to ``prompt`` (kept independent of it)."""
    return f"answer to <{prompt}>"


# -- line files: counts that every process can add to --------------------------------


def append_line(path: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Append one JSON line with a single ``O_APPEND`` write (atomic between processes)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
    finally:
        os.close(fd)


def read_lines(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The JSON lines of a line file (a missing file has none)."""
    try:
        with open(path) as handle:
            return [json.loads(line) for line in handle if line.strip()]
    except FileNotFoundError:
        return []


def count_lines(path: str | os.PathLike[str]) -> int:
    """How many lines a line file has (a missing file has none)."""
    try:
        with open(path, "rb") as handle:
            return sum(1 for _ in handle)
    except FileNotFoundError:
        return 0


def poll_until(
    predicate: Callable[[], bool], deadline_s: float, what: str, interval_s: float = 0.002
) -> float:
    """Poll ``predicate`` until true; return the seconds it took.

    A bounded poll with a deadline (the predicate decides, not the sleep).

    Raises:
        AssertionError: not true within ``deadline_s``.
    """
    start = time.monotonic()
    end = start + deadline_s
    while not predicate():
        if time.monotonic() >= end:
            raise AssertionError(f"timed out after {deadline_s} s waiting for {what}")
        time.sleep(interval_s)
    return time.monotonic() - start


async def apoll_until(
    predicate: Callable[[], bool], deadline_s: float, what: str, interval_s: float = 0.002
) -> float:
    """:func:`poll_until` for coroutines (sleeps with ``asyncio.sleep``)."""
    start = time.monotonic()
    end = start + deadline_s
    while not predicate():
        if time.monotonic() >= end:
            raise AssertionError(f"timed out after {deadline_s} s waiting for {what}")
        await asyncio.sleep(interval_s)
    return time.monotonic() - start


# -- pipes ------------------------------------------------------------------------------


def send(fd: int, message: str) -> None:
    """Write one line to a pipe."""
    os.write(fd, (message + "\n").encode())


def receive(fd: int, deadline_s: float) -> str:
    """Read one line (written by :func:`send`) from a pipe, by a deadline.

    Raises:
        AssertionError: nothing within ``deadline_s``, or the writer closed the pipe.
    """
    end = time.monotonic() + deadline_s
    data = b""
    while not data.endswith(b"\n"):
        remaining = end - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no line on fd {fd} within {deadline_s} s (got {data!r})")
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            chunk = os.read(fd, 1)
            if not chunk:
                raise AssertionError(f"fd {fd} closed by its writer (got {data!r})")
            data += chunk
    return data.decode().rstrip("\n")


# -- the model --------------------------------------------------------------------------

Hook = Callable[[str], object]
AsyncHook = Callable[[str], Awaitable[object]]


class BurstChatModel(BaseChatModel):
    """A deterministic chat model that records every real call in ``calls_file``.

    Each call appends ``{"pid", "thread", "prompt", "t"}`` (``t``: CLOCK_MONOTONIC,
    the same clock in every process of the host), then runs the instance's hook —
    which may block until the test releases it, or raise — then answers
    :func:`expected_answer`.  Hooks are private attributes: they are not part of the
    model's parameters, so every process's model has the same cache key.
    """

    calls_file: str

    _hook: Hook | None = PrivateAttr(default=None)
    _ahook: AsyncHook | None = PrivateAttr(default=None)

    @property
    def _llm_type(self) -> str:
        return "burst-fake"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": "burst-fake-1", "calls_file": self.calls_file}

    def with_hooks(
        self, hook: Hook | None = None, ahook: AsyncHook | None = None
    ) -> BurstChatModel:
        """Set the hooks run inside each real call (sync and async); returns self."""
        self._hook = hook
        self._ahook = ahook
        return self

    def _record(self, messages: list[BaseMessage]) -> str:
        prompt = str(messages[-1].content)
        append_line(
            self.calls_file,
            {"pid": os.getpid(), "thread": threading.get_ident(), "prompt": prompt,
             "t": time.monotonic()},
        )
        return prompt

    @staticmethod
    def _result(prompt: str) -> ChatResult:
        return ChatResult(
            generations=[ChatGeneration(message=AIMessage(content=expected_answer(prompt)))]
        )

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        prompt = self._record(messages)
        if self._hook is not None:
            self._hook(prompt)
        return self._result(prompt)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        prompt = self._record(messages)
        if self._ahook is not None:
            await self._ahook(prompt)
        elif self._hook is not None:
            self._hook(prompt)
        return self._result(prompt)


def cache_key(model: BaseChatModel, prompt: str) -> tuple[str, str]:
    """The ``(prompt, llm_string)`` under which ``model.invoke(prompt)`` is cached.

    What langchain_core 1.8's chat models look up: the serialized message list, and
    the model's parameters (``_get_llm_string``, a langchain_core internal).
    """
    return dumps([HumanMessage(content=prompt)]), model._get_llm_string()


# -- the one place that uses a shmcache internal ------------------------------------------


class WaitCounter:
    """How many times lookups of one cache instance started waiting for another caller."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self.count = 0

    def note(self) -> None:
        with self._guard:
            self.count += 1


def instrument_waits(
    cache: SharedMemoryCache, waits_file: str | os.PathLike[str] | None = None
) -> WaitCounter:
    """Note each wait of ``cache``'s lookups for another computing caller.

    Each time a lookup (sync or async) starts waiting, the returned counter goes up
    and, with ``waits_file``, a line ``{"pid": ...}`` is appended to it (so waits in
    other processes count too).  The waiting itself is unchanged.

    Internal API: wraps ``cache._coalescer.wait`` and ``.await_value``, the only
    shmcache internals these tests touch, so a rewrite of ``_coalesce.py`` changes
    this one function.
    """
    coalescer = cache._coalescer
    assert coalescer is not None, "instrument_waits needs a cache opened with coalesce=True"
    counter = WaitCounter()
    wait, await_value = coalescer.wait, coalescer.await_value

    def note() -> None:
        counter.note()
        if waits_file is not None:
            append_line(waits_file, {"pid": os.getpid(), "thread": threading.get_ident()})

    def waiting(*args: Any, **kwargs: Any) -> Any:
        note()
        return wait(*args, **kwargs)

    async def awaiting(*args: Any, **kwargs: Any) -> Any:
        note()
        return await await_value(*args, **kwargs)

    coalescer.wait = waiting  # type: ignore[method-assign]
    coalescer.await_value = awaiting  # type: ignore[method-assign]
    return counter


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child program or server: it imports the very shmcache
    this process imported and this module (``tests/coalesce_apps``)."""
    env = dict(os.environ)
    package_root = str(Path(shmcache.__file__).resolve().parent.parent)
    parts = [str(APPS_DIR), package_root]
    if env.get("PYTHONPATH"):
        parts.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env["PYTHONUNBUFFERED"] = "1"
    for tracing in ("LANGCHAIN_TRACING_V2", "LANGCHAIN_TRACING", "LANGSMITH_TRACING"):
        env.pop(tracing, None)
    env.update(extra)
    return env


# -- spawn children of the burst test -------------------------------------------------------


def burst_child(
    name: str,
    directory: str,
    calls_file: str,
    waits_file: str,
    waiters: int,
    prompt: str,
    barrier: Any,
    result: Any,
) -> None:
    """One process of a burst: open the cache, wait at the barrier, ``invoke`` once.

    Whoever computes holds its model call until ``waiters`` waits are noted in
    ``waits_file`` (at most 20 s: then it answers anyway and the test's counts
    say what went wrong).  Sends ``(pid, answer text)`` on the ``result`` pipe end.
    """
    from langchain_core.globals import set_llm_cache

    cache = SharedMemoryCache(name, directory=directory, coalesce_timeout=30.0)
    set_llm_cache(cache)
    instrument_waits(cache, waits_file)

    def hold(_: str) -> None:
        deadline = time.monotonic() + 20.0
        while count_lines(waits_file) < waiters and time.monotonic() < deadline:
            time.sleep(0.002)  # a bounded poll: the waits file decides

    model = BurstChatModel(calls_file=calls_file).with_hooks(hold)
    barrier.wait(timeout=60)
    answer = model.invoke(prompt)
    result.send((os.getpid(), str(answer.content)))
    result.close()
    cache.close()

"""A deterministic, slow stand-in for a real chat model, shared by the examples.

``SlowEchoChatModel`` behaves like a remote provider as far as the cache can tell:
every real call takes ``delay_s`` seconds and its answer depends only on the prompt.
Each real call (never a cache hit) appends one line to ``calls_file`` with a single
``O_APPEND`` write, so a test or a demo can count model calls made by *every*
process on the host by counting lines in one file.

Environment variables (read when the model is constructed):

* ``SHMCACHE_DEMO_DELAY``: seconds per model call (default ``0.2``).
* ``SHMCACHE_DEMO_CALLS_FILE``: path of the call-count file (default: no file).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from pydantic import Field

__all__ = ["SlowEchoChatModel", "count_calls", "expected_answer"]

DEFAULT_DELAY_S = 0.2


def _env_delay_s() -> float:
    return float(os.environ.get("SHMCACHE_DEMO_DELAY", DEFAULT_DELAY_S))


def _env_calls_file() -> str | None:
    return os.environ.get("SHMCACHE_DEMO_CALLS_FILE") or None


def expected_answer(prompt: str, model_name: str = "slow-echo-1") -> str:
    """Return the answer ``SlowEchoChatModel`` gives to ``prompt``.

    Args:
        prompt: The text of the last message sent to the model.
        model_name: The model's ``model_name``.

    Returns:
        The deterministic answer text.
    """
    return f"[{model_name}] {prompt[::-1]} ({len(prompt.split())} words)"


def count_calls(calls_file: str | os.PathLike[str]) -> int:
    """Return how many real model calls were recorded in ``calls_file``.

    Args:
        calls_file: The file the models appended to; a missing file means none.

    Returns:
        The number of lines in the file.
    """
    try:
        with open(calls_file, "rb") as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


class SlowEchoChatModel(BaseChatModel):
    """Chat model whose answer is a pure function of the prompt, after a delay.

    Only ``model_name`` identifies the model to the cache (``_identifying_params``):
    the delay and the count file do not change answers, so processes configured
    with different ones still share cache entries.
    """

    model_name: str = "slow-echo-1"
    delay_s: float = Field(default_factory=_env_delay_s)
    calls_file: str | None = Field(default_factory=_env_calls_file)

    @property
    def _llm_type(self) -> str:
        return "slow-echo"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name}

    def _answer(self, messages: list[BaseMessage]) -> ChatResult:
        prompt = messages[-1].text if messages else ""
        self._record_call(prompt)
        message = AIMessage(
            content=expected_answer(prompt, self.model_name),
            response_metadata={"model_name": self.model_name},
        )
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _record_call(self, prompt: str) -> None:
        if self.calls_file is None:
            return
        # One write() on an O_APPEND fd: lines from concurrent processes never
        # interleave, so the line count is the exact number of calls.
        line = f"{os.getpid()}\t{json.dumps(prompt)}\n".encode()
        fd = os.open(self.calls_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        """Answer after blocking for ``delay_s`` (a sync provider's network wait)."""
        time.sleep(self.delay_s)
        return self._answer(messages)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        """Answer after awaiting ``delay_s``; the event loop keeps running meanwhile."""
        await asyncio.sleep(self.delay_s)
        return self._answer(messages)

"""Sample values and a fake chat model shared by the tests."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult, Generation

from shmcache import SharedMemoryCache

# The type of the ``make_cache`` fixture (see conftest.py).
CacheFactory = Callable[..., SharedMemoryCache]


def chat_generation(text: str = "The weather in Paris is mild. " * 30) -> ChatGeneration:
    """A ~1 KB ChatGeneration with a tool call and usage metadata, as models return."""
    return ChatGeneration(
        message=AIMessage(
            content=text,
            id="run-1234",
            tool_calls=[
                {"name": "get_weather", "args": {"city": "Paris", "days": 3}, "id": "call_1"}
            ],
            usage_metadata={
                "input_tokens": 120,
                "output_tokens": 250,
                "total_tokens": 370,
                "input_token_details": {"cache_read": 100},
                "output_token_details": {"reasoning": 20},
            },
            response_metadata={"model_name": "fake-1", "finish_reason": "tool_calls"},
        ),
        generation_info={"finish_reason": "tool_calls"},
    )


def text_generations(text: str) -> list[Generation]:
    """A one-element list of plain Generations."""
    return [Generation(text=text)]


class CountingChatModel(BaseChatModel):
    """A deterministic chat model that appends one line to ``count_file`` per call.

    Counting in a file (O_APPEND) makes calls made in any process visible.
    """

    count_file: str

    @property
    def _llm_type(self) -> str:
        return "counting-fake"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": "counting-fake-1"}

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        fd = os.open(self.count_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, f"{os.getpid()}\n".encode())
        finally:
            os.close(fd)
        prompt = str(messages[-1].content)
        message = AIMessage(
            content=f"answer to {prompt}",
            tool_calls=[{"name": "lookup", "args": {"q": prompt}, "id": "call_9"}],
            usage_metadata={"input_tokens": 5, "output_tokens": 7, "total_tokens": 12},
        )
        return ChatResult(generations=[ChatGeneration(message=message)])


def model_calls(count_file: str) -> int:
    """How many times any process called a CountingChatModel writing to ``count_file``."""
    try:
        with open(count_file) as handle:
            return sum(1 for _ in handle)
    except FileNotFoundError:
        return 0

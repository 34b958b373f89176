"""A stand-in chat model whose only job is to let LangChain build a real llm_string."""

from __future__ import annotations

from typing import Any, Final

from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import BaseMessage
from langchain_core.outputs import ChatResult


class BenchChatModel(BaseChatModel):
    """A serializable stand-in with an OpenAI-like configuration (never called).

    Only used to let LangChain itself build the ``llm_string`` a real chat model would
    produce; ``_generate`` is never reached by the benchmark.
    """

    model_name: str = "gpt-4o-mini"
    temperature: float = 0.2
    max_tokens: int | None = 1024
    top_p: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    n: int = 1
    seed: int | None = 42
    request_timeout: float | None = 60.0
    max_retries: int = 2
    streaming: bool = False
    base_url: str | None = "https://api.openai.com/v1"

    @classmethod
    def is_lc_serializable(cls) -> bool:
        """Serializable like the provider chat models, so the llm_string is a JSON dump."""
        return True

    @classmethod
    def get_lc_namespace(cls) -> list[str]:
        """Pretend to live where a provider package would put it."""
        return ["langchain", "chat_models", "openai"]

    @property
    def _llm_type(self) -> str:
        return "openai-chat"

    def _generate(self, messages: list[BaseMessage], *args: Any, **kwargs: Any) -> ChatResult:
        raise NotImplementedError("BenchChatModel only builds llm_strings")


TOOL_SCHEMA: Final = {
    "type": "function",
    "function": {
        "name": "get_order_status",
        "description": "Look up the shipping status of an order by its id.",
        "parameters": {
            "type": "object",
            "properties": {"order_id": {"type": "string", "description": "Order id"}},
            "required": ["order_id"],
        },
    },
}

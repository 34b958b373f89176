"""The benchmark workload: LangChain-shaped prompts, an llm_string and cached values.

Everything here is deterministic, so every worker process rebuilds exactly the same
keys and values from a few integers instead of receiving them over a pipe:

* ``prompt(i)`` is what a chat model passes to ``BaseCache.lookup``: the
  ``langchain_core.load.dumps`` of a short conversation (system + human message,
  sometimes a prior exchange), 200 to 600 characters, unique per ``i``.
* ``llm_string()`` is what ``BaseChatModel._get_llm_string`` builds for a serializable,
  OpenAI-like chat model configuration with a bound tool and a ``stop`` list.
* ``chat_value(i)`` is a ``[ChatGeneration]`` whose ``AIMessage`` carries ~1 KB of text,
  one tool call, ``usage_metadata`` with token details and response metadata;
  ``plain_value(i)`` is the plain-text ``[Generation]`` variant an LLM (not chat) stores.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator, Sequence
from typing import Any, Final

from langchain_core.load import dumps
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from langchain_core.outputs import ChatGeneration, Generation

VALUE_VARIANTS: Final = 16
"""Distinct values cycled over the keys: entry ``i`` stores variant ``i % VALUE_VARIANTS``."""

CHAT_TEXT_CHARS: Final = 1024
"""Length of the AIMessage text in the standard chat value."""

_MARKER: Final = "@@IDX@@"
"""Placeholder spliced into prompt templates; replaced by the entry number."""

_SYSTEM_PROMPTS: Final = (
    "You are a helpful assistant.",
    "You are a meticulous data analyst. Answer concisely and cite the tables you used.",
    "You are a support agent for an online bookshop. Be polite; never invent order data.",
    "You are a senior Python reviewer. Point out bugs first, style second.",
)
_QUESTIONS: Final = (
    "What is the capital of France?",
    "Summarise the attached quarterly report in three bullet points and flag any risk.",
    "Where is my order? It was supposed to arrive on Tuesday and tracking shows nothing.",
    "Why does this function leak file descriptors when the network is down?",
    "Translate 'the cache is shared by every process on the host' into German.",
)
_WORDS: Final = (
    "cache",
    "shared",
    "memory",
    "process",
    "lookup",
    "update",
    "segment",
    "ring",
    "index",
    "bucket",
    "record",
    "value",
    "prompt",
    "model",
    "token",
    "latency",
    "throughput",
    "reader",
    "writer",
    "lock",
    "version",
    "digest",
    "arena",
)


@functools.lru_cache(maxsize=1)
def llm_string() -> str:
    """The llm_string LangChain builds for ``BenchChatModel`` called with one bound tool.

    Computed once in the parent and shipped to workers inside ``PhaseConfig.llm``, so that
    workers need not import ``langchain_core.language_models`` (~0.3 s per process).
    """
    from benchmarks.chat_model import TOOL_SCHEMA, BenchChatModel

    model = BenchChatModel()
    return model._get_llm_string(stop=["\nObservation:"], tools=[TOOL_SCHEMA])


def _conversation(variant: int, content: str) -> list[BaseMessage]:
    """Messages of prompt template ``variant`` with the last human turn set to ``content``."""
    if variant % 3 == 2:
        return [
            HumanMessage(content="Hi, a question."),
            AIMessage(content="Sure?"),
            HumanMessage(content=content),
        ]
    system = SystemMessage(content=_SYSTEM_PROMPTS[variant % len(_SYSTEM_PROMPTS)])
    return [system, HumanMessage(content=content)]


_PROMPT_VARIANTS: Final = 12


@functools.lru_cache(maxsize=1)
def _prompt_templates() -> tuple[tuple[str, str], ...]:
    """(prefix, suffix) pairs around the entry number, from real ``dumps`` output."""
    templates = []
    for variant in range(_PROMPT_VARIANTS):
        question = _QUESTIONS[variant % len(_QUESTIONS)]
        content = f"{question} (ticket {_MARKER})"
        text = dumps(_conversation(variant, content))
        prefix, suffix = text.split(_MARKER)
        templates.append((prefix, suffix))
    return tuple(templates)


def prompt_messages(i: int) -> list[BaseMessage]:
    """The conversation whose dump is ``prompt(i)`` (used to validate the fast path)."""
    question = _QUESTIONS[(i % _PROMPT_VARIANTS) % len(_QUESTIONS)]
    return _conversation(i % _PROMPT_VARIANTS, f"{question} (ticket {i})")


def prompt(i: int) -> str:
    """Prompt string of entry ``i`` exactly as ``dumps(prompt_messages(i))`` would give it.

    Spliced from a pre-dumped template so that a writer can generate a million keys in
    about a second; ``tests/test_benchmarks_smoke.py`` checks the equivalence.
    """
    prefix, suffix = _prompt_templates()[i % _PROMPT_VARIANTS]
    return f"{prefix}{i}{suffix}"


def missing_prompt(i: int) -> str:
    """A prompt never stored by the benchmark (negative ticket numbers)."""
    return prompt(-1 - i)


def _text(variant: int, chars: int) -> str:
    """Deterministic prose of exactly ``chars`` characters."""
    words: list[str] = []
    total = 0
    k = variant
    while total < chars:
        word = _WORDS[(k * 7 + variant) % len(_WORDS)]
        words.append(word)
        total += len(word) + 1
        k += 1
    return " ".join(words)[:chars]


def make_chat_value(variant: int, text_chars: int = CHAT_TEXT_CHARS) -> list[ChatGeneration]:
    """A ``[ChatGeneration]`` like a tool-calling OpenAI chat model returns.

    Args:
        variant: Selects the text, ids and token counts.
        text_chars: Length of the AIMessage ``content``.
    """
    input_tokens = 350 + variant
    output_tokens = 220 + text_chars // 4
    message = AIMessage(
        content=_text(variant, text_chars),
        tool_calls=[
            {
                "name": "get_order_status",
                "args": {"order_id": f"A-{10_000 + variant}", "verbose": True},
                "id": f"call_{variant:04d}Xq3bT9mWvLr2s",
                "type": "tool_call",
            }
        ],
        usage_metadata={
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "total_tokens": input_tokens + output_tokens,
            "input_token_details": {"cache_read": 256, "audio": 0},
            "output_token_details": {"reasoning": 64, "audio": 0},
        },
        response_metadata={
            "finish_reason": "tool_calls",
            "model_name": "gpt-4o-mini-2024-07-18",
            "system_fingerprint": "fp_0ba0d124f1",
            "model_provider": "openai",
            "token_usage": {
                "prompt_tokens": input_tokens,
                "completion_tokens": output_tokens,
                "total_tokens": input_tokens + output_tokens,
            },
        },
        id=f"lc_run--0b7e8f2a-{variant:04d}-4c1e-9d3a-5f6b7c8d9e0f",
    )
    return [
        ChatGeneration(
            message=message,
            generation_info={"finish_reason": "tool_calls", "logprobs": None},
        )
    ]


def make_plain_value(variant: int, text_chars: int = CHAT_TEXT_CHARS) -> list[Generation]:
    """The plain-text ``[Generation]`` variant (what a completion LLM stores)."""
    return [
        Generation(
            text=_text(variant + 1000, text_chars),
            generation_info={"finish_reason": "stop", "logprobs": None},
        )
    ]


@functools.lru_cache(maxsize=VALUE_VARIANTS)
def _chat_variant(variant: int) -> list[ChatGeneration]:
    return make_chat_value(variant)


@functools.lru_cache(maxsize=VALUE_VARIANTS)
def _plain_variant(variant: int) -> list[Generation]:
    return make_plain_value(variant)


def chat_value(i: int) -> list[ChatGeneration]:
    """The chat value stored under ``prompt(i)`` (shared object: do not mutate)."""
    return _chat_variant(i % VALUE_VARIANTS)


def plain_prompt(i: int) -> str:
    """Key of the plain-text entry ``i`` (a completion-style prompt string)."""
    return f"Human: {_QUESTIONS[i % len(_QUESTIONS)]} (ticket {i})\nAssistant:"


def plain_value(i: int) -> list[Generation]:
    """The plain ``[Generation]`` stored under ``plain_prompt(i)`` (do not mutate)."""
    return _plain_variant(i % VALUE_VARIANTS)


def sized_value(variant: int, value_bytes: int) -> list[ChatGeneration]:
    """A chat value whose message text is ``value_bytes`` characters (size curve)."""
    return make_chat_value(variant, text_chars=value_bytes)


def sample(n_total: int, k: int, seed: int) -> list[int]:
    """``k`` entry numbers drawn from ``range(n_total)`` (with replacement if needed)."""
    import random

    rng = random.Random(seed)
    if k <= n_total:
        return rng.sample(range(n_total), k)
    return [rng.randrange(n_total) for _ in range(k)]


def batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """Consecutive slices of ``items`` of at most ``size`` elements."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def describe() -> dict[str, Any]:
    """Sizes of the workload's strings and values, for the report."""
    import pickle

    prompts = [len(prompt(i)) for i in range(_PROMPT_VARIANTS * 3)]
    return {
        "prompt_chars_min": min(prompts),
        "prompt_chars_max": max(prompts),
        "llm_string_chars": len(llm_string()),
        "chat_value_pickle_bytes": len(pickle.dumps(chat_value(0), pickle.HIGHEST_PROTOCOL)),
        "plain_value_pickle_bytes": len(pickle.dumps(plain_value(0), pickle.HIGHEST_PROTOCOL)),
        "chat_value_json_chars": len(json.dumps(chat_value(0)[0].message.model_dump())),
        "value_variants": VALUE_VARIANTS,
    }

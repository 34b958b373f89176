"""Tests for the value codec (``shmcache._codec``).

Round trips of every supported class, refusals at encode time, and hostile bytes at
decode time (truncations, byte flips, random bytes, wrong-shaped msgpack, lying or
bomb-like compressed bodies), plain (format 1) and compressed (format 2) encodings.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import datetime
import enum
import math
import struct
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import langchain_core.messages as lc_messages
import msgpack
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    BaseMessageChunk,
    ChatMessage,
    ChatMessageChunk,
    FunctionMessage,
    FunctionMessageChunk,
    HumanMessage,
    HumanMessageChunk,
    RemoveMessage,
    SystemMessage,
    SystemMessageChunk,
    ToolMessage,
    ToolMessageChunk,
)
from langchain_core.outputs import (
    ChatGeneration,
    ChatGenerationChunk,
    Generation,
    GenerationChunk,
)
from pydantic import BaseModel

from shmcache import _accel, _compress
from shmcache._codec import (
    _COMPRESSED_HEADER,
    _HEADER,
    _MESSAGE_SPECS,
    FORMAT_VERSION,
    MAX_NESTING_DEPTH,
    CodecError,
    CodecVersionError,
    UnencodableValueError,
    _build_spec,
    decode_generations,
    decode_verified,
    encode_generations,
)
from shmcache._errors import ShmCacheError

REPO_ROOT = Path(__file__).resolve().parent.parent
SUBPROCESS_TIMEOUT_S = 60

# --------------------------------------------------------------------------- values

LONE_SURROGATES = "lo\ud800ne \udfff and a split pair \ud83d\ude00 end"


def rich_free_form() -> dict[str, Any]:
    """A free-form dict exercising every allowed leaf and nesting."""
    return {
        "text": "plain ascii",
        "unicode": "héllo wörld ✓ 😀",
        "surrogates": LONE_SURROGATES,
        LONE_SURROGATES: "surrogates in a key",
        "bytes": b"\x00\xff raw \x80",
        "empty_bytes": b"",
        "big": 2**64 - 1,
        "small": -(2**63),
        "neg": -7,
        "zero": 0,
        "float": 3.141592653589793,
        "neg_zero": -0.0,
        "inf": math.inf,
        "ninf": -math.inf,
        "tiny": 5e-324,
        "true": True,
        "false": False,
        "none": None,
        "empty_list": [],
        "empty_dict": {},
        "nested": {"a": [1, [2, [3, {"b": [None, "x", b"y", 1.5]}]]], "c": {"d": {"e": {}}}},
    }


def content_blocks() -> list[str | dict[Any, Any]]:
    """Message content as a list of str and block dicts, v0 and v1 style."""
    return [
        "a bare string block",
        {"type": "text", "text": "Hello " + LONE_SURROGATES},
        {"type": "image", "base64": "iVBORw0KGgo=", "mime_type": "image/png"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "reasoning", "reasoning": "thinking…", "extras": {"signature": b"sig"}},
        {"type": "tool_use", "id": "toolu_1", "name": "search", "input": {"q": "x"}},
        {"text": "legacy block without a type"},
    ]


def usage_metadata() -> dict[str, Any]:
    """Usage metadata with both detail dicts."""
    return {
        "input_tokens": 350,
        "output_tokens": 240,
        "total_tokens": 590,
        "input_token_details": {"audio": 10, "cache_creation": 200, "cache_read": 100},
        "output_token_details": {"audio": 10, "reasoning": 200},
    }


def tool_calls() -> list[dict[str, Any]]:
    return [
        {"name": "get_weather", "args": {"city": "Paris", "days": 3, "deep": rich_free_form()},
         "id": "call_1", "type": "tool_call"},
        {"name": "noop", "args": {}, "id": None, "type": "tool_call"},
    ]


def invalid_tool_calls() -> list[dict[str, Any]]:
    return [
        {"name": "broken", "args": "{not json", "id": "call_2", "error": "bad json",
         "type": "invalid_tool_call"},
    ]


def tool_call_chunks() -> list[dict[str, Any]]:
    return [
        {"name": "get_weather", "args": '{"city": "Paris"}', "id": "call_1", "index": 0,
         "type": "tool_call_chunk"},
    ]


def common_kwargs() -> dict[str, Any]:
    """Fields every message class has, all set to non-default values."""
    return {
        "content": content_blocks(),
        "additional_kwargs": rich_free_form(),
        "response_metadata": {"model_name": "m-1", "finish_reason": "stop", **rich_free_form()},
        "name": "alice " + LONE_SURROGATES,
        "id": "run-42",
    }


def make_message(cls: type[BaseMessage]) -> BaseMessage:
    """Build a validated message of ``cls`` with every field set richly."""
    kwargs = common_kwargs()
    if cls is AIMessage:
        kwargs.update(
            tool_calls=tool_calls(),
            invalid_tool_calls=invalid_tool_calls(),
            usage_metadata=usage_metadata(),
        )
    elif cls is AIMessageChunk:
        # A chunk's tool calls are derived from tool_call_chunks by its validator.
        kwargs.update(
            tool_call_chunks=tool_call_chunks(),
            usage_metadata=usage_metadata(),
            chunk_position="last",
        )
    elif cls in (ToolMessage, ToolMessageChunk):
        kwargs.update(
            tool_call_id="call_1", artifact={"rows": [1, 2, 3], "blob": b"\x01"}, status="error"
        )
    elif cls in (ChatMessage, ChatMessageChunk):
        kwargs.update(role="critic")
    elif cls in (BaseMessage, BaseMessageChunk):
        kwargs.update(type="custom")
    elif cls is RemoveMessage:
        del kwargs["content"]  # refused by its constructor
    return cls(**kwargs)


ALL_MESSAGE_CLASSES: list[type[BaseMessage]] = [
    AIMessage,
    AIMessageChunk,
    HumanMessage,
    HumanMessageChunk,
    SystemMessage,
    SystemMessageChunk,
    ToolMessage,
    ToolMessageChunk,
    FunctionMessage,
    FunctionMessageChunk,
    ChatMessage,
    ChatMessageChunk,
    RemoveMessage,
    BaseMessage,
    BaseMessageChunk,
]


def make_generation(message: BaseMessage) -> ChatGeneration:
    """Wrap a message in the generation class that fits it."""
    generation_info = {"finish_reason": "stop", "logprobs": {"content": [{"t": "a", "p": -0.1}]}}
    if isinstance(message, BaseMessageChunk):
        return ChatGenerationChunk(message=message, generation_info=generation_info)
    return ChatGeneration(message=message, generation_info=generation_info)


def typical_chat_generation() -> ChatGeneration:
    """The ~1 KB value of the speed target: text, one tool call, usage, metadata."""
    message = AIMessage(
        content="Sure - I'll look up the weather in Paris for the next three days. " * 6,
        id="run-4c1f2a4e-9b7d-4a2e-8f6e-1d2c3b4a5f60",
        tool_calls=[{"name": "get_weather", "args": {"city": "Paris", "days": 3}, "id": "c1"}],
        usage_metadata=usage_metadata(),
        response_metadata={"model_name": "gpt-4o", "finish_reason": "tool_calls"},
    )
    return ChatGeneration(message=message, generation_info={"finish_reason": "tool_calls"})


# --------------------------------------------------------------------------- helpers


def assert_same(decoded: list[Generation], original: list[Generation]) -> None:
    """Assert equality class for class, including dumps and fields-set bookkeeping."""
    assert isinstance(decoded, list)
    assert len(decoded) == len(original)
    for got, want in zip(decoded, original, strict=True):
        assert type(got) is type(want)
        assert got == want
        assert got.model_dump() == want.model_dump()
        assert got.model_fields_set == want.model_fields_set
        if isinstance(want, ChatGeneration):
            assert isinstance(got, ChatGeneration)
            assert type(got.message) is type(want.message)
            assert got.message == want.message
            assert got.message.model_dump() == want.message.model_dump()
            assert got.message.model_fields_set == want.message.model_fields_set
            assert got.message.model_extra == want.message.model_extra
            assert got.text == want.text


def round_trip(value: list[Generation]) -> list[Generation]:
    encoded = encode_generations(value)
    decoded = decode_generations(encoded)
    assert_same(decoded, value)
    # The cache's hit path (no per-field checks) must rebuild exactly the same.
    assert_same(decode_verified(encoded), value)
    return decoded


def assert_decoded_is_encodable(decoded: list[Generation]) -> None:
    """Whatever decode returns must be a value encode accepts and restores exactly."""
    assert isinstance(decoded, list)
    assert decoded
    assert_same(decode_generations(encode_generations(decoded)), decoded)


def decode_or_codec_error(data: Any) -> list[Generation] | None:
    """Decode; None when CodecError (any other exception fails the test)."""
    try:
        return decode_generations(data)
    except CodecError:
        return None


def body_of(data: bytes) -> bytes:
    """The msgpack body of an encoding, plain or compressed."""
    if data.startswith(_COMPRESSED_HEADER):
        return _compress.decompress_body(data[len(_COMPRESSED_HEADER) :])
    assert data.startswith(_HEADER)
    return data[len(_HEADER) :]


@contextlib.contextmanager
def compression(flag: bool) -> Any:
    """Turn compression on or off for the block (then back on, the default)."""
    _compress.set_enabled(flag)
    try:
        yield
    finally:
        _compress.set_enabled(True)


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("cls", ALL_MESSAGE_CLASSES, ids=lambda c: c.__name__)
def test_round_trip_every_message_class(cls: type[BaseMessage]) -> None:
    message = make_message(cls)
    round_trip([make_generation(message)])


def test_every_shipped_message_class_is_supported() -> None:
    shipped = {
        obj
        for obj in vars(lc_messages).values()
        if isinstance(obj, type) and issubclass(obj, BaseMessage)
    }
    assert shipped <= set(_MESSAGE_SPECS)
    assert set(ALL_MESSAGE_CLASSES) == set(_MESSAGE_SPECS)


def test_round_trip_plain_generations() -> None:
    value: list[Generation] = [
        Generation(text="plain " + LONE_SURROGATES, generation_info=rich_free_form()),
        GenerationChunk(text="chunk", generation_info={"finish_reason": "length"}),
        Generation(text=""),
        GenerationChunk(text="", generation_info=None),
    ]
    round_trip(value)


def test_round_trip_mixed_list_of_all_generation_classes() -> None:
    value: list[Generation] = [
        Generation(text="a"),
        GenerationChunk(text="b"),
        make_generation(make_message(AIMessage)),
        make_generation(make_message(AIMessageChunk)),
        make_generation(make_message(HumanMessage)),
        make_generation(make_message(ToolMessageChunk)),
    ]
    assert [type(g) for g in value] == [
        Generation, GenerationChunk, ChatGeneration, ChatGenerationChunk,
        ChatGeneration, ChatGenerationChunk,
    ]
    round_trip(value)


def test_round_trip_keeps_tool_calls_and_usage_that_model_dump_drops() -> None:
    message = make_message(AIMessage)
    assert isinstance(message, AIMessage)
    (decoded,) = round_trip([make_generation(message)])
    assert isinstance(decoded, ChatGeneration)
    got = decoded.message
    assert isinstance(got, AIMessage)
    assert got.tool_calls == message.tool_calls
    assert got.invalid_tool_calls == message.invalid_tool_calls
    assert got.usage_metadata == usage_metadata()
    assert got.tool_calls[0]["args"]["deep"]["surrogates"] == LONE_SURROGATES


def test_round_trip_chunk_specific_fields() -> None:
    message = make_message(AIMessageChunk)
    assert isinstance(message, AIMessageChunk)
    (decoded,) = round_trip([make_generation(message)])
    assert isinstance(decoded, ChatGenerationChunk)
    got = decoded.message
    assert isinstance(got, AIMessageChunk)
    assert got.chunk_position == "last"
    assert got.tool_call_chunks == message.tool_call_chunks
    assert got.tool_calls == message.tool_calls
    assert got.tool_calls  # derived by the validator, restored as stored


def test_round_trip_tool_message_fields() -> None:
    message = make_message(ToolMessage)
    (decoded,) = round_trip([make_generation(message)])
    assert isinstance(decoded, ChatGeneration)
    got = decoded.message
    assert isinstance(got, ToolMessage)
    assert (got.tool_call_id, got.status) == ("call_1", "error")
    assert got.artifact == {"rows": [1, 2, 3], "blob": b"\x01"}


def test_round_trip_string_content_and_defaults() -> None:
    value: list[Generation] = [
        ChatGeneration(message=AIMessage(content="")),
        ChatGeneration(message=HumanMessage(content="hi")),
        ChatGenerationChunk(message=AIMessageChunk(content="x")),
        ChatGeneration(message=RemoveMessage(id="gone")),
    ]
    round_trip(value)


def test_round_trip_extra_fields_on_messages() -> None:
    message = AIMessage(content="x", custom_field={"a": [1, b"2"]}, other=None)
    assert message.model_extra == {"custom_field": {"a": [1, b"2"]}, "other": None}
    (decoded,) = round_trip([ChatGeneration(message=message)])
    assert isinstance(decoded, ChatGeneration)
    assert decoded.message.model_extra == message.model_extra
    assert decoded.message.custom_field == {"a": [1, b"2"]}  # type: ignore[attr-defined]


def test_round_trip_model_construct_fields_set() -> None:
    message = AIMessage.model_construct(content="x", id="1")
    generation = ChatGeneration.model_construct(message=message, text="x")
    round_trip([generation])


def test_text_accessor_is_stored_as_plain_text() -> None:
    generation = ChatGeneration(message=AIMessage(content=[{"type": "text", "text": "ab"}]))
    assert type(generation.text) is not str  # LangChain's TextAccessor
    (decoded,) = round_trip([generation])
    assert decoded.text == "ab"


def test_text_accessor_inside_free_form_data_comes_back_as_equal_str() -> None:
    text, key = AIMessage(content="said").text, AIMessage(content="key").text
    assert type(text) is not str
    value = with_kwarg({"said": text, "list": [text], key: 1})
    (decoded,) = round_trip(value)
    got = decoded.message.additional_kwargs["x"]  # type: ignore[attr-defined]
    assert got == {"said": "said", "list": ["said"], "key": 1}
    assert type(got["said"]) is str
    assert type(got["list"][0]) is str
    assert [type(k) for k in got] == [str, str, str]


def test_encoding_starts_with_format_byte() -> None:
    data = encode_generations([Generation(text="x")])
    assert isinstance(data, bytes)
    assert data[0] == 1  # too short to compress: plain, as format 1 wrote it
    assert data.startswith(_HEADER)
    compressed = encode_generations([typical_chat_generation()])
    assert compressed[0] == FORMAT_VERSION == 2
    assert compressed.startswith(_COMPRESSED_HEADER)
    assert compressed[1:5] == data[1:5]  # the same layout digest


def test_encoding_is_deterministic() -> None:
    value = [make_generation(make_message(AIMessage))]
    first = encode_generations(value)
    assert encode_generations(value) == first
    assert encode_generations(decode_generations(first)) == first


def test_encode_accepts_tuple_sequence_and_decode_accepts_memoryview() -> None:
    value = (Generation(text="a"), Generation(text="b"))
    data = encode_generations(value)
    assert decode_generations(memoryview(data)) == list(value)
    assert decode_generations(memoryview(bytearray(data))) == list(value)


def test_decoding_twice_gives_independent_objects() -> None:
    original = [make_generation(make_message(AIMessage))]
    data = encode_generations(original)
    first, second = decode_generations(data), decode_generations(data)
    assert first is not second
    assert first[0] is not second[0]
    message_1, message_2 = first[0].message, second[0].message  # type: ignore[attr-defined]
    assert message_1 is not message_2
    # What LangChain does on a cache hit, plus other in-place edits.
    message_1.usage_metadata["total_cost"] = 0
    message_1.additional_kwargs["nested"]["a"].append("mutated")
    message_1.content.append("more")
    message_1.tool_calls[0]["args"]["city"] = "Rome"
    message_1.model_fields_set.add("name")
    first[0].generation_info["new"] = 1  # type: ignore[index]
    assert second == original
    assert second[0].message.model_fields_set == original[0].message.model_fields_set  # type: ignore[attr-defined]
    assert decode_generations(data) == original
    assert first != original


def test_round_trip_in_another_process() -> None:
    value = [
        make_generation(make_message(AIMessage)),
        make_generation(make_message(ToolMessageChunk)),
        GenerationChunk(text=LONE_SURROGATES, generation_info=rich_free_form()),
    ]
    data = encode_generations(value)
    child = (
        "import sys\n"
        "from shmcache._codec import decode_generations, encode_generations\n"
        "value = decode_generations(sys.stdin.buffer.read())\n"
        "sys.stderr.write(','.join(type(g).__name__ for g in value))\n"
        "sys.stdout.buffer.write(encode_generations(value))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", child],
        input=data,
        capture_output=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        cwd=REPO_ROOT,
        env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert result.stderr.decode() == "ChatGeneration,ChatGenerationChunk,GenerationChunk"
    assert result.stdout == data
    assert_same(decode_generations(result.stdout), value)


def test_concurrent_threads_round_trip() -> None:
    value = [make_generation(make_message(AIMessage)), Generation(text="t")]
    data = encode_generations(value)

    def work(_: int) -> bool:
        return all(
            encode_generations(value) == data and decode_generations(data) == value
            for _ in range(50)
        )

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert all(pool.map(work, range(16)))


json_leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text()  # includes lone surrogates
    | st.binary()
)
json_values = st.recursive(
    json_leaves,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(
    info=st.dictionaries(st.text(max_size=8), json_values, max_size=4),
    kwargs=st.dictionaries(st.text(max_size=8), json_values, max_size=4),
    text=st.text(),
)
def test_round_trip_random_free_form_values(
    info: dict[str, Any], kwargs: dict[str, Any], text: str
) -> None:
    message = AIMessage(content=text, additional_kwargs=kwargs, response_metadata=info)
    round_trip([ChatGeneration(message=message, generation_info=info), Generation(text=text)])


# --------------------------------------------------------------------------- refusals


class StrEnumValue(str, enum.Enum):
    A = "a"


class IntEnumValue(enum.IntEnum):
    ONE = 1


class SomeModel(BaseModel):
    x: int = 1


class MyGeneration(Generation):
    pass


class MyAIMessage(AIMessage):
    pass


class MyStr(str):
    pass


def with_kwarg(value: Any) -> list[Generation]:
    """A generation whose message's additional_kwargs['x'] holds ``value``."""
    return [ChatGeneration(message=AIMessage(content="c", additional_kwargs={"x": value}))]


def self_containing() -> dict[str, Any]:
    loop: dict[str, Any] = {}
    loop["self"] = loop
    return loop


def nested_lists(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


REJECTED_LEAVES: list[tuple[str, Any, str]] = [
    ("tuple", (1, 2), "is a tuple, which would come back as a list"),
    ("set", {1}, "is a set"),
    ("frozenset", frozenset({1}), "is a frozenset"),
    ("str enum", StrEnumValue.A, "str subclass), which would come back as a plain str"),
    ("int enum", IntEnumValue.ONE, "int subclass), which would come back as a plain int"),
    ("str subclass", MyStr("s"), "str subclass"),
    ("dict subclass", collections.OrderedDict(a=1), "dict subclass"),
    ("defaultdict", collections.defaultdict(list), "dict subclass"),
    ("list subclass", collections.UserList([1]), "cannot be stored losslessly"),
    ("bytearray", bytearray(b"x"), "would come back as bytes"),
    ("memoryview", memoryview(b"x"), "would come back as bytes"),
    ("int too big", 2**64, "outside the 64-bit range"),
    ("int too small", -(2**63) - 1, "outside the 64-bit range"),
    ("nan", math.nan, "NaN"),
    ("pydantic object", SomeModel(), "pydantic model (SomeModel)"),
    ("message object", HumanMessage(content="m"), "pydantic model (HumanMessage)"),
    ("datetime", datetime.datetime(2024, 1, 1), "is a datetime"),
    ("object", object(), "is an object, which cannot be stored losslessly"),
    ("int key", {1: "a"}, "has the key 1 of type int"),
    ("bytes key", {b"k": "a"}, "has the key b'k' of type bytes"),
    ("none key", {None: "a"}, "has the key None of type NoneType"),
    ("tuple key", {(1, 2): "a"}, "of type tuple"),
    ("str enum key", {StrEnumValue.A: 1}, "of type StrEnumValue"),
    ("too deep", nested_lists(MAX_NESTING_DEPTH + 1), f"more than {MAX_NESTING_DEPTH} levels"),
    ("contains itself", self_containing(), "contains itself"),
]


@pytest.mark.parametrize(
    ("value", "reason"),
    [pytest.param(v, r, id=i) for i, v, r in REJECTED_LEAVES],
)
def test_rejects_unstorable_free_form_values(value: Any, reason: str) -> None:
    with pytest.raises(UnencodableValueError) as info:
        encode_generations(with_kwarg(value))
    message = str(info.value)
    assert message.startswith("generations[0].message.additional_kwargs['x']")
    assert reason in message


def test_rejection_message_names_the_path_deep_inside() -> None:
    with pytest.raises(UnencodableValueError) as info:
        encode_generations(with_kwarg({"a": [1, "b", {"c": (1,)}]}))
    assert str(info.value) == (
        "generations[0].message.additional_kwargs['x']['a'][2]['c'] is a tuple, "
        "which would come back as a list"
    )


def test_unencodable_is_shmcache_error_and_type_error() -> None:
    with pytest.raises(UnencodableValueError) as info:
        encode_generations([])
    assert isinstance(info.value, ShmCacheError)
    assert isinstance(info.value, TypeError)
    assert "empty" in str(info.value)


def message_with(**fields: Any) -> Callable[[], list[Generation]]:
    """A validated AIMessage generation, with fields assigned after validation."""

    def build() -> list[Generation]:
        message = AIMessage(content="c", tool_calls=[{"name": "f", "args": {}, "id": "1"}])
        generation = ChatGeneration(message=message)
        for name, value in fields.items():
            setattr(message, name, value)
        return [generation]

    return build


REJECTED_VALUES: list[tuple[str, Callable[[], Any], str]] = [
    ("empty list", lambda: [], "empty sequence"),
    ("empty tuple", lambda: (), "empty sequence"),
    ("not a sequence", lambda: Generation(text="x"), "expected a sequence"),
    ("a string", lambda: "text", "expected a sequence"),
    ("a set", lambda: {1}, "expected a sequence"),
    ("not a generation", lambda: ["text"], "generations[0] is a str"),
    ("message not generation", lambda: [AIMessage(content="x")], "generations[0] is an AIMessage"),
    (
        "generation subclass",
        lambda: [Generation(text="a"), MyGeneration(text="x")],
        "generations[1] is a MyGeneration (from test_codec",
    ),
    (
        "message subclass",
        lambda: [ChatGeneration(message=MyAIMessage(content="x"))],
        "generations[0].message is a MyAIMessage",
    ),
    (
        "tuple in generation_info",
        lambda: [Generation(text="x", generation_info={"k": (1,)})],
        "generations[0].generation_info['k'] is a tuple",
    ),
    (
        "set in response_metadata",
        lambda: [ChatGeneration(message=AIMessage(content="x", response_metadata={"s": {1}}))],
        "generations[0].message.response_metadata['s'] is a set",
    ),
    (
        "tuple in tool call args",
        lambda: [ChatGeneration(message=AIMessage(
            content="", tool_calls=[{"name": "f", "args": {"a": (1,)}, "id": "1"}]))],
        "generations[0].message.tool_calls[0]['args']['a'] is a tuple",
    ),
    (
        "pydantic object in content block",
        lambda: [ChatGeneration(message=AIMessage(content=[{"type": "x", "v": SomeModel()}]))],
        "generations[0].message.content[0]['v'] is a pydantic model",
    ),
    (
        "str enum in usage_metadata",
        message_with(usage_metadata={"input_tokens": 1, "output_tokens": 1, "total_tokens": 2,
                                     "input_token_details": {"audio": IntEnumValue.ONE}}),
        "usage_metadata['input_token_details']['audio'] is an IntEnumValue",
    ),
    (
        "tuple artifact",
        lambda: [ChatGeneration(message=ToolMessage(content="", tool_call_id="1", artifact=(1,)))],
        "generations[0].message.artifact is a tuple",
    ),
    (
        "pydantic artifact",
        lambda: [ChatGeneration(message=ToolMessage(
            content="", tool_call_id="1", artifact=SomeModel()))],
        "generations[0].message.artifact is a pydantic model",
    ),
    (
        "pydantic extra field",
        lambda: [ChatGeneration(message=AIMessage(content="x", extra_thing=SomeModel()))],
        "(extra fields)['extra_thing'] is a pydantic model",
    ),
    (
        "non-str key in tool_call_chunks",
        lambda: [ChatGenerationChunk(message=AIMessageChunk(
            content="", tool_call_chunks=[{"name": "f", "args": "{}", "id": "1", "index": 0}],
            additional_kwargs={"ok": {1: 2}}))],
        "additional_kwargs['ok'] has the key 1 of type int",
    ),
    ("int name", message_with(name=5), "generations[0].message.name is an int, expected str"),
    ("tuple content", message_with(content=("a",)), "content is a tuple, expected str or list"),
    ("int content block", message_with(content=["a", 1]), "content[1] is an int, expected str"),
    ("tool_calls not list", message_with(tool_calls={}), "tool_calls is a dict, expected list"),
    ("tool call not dict", message_with(tool_calls=["f"]), "tool_calls[0] is a str, expected dict"),
    ("bad literal", message_with(type="human"), "message.type is 'human', expected 'ai'"),
    (
        "chunk generation with non-chunk message",
        lambda: [ChatGenerationChunk.model_construct(message=AIMessage(content="x"), text="x")],
        "generations[0].message is an AIMessage, expected BaseMessageChunk",
    ),
    (
        "big int in generation_info",
        lambda: [GenerationChunk(text="x", generation_info={"n": [2**70]})],
        "generation_info['n'][0] is the int 1180591620717411303424",
    ),
]


@pytest.mark.parametrize(
    ("make", "expected"),
    [pytest.param(m, e, id=i) for i, m, e in REJECTED_VALUES],
)
def test_rejects_values_that_cannot_come_back_equal(
    make: Callable[[], Any], expected: str
) -> None:
    with pytest.raises(UnencodableValueError) as info:
        encode_generations(make())
    assert expected in str(info.value)


def test_rejects_extra_fields_on_a_class_that_ignores_them() -> None:
    generation = Generation(text="x")
    object.__setattr__(generation, "__pydantic_extra__", {"sneaked": 1})
    with pytest.raises(UnencodableValueError, match="its class does not allow"):
        encode_generations([generation])


def test_rejects_private_attributes() -> None:
    message = AIMessage(content="x")
    object.__setattr__(message, "__pydantic_private__", {"_secret": 1})
    with pytest.raises(UnencodableValueError, match="private attributes"):
        encode_generations([ChatGeneration(message=message)])


def test_rejection_of_deep_value_in_a_deep_call_stack() -> None:
    value = with_kwarg(nested_lists(MAX_NESTING_DEPTH - 2))
    assert_same(decode_generations(encode_generations(value)), value)

    def recurse(levels: int) -> bytes:
        return encode_generations(value) if levels == 0 else recurse(levels - 1)

    def stack_depth() -> int:
        frame, depth = sys._getframe(), 0
        while frame is not None:
            frame, depth = frame.f_back, depth + 1  # type: ignore[assignment]
        return depth

    headroom = 40
    levels = sys.getrecursionlimit() - stack_depth() - headroom
    if _accel.plain_tree is None:
        # Close to the interpreter's limit the Python walk cannot finish: still only
        # our error, never a RecursionError.
        with pytest.raises(UnencodableValueError, match="nested too deeply"):
            recurse(levels)
    else:
        # The compiled check uses no Python frames: the value (within the depth
        # bound) is stored, and comes back equal.
        assert_same(decode_generations(recurse(levels)), value)


def test_a_future_field_is_stored_or_refused_never_dropped() -> None:
    class FutureMessage(AIMessage):
        brand_new: Any = None

    spec = _build_spec(99, FutureMessage)
    assert spec.names == tuple(FutureMessage.model_fields)
    assert "brand_new" in spec.names
    check = dict(zip(spec.names, spec.encoders, strict=True))["brand_new"]
    assert check({"a": [1]}) == {"a": [1]}
    with pytest.raises(Exception, match="is a tuple"):
        check((1,))


def test_spec_fields_match_model_fields_for_every_class() -> None:
    from shmcache._codec import _GENERATION_SPECS

    for cls, spec in [*_GENERATION_SPECS.items(), *_MESSAGE_SPECS.items()]:
        assert spec.cls is cls
        assert spec.names == tuple(cls.model_fields)


# --------------------------------------------------------------------------- hostile bytes


def sample_encodings() -> list[bytes]:
    return [
        encode_generations([Generation(text="hi", generation_info={"a": [1, b"x", None]})]),
        encode_generations([typical_chat_generation()]),
        encode_generations([make_generation(make_message(AIMessageChunk))]),
        encode_generations([
            make_generation(make_message(ToolMessage)),
            ChatGeneration(message=AIMessage(content="x", extra_field=[1])),
        ]),
    ]


def test_every_truncation_is_rejected() -> None:
    for data in sample_encodings():
        for length in range(len(data)):
            with pytest.raises(CodecError):
                decode_generations(data[:length])
            with pytest.raises(CodecError):
                decode_generations(memoryview(data)[:length])


def test_trailing_garbage_is_rejected() -> None:
    data = encode_generations([Generation(text="x")])
    for tail in (b"\x00", b"\xc0", data[len(_HEADER):]):
        with pytest.raises(CodecError):
            decode_generations(data + tail)
    compressed = encode_generations([typical_chat_generation()])
    assert compressed.startswith(_COMPRESSED_HEADER)
    for tail in (b"\x00", b"\xc0", compressed[len(_COMPRESSED_HEADER) + 4 :]):
        for decode in (decode_generations, decode_verified):
            with pytest.raises(CodecError, match="unused data"):
                decode(compressed + tail)


# A flip can turn e.g. a tool call chunk's index into another plain value: decode checks
# field shapes, not TypedDict contents, so model_dump() of such a value may warn.
@pytest.mark.filterwarnings("ignore:Pydantic serializer warnings")
def test_every_byte_flip_is_rejected_or_decodes_to_an_encodable_value() -> None:
    rejected = accepted = 0
    for data in sample_encodings():
        for position in range(len(data)):
            for flip in (0x01, 0x80, 0xFF):
                corrupted = bytearray(data)
                corrupted[position] ^= flip
                decoded = decode_or_codec_error(bytes(corrupted))
                if decoded is None:
                    rejected += 1
                else:
                    accepted += 1
                    assert_decoded_is_encodable(decoded)
    assert rejected > 0
    assert accepted > 0  # flips inside string payloads stay valid: the crc's job


def test_header_mismatch_is_a_version_error() -> None:
    data = encode_generations([Generation(text="x")])
    for corrupted in (
        bytes([FORMAT_VERSION + 1]) + data[1:],
        data[:1] + bytes([data[1] ^ 0xFF]) + data[2:],
    ):
        with pytest.raises(CodecVersionError, match="treat it as a miss"):
            decode_generations(corrupted)
    assert issubclass(CodecVersionError, CodecError)
    assert issubclass(CodecError, ShmCacheError)
    assert issubclass(CodecError, ValueError)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=2048))
def test_random_bytes_are_rejected(data: bytes) -> None:
    with pytest.raises(CodecError):
        decode_generations(data)


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=2048))
def test_random_bodies_behind_a_valid_header(body: bytes) -> None:
    decoded = decode_or_codec_error(_HEADER + body)
    if decoded is not None:
        assert_decoded_is_encodable(decoded)


msgpack_values = st.recursive(
    json_leaves | st.just(msgpack.ExtType(5, b"ext")),
    lambda children: st.lists(children, max_size=6)
    | st.dictionaries(st.text(max_size=4) | st.binary(max_size=4), children, max_size=4),
    max_leaves=30,
)
generation_like = st.lists(
    st.one_of(st.integers(-2, 20), msgpack_values), min_size=0, max_size=8
)


@settings(max_examples=300, deadline=None)
@given(payload=st.one_of(msgpack_values, st.lists(generation_like, max_size=3)))
def test_random_msgpack_structures_are_rejected_or_valid(payload: Any) -> None:
    body = msgpack.packb(payload, unicode_errors="surrogatepass")
    decoded = decode_or_codec_error(_HEADER + body)
    if decoded is not None:
        assert_decoded_is_encodable(decoded)


def reencode(payload: Any) -> bytes:
    return _HEADER + msgpack.packb(payload, unicode_errors="surrogatepass")


def valid_payload() -> list[Any]:
    return msgpack.unpackb(  # type: ignore[no-any-return]
        body_of(encode_generations([make_generation(make_message(AIMessageChunk))])),
        unicode_errors="surrogatepass",
    )


def mutated(edit: Callable[[list[Any]], None]) -> bytes:
    payload = valid_payload()
    edit(payload)
    return reencode(payload)


def set_slot(path: tuple[int, ...], value: Any) -> Callable[[list[Any]], None]:
    def edit(payload: list[Any]) -> None:
        target = payload
        for index in path[:-1]:
            target = target[index]
        target[path[-1]] = value

    return edit


# Generation slots: 0 tag, 1 mask, 2 extras, 3 text, 4 generation_info, 5 type, 6 message.
# AIMessageChunk slots: 3 content, 4 additional_kwargs, 5 response_metadata, 6 type,
# 7 name, 8 id, 9 tool_calls, 10 invalid_tool_calls, 11 usage_metadata,
# 12 tool_call_chunks, 13 chunk_position.
WRONG_SHAPES: list[tuple[str, Callable[[], bytes]]] = [
    ("nil", lambda: reencode(None)),
    ("int", lambda: reencode(5)),
    ("empty list", lambda: reencode([])),
    ("map", lambda: reencode({"a": 1})),
    ("list of nil", lambda: reencode([None])),
    ("empty object", lambda: reencode([[]])),
    ("short object", lambda: reencode([[1, 0]])),
    ("unknown generation tag", lambda: mutated(set_slot((0, 0), 99))),
    ("negative tag", lambda: mutated(set_slot((0, 0), -1))),
    ("bool tag", lambda: mutated(set_slot((0, 0), True))),
    ("float tag", lambda: mutated(set_slot((0, 0), 4.0))),
    ("str tag", lambda: mutated(set_slot((0, 0), "ChatGenerationChunk"))),
    ("list tag", lambda: mutated(set_slot((0, 0), [4]))),
    ("generation tag of other width", lambda: mutated(set_slot((0, 0), 1))),
    ("non-chunk generation for chunk message", lambda: mutated(set_slot((0, 0), 3))),
    ("non-chunk message in chunk generation", lambda: mutated(set_slot((0, 6, 0), 1))),
    ("unknown message tag", lambda: mutated(set_slot((0, 6, 0), 77))),
    ("message is a map", lambda: mutated(set_slot((0, 6), {"content": "x"}))),
    ("message is nil", lambda: mutated(set_slot((0, 6), None))),
    ("extra slot", lambda: mutated(lambda p: p[0].append(None))),
    ("missing slot", lambda: mutated(lambda p: p[0].pop())),
    ("mask negative", lambda: mutated(set_slot((0, 1), -1))),
    ("mask too big", lambda: mutated(set_slot((0, 1), 2**40))),
    ("mask float", lambda: mutated(set_slot((0, 1), 1.0))),
    ("extras bit without extras", lambda: mutated(set_slot((0, 6, 1), 1 << 11))),
    ("extras on a generation", lambda: mutated(set_slot((0, 2), {"x": 1}))),
    ("extras empty map", lambda: mutated(set_slot((0, 6, 2), {}))),
    ("extras shadow a field", lambda: mutated(set_slot((0, 6, 2), {"content": "x"}))),
    ("extras is a list", lambda: mutated(set_slot((0, 6, 2), ["x"]))),
    ("text is int", lambda: mutated(set_slot((0, 3), 1))),
    ("text is bytes", lambda: mutated(set_slot((0, 3), b"x"))),
    ("generation_info is list", lambda: mutated(set_slot((0, 4), []))),
    ("generation type literal", lambda: mutated(set_slot((0, 5), "ChatGeneration"))),
    ("content is int", lambda: mutated(set_slot((0, 6, 3), 3))),
    ("content block is int", lambda: mutated(set_slot((0, 6, 3), ["a", 3]))),
    ("content block is nil", lambda: mutated(set_slot((0, 6, 3), [None]))),
    ("additional_kwargs is nil", lambda: mutated(set_slot((0, 6, 4), None))),
    ("bytes key", lambda: mutated(set_slot((0, 6, 4), {b"k": 1}))),
    ("nested bytes key", lambda: mutated(set_slot((0, 6, 5), {"a": [{b"k": 1}]}))),
    ("message type literal", lambda: mutated(set_slot((0, 6, 6), "ai"))),
    ("name is int", lambda: mutated(set_slot((0, 6, 7), 7))),
    ("id is list", lambda: mutated(set_slot((0, 6, 8), ["x"]))),
    ("tool_calls is map", lambda: mutated(set_slot((0, 6, 9), {}))),
    ("tool call is str", lambda: mutated(set_slot((0, 6, 9), ["call"]))),
    ("usage_metadata is list", lambda: mutated(set_slot((0, 6, 11), [1]))),
    ("chunk_position unknown", lambda: mutated(set_slot((0, 6, 13), "first"))),
    ("ext type in a value", lambda: mutated(set_slot((0, 6, 4), {"x": msgpack.ExtType(1, b"")}))),
    ("nan in a value", lambda: mutated(set_slot((0, 6, 4), {"x": math.nan}))),
    ("too deep", lambda: mutated(set_slot((0, 6, 4), {"x": nested_lists(MAX_NESTING_DEPTH)}))),
    ("timestamp ext", lambda: _HEADER + b"\x91\xd6\xff\x00\x00\x00\x01"),
    ("deep msgpack nesting", lambda: _HEADER + b"\x91" * 100_000),
    ("huge array length", lambda: _HEADER + b"\xdd\xff\xff\xff\xff"),
    ("huge map length", lambda: _HEADER + b"\x91\xdf\xff\xff\xff\xff\x00"),
    ("huge str length", lambda: _HEADER + b"\x91\xdb\xff\xff\xff\xff" + b"a" * 16),
    ("huge bin length", lambda: _HEADER + b"\x91\xc6\xff\xff\xff\xff" + b"a" * 16),
    ("int map key", lambda: _HEADER + b"\x91\x81\x01\x02"),
    ("invalid utf-8", lambda: _HEADER + b"\x91\xa2\xff\xfe"),
    ("reserved byte", lambda: _HEADER + b"\xc1"),
    ("header only", lambda: _HEADER),
    ("empty", lambda: b""),
]


@pytest.mark.parametrize("make", [pytest.param(m, id=i) for i, m in WRONG_SHAPES])
def test_wrong_shaped_input_is_rejected(make: Callable[[], bytes]) -> None:
    data = make()
    with pytest.raises(CodecError):
        decode_generations(data)


def test_payload_edits_used_above_start_from_a_valid_value() -> None:
    # Guards the slot numbers of WRONG_SHAPES: untouched, the payload decodes.
    payload = valid_payload()
    assert payload[0][0] == 4 and payload[0][6][0] == 2
    assert payload[0][6][13] == "last"
    assert decode_generations(reencode(payload)) == [
        make_generation(make_message(AIMessageChunk))
    ]


@pytest.mark.parametrize(
    "data",
    [None, 5, "text", ["list"], object(), memoryview(b"\x00" * 16)[::2]],
    ids=["none", "int", "str", "list", "object", "strided memoryview"],
)
def test_non_bytes_input_is_a_codec_error(data: Any) -> None:
    with pytest.raises(CodecError):
        decode_generations(data)


def test_codec_error_on_hostile_input_names_the_problem() -> None:
    with pytest.raises(CodecError) as info:
        decode_generations(mutated(set_slot((0, 6, 7), 7)))
    assert str(info.value) == (
        "not a valid encoding: generations[0].message.name is an int, expected str"
    )


def test_decode_does_not_share_state_with_the_input_buffer() -> None:
    value = [make_generation(make_message(HumanMessage))]
    buffer = bytearray(encode_generations(value))
    decoded = decode_generations(memoryview(buffer))
    buffer[:] = b"\x00" * len(buffer)  # the shared-memory slot gets reused
    assert decoded == value
    assert copy.deepcopy(decoded) == value


# --------------------------------------------------------------------------- decode_verified


def test_verified_decode_returns_fresh_objects() -> None:
    data = encode_generations([typical_chat_generation()])
    first, second = decode_verified(data), decode_verified(memoryview(data))
    assert first == second
    assert first[0] is not second[0]
    assert first[0].message is not second[0].message  # type: ignore[attr-defined]
    assert first[0].message.tool_calls is not second[0].message.tool_calls  # type: ignore[attr-defined]


def test_verified_decode_of_truncations_raises_only_codec_error() -> None:
    for data in sample_encodings():
        for length in range(len(data)):
            with contextlib.suppress(CodecError):
                decode_verified(data[:length])


@settings(max_examples=300, deadline=None)
@given(payload=st.one_of(msgpack_values, st.lists(generation_like, max_size=3)))
def test_verified_decode_of_random_structures_raises_only_codec_error(payload: Any) -> None:
    body = msgpack.packb(payload, unicode_errors="surrogatepass")
    with contextlib.suppress(CodecError):
        decode_verified(_HEADER + body)


def test_verified_decode_checks_header_and_tags() -> None:
    data = bytearray(encode_generations([Generation(text="x")]))
    data[0] ^= 0xFF
    with pytest.raises(CodecVersionError):
        decode_verified(bytes(data))
    with pytest.raises(CodecError, match="not a valid encoding"):
        decode_verified(_HEADER + msgpack.packb([[99, 0, None, "x"]]))


def test_chat_generation_text_is_stored_once() -> None:
    content = "a long answer " * 200
    generation = ChatGeneration(message=AIMessage(content=content))
    assert len(encode_generations([generation])) < len(content) + 200
    decoded = round_trip([generation])
    assert decoded[0].text == content


def test_chat_generation_text_that_differs_from_content_is_kept() -> None:
    message = AIMessage(content="the content")
    odd = ChatGeneration.model_construct(text="another text", message=message)
    blocks = ChatGeneration(message=AIMessage(content=[{"type": "text", "text": "hi"}]))
    assert round_trip([odd])[0].text == "another text"
    assert round_trip([blocks])[0].text == "hi"


def test_missing_text_with_block_content_is_rejected() -> None:
    generation = ChatGeneration(message=AIMessage(content=[{"type": "text", "text": "hi"}]))
    payload = msgpack.unpackb(body_of(encode_generations([generation])))
    text_slot = 3 + list(ChatGeneration.model_fields).index("text")
    assert payload[0][text_slot] == "hi"
    payload[0][text_slot] = None
    data = _HEADER + msgpack.packb(payload)
    with pytest.raises(CodecError, match="message content is not a str"):
        decode_generations(data)
    with pytest.raises(CodecError, match="message content is not a str"):
        decode_verified(data)


# --------------------------------------------------------------------------- compression


def long_answer(seed: int, chars: int = 2000) -> list[Generation]:
    """A chat value whose encoding compresses (prose-like, not repeated bytes)."""
    import random

    rng = random.Random(seed)
    words = ("the", "model", "said", "that", "a", "cache", "of", "answers", "saves", "calls",
             "when", "prompts", "repeat")
    content = " ".join(rng.choice(words) + rng.choice(["", ",", "."]) for _ in range(chars // 5))
    return [
        ChatGeneration(
            message=AIMessage(
                content=content[:chars],
                id=f"run-{seed}",
                usage_metadata=usage_metadata(),
                response_metadata={"model_name": "gpt-4o", "finish_reason": "stop"},
            ),
            generation_info={"finish_reason": "stop"},
        )
    ]


def compressed_encoding(seed: int = 1) -> bytes:
    data = encode_generations(long_answer(seed))
    assert data.startswith(_COMPRESSED_HEADER)
    return data


def test_compressible_values_are_compressed_and_round_trip() -> None:
    value = long_answer(2)
    data = encode_generations(value)
    with compression(False):
        plain = encode_generations(value)
    assert data[0] == 2 and plain[0] == 1
    assert len(data) < 0.75 * len(plain)
    assert body_of(data) == body_of(plain)
    for encoded in (data, plain):
        for decode in (decode_generations, decode_verified):
            assert_same(decode(encoded), value)
            assert_same(decode(memoryview(encoded)), value)


@settings(max_examples=100, deadline=None)
@given(
    texts=st.lists(st.text(max_size=3000) | st.sampled_from(["", "abc " * 400]), min_size=1,
                   max_size=3),
    seed=st.integers(0, 1000),
    enabled=st.booleans(),
)
def test_round_trips_with_compression_on_and_off(
    texts: list[str], seed: int, enabled: bool
) -> None:
    value: list[Generation] = [
        ChatGeneration(message=AIMessage(content=t)) if i % 2 else Generation(text=t)
        for i, t in enumerate(texts)
    ]
    value += long_answer(seed, 300 + seed)
    with compression(enabled):
        data = encode_generations(value)
    if not enabled:
        assert data[0] == 1
    assert_same(decode_generations(data), value)
    assert_same(decode_verified(data), value)


def test_plain_encodings_are_format_1_byte_for_byte() -> None:
    # What a release before compression wrote, and reads: the same bytes, so that
    # old records (segment or Redis) decode here and plain new ones decode there.
    value = [Generation(text="short", generation_info={"a": 1})]
    data = encode_generations(value)
    assert data == _HEADER + msgpack.packb(msgpack.unpackb(data[5:]), use_bin_type=True)
    assert data[0] == 1
    with compression(False):
        assert encode_generations(long_answer(3))[0] == 1


def test_older_readers_see_compressed_encodings_as_another_version() -> None:
    # An older release compares the first five bytes with its own header (format 1):
    # a compressed encoding differs there, hence a CodecVersionError (a quiet miss)
    # and never an attempt to read a zstd frame as msgpack.
    data = compressed_encoding()
    assert data[:5] != _HEADER and data[1:5] == _HEADER[1:5]


@pytest.mark.parametrize("format_byte", [0, 3, 0x28, 0xFF])
def test_unknown_format_bytes_are_version_errors(format_byte: int) -> None:
    for data in (compressed_encoding(), encode_generations([Generation(text="x")])):
        for decode in (decode_generations, decode_verified):
            with pytest.raises(CodecVersionError, match="treat it as a miss"):
                decode(bytes([format_byte]) + data[1:])


def test_compressed_encoding_under_another_layout_is_a_version_error() -> None:
    data = bytearray(compressed_encoding())
    data[3] ^= 0x40
    for decode in (decode_generations, decode_verified):
        with pytest.raises(CodecVersionError):
            decode(bytes(data))


def compressed(frame: bytes, recorded: int) -> bytes:
    return _COMPRESSED_HEADER + struct.pack("<I", recorded) + frame


def frame_of(body: bytes, **kwargs: Any) -> bytes:
    return zstandard.ZstdCompressor(write_checksum=False, **kwargs).compress(body)


def frame_stating(size: int, body: bytes) -> bytes:
    frame = frame_of(body, write_content_size=False)
    assert frame[4] & 0xE3 == 0  # no size, not single-segment, no dict id, no checksum
    stated = bytes([frame[4] | 0xC0]) + frame[5:6] + size.to_bytes(8, "little")
    return frame[:4] + stated + frame[6:]


PLAIN_BODY = body_of(encode_generations(long_answer(4)))
HOSTILE_COMPRESSED: list[tuple[str, Callable[[], bytes]]] = [
    ("length only", lambda: _COMPRESSED_HEADER + struct.pack("<I", 100)),
    ("garbage frame", lambda: compressed(b"\x00\xff garbage " * 8, 96)),
    ("zero length", lambda: compressed(frame_of(b""), 0)),
    ("huge length", lambda: compressed(frame_stating(2**32 - 1, PLAIN_BODY), 2**32 - 1)),
    ("frame states 48 MiB",
     lambda: compressed(frame_stating(48 << 20, PLAIN_BODY), len(PLAIN_BODY))),
    ("frame without size", lambda: compressed(frame_of(PLAIN_BODY, write_content_size=False),
                                              len(PLAIN_BODY))),
    ("recorded too short", lambda: compressed(frame_of(PLAIN_BODY), len(PLAIN_BODY) - 1)),
    ("recorded too long", lambda: compressed(frame_of(PLAIN_BODY), len(PLAIN_BODY) + 1)),
    ("ratio bomb", lambda: compressed(frame_of(b"\x91" * (4 << 20)), 4 << 20)),
    ("trailing frame", lambda: compressed(frame_of(PLAIN_BODY) * 2, len(PLAIN_BODY))),
    ("truncated frame", lambda: compressed(frame_of(PLAIN_BODY)[:-5], len(PLAIN_BODY))),
]


@pytest.mark.parametrize("make", [pytest.param(m, id=i) for i, m in HOSTILE_COMPRESSED])
def test_hostile_compressed_bodies_are_codec_errors_not_version_errors(
    make: Callable[[], bytes],
) -> None:
    import tracemalloc

    data = make()
    for decode in (decode_generations, decode_verified):
        tracemalloc.start()
        try:
            with pytest.raises(CodecError) as info:
                decode(data)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert not isinstance(info.value, CodecVersionError)  # damage, not a version
        assert isinstance(info.value, _compress.CompressedDataError)
        assert peak < 1 << 20, f"peak allocation {peak} bytes"


def test_hostile_msgpack_inside_a_valid_frame_is_a_codec_error() -> None:
    for body in (b"\xdd\xff\xff\xff\xff" + b"\x00" * 600, b"\x91" * 100_000 + b"\xc0",
                 b"\xc1" * 700):
        data = compressed(frame_of(body), len(body))
        for decode in (decode_generations, decode_verified):
            with pytest.raises(CodecError):
                decode(data)


def test_every_truncation_of_a_compressed_encoding_is_rejected() -> None:
    data = compressed_encoding(5)
    for length in range(len(data)):
        for decode in (decode_generations, decode_verified):
            with pytest.raises(CodecError):
                decode(data[:length])


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=1024))
def test_random_bodies_behind_the_compressed_header(body: bytes) -> None:
    for data in (_COMPRESSED_HEADER + body, _COMPRESSED_HEADER + body[:4] + b"\x28\xb5\x2f\xfd"
                 + body[4:]):
        decoded = decode_or_codec_error(data)
        if decoded is not None:
            assert_decoded_is_encodable(decoded)
        with contextlib.suppress(CodecError):
            decode_verified(data)


@settings(max_examples=300, deadline=None)
@given(position=st.integers(0, 10**6), flip=st.integers(1, 255))
@pytest.mark.filterwarnings("ignore:Pydantic serializer warnings")
def test_byte_flips_in_a_compressed_encoding(position: int, flip: int) -> None:
    data = bytearray(compressed_encoding(6))
    data[position % len(data)] ^= flip
    decoded = decode_or_codec_error(bytes(data))
    if decoded is not None:
        assert_decoded_is_encodable(decoded)
    with contextlib.suppress(CodecError):
        decode_verified(bytes(data))

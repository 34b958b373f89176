"""The compiled update encoder (``_speedups.flatten``) agrees with the codec's own.

An update turns generations into the payload msgpack packs: ``[tag, mask, extras,
*fields]`` per object, every field checked.  Where the extension is built, C code
writes the common shapes and returns None for anything else, which the Python encoder
then writes or refuses with a message naming the field.  So for any value the
compiled payload must be None or exactly Python's (same values, same types, same
packed bytes), and it must be None wherever Python refuses the value.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from _samples import chat_generation
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.base import TextAccessor
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, Generation, GenerationChunk
from test_codec import ALL_MESSAGE_CLASSES, make_generation, make_message

from shmcache import _accel, _codec
from shmcache._codec import UnencodableValueError, decode_generations, encode_generations

pytestmark = pytest.mark.skipif(
    not _accel.compiled(),
    reason="the C extension is not built here (test_speedups says whether it should be)",
)


def _compiled(value: Any) -> list[Any] | None:
    assert _accel.flatten is not None
    return _accel.flatten(
        value, _codec._GENERATION_ENCODERS, _codec._MESSAGE_ENCODERS, TextAccessor,
        _codec.MAX_NESTING_DEPTH,
    )  # fmt: skip


def _python(value: Any) -> list[Any] | UnencodableValueError:
    try:
        return _codec._python_payload(value)
    except UnencodableValueError as exc:
        return exc


def _types(tree: Any) -> Any:
    if isinstance(tree, list):
        return [_types(item) for item in tree]
    if isinstance(tree, dict):
        return {key: _types(item) for key, item in tree.items()}
    return type(tree)


def _assert_agree(value: Any, *, common: bool = False) -> None:
    python = _python(value)
    compiled = _compiled(value)
    if isinstance(python, UnencodableValueError):
        assert compiled is None, f"C wrote {compiled!r} where Python refused: {python}"
        return
    if common:
        assert compiled is not None, "a common shape was left to Python"
    if compiled is not None:
        assert compiled == python
        assert _types(compiled) == _types(python)
        assert _codec._pack(compiled) == _codec._pack(python)


@pytest.mark.parametrize("cls", ALL_MESSAGE_CLASSES, ids=lambda c: c.__name__)
def test_every_message_class_gives_pythons_payload(cls: type[BaseMessage]) -> None:
    _assert_agree([make_generation(make_message(cls))])


@pytest.mark.parametrize(
    "value",
    [
        [Generation(text="plain")],
        [Generation(text="info", generation_info={"a": [1, {"b": None}], "c": 1.5})],
        [GenerationChunk(text="chunk")],
        [chat_generation()],
        [chat_generation(), Generation(text="two"), chat_generation("three")],
        [ChatGeneration(message=HumanMessage(content=[{"type": "text", "text": "hi"}, "x"]))],
        [ChatGeneration(message=SystemMessage(content="s", name="n", id="i"))],
        [ChatGenerationChunk(message=AIMessageChunk(content="part", id="c1"))],
        [ChatGeneration(text="differs", message=AIMessage(content="from the text"))],
        [ChatGeneration(message=AIMessage(content=[{"type": "text", "text": "blocks"}]))],
    ],
    ids=lambda v: "+".join(type(g).__name__ for g in v),
)
def test_common_values_are_written_in_c_as_python_writes_them(value: list[Generation]) -> None:
    _assert_agree(value, common=True)
    assert decode_generations(encode_generations(value)) == value


def test_text_accessor_text_is_stored_as_a_plain_str() -> None:
    generation = chat_generation()
    assert type(generation.__dict__["text"]) is TextAccessor  # what LangChain sets
    generation.__dict__["text"] = TextAccessor("not the content")
    compiled = _compiled([generation])
    assert compiled is not None and type(compiled[0][3]) is str
    _assert_agree([generation])


def _bad(cls: type[Any], **fields: Any) -> Any:
    return cls.model_construct(**fields)


_AI = {"content": "x", "type": "ai"}
_BAD_AI_FIELDS: list[dict[str, Any]] = [
    {"content": ("a",)}, {"content": [1]}, {"content": [("t",)]},
    {"additional_kwargs": {"t": (1,)}}, {"additional_kwargs": {1: "k"}},
    {"additional_kwargs": [1]}, {"response_metadata": {"n": math.nan}},
    {"response_metadata": {"big": 2**64}}, {"name": 7}, {"id": b"id"},
    {"type": "human"}, {"type": None}, {"tool_calls": [("call",)]},
    {"tool_calls": ({"a": 1},)}, {"invalid_tool_calls": [{"s": {1, 2}}]},
    {"usage_metadata": []}, {"usage_metadata": {"t": bytearray(b"x")}},
    {"name": TextAccessor("accessor")}, {"id": TextAccessor("accessor")},
]  # fmt: skip


def _refused_or_odd() -> list[Any]:
    private = AIMessage(content="p")
    object.__setattr__(private, "__pydantic_private__", {"_secret": 1})
    no_field = AIMessage(content="d")
    del no_field.__dict__["id"]
    odd_set = AIMessage(content="f")
    object.__setattr__(odd_set, "__pydantic_fields_set__", ["content"])
    extra = AIMessage(content="e", extra_field=[1])

    class Sub(Generation):
        pass

    return [
        [],
        (Generation(text="tuple"),),
        [Sub(text="subclass")],
        ["not a generation"],
        [ChatGeneration.model_construct(message=Generation(text="no message"), text="t")],
        *([ChatGeneration(message=m)] for m in (private, no_field, odd_set, extra)),
        *(
            [ChatGeneration.model_construct(message=_bad(AIMessage, **{**_AI, **f}), text="x")]
            for f in _BAD_AI_FIELDS
        ),
        [Generation.model_construct(text=1)],
        [Generation.model_construct(text="t", generation_info={"d": {"e": [math.inf, -0.0]}})],
        [Generation.model_construct(text="t", generation_info=())],
        [Generation.model_construct(text="t", type="Other")],
        [ChatGeneration.model_construct(message=AIMessage(content="c"), text=None)],
        [ChatGenerationChunk.model_construct(message=AIMessage(content="c"), text="c")],
        [ToolMessage(content="t", tool_call_id="i", artifact={"rows": (1,)})],
    ]  # fmt: skip


@pytest.mark.parametrize("index", range(len(_refused_or_odd())))
def test_c_never_writes_what_python_refuses(index: int) -> None:
    _assert_agree(_refused_or_odd()[index])


_texts = st.text(max_size=12)
_leaves = st.one_of(
    st.none(), st.booleans(), _texts, st.binary(max_size=4),
    st.integers(-(2**63) - 1, 2**64), st.floats(allow_nan=True),
    st.builds(TextAccessor, _texts), st.tuples(st.integers(0, 2)),
)  # fmt: skip
_free = st.recursive(
    _leaves,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_texts | st.integers(0, 2), inner,
                                                                 max_size=3),
    max_leaves=10,
)  # fmt: skip
_free_dicts = st.dictionaries(_texts, _free, max_size=3)
_messages = st.one_of(
    st.builds(AIMessage.model_construct, content=_texts | st.lists(_texts | _free_dicts),
              response_metadata=_free_dicts, additional_kwargs=_free_dicts,
              id=st.none() | _texts | st.integers(0, 3), name=st.none() | _texts,
              tool_calls=st.lists(_free_dicts, max_size=2), invalid_tool_calls=st.just([]),
              usage_metadata=st.none() | _free_dicts, type=st.sampled_from(["ai", "human"])),
    st.builds(HumanMessage, content=_texts),
)  # fmt: skip
_generations = st.lists(
    st.one_of(
        st.builds(Generation.model_construct, text=_texts | st.builds(TextAccessor, _texts),
                  generation_info=st.none() | _free_dicts, type=st.just("Generation")),
        st.builds(lambda m, t: ChatGeneration.model_construct(message=m, text=t), _messages,
                  st.none() | _texts),
    ),
    min_size=1,
    max_size=3,
)  # fmt: skip


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_generations)
def test_compiled_and_python_encoders_agree_on_any_value(value: list[Generation]) -> None:
    _assert_agree(value)


@pytest.mark.parametrize(
    "tables",
    [
        ([], {}),
        ({Generation: "no"}, {}),
        ({Generation: (1, ("text",), ((0, None),), -1)}, {}),  # one entry short
        ({Generation: (1, ("text",), ((99, None),), -1, -1)}, {}),  # unknown check
        ({Generation: (1, ("text",), ((7, ["a"]),), -1, -1)}, {}),  # literal not a frozenset
        ({Generation: (1, ("text",), ((8, "t"),), -1, -1)}, {}),  # message base not a type
        ({Generation: (1, ("text",), (), -1, -1)}, {}),  # kinds and names differ
        ({Generation: (1, ("text",), ((0, None),), 0, 5)}, {}),  # mirror slot out of range
        ({"Generation": (1, ("text",), ((0, None),), -1, -1)}, {}),  # key not a type
    ],
)
def test_bad_encoder_tables_are_refused(tables: tuple[Any, Any]) -> None:
    assert _accel.flatten is not None
    with pytest.raises(TypeError, match="encoder table"):
        _accel.flatten([Generation(text="t")], *tables, TextAccessor, 10)
    with pytest.raises(TypeError, match="5 arguments"):
        _accel.flatten([])  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="text_type"):
        _accel.flatten([], {}, {}, "no", 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_depth"):
        _accel.flatten([], {}, {}, TextAccessor, -1)

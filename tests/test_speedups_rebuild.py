"""The compiled hit-path decode (``_speedups.rebuild`` / ``decode_plain``) agrees with
the codec's own rebuild.

A hit turns the stored bytes back into new objects.  Where the extension is built, C
code does the common shapes and returns None for anything else, which the Python
decoder then builds or refuses.  So for any payload the compiled result must be None
or objects indistinguishable from Python's: same classes, ``__dict__`` in the same
order, ``model_fields_set``, extras and private slots, and fresh containers each
time.  It must never build what the Python decoder refuses.
"""

from __future__ import annotations

import copy
from typing import Any

import msgpack
import pytest
from _samples import chat_generation
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, Generation, GenerationChunk
from pydantic import BaseModel

from shmcache import _accel, _codec
from shmcache._codec import CodecError, decode_verified, encode_generations

pytestmark = pytest.mark.skipif(
    not _accel.compiled(),
    reason="the C extension is not built here (test_speedups says whether it should be)",
)
TABLES = (_codec._GENERATION_TABLE, _codec._MESSAGE_TABLE)


def _python_rebuild(payload: Any) -> list[Any] | Exception:
    """What the pure-Python verified decoder makes of a payload (or raises)."""
    try:
        return [_codec._rebuild_verified(item, _codec._GENERATION_SPECS_BY_TAG) for item in payload]
    except Exception as exc:  # the codec turns any of these into CodecError
        return exc


def _compiled_rebuild(payload: Any) -> list[Any] | None:
    assert _accel.rebuild is not None
    return _accel.rebuild(payload, *TABLES)


def _state(obj: Any) -> Any:
    """Everything a rebuilt object is made of, nested objects included."""
    if isinstance(obj, BaseModel):
        return (
            type(obj),
            [(name, _state(value)) for name, value in obj.__dict__.items()],
            obj.__pydantic_fields_set__,
            obj.__pydantic_extra__,
            obj.__pydantic_private__,
        )
    return obj


def _payload(value: list[Generation]) -> Any:
    data = encode_generations(value, compress=False)
    return msgpack.unpackb(data[_codec._HEADER_LEN :])


def _warm(payload: Any) -> None:
    """Let the Python decoder meet the payload's masks (it caches them for C)."""
    result = _python_rebuild(payload)
    assert not isinstance(result, Exception), result


def _samples() -> list[list[Generation]]:
    message = chat_generation().message
    return [
        [Generation(text="plain")],
        [Generation(text="info", generation_info={"a": [1, {"b": None}]})],
        [GenerationChunk(text="chunk")],
        [chat_generation()],
        [ChatGeneration(message=HumanMessage(content=[{"type": "text", "text": "hi"}, "x"]))],
        [ChatGenerationChunk(message=AIMessageChunk(content="part", id="c1"))],
        [ChatGeneration(message=ToolMessage(content="42", tool_call_id="t1", artifact=[1]))],
        [ChatGeneration(message=AIMessage.model_construct(content="constructed"))],
        [ChatGeneration(text="differs", message=AIMessage(content="from the text"))],
        [chat_generation("one"), Generation(text="two"), chat_generation("three")],
        [ChatGeneration(message=message, generation_info=None)],
    ]


@pytest.mark.parametrize("value", _samples(), ids=lambda v: "+".join(type(g).__name__ for g in v))
def test_compiled_rebuild_makes_the_objects_python_makes(value: list[Generation]) -> None:
    payload = _payload(value)
    _warm(payload)
    built = _compiled_rebuild(payload)
    assert built is not None, "a common shape was declined"
    assert [_state(g) for g in built] == [_state(g) for g in _python_rebuild(payload)]  # type: ignore[union-attr]
    assert built == value
    encoded = encode_generations(value, compress=False)
    assert decode_verified(encoded) == value
    assert [_state(g) for g in decode_verified(memoryview(encoded))] == [_state(g) for g in built]


def test_each_decode_gives_fresh_containers() -> None:
    encoded = encode_generations([chat_generation()], compress=False)
    first, second = decode_verified(encoded)[0], decode_verified(encoded)[0]
    assert isinstance(first, ChatGeneration) and isinstance(second, ChatGeneration)
    first.message.model_fields_set.add("name")
    first.model_fields_set.clear()
    first.message.response_metadata["changed"] = True
    first.__dict__["text"] = "changed"
    assert second == chat_generation()
    assert second.message.model_fields_set != first.message.model_fields_set
    assert "changed" not in second.message.response_metadata
    assert decode_verified(encoded) == [chat_generation()]


def test_a_mask_python_has_not_met_is_left_to_python() -> None:
    value = [Generation(text="t", generation_info={"k": 1})]
    payload = _payload(value)
    spec = _codec._GENERATION_SPECS_BY_TAG[payload[0][0]]
    saved = dict(spec.fields_set_by_mask)
    spec.fields_set_by_mask.clear()
    try:
        assert _compiled_rebuild(payload) is None
        assert decode_verified(encode_generations(value, compress=False)) == value  # Python met it
        assert _compiled_rebuild(payload) == value
    finally:
        spec.fields_set_by_mask.update(saved)


def _variants(payload: list[Any]) -> list[Any]:
    """Payloads that differ from a valid one in one place each."""
    item, message = payload[0], payload[0][6]
    out: list[Any] = [tuple(payload), {"a": 1}, 7, None, [None], [[]], [[3, 1]], [tuple(item)]]
    for index, bad in [
        (0, True), (0, 0), (0, -1), (0, 99), (0, 2**70), (0, 3.0), (0, "3"),
        (1, True), (1, -1), (1, 2**40), (1, 2**70), (1, 1.0), (1, None), (1, 1 << (len(item) - 3)),
        (2, {}), (2, {"x": 1}), (2, []),
    ]:  # fmt: skip
        changed = copy.deepcopy(payload)
        changed[0][index] = bad
        out.append(changed)
    for bad_message in (None, "text", [], message[:-1], [*message, None], [99, *message[1:]],
                        [message[0], message[1], {"x": 1}, *message[3:]]):  # fmt: skip
        changed = copy.deepcopy(payload)
        changed[0][6] = bad_message
        out.append(changed)
    longer = copy.deepcopy(payload)
    longer[0].append(None)
    shorter = copy.deepcopy(payload)
    shorter[0].pop()
    no_text = copy.deepcopy(payload)
    no_text[0][3] = None
    no_text[0][6][3] = [{"type": "text", "text": "blocks"}]  # text nil, content not a str
    out += [longer, shorter, no_text, [*payload, 5], [*payload, [1, 0, None]]]
    # A Generation's mask is 1 when only text is set: True must not pass for it.
    plain = _payload([Generation(text="x")])[0]
    for index, bad in [(1, True), (0, True), (2, {}), (3, None)]:
        changed = list(plain)
        changed[index] = bad
        out.append([changed])
    return out


@pytest.mark.parametrize("index", range(len(_variants(_payload([chat_generation()])))))
def test_compiled_rebuild_never_builds_what_python_refuses(index: int) -> None:
    valid = _payload([chat_generation()])
    _warm(valid)
    _warm(_payload([Generation(text="x")]))
    payload = _variants(valid)[index]
    python = _python_rebuild(payload)
    built = _compiled_rebuild(payload)
    if isinstance(python, Exception):
        assert built is None, f"C built {built!r} where Python raised {python!r}"
    elif built is not None:
        assert [_state(g) for g in built] == [_state(g) for g in python]


_texts = st.text(max_size=20)
_free = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | _texts | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_texts, inner, max_size=3),
    max_leaves=8,
)
_free_dicts = st.dictionaries(_texts, _free, max_size=3)
_messages = st.one_of(
    st.builds(AIMessage, content=_texts, id=st.none() | _texts,
              response_metadata=st.dictionaries(_texts, _free, max_size=3)),
    st.builds(HumanMessage, content=st.lists(_texts | st.just({"type": "text", "text": "t"}))),
)  # fmt: skip
_chunks = st.builds(AIMessageChunk, content=_texts, name=st.none() | _texts)
_generations = st.lists(
    st.one_of(
        st.builds(Generation, text=_texts, generation_info=st.none() | _free_dicts),
        st.builds(ChatGeneration, message=_messages),
        st.builds(ChatGenerationChunk, message=_chunks),
    ),
    min_size=1,
    max_size=3,
)  # fmt: skip


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_generations)
def test_compiled_and_python_decoders_agree_on_any_value(value: list[Generation]) -> None:
    encoded = encode_generations(value, compress=False)
    payload = msgpack.unpackb(encoded[_codec._HEADER_LEN :])
    python = _python_rebuild(payload)
    assert not isinstance(python, Exception)
    built = _compiled_rebuild(payload)
    if built is not None:
        assert [_state(g) for g in built] == [_state(g) for g in python]
    assert decode_verified(encoded) == value


def test_decode_plain_leaves_other_encodings_to_python() -> None:
    assert _accel.decode_plain is not None
    value = [Generation(text=" ".join(f"word{i % 37}" for i in range(300)))]
    compressed = encode_generations(value, compress=True)
    assert compressed[:1] != _codec._HEADER[:1]
    plain = encode_generations(value, compress=False)
    args = (msgpack.unpackb, _codec._reject_ext, *TABLES)
    other_format = bytes([9]) + plain[1:]
    for data in (compressed, plain[: _codec._HEADER_LEN], b"", other_format, object(), "str"):
        assert _accel.decode_plain(data, _codec._HEADER, *args) is None
    assert _accel.decode_plain(plain, _codec._HEADER, *args) == value
    assert _accel.decode_plain(memoryview(plain), _codec._HEADER, *args) == value
    assert decode_verified(compressed) == value


def test_decode_plain_passes_msgpack_errors_through_as_codec_errors() -> None:
    good = encode_generations([Generation(text="t")], compress=False)
    header = _codec._HEADER
    for bad in (good[:-1], good + b"\x00", header + b"\xc1", header + b"\xd4\x05\x00"):
        with pytest.raises(CodecError):
            decode_verified(bad)
        with pytest.raises(CodecError):
            decode_verified(memoryview(bytearray(bad)))


def test_decode_plain_does_not_keep_the_callers_buffer() -> None:
    assert _accel.decode_plain is not None
    kept: list[memoryview] = []

    def keeping_unpackb(body: memoryview, **kwargs: Any) -> Any:
        kept.append(body)
        return msgpack.unpackb(body, **kwargs)

    data = bytearray(encode_generations([Generation(text="t")], compress=False))
    got = _accel.decode_plain(data, _codec._HEADER, keeping_unpackb, _codec._reject_ext, *TABLES)
    assert got == [Generation(text="t")]
    with pytest.raises(ValueError, match="released"):
        kept[0].tobytes()
    data.extend(b"x")  # no export is left on the bytearray


def _spec(*fields: Any) -> tuple[Any, ...]:
    return (None, fields)


@pytest.mark.parametrize(
    "tables",
    [
        ([], ()),
        ((("not a spec",),), ()),
        (_spec(Generation, ("text",), False, {}, (), -1), ()),  # one entry short
        (_spec(Generation, ("text",), False, {}, (5,), -1, -1), ()),  # message slot out of range
        (_spec(Generation, ("text",), "no", {}, (), -1, -1), ()),  # allows_extra not a bool
        (_spec(Generation, ("text",), False, {}, (), 0, 7), ()),  # mirror slot out of range
        ((), _spec("cls", ("text",), False, {}, (), -1, -1)),  # cls not a type
    ],
)
def test_bad_tables_are_refused(tables: tuple[Any, Any]) -> None:
    assert _accel.rebuild is not None and _accel.decode_plain is not None
    with pytest.raises(TypeError, match="rebuild table"):
        _accel.rebuild([], *tables)
    with pytest.raises(TypeError, match="rebuild table"):
        _accel.decode_plain(b"", _codec._HEADER, msgpack.unpackb, _codec._reject_ext, *tables)
    with pytest.raises(TypeError, match="3 arguments"):
        _accel.rebuild([])  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="header must be bytes"):
        _accel.decode_plain(b"", "h", msgpack.unpackb, _codec._reject_ext, *TABLES)  # type: ignore[arg-type]

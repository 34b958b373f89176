"""Value codec: LangChain generations to msgpack bytes and back.

The cache stores the ``list[Generation]`` that LangChain hands to ``BaseCache.update``.
This module turns such a list into bytes and rebuilds an equal list, class for class,
in any process.  Design points:

* Exact or nothing.  :func:`encode_generations` refuses (``UnencodableValueError``)
  any value that would not come back equal and of the same classes: unknown classes,
  tuples, sets, ``str``/``int``/``dict`` subclasses, non-``str`` dict keys, ints beyond
  64 bits, NaN, pydantic objects inside free-form fields, and so on.  One exception:
  LangChain's own ``TextAccessor`` (the ``str`` subclass ``message.text`` returns)
  is stored as the plain ``str`` it equals.
* Explicit schema.  Each supported class has a fixed tag and its fields are taken from
  its ``model_fields`` at import, so a field a later langchain-core adds is stored too
  (or refused if its value is not plain data) rather than silently dropped.  A digest
  of that layout follows the format byte; bytes written under another layout are
  refused with :class:`CodecVersionError` (a kind of :class:`CodecError`).
* Never trust the bytes.  :func:`decode_generations` shape-checks everything it reads
  with the same checks the encoder applies, bounds msgpack by the input length and
  nesting by :data:`MAX_NESTING_DEPTH`, and raises :class:`CodecError`, nothing else.
  No class is ever looked up by a name found in the data.
* Fast rebuild.  Values that passed those checks are exactly what the encoder accepted
  from validated objects, so objects are rebuilt the way ``model_construct`` does it
  (without its per-field bookkeeping) instead of re-running pydantic validation, which
  costs several times more.  Every field value is stored, derived ones included
  (``ChatGeneration.text``, an ``AIMessageChunk``'s parsed ``tool_calls``), so no
  validator needs to run; ``model_fields_set`` and extra fields are restored too.
  The checks cover each field's type (``name`` is a str or None, ``tool_calls`` a
  list of dicts, ...) and that free-form data is plain; keys inside a tool call dict
  are free-form data like any other.

* Compressed where it pays.  The msgpack body is zstd-compressed when that saves at
  least an eighth of it (``_compress.py`` says when and why); byte 0 says which.
  Plain encodings are byte for byte those of format 1, so releases from before
  compression read them, and read a compressed one as :class:`CodecVersionError`
  (a plain miss, never damage): the remote tier is shared across releases.

All functions are thread-safe (no shared mutable state beyond bounded caches and
per-thread zstd contexts).

Wire format (``FORMAT_VERSION`` 2)::

    byte 0      format: 1 = plain, 2 = compressed (anything else: CodecVersionError)
    bytes 1..4  crc32 of the class/field layout, big-endian (another layout:
                CodecVersionError)
    format 1    bytes 5..   the body
    format 2    bytes 5..8  the body's length n, u32 little-endian
                bytes 9..   one zstd frame of the body (content size n stated,
                            no dictionary, no checksum); see ``_compress.py``
    body        msgpack array of objects; each object is
                [tag, fields_set_mask, extras_or_nil, field_0, ..., field_n-1]
                with fields in ``model_fields`` order; ChatGeneration.message holds a
                nested message object of the same shape.

Decompression is bounded before it starts (``n`` at most
``_compress.MAX_UNPACKED_BYTES`` and ``_compress.MAX_RATIO`` times the frame, the
frame's stated size equal to ``n``) and any failure is a :class:`CodecError`, in
both decoders: the segment's crc32 vouches for the bytes, not for their writer.
"""

from __future__ import annotations

import operator
import reprlib
import struct
import sys
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Union, cast, get_args, get_origin

import msgpack
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
from langchain_core.messages.base import TextAccessor
from langchain_core.outputs import (
    ChatGeneration,
    ChatGenerationChunk,
    Generation,
    GenerationChunk,
)
from pydantic import BaseModel

from shmcache import _accel, _compress
from shmcache._errors import CodecError, CodecVersionError, ShmCacheError

__all__ = [
    "FORMAT_VERSION",
    "MAX_NESTING_DEPTH",
    "CodecError",
    "CodecVersionError",
    "UnencodableValueError",
    "decode_generations",
    "decode_verified",
    "encode_generations",
]

FORMAT_VERSION: Final = 2
"""The newest format this codec reads and writes (byte 0 of an encoding).

Format 2 added compressed encodings; values that do not compress are still written
in format 1 (byte 0 is 1), which format 2 contains.  Bump it when the wire format
changes; a changed class/field layout changes the layout digest instead.
"""

MAX_NESTING_DEPTH: Final = 100
"""Deepest nesting of lists/dicts accepted inside one field (both directions)."""

_INT_MIN: Final = -(2**63)
_INT_MAX: Final = 2**64 - 1
_HEADER_LEN: Final = 5
_PLAIN_FORMAT: Final = 1
_COMPRESSED_FORMAT: Final = 2
_MASK_CACHE_MAX_ENTRIES: Final = 1024

# Tags are part of the format: never renumber, only add.
_GENERATION_TAGS: Final[tuple[tuple[int, type[Generation]], ...]] = (
    (1, Generation),
    (2, GenerationChunk),
    (3, ChatGeneration),
    (4, ChatGenerationChunk),
)
_MESSAGE_TAGS: Final[tuple[tuple[int, type[BaseMessage]], ...]] = (
    (1, AIMessage),
    (2, AIMessageChunk),
    (3, HumanMessage),
    (4, HumanMessageChunk),
    (5, SystemMessage),
    (6, SystemMessageChunk),
    (7, ToolMessage),
    (8, ToolMessageChunk),
    (9, FunctionMessage),
    (10, FunctionMessageChunk),
    (11, ChatMessage),
    (12, ChatMessageChunk),
    (13, RemoveMessage),
    (14, BaseMessage),
    (15, BaseMessageChunk),
)

if sys.version_info >= (3, 11):
    from operator import call as _call
else:  # pragma: no cover - Python 3.10

    def _call(check: Callable[[Any], Any], value: Any) -> Any:
        return check(value)


# Leaves msgpack gives back unchanged; int and float need a value check as well.
_PLAIN_LEAF_TYPES: Final[frozenset[type]] = frozenset({type(None), bool, str, bytes})


# CodecError ("the bytes are not a valid encoding") is defined by _compress, whose
# errors subclass it, and is imported from here.


class UnencodableValueError(ShmCacheError, TypeError):
    """The value cannot be stored so that it comes back equal, class for class."""


class _Invalid(Exception):
    """Internal: a value failed a check; ``path`` is collected while unwinding."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.path: list[str] = []

    def describe(self, root: str = "") -> str:
        """Return ``root`` + path + reason, e.g. ``generations[0].text is an int``."""
        return f"{root}{''.join(reversed(self.path))} {self.reason}"


# --------------------------------------------------------------------------- checks
# Every check takes a value and returns what to store / what was read, raising
# _Invalid otherwise.  The encoder and the decoder run the same checks, so whatever
# the encoder writes the decoder accepts, and nothing else.

_Check = Callable[[Any], Any]


def _type_phrase(value: object) -> str:
    """Name a value's type for messages: ``a tuple``, ``an int``."""
    name = type(value).__qualname__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def _why_not_plain(value: object) -> str:
    """Say why a leaf value cannot be stored losslessly."""
    kind = type(value)
    if kind is tuple:
        return "is a tuple, which would come back as a list"
    if kind is set or kind is frozenset:
        return f"is {_type_phrase(value)}, which msgpack cannot store (use a list)"
    if kind is bytearray or kind is memoryview:
        return f"is {_type_phrase(value)}, which would come back as bytes"
    if kind is int:
        return f"is the int {reprlib.repr(value)}, outside the 64-bit range msgpack stores"
    if kind is float:
        return "is a float NaN, which never equals itself, so it cannot come back equal"
    if isinstance(value, BaseModel):
        return f"is a pydantic model ({kind.__qualname__}); store plain data (model_dump())"
    for base in (bool, int, float, str, bytes, list, dict):
        if isinstance(value, base):
            return (
                f"is {_type_phrase(value)} (a {base.__name__} subclass), "
                f"which would come back as a plain {base.__name__}"
            )
    return f"is {_type_phrase(value)}, which cannot be stored losslessly"


def _check_leaf(value: Any) -> None:
    """Accept an int in 64-bit range, a non-NaN float or a TextAccessor; reject the rest."""
    kind = type(value)
    if kind is int:
        if _INT_MIN <= value <= _INT_MAX:
            return
    elif kind is float:
        if value == value:  # NaN is the only float unequal to itself
            return
    elif kind is TextAccessor:
        # LangChain's own ``message.text`` type: no state beyond the str, and it
        # compares equal to the plain str it comes back as (see _plain_text).
        return
    raise _Invalid(_why_not_plain(value))


def _too_deep() -> _Invalid:
    return _Invalid(f"is nested more than {MAX_NESTING_DEPTH} levels deep (or contains itself)")


def _check_nested(item: Any, kind: type, depth: int) -> None:
    """Check a value that is not a plain leaf: a container, or a leaf needing a look."""
    if kind is dict:
        _check_dict(item, depth)
    elif kind is list:
        _check_list(item, depth)
    else:
        _check_leaf(item)


# The compiled twin of the two checks below (None where not built): a yes ends a
# top-level check; a no runs the Python one, which finds and names what is wrong.
_plain_tree: Final = _accel.plain_tree


def _compiled_says_plain(value: Any, depth: int) -> bool:
    """Does the compiled check pass ``value`` (top-level calls only)?"""
    return (
        not depth
        and _plain_tree is not None
        and _plain_tree(value, 0, MAX_NESTING_DEPTH, TextAccessor)
    )


def _check_dict(value: dict[Any, Any], depth: int) -> None:
    """Check a free-form dict: ``str`` keys, plain values, bounded depth."""
    if _compiled_says_plain(value, depth):
        return
    if depth >= MAX_NESTING_DEPTH:
        raise _too_deep()
    depth += 1
    for key, item in value.items():
        if type(key) is not str and type(key) is not TextAccessor:
            raise _Invalid(
                f"has the key {reprlib.repr(key)} of type {type(key).__qualname__}; "
                "only str keys come back as stored"
            )
        kind = type(item)
        if kind in _PLAIN_LEAF_TYPES or (kind is int and _INT_MIN <= item <= _INT_MAX):
            continue
        try:
            _check_nested(item, kind, depth)
        except _Invalid as exc:
            exc.path.append(f"[{key!r}]")
            raise


def _check_list(value: list[Any], depth: int) -> None:
    """Check a free-form list: plain items, bounded depth."""
    if _compiled_says_plain(value, depth):
        return
    if depth >= MAX_NESTING_DEPTH:
        raise _too_deep()
    depth += 1
    for item in value:
        kind = type(item)
        if kind in _PLAIN_LEAF_TYPES or (kind is int and _INT_MIN <= item <= _INT_MAX):
            continue
        try:
            _check_nested(item, kind, depth)
        except _Invalid as exc:
            # Found only on failure, to keep enumerate() off the fast path.
            index = next(i for i, other in enumerate(value) if other is item)
            exc.path.append(f"[{index}]")
            raise


def _check_any(value: Any) -> Any:
    """Check a free-form value (``ToolMessage.artifact``, unknown future fields)."""
    kind = type(value)
    if kind is dict:
        _check_dict(value, 0)
    elif kind is list:
        _check_list(value, 0)
    elif kind not in _PLAIN_LEAF_TYPES:
        _check_leaf(value)
    return value


def _expected(value: Any, what: str) -> _Invalid:
    return _Invalid(f"is {_type_phrase(value)}, expected {what}")


def _check_str(value: Any) -> str:
    """Check a ``str`` field; LangChain's own ``TextAccessor`` is stored as a str."""
    kind = type(value)
    if kind is str:
        return value  # type: ignore[no-any-return]
    if kind is TextAccessor:
        return str.__str__(value)
    raise _expected(value, "str")


def _check_optional_str(value: Any) -> str | None:
    return None if value is None else _check_str(value)


def _check_free_dict(value: Any) -> dict[str, Any]:
    if type(value) is not dict:
        raise _expected(value, "dict")
    if value:  # most of a message's dicts are empty: skip the call
        _check_dict(value, 0)
    return value


def _check_optional_free_dict(value: Any) -> dict[str, Any] | None:
    return None if value is None else _check_free_dict(value)


def _check_dict_list(value: Any) -> list[dict[str, Any]]:
    """Check a list of dicts (tool calls, invalid tool calls, tool call chunks)."""
    if type(value) is not list:
        raise _expected(value, "list")
    for index, item in enumerate(value):
        if type(item) is not dict:
            exc = _expected(item, "dict")
            exc.path.append(f"[{index}]")
            raise exc
    _check_list(value, 0)
    return value


def _check_content(value: Any) -> str | list[Any]:
    """Check message content: a str, or a list of str and dict blocks."""
    kind = type(value)
    if kind is str:
        return value  # type: ignore[no-any-return]
    if kind is not list:
        raise _expected(value, "str or list")
    for index, item in enumerate(value):
        if type(item) is not str and type(item) is not dict:
            exc = _expected(item, "str or dict")
            exc.path.append(f"[{index}]")
            raise exc
    _check_list(value, 0)
    return value  # type: ignore[no-any-return]


def _literal_check(allowed: frozenset[str | None]) -> _Check:
    """Build a check for a ``Literal[...]`` (or optional literal) field."""
    shown = " or ".join(sorted(repr(choice) for choice in allowed))

    def check(value: Any) -> Any:
        if (value is None or type(value) is str) and value in allowed:
            return value
        raise _Invalid(f"is {reprlib.repr(value)}, expected {shown}")

    return check


def _literal_values(annotation: Any) -> frozenset[str | None] | None:
    """Return the values of a ``Literal``/``Optional[Literal]`` annotation, else None."""
    if get_origin(annotation) is Literal:
        options = get_args(annotation)
    elif get_origin(annotation) in (Union, type(str | None)):
        options = ()
        for arm in get_args(annotation):
            if arm is type(None):
                options += (None,)
            elif get_origin(arm) is Literal:
                options += get_args(arm)
            else:
                return None
    else:
        return None
    if not all(option is None or type(option) is str for option in options):
        return None
    return frozenset(options)


# Field name -> check, for the fields langchain-core 1.x defines.  A field not listed
# (added by a later release) is stored as free-form data, checked like any other.
_CHECKS_BY_FIELD: Final[dict[str, _Check]] = {
    "text": _check_str,
    "generation_info": _check_optional_free_dict,
    "content": _check_content,
    "additional_kwargs": _check_free_dict,
    "response_metadata": _check_free_dict,
    "type": _check_str,
    "name": _check_optional_str,
    "id": _check_optional_str,
    "tool_calls": _check_dict_list,
    "invalid_tool_calls": _check_dict_list,
    "tool_call_chunks": _check_dict_list,
    "usage_metadata": _check_optional_free_dict,
    "tool_call_id": _check_str,
    "role": _check_str,
}


# The compiled encoder's name for each check (the order of _speedups_codec.c).
_COMPILED_KINDS: Final[dict[_Check, int]] = {
    check: code
    for code, check in enumerate(
        (_check_str, _check_optional_str, _check_free_dict, _check_optional_free_dict,
         _check_dict_list, _check_content, _check_any)
    )
}  # fmt: skip
_KIND_LITERAL: Final = 7
_KIND_MESSAGE: Final = 8
for _field_check in _CHECKS_BY_FIELD.values():
    assert _field_check in _COMPILED_KINDS, _field_check  # a new check needs a C twin


# --------------------------------------------------------------------------- schema


@dataclass(eq=False)
class _ClassSpec:
    """How one class is written and rebuilt."""

    cls: type[BaseModel]
    tag: int
    names: tuple[str, ...]
    encoders: tuple[_Check, ...]
    decoders: tuple[_Check, ...]
    allows_extra: bool
    # Rebuild like model_construct (no post-init hook, no private attributes).
    fast_build: bool
    # operator.itemgetter over ``names``: the field values as a tuple, in one C call.
    get_values: Callable[[dict[str, Any]], tuple[Any, ...]]
    # Class, fields and their checks as text, for the layout digest.
    layout: str
    # Length of the encoded array: tag, mask, extras, then one slot per field.
    width: int = field(init=False)
    # Mask bit saying the extras' names are in ``model_fields_set``.
    extras_bit: int = field(init=False)
    mask_by_fields_set: dict[frozenset[str], int] = field(default_factory=dict)
    fields_set_by_mask: dict[int, frozenset[str]] = field(default_factory=dict)
    # Names of the fields that hold a nested message (rebuilt, not taken as data).
    message_fields: tuple[str, ...] = ()
    # ChatGeneration-like: ``text`` mirrors ``message.content`` and is not stored
    # twice; its slot holds nil then (a 1 KB answer would otherwise take 2 KB).
    text_mirrors_message: bool = False
    # Each field's check as the compiled encoder names it: (code, argument).
    compiled_kinds: tuple[tuple[int, object], ...] = ()

    def __post_init__(self) -> None:
        self.width = 3 + len(self.names)
        self.extras_bit = 1 << len(self.names)


def _message_field_checks(
    base: type[BaseMessage],
) -> tuple[_Check, _Check]:
    """Build the encode/decode pair for ``ChatGeneration.message``-like fields."""

    def encode(value: Any) -> list[Any]:
        spec = _MESSAGE_SPECS.get(type(value))
        if spec is None:
            raise _Invalid(_unsupported_class(value, _MESSAGE_SPECS))
        if not isinstance(value, base):
            raise _expected(value, base.__name__)
        return _encode_object(value, spec)

    def decode(value: Any) -> BaseModel:
        obj = _decode_object(value, _MESSAGE_SPECS_BY_TAG)
        if not isinstance(obj, base):
            raise _expected(obj, base.__name__)
        return obj

    return encode, decode


def _values_getter(names: tuple[str, ...]) -> Callable[[dict[str, Any]], tuple[Any, ...]]:
    """Return a function reading ``names`` from a ``__dict__`` as a tuple."""
    if len(names) == 1:  # itemgetter of one name returns the bare value
        name = names[0]
        return lambda values: (values[name],)
    return operator.itemgetter(*names)


def _build_spec(tag: int, cls: type[BaseModel]) -> _ClassSpec:
    """Derive a class's spec from its ``model_fields`` (exact, in field order)."""
    encoders: list[_Check] = []
    decoders: list[_Check] = []
    message_fields: list[str] = []
    mirrors = "text" in cls.model_fields and "message" in cls.model_fields
    layout = [f"{tag}:{cls.__name__}:{cls.model_config.get('extra')}"]
    compiled_kinds: list[tuple[int, object]] = []
    for name, info in cls.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseMessage):
            encode, decode = _message_field_checks(annotation)
            message_fields.append(name)
            kind = f"message[{annotation.__name__}]"
            compiled_kinds.append((_KIND_MESSAGE, annotation))
        elif (allowed := _literal_values(annotation)) is not None:
            encode = decode = _literal_check(allowed)
            kind = f"literal{sorted(allowed, key=repr)}"
            compiled_kinds.append((_KIND_LITERAL, allowed))
        else:
            encode = decode = _CHECKS_BY_FIELD.get(name, _check_any)
            kind = encode.__name__
            compiled_kinds.append((_COMPILED_KINDS[encode], None))
        encoders.append(encode)
        decoders.append(_check_optional_str if mirrors and name == "text" else decode)
        layout.append(f"{name}={kind}")
    return _ClassSpec(
        cls=cls,
        tag=tag,
        names=tuple(cls.model_fields),
        encoders=tuple(encoders),
        decoders=tuple(decoders),
        allows_extra=cls.model_config.get("extra") == "allow",
        get_values=_values_getter(tuple(cls.model_fields)),
        layout=",".join(layout) + (",text=mirror" if mirrors else ""),
        message_fields=tuple(message_fields),
        text_mirrors_message=mirrors,
        compiled_kinds=tuple(compiled_kinds),
        fast_build=(
            not cls.__pydantic_post_init__
            and not cls.__private_attributes__
            and not cls.__pydantic_root_model__
        ),
    )


def _layout_digest(specs: Iterable[_ClassSpec]) -> bytes:
    """Digest of tags, classes, fields and checks: another layout must not be misread."""
    text = ";".join(spec.layout for spec in specs)
    return struct.pack(">I", zlib.crc32(text.encode()))


_GENERATION_SPECS: Final[dict[type, _ClassSpec]] = {
    cls: _build_spec(tag, cls) for tag, cls in _GENERATION_TAGS
}
_GENERATION_SPECS_BY_TAG: Final[dict[int, _ClassSpec]] = {
    spec.tag: spec for spec in _GENERATION_SPECS.values()
}
_MESSAGE_SPECS: Final[dict[type, _ClassSpec]] = {
    cls: _build_spec(tag, cls) for tag, cls in _MESSAGE_TAGS
}
_MESSAGE_SPECS_BY_TAG: Final[dict[int, _ClassSpec]] = {
    spec.tag: spec for spec in _MESSAGE_SPECS.values()
}


def _compiled_table(specs_by_tag: dict[int, _ClassSpec]) -> tuple[object, ...]:
    """The compiled rebuild's view of a tag table (see ``_speedups_codec.c``).

    Index = tag; None where a class is not rebuilt like ``model_construct``, which
    sends its values to :func:`_rebuild_verified`.  ``masks`` is the spec's own
    fields-set cache, read (never written) by the C code.
    """
    table: list[object] = [None] * (max(specs_by_tag) + 1)
    for tag, spec in specs_by_tag.items():
        if not spec.fast_build:
            continue
        names = spec.names
        table[tag] = (
            spec.cls,
            names,
            spec.allows_extra,
            spec.fields_set_by_mask,
            tuple(names.index(name) for name in spec.message_fields),
            names.index("text") if spec.text_mirrors_message else -1,
            names.index("message") if spec.text_mirrors_message else -1,
        )
    return tuple(table)




def _compiled_encoders(specs: dict[type, _ClassSpec]) -> dict[type, tuple[object, ...]]:
    """The compiled encoder's view of a class table (see ``_speedups_codec.c``)."""
    return {
        cls: (
            spec.tag,
            spec.names,
            spec.compiled_kinds,
            spec.names.index("text") if spec.text_mirrors_message else -1,
            spec.names.index("message") if spec.text_mirrors_message else -1,
        )
        for cls, spec in specs.items()
    }


_GENERATION_ENCODERS: Final = _compiled_encoders(_GENERATION_SPECS)
_MESSAGE_ENCODERS: Final = _compiled_encoders(_MESSAGE_SPECS)
# The compiled encoder (None where not built): the payload of the common shapes
# (no TextAccessor, extras or private attributes, every check passed); None for
# anything else, which _encode_object then writes or refuses, naming the problem.
_flatten: Final = _accel.flatten
_GENERATION_TABLE: Final = _compiled_table(_GENERATION_SPECS_BY_TAG)
_MESSAGE_TABLE: Final = _compiled_table(_MESSAGE_SPECS_BY_TAG)
# The compiled rebuild (None where not built): the objects of the common shapes;
# None for anything else, which _rebuild_verified then builds or refuses.
# decode_plain also checks the header and unpacks a plain body (as _unpack does).
_rebuild: Final = _accel.rebuild
_decode_plain: Final = _accel.decode_plain
_LAYOUT_DIGEST: Final[bytes] = _layout_digest(
    [*_GENERATION_SPECS.values(), *_MESSAGE_SPECS.values()]
)
# The five bytes before a plain body / before a compressed one.
_HEADER: Final[bytes] = bytes([_PLAIN_FORMAT]) + _LAYOUT_DIGEST
_COMPRESSED_HEADER: Final[bytes] = bytes([_COMPRESSED_FORMAT]) + _LAYOUT_DIGEST


def _unsupported_class(value: object, specs: dict[type, _ClassSpec]) -> str:
    kind = type(value)
    names = ", ".join(spec.cls.__name__ for spec in specs.values())
    return (
        f"is {_type_phrase(value)} (from {kind.__module__}), which the codec cannot "
        f"rebuild exactly; supported: {names}"
    )


# --------------------------------------------------------------------------- encode


def _fields_set_mask(spec: _ClassSpec, obj: BaseModel, extras: dict[str, Any] | None) -> int:
    """Encode ``model_fields_set`` as a bit mask over the spec's fields."""
    fields_set: set[str] = obj.__pydantic_fields_set__
    key = frozenset(fields_set)
    mask = spec.mask_by_fields_set.get(key)
    if mask is None:
        mask = sum(1 << i for i, name in enumerate(spec.names) if name in key)
        if len(spec.mask_by_fields_set) < _MASK_CACHE_MAX_ENTRIES:
            spec.mask_by_fields_set[key] = mask
    if extras and extras.keys() <= key:
        mask |= spec.extras_bit
    return mask


def _encode_extras(spec: _ClassSpec, obj: BaseModel) -> dict[str, Any] | None:
    """Return the object's extra (undeclared) fields, checked, or None."""
    extras = obj.__pydantic_extra__
    if getattr(obj, "__pydantic_private__", None):
        raise _Invalid("has private attributes, which the codec does not store")
    if not extras:
        return None
    if not spec.allows_extra:  # the decoder would refuse them
        raise _Invalid("has extra fields, which its class does not allow")
    try:
        _check_dict(extras, 0)
    except _Invalid as exc:
        exc.path.append(" (extra fields)")
        raise
    clash = extras.keys() & set(spec.names)
    if clash:
        raise _Invalid(f"has extra fields named like declared fields: {sorted(clash)}")
    return extras


def _run_checks(
    names: tuple[str, ...], checks: tuple[_Check, ...], values: Sequence[Any]
) -> list[Any]:
    """Apply each field's check; on failure, say which field failed."""
    try:
        # map() keeps the per-field loop in C: this is the hot path of both directions.
        return list(map(_call, checks, values))
    except _Invalid:
        pass
    # Rare path: re-run one by one (checks are pure) to name the field.
    for name, check, value in zip(names, checks, values, strict=True):
        try:
            check(value)
        except _Invalid as exc:
            exc.path.append(f".{name}")
            raise
    raise AssertionError("unreachable: a check failed only once")  # pragma: no cover


def _encode_object(obj: BaseModel, spec: _ClassSpec) -> list[Any]:
    """Encode one generation or message as ``[tag, mask, extras, *fields]``."""
    extras = _encode_extras(spec, obj)
    try:
        values = spec.get_values(obj.__dict__)
    except KeyError as exc:
        raise _Invalid(f"has no value for its field {exc}") from None
    out: list[Any] = [spec.tag, _fields_set_mask(spec, obj, extras), extras]
    out += _run_checks(spec.names, spec.encoders, values)
    if spec.text_mirrors_message:
        content = obj.__dict__["message"].content
        if type(content) is str and obj.__dict__["text"] == content:
            out[3 + spec.names.index("text")] = None
    return out


def _plain_text(value: Any) -> str:
    """msgpack ``default`` hook: store a TextAccessor as the str it is."""
    if type(value) is TextAccessor:
        return str.__str__(value)
    raise TypeError(f"cannot pack {_type_phrase(value)}")


def _pack(payload: list[Any]) -> bytes:
    """Pack with msgpack; lone surrogates take the slower ``surrogatepass`` path."""
    # A Packer per call (what packb does) keeps this thread-safe; it costs ~0.1 us.
    # strict_types sends every subclass to ``default``: the checks let only
    # TextAccessor through, anything else that slipped past them fails loudly.
    try:
        return msgpack.packb(payload, use_bin_type=True, strict_types=True, default=_plain_text)
    except UnicodeEncodeError:
        return msgpack.packb(
            payload,
            use_bin_type=True,
            strict_types=True,
            default=_plain_text,
            unicode_errors="surrogatepass",
        )


def _python_payload(generations: Sequence[Generation]) -> list[Any]:
    """The payload of :func:`encode_generations`, every field checked in Python."""
    payload: list[Any] = []
    for index, generation in enumerate(generations):
        root = f"generations[{index}]"
        spec = _GENERATION_SPECS.get(type(generation))
        try:
            if spec is None:
                raise _Invalid(_unsupported_class(generation, _GENERATION_SPECS))
            payload.append(_encode_object(generation, spec))
        except _Invalid as exc:
            raise UnencodableValueError(exc.describe(root)) from None
        except RecursionError:
            raise UnencodableValueError(f"{root} is nested too deeply to encode") from None
    return payload


def encode_generations(generations: Sequence[Generation], *, compress: bool = True) -> bytes:
    """Encode the generations LangChain hands to ``BaseCache.update``.

    Args:
        generations: A non-empty sequence of ``Generation``, ``GenerationChunk``,
            ``ChatGeneration`` or ``ChatGenerationChunk`` (exactly these classes).
        compress: False: never compress (format 1), e.g. while the segment has room.

    Returns:
        Bytes in format 1 (plain) or 2 (compressed, where that saves at least an
        eighth), which :func:`decode_generations` turns back into an equal list of
        the same classes.

    Raises:
        UnencodableValueError: The value is empty, or would not come back equal and
            of the same classes; the message names the offending part, e.g.
            ``generations[0].message.additional_kwargs['x'] is a tuple, which would
            come back as a list``.
    """
    if type(generations) is not list and (  # a list needs no ABC check (LangChain's case)
        not isinstance(generations, Sequence) or isinstance(generations, (str, bytes))
    ):
        raise UnencodableValueError(
            f"expected a sequence of Generation objects, got {_type_phrase(generations)}"
        )
    if not generations:
        raise UnencodableValueError("the value is an empty sequence; there is nothing to store")
    payload: list[Any] | None = None
    if _flatten is not None:
        payload = _flatten(
            generations, _GENERATION_ENCODERS, _MESSAGE_ENCODERS, TextAccessor, MAX_NESTING_DEPTH
        )
    if payload is None:
        payload = _python_payload(generations)
    try:
        body = _pack(payload)
    except (TypeError, ValueError, OverflowError) as exc:
        # Unreachable if the checks above are complete; kept so no other type escapes.
        raise UnencodableValueError(f"the value cannot be packed: {exc}") from exc
    compressed = _compress.compress_body(body, compress=compress)
    if compressed is None:
        return _HEADER + body
    return _COMPRESSED_HEADER + compressed


# --------------------------------------------------------------------------- decode


def _reject_ext(code: int, data: bytes) -> Any:
    raise _Invalid(f"holds a msgpack extension type {code}, which the codec never writes")


def _unpack(data: bytes | memoryview) -> Any:
    """Check the header, decompress a compressed body (bounded) and unpack the body
    with limits bound by its length."""
    view = memoryview(data).cast("B")
    if view.nbytes < _HEADER_LEN + 1:
        raise _Invalid(f"is {view.nbytes} bytes long, too short for an encoding")
    header = view[:_HEADER_LEN].tobytes()
    body: bytes | memoryview
    if header == _HEADER:
        body = view[_HEADER_LEN:]
    elif header == _COMPRESSED_HEADER:
        # Raises CompressedDataError (a CodecError) on any bad or lying body.
        body = _compress.decompress_body(view[_HEADER_LEN:])
    else:
        raise CodecVersionError(
            f"written with codec format {header[0]} / layout {header[1:].hex()}, "
            f"this process reads formats {_PLAIN_FORMAT}-{FORMAT_VERSION} / layout "
            f"{_LAYOUT_DIGEST.hex()} (another shmcache or langchain-core version); "
            "treat it as a miss"
        )
    # unpackb's defaults already bound every length by the input's size (no
    # allocation beyond it), refuse non-str keys and give lists; each keyword
    # passed costs time on the hit path.
    return msgpack.unpackb(body, unicode_errors="surrogatepass", ext_hook=_reject_ext)


def _decode_fields_set(spec: _ClassSpec, mask: Any, extras: dict[str, Any] | None) -> set[str]:
    """Turn a mask back into a fresh ``model_fields_set``."""
    if type(mask) is not int or not 0 <= mask < spec.extras_bit << 1:
        raise _Invalid(f"has the fields-set mask {reprlib.repr(mask)}, out of range")
    names = spec.fields_set_by_mask.get(mask)
    if names is None:
        names = frozenset(name for i, name in enumerate(spec.names) if mask >> i & 1)
        if len(spec.fields_set_by_mask) < _MASK_CACHE_MAX_ENTRIES:
            spec.fields_set_by_mask[mask] = names
    fields_set = set(names)
    if mask & spec.extras_bit:
        if not extras:
            raise _Invalid("marks extra fields as set but has none")
        fields_set.update(extras)
    return fields_set


def _decode_extras(spec: _ClassSpec, extras: Any) -> dict[str, Any] | None:
    """Check the extras slot; return the dict pydantic keeps in ``__pydantic_extra__``."""
    if extras is None:
        return {} if spec.allows_extra else None
    if not spec.allows_extra or type(extras) is not dict or not extras:
        raise _Invalid(f"has extra fields {reprlib.repr(extras)} where none can be")
    _check_dict(extras, 0)
    if not extras.keys().isdisjoint(spec.names):
        raise _Invalid("has extra fields named like declared fields")
    return extras


def _restore_text(values: dict[str, Any]) -> None:
    """Put back a ChatGeneration ``text`` stored as nil (it equals the str content)."""
    if values["text"] is None:
        content = values["message"].content
        if type(content) is not str:
            raise _Invalid("has no text and its message content is not a str")
        values["text"] = content


_new_object: Final = object.__new__
_set_slot: Final = object.__setattr__


def _decode_object(item: Any, specs_by_tag: dict[int, _ClassSpec]) -> BaseModel:
    """Check and rebuild one ``[tag, mask, extras, *fields]`` array."""
    if type(item) is not list or len(item) < 3:
        raise _expected(item, "an object array")
    tag = item[0]
    spec = specs_by_tag.get(tag) if type(tag) is int else None
    if spec is None:
        raise _Invalid(f"has the unknown class tag {reprlib.repr(tag)}")
    if len(item) != spec.width:
        raise _Invalid(f"has {len(item)} slots, {spec.cls.__name__} takes {spec.width}")
    extras = _decode_extras(spec, item[2])
    fields_set = _decode_fields_set(spec, item[1], extras)
    # Lengths match (checked above); zip's strict= keyword alone costs ~0.15 us here.
    values = dict(zip(spec.names, _run_checks(spec.names, spec.decoders, item[3:])))  # noqa: B905
    return _build(spec, values, fields_set, extras)


def _build(
    spec: _ClassSpec,
    values: dict[str, Any],
    fields_set: set[str],
    extras: dict[str, Any] | None,
) -> BaseModel:
    """Make the object from its field values (both decoders end here)."""
    if spec.text_mirrors_message:
        _restore_text(values)
    if not spec.fast_build:
        return spec.cls.model_construct(fields_set, **values, **(extras or {}))
    # What model_construct does once defaults are resolved; every field is present.
    obj = _new_object(spec.cls)
    _set_slot(obj, "__dict__", values)
    _set_slot(obj, "__pydantic_fields_set__", fields_set)
    _set_slot(obj, "__pydantic_extra__", extras)
    _set_slot(obj, "__pydantic_private__", None)
    return obj


def _rebuild_verified(item: Any, specs_by_tag: dict[int, _ClassSpec]) -> BaseModel:
    """Rebuild one object from an array this module's encoder wrote (unchecked fields)."""
    spec = specs_by_tag[item[0]]
    if len(item) != spec.width:
        raise _Invalid(f"has {len(item)} slots, {spec.cls.__name__} takes {spec.width}")
    extras = item[2]
    if extras is None and spec.allows_extra:
        extras = {}
    values = dict(zip(spec.names, item[3:]))  # noqa: B905 - width checked above
    for name in spec.message_fields:
        values[name] = _rebuild_verified(values[name], _MESSAGE_SPECS_BY_TAG)
    return _build(spec, values, _decode_fields_set(spec, item[1], extras), extras)


def decode_verified(data: bytes | memoryview) -> list[Generation]:
    """Rebuild generations from bytes whose integrity the caller has verified.

    The cache's hit path: a record that matched its full key digest, position and
    crc32 holds exactly what :func:`encode_generations` wrote from validated objects
    (DESIGN §3), so the per-field shape checks of :func:`decode_generations` are
    skipped — they cost more than the rest of the hit.  The header (format and
    layout), class tags, array widths and ``model_fields_set`` masks are still
    checked, a compressed body is decompressed with every bound of
    :func:`decode_generations`, and any failure still raises :class:`CodecError`
    and nothing else.

    Raises:
        CodecError: ``data`` is not a valid encoding; :class:`CodecVersionError` if
            it was written under another format or langchain-core field layout.
    """
    try:
        if _decode_plain is not None:
            built = _decode_plain(
                data, _HEADER, msgpack.unpackb, _reject_ext, _GENERATION_TABLE, _MESSAGE_TABLE
            )
            if built is not None:
                return built  # type: ignore[return-value]
        payload = _unpack(data)
        if _rebuild is not None:
            built = _rebuild(payload, _GENERATION_TABLE, _MESSAGE_TABLE)
            if built is not None:
                return built  # type: ignore[return-value]
        return [_rebuild_verified(item, _GENERATION_SPECS_BY_TAG) for item in payload]  # type: ignore[misc]
    except CodecError:
        raise
    except _Invalid as exc:
        raise CodecError(f"not a valid encoding: {exc.describe('generations')}") from None
    except Exception as exc:  # wrong shapes surface as KeyError, TypeError, ...
        raise CodecError(f"not a valid encoding: {type(exc).__name__}: {exc}") from exc


def decode_generations(data: bytes | memoryview) -> list[Generation]:
    """Rebuild the generations from bytes written by :func:`encode_generations`.

    Every call returns a new list of new objects (callers mutate them), equal to the
    stored ones and of exactly the same classes.

    Args:
        data: The encoded value (``bytes``, or a ``memoryview`` into shared memory,
            which is not kept past the call).

    Returns:
        The list of generations.

    Raises:
        CodecError: ``data`` is not a valid encoding (damaged, truncated, or not ours);
            :class:`CodecVersionError` if it was written under another format or
            langchain-core field layout.  No other exception escapes.
    """
    try:
        payload = _unpack(data)
        if type(payload) is not list or not payload:
            raise _expected(payload, "a non-empty list of generations")
        generations: list[Generation] = []
        for index, item in enumerate(payload):
            try:
                generations.append(cast(Generation, _decode_object(item, _GENERATION_SPECS_BY_TAG)))
            except _Invalid as exc:
                exc.path.append(f"[{index}]")
                raise
        return generations
    except CodecError:
        raise
    except _Invalid as exc:
        raise CodecError(f"not a valid encoding: {exc.describe('generations')}") from None
    except Exception as exc:  # msgpack, memoryview and recursion errors alike
        raise CodecError(f"not a valid encoding: {type(exc).__name__}: {exc}") from exc

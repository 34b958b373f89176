"""The compiled free-form check (``_speedups.plain_tree``) agrees with the codec's own.

An update checks that every free-form dict and list of a value (``additional_kwargs``,
``response_metadata``, tool call arguments, ``usage_metadata`` …) comes back exactly
as stored: ``str`` keys, no tuple, set, NaN, out-of-range int or subclass anywhere,
at most ``MAX_NESTING_DEPTH`` levels.  Where the extension is built, a compiled yes
ends that check and a no lets the Python check find and name the problem.  So the two
must agree on every tree, in both directions: a wrong yes would store a value that
does not come back equal, a wrong no would cost time on every update.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from langchain_core.messages import AIMessage
from langchain_core.messages.base import TextAccessor
from langchain_core.outputs import ChatGeneration

from shmcache import _accel, _codec
from shmcache._codec import UnencodableValueError

pytestmark = pytest.mark.skipif(
    not _accel.compiled(),
    reason="the C extension is not built here (test_speedups says whether it should be)",
)
MAX = _codec.MAX_NESTING_DEPTH


class _Str(str):
    pass


class _Int(int):
    pass


class _Dict(dict):  # type: ignore[type-arg]
    pass


def _python_passes(value: Any, monkeypatch: pytest.MonkeyPatch) -> bool:
    with monkeypatch.context() as patch:
        patch.setattr(_codec, "_plain_tree", None)
        try:
            _codec._check_any(value)
        except _codec._Invalid:
            return False
    return True


def _compiled_passes(value: Any) -> bool:
    assert _accel.plain_tree is not None
    if type(value) not in (dict, list):
        # _check_any looks at a bare leaf itself; the compiled check sees it in a list.
        return _accel.plain_tree([value], 0, MAX, TextAccessor)
    return _accel.plain_tree(value, 0, MAX, TextAccessor)


_leaves = st.one_of(
    st.none(), st.booleans(), st.text(max_size=5), st.binary(max_size=5),
    st.integers(min_value=-(2**63) - 2, max_value=2**64 + 1),
    st.sampled_from([-(2**63), -(2**63) - 1, 2**63, 2**64 - 1, 2**64, 0, -1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.builds(TextAccessor, st.text(max_size=5)),
    st.builds(_Str, st.text(max_size=3)), st.builds(_Int, st.integers(0, 9)),
    st.tuples(st.integers(0, 3)), st.frozensets(st.integers(0, 3), max_size=2),
    st.builds(bytearray, st.binary(max_size=3)), st.just(object()),
)  # fmt: skip
_keys = st.one_of(
    st.text(max_size=4), st.builds(TextAccessor, st.text(max_size=4)),
    st.integers(0, 3), st.builds(_Str, st.text(max_size=3)), st.none(),
    st.tuples(st.integers(0, 2)),
)  # fmt: skip
_trees = st.recursive(
    _leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(_keys, inner, max_size=4),
        st.builds(_Dict, st.dictionaries(st.text(max_size=2), inner, max_size=2)),
    ),
    max_leaves=25,
)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_trees)
def test_both_checks_agree_on_any_tree(tree: Any) -> None:
    with pytest.MonkeyPatch.context() as monkeypatch:
        assert _compiled_passes(tree) == _python_passes(tree, monkeypatch)


def _nested(levels: int, leaf: Any = 1) -> Any:
    value: Any = leaf
    for i in range(levels):
        value = [value] if i % 2 else {"k": value}
    return value


@pytest.mark.parametrize("levels", [MAX - 1, MAX, MAX + 1, MAX + 50])
@pytest.mark.parametrize("leaf", [1, "x", float("nan")])
def test_the_depth_bound_is_the_same(
    levels: int, leaf: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = _nested(levels, leaf)
    passes = _python_passes(tree, monkeypatch)
    assert _compiled_passes(tree) == passes
    assert passes == (levels <= MAX and not (isinstance(leaf, float) and math.isnan(leaf)))


def test_a_tree_that_contains_itself_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    loop: list[Any] = [1]
    loop.append(loop)
    loop_dict: dict[str, Any] = {}
    loop_dict["self"] = loop_dict
    for tree in (loop, loop_dict):
        assert not _compiled_passes(tree)
        assert not _python_passes(tree, monkeypatch)


def test_bad_arguments_are_refused() -> None:
    assert _accel.plain_tree is not None
    with pytest.raises(TypeError):
        _accel.plain_tree({}, 0, MAX)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="type"):
        _accel.plain_tree({}, 0, MAX, "not a type")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="depth"):
        _accel.plain_tree({}, -1, MAX, TextAccessor)
    with pytest.raises(ValueError, match="max_depth"):
        _accel.plain_tree({}, 0, 10**6, TextAccessor)


def test_an_unstorable_value_is_still_refused_with_its_path() -> None:
    """The compiled no hands over to the Python check, which names the field."""
    bad = ChatGeneration(
        message=AIMessage(content="hi", response_metadata={"scores": [1.0, float("nan")]})
    )
    with pytest.raises(UnencodableValueError, match=r"response_metadata.*\['scores'\]\[1\]"):
        _codec.encode_generations([bad])
    good = ChatGeneration(message=AIMessage(content="hi", response_metadata={"scores": [1.0]}))
    assert _codec.decode_generations(_codec.encode_generations([good])) == [good]

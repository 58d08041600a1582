"""Property tests of the bounded JSON parse and the id rules (``scope_stream.transport.validate``)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scope_stream.store import StoreRefused, store_path_for
from scope_stream.transport.validate import (
    MAX_DEPTH,
    MAX_INT_DIGITS,
    ProtocolError,
    is_safe_id,
    json_depth,
    loads,
)

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**MAX_INT_DIGITS) + 1, max_value=10**MAX_INT_DIGITS - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
_values = st.recursive(
    _scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=40,
)


def _depth(v: Any) -> int:
    if isinstance(v, list):
        return 1 + max((_depth(x) for x in v), default=0)
    if isinstance(v, dict):
        return 1 + max((_depth(x) for x in v.values()), default=0)
    return 0


@settings(max_examples=300, deadline=None)
@given(_values)
def test_what_fits_the_limits_round_trips(value: Any) -> None:
    raw = json.dumps(value).encode()
    if _depth(value) <= MAX_DEPTH:
        assert loads(raw) == value
    else:
        with pytest.raises(ProtocolError) as info:
            loads(raw)
        assert info.value.reason == "depth"


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=0, max_value=80), st.sampled_from(["[", '{"k":']))
def test_nesting_is_refused_past_the_limit_only(depth: int, opener: str) -> None:
    closer = "]" if opener == "[" else "}"
    raw = (opener * depth + "1" + closer * depth).encode()
    if depth <= MAX_DEPTH:
        assert json_depth(raw) == depth
        loads(raw)
    else:
        with pytest.raises(ProtocolError) as info:
            loads(raw)
        assert info.value.reason == "depth"


@settings(max_examples=200, deadline=None)
@given(_values, st.text(alphabet='[]{}"\\', max_size=30))
def test_depth_scan_ignores_brackets_inside_strings(value: Any, noise: str) -> None:
    wrapped = {"noise": noise, "value": value}
    assert json_depth(json.dumps(wrapped).encode()) == _depth(wrapped)
    if _depth(wrapped) <= MAX_DEPTH:
        assert loads(json.dumps(wrapped).encode()) == wrapped


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | st.text(alphabet='[]{}:,"0123456789.eE+-NaInfity ', max_size=200).map(str.encode))
def test_anything_else_only_ever_raises_protocol_error(raw: bytes) -> None:
    try:
        out = loads(raw)
    except ProtocolError as exc:
        assert exc.reason in ("header", "depth", "number")
        return
    json.dumps(out, allow_nan=False)  # whatever is accepted re-encodes


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 100_000,
        b"NaN",
        b"[Infinity]",
        b"-Infinity",
        b"1e400",
        b"-1e999",
        b"9" * 5000,
        b'{"a": ' + b"1" * 25 + b"}",
    ],
)
def test_known_killers_are_refused(raw: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        loads(raw)
    assert info.value.reason in ("depth", "number")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=140) | st.text(alphabet="./-_aZ09", max_size=12))
def test_safe_ids_stay_under_the_root(slide_id: str) -> None:
    root = Path("/srv/scans")
    if is_safe_id(slide_id):
        path = store_path_for(root, slide_id)
        assert path.parent == root.resolve() and path.name == f"{slide_id}.zarr"
        assert not slide_id.startswith(".") and ".." not in slide_id and "/" not in slide_id
    else:
        with pytest.raises(StoreRefused):
            store_path_for(root, slide_id)


def test_floats_are_finite() -> None:
    assert math.isfinite(loads(b"1.7976931348623157e308"))
    with pytest.raises(ProtocolError):
        loads(b"1.8e308")

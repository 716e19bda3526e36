"""`apply_select`: path expressions over nested Arrow values, checked against a Python reference."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from framefeed.errors import ConfigError
from framefeed.select import apply_select, select_type

pytestmark = pytest.mark.timeout(120)

POSE = pa.struct([("x", pa.float64()), ("y", pa.float64())])
ROW = pa.struct([("poses", pa.list_(POSE)), ("name", pa.string())])
# Rerun style: each row is a list of instances.
INSTANCES = pa.list_(
    pa.struct([("blob", pa.binary()), ("x", pa.int64()), ("v", pa.list_(pa.int64()))])
)

RERUN_ROWS: list[Any] = [
    [{"blob": b"a", "x": 1, "v": [1, 2]}],
    [],
    None,
    [{"blob": b"b", "x": 2, "v": None}, {"blob": None, "x": 3, "v": [7]}],
]


def _rows() -> pa.Array:
    return pa.array(RERUN_ROWS, type=INSTANCES)


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("[0]", [RERUN_ROWS[0][0], None, None, RERUN_ROWS[3][0]]),
        ("[0].blob", [b"a", None, None, b"b"]),
        ("[0]['blob']", [b"a", None, None, b"b"]),
        ('[0]["blob"]', [b"a", None, None, b"b"]),
        ("[1].blob", [None, None, None, None]),
        ("[-1].x", [1, None, None, 3]),
        ("[-2].x", [None, None, None, 2]),
        ("[0].v[1]", [2, None, None, None]),
        ("[0].v[-1]", [2, None, None, None]),
        ("[*].x", [[1], [], None, [2, 3]]),
        ("[*].v[0]", [[1], [], None, [None, 7]]),
        ("[*].v", [[[1, 2]], [], None, [None, [7]]]),
        ("[1:].x", [[], [], None, [3]]),
        ("[:-1].blob", [[], [], None, [b"b"]]),
        ("[::2].x", [[1], [], None, [2]]),
        ("[-5:5].x", [[1], [], None, [2, 3]]),
        ("[*].v[*]", [[[1, 2]], [], None, [None, [7]]]),
        ("[*].v[1:]", [[[2]], [], None, [None, []]]),
    ],
)
def test_rerun_style_rows(expr: str, expected: list[Any]) -> None:
    out = apply_select(_rows(), expr)
    assert out.to_pylist() == expected
    assert out.type == select_type(INSTANCES, expr)


def test_struct_rows_with_leading_dot_or_not() -> None:
    rows = pa.array(
        [
            {
                "poses": [{"x": 1.0, "y": 0.0}, {"x": 2.0, "y": 0.0}, {"x": 3.0, "y": 9.0}],
                "name": "a",
            },
            {"poses": [{"x": 4.0, "y": 1.0}], "name": None},
            None,
        ],
        type=ROW,
    )
    assert apply_select(rows, "name").to_pylist() == ["a", None, None]
    assert apply_select(rows, ".name").to_pylist() == ["a", None, None]
    assert apply_select(rows, "poses[2].x").to_pylist() == [3.0, None, None]
    assert apply_select(rows, ".poses[-1].y").to_pylist() == [9.0, 1.0, None]
    assert apply_select(rows, "poses[*].x").to_pylist() == [[1.0, 2.0, 3.0], [4.0], None]
    assert apply_select(rows, "poses[-2:].x").to_pylist() == [[2.0, 3.0], [4.0], None]


def test_binary_blob_column_keeps_its_bytes() -> None:
    """Rerun's EncodedImage blob: list<list<uint8>> per row; ``[0]`` gives one blob per row."""
    blobs = pa.array([[[1, 2, 3]], [[4]], []], type=pa.list_(pa.list_(pa.uint8())))
    out = apply_select(blobs, "[0]")
    assert out.type == pa.list_(pa.uint8())
    assert out.to_pylist() == [[1, 2, 3], [4], None]


@pytest.mark.parametrize(
    "list_type",
    [pa.list_(pa.int32()), pa.large_list(pa.int32()), pa.list_(pa.int32(), 3)],
    ids=["list", "large_list", "fixed_size_list"],
)
def test_list_flavours(list_type: pa.DataType) -> None:
    values = [[1, 2, 3], None, [4, 5, 6], [7, 8, 9]]
    arr = pa.array(values, type=list_type)
    assert apply_select(arr, "[0]").to_pylist() == [1, None, 4, 7]
    assert apply_select(arr, "[-1]").to_pylist() == [3, None, 6, 9]
    assert apply_select(arr, "[3]").to_pylist() == [None] * 4
    assert apply_select(arr, "[1:]").to_pylist() == [[2, 3], None, [5, 6], [8, 9]]
    sliced = arr.slice(1)  # a non-zero offset into the same buffers
    assert apply_select(sliced, "[1]").to_pylist() == [None, 5, 8]
    assert apply_select(sliced, "[*]").to_pylist() == [None, [4, 5, 6], [7, 8, 9]]
    expected_large = pa.types.is_large_list(list_type)
    assert pa.types.is_large_list(apply_select(arr, "[*]").type) == expected_large


def test_chunked_arrays_and_empty_inputs() -> None:
    rows = _rows()
    chunked = pa.chunked_array([rows, rows.slice(1, 2), rows.slice(0, 0)])
    out = apply_select(chunked, "[-1].x")
    assert isinstance(out, pa.Array)
    assert out.to_pylist() == [1, None, None, 3, None, None]
    empty = apply_select(pa.chunked_array([], type=INSTANCES), "[0].blob")
    assert len(empty) == 0 and empty.type == pa.binary()
    assert apply_select(rows.slice(0, 0), "[*].v[0]").to_pylist() == []


def test_extension_types_are_read_through_their_storage() -> None:
    class Tagged(pa.ExtensionType):
        def __init__(self) -> None:
            super().__init__(INSTANCES, "test.tagged")

        def __arrow_ext_serialize__(self) -> bytes:
            return b""

        @classmethod
        def __arrow_ext_deserialize__(cls, storage_type: pa.DataType, serialized: bytes) -> Any:
            return cls()

    arr = pa.ExtensionArray.from_storage(Tagged(), _rows())
    assert apply_select(arr, "[0].x").to_pylist() == [1, None, None, 2]


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "position", "expected"),
    [
        ("a..b", 2, 'a field name (letters, digits, "_") after "."'),
        ("a b", 1, '".name" or "[...]"'),
        ("[0", 2, '"]"'),
        ("[x]", 1, "an integer"),
        ("[]", 1, "an integer"),
        ("[1:2:0]", 5, "a slice step of at least 1"),
        ("[::-1]", 3, "a slice step of at least 1"),
        ("[1:2:3:4]", 6, '"]"'),
        ("*", 0, "a field name"),
        ("[0].", 4, "a field name"),
        ("[0]x", 3, '".name" or "[...]"'),
        ("['blob]", 1, "an integer"),
    ],
)
def test_syntax_errors_say_where_and_what(expr: str, position: int, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        apply_select(_rows(), expr)
    message = str(info.value)
    assert f"select expression {expr!r}" in message
    assert f"at position {position}, expected {expected}" in message
    assert message.endswith(" " * 4 + " " * position + "^")


def test_empty_expression() -> None:
    with pytest.raises(ConfigError, match="select expression is empty"):
        apply_select(_rows(), " ")


def test_missing_field_names_the_type_and_its_fields() -> None:
    with pytest.raises(ConfigError) as info:
        apply_select(_rows(), "[0].pose")
    message = str(info.value)
    assert "'.pose' at position 3" in message
    assert "struct<blob: binary, x: int64" in message
    assert "has no field 'pose'; its fields are ['blob', 'x', 'v']" in message


def test_field_of_a_list_says_to_index_it() -> None:
    with pytest.raises(ConfigError) as info:
        apply_select(_rows(), "blob")
    message = str(info.value)
    assert "'blob' at position 0 needs a struct with a field 'blob'" in message
    assert "list<item: struct<blob: binary" in message
    assert "index it first" in message


def test_index_of_a_scalar_and_of_a_struct() -> None:
    with pytest.raises(ConfigError, match=r"'\[0\]' at position 8 needs a list, .* type binary"):
        apply_select(_rows(), "[0].blob[0]")
    with pytest.raises(ConfigError, match=r"needs a list, .*its fields are \['blob', 'x', 'v'\]"):
        apply_select(_rows(), "[0][1]")


def test_type_errors_come_before_any_work() -> None:
    """The check runs on the type: an empty column with a bad path still fails."""
    with pytest.raises(ConfigError, match="has no field 'nope'"):
        apply_select(pa.array([], type=INSTANCES), "[0].nope")
    with pytest.raises(ConfigError, match="has no field 'nope'"):
        select_type(INSTANCES, "[*].nope")


# --- property: the vectorised path equals a row-by-row Python reference -----------------------

ITEM = pa.struct([("x", pa.int64()), ("v", pa.list_(pa.int64()))])
NESTED = pa.list_(ITEM)

_ints = st.one_of(st.none(), st.integers(-5, 5))
_items = st.one_of(
    st.none(),
    st.fixed_dictionaries(
        {
            "x": st.one_of(st.none(), st.integers(-100, 100)),
            "v": st.one_of(st.none(), st.lists(_ints, max_size=4)),
        }
    ),
)
_rows_strategy = st.lists(st.one_of(st.none(), st.lists(_items, max_size=5)), max_size=12)


@st.composite
def _steps(
    draw: st.DrawFn, data_type: pa.DataType = NESTED, depth: int = 0
) -> list[tuple[Any, ...]]:
    """Steps valid for ``data_type``: (field, n), (index, i), (each,), (slice, a, b, c)."""
    if depth > 0 and draw(st.booleans()):
        return []
    if pa.types.is_struct(data_type):
        name = draw(st.sampled_from([data_type.field(i).name for i in range(data_type.num_fields)]))
        return [("field", name), *draw(_steps(data_type.field(name).type, depth + 1))]
    if pa.types.is_list(data_type):
        kind = draw(st.sampled_from(["index", "each", "slice"]))
        rest = draw(_steps(data_type.value_type, depth + 1))
        if kind == "index":
            return [("index", draw(st.integers(-6, 6))), *rest]
        if kind == "each":
            return [("each",), *rest]
        bounds = (draw(st.one_of(st.none(), st.integers(-6, 6))) for _ in range(2))
        return [("slice", *bounds, draw(st.one_of(st.none(), st.integers(1, 3)))), *rest]
    return []


def _text(steps: list[tuple[Any, ...]]) -> str:
    out = []
    for step in steps:
        if step[0] == "field":
            out.append(f".{step[1]}")
        elif step[0] == "index":
            out.append(f"[{step[1]}]")
        elif step[0] == "each":
            out.append("[*]")
        else:
            a, b, c = ("" if v is None else str(v) for v in step[1:])
            out.append(f"[{a}:{b}:{c}]" if c else f"[{a}:{b}]")
    return "".join(out)


def _reference(value: Any, steps: list[tuple[Any, ...]]) -> Any:
    if not steps:
        return value
    if value is None:
        return None
    step, rest = steps[0], steps[1:]
    if step[0] == "field":
        return _reference(value[step[1]], rest)
    if step[0] == "index":
        i = step[1]
        return _reference(value[i], rest) if -len(value) <= i < len(value) else None
    if step[0] == "each":
        return [_reference(v, rest) for v in value]
    return [_reference(v, rest) for v in value[slice(*step[1:])]]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=_rows_strategy, steps=_steps(), offset=st.integers(0, 3), split=st.integers(0, 12))
def test_matches_row_by_row_reference(
    rows: list[Any], steps: list[tuple[Any, ...]], offset: int, split: int
) -> None:
    expr = _text(steps)
    arr = pa.array(rows, type=NESTED).slice(min(offset, len(rows)))
    expected = [_reference(r, steps) for r in arr.to_pylist()]
    out = apply_select(arr, expr)
    assert out.to_pylist() == expected, expr
    assert out.type == select_type(NESTED, expr)
    cut = min(split, len(arr))
    chunked = pa.chunked_array([arr.slice(0, cut), arr.slice(cut)], type=NESTED)
    assert apply_select(chunked, expr).to_pylist() == expected, expr

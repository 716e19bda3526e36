"""`select`: a small path expression over nested Arrow values, applied to whole columns.

Columns of robot recordings often hold structs or lists: a Rerun component is a list of
instances per row (``/camera:EncodedImage:blob`` holds ``list<binary>``), a pose is a struct.
``Field(..., select="[0]")`` picks the value to decode from each row. The expression is a chain
of steps, applied left to right to every row at once (``pyarrow.compute``, numpy index
arithmetic; never a Python loop over rows):

- ``name`` or ``.name``: a struct field (the first step may omit the dot); ``["odd name"]``
  quotes a name that is not an identifier.
- ``[i]``: list item ``i``; a negative ``i`` counts from the end (``[-1]`` is the last item).
- ``[*]``: every item; the steps after it apply to each item and the result is a list.
- ``[a:b]``, ``[a:b:step]``: like ``[*]`` over a slice, with Python's rules (``[1:]``,
  ``[:-1]``, ``[::2]``; the step is at least 1).

``"poses[2].x"`` is field ``poses``, its item 2, that item's field ``x``; ``"poses[*].x"`` is
the list of every pose's ``x`` and ``"poses[-2:].x"`` that of the last two. A row that is
null, or whose list is too short for ``[i]``, gives null (a decoder's "missing value"); it is
not an error, since Rerun rows may hold no instance at all. A malformed expression, or a step
that does not fit the column's type, is a `ConfigError` naming the position, the type there
and, for structs, the fields it has.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .errors import ConfigError

__all__ = ["SELECT_SEP", "apply_select", "select_type"]

SELECT_SEP = "#"
"""Separates a column path from a field's select expression in a derived column's path."""

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_INT = re.compile(r"-?[0-9]+")
_QUOTED = re.compile(r"\"((?:[^\"\\]|\\.)*)\"|'((?:[^'\\]|\\.)*)'")


@dataclass(frozen=True)
class _Step:
    kind: str
    """``field``, ``index``, ``slice`` or ``each``."""
    pos: int
    """Where the step starts in the expression (0-based)."""
    text: str
    """The step as written."""
    name: str = ""
    index: int = 0
    start: int | None = None
    stop: int | None = None
    step: int = 1


def _syntax(expr: str, pos: int, expected: str) -> ConfigError:
    found = repr(expr[pos]) if pos < len(expr) else "the end"
    pointer = f"\n    {expr}\n    {' ' * pos}^"
    return ConfigError(
        f"select expression {expr!r}: at position {pos}, expected {expected}, found {found}"
        f"{pointer}"
    )


@functools.lru_cache(maxsize=256)
def _parse(expr: str) -> tuple[_Step, ...]:
    if not isinstance(expr, str):
        raise ConfigError(f"a select expression must be a str, not {type(expr).__name__}")
    if not expr.strip():
        raise ConfigError(
            "select expression is empty; use a path such as 'blob', '[0]' or 'poses[2].x'"
        )
    steps: list[_Step] = []
    pos = 0
    while pos < len(expr):
        start = pos
        ch = expr[pos]
        if ch == "." or (ch != "[" and not steps):
            if ch == ".":
                pos += 1
            m = _NAME.match(expr, pos)
            if m is None:
                what = 'after "."' if ch == "." else 'or "[...]"'
                raise _syntax(expr, pos, f'a field name (letters, digits, "_") {what}')
            pos = m.end()
            steps.append(_Step("field", start, expr[start:pos], name=m.group()))
        elif ch == "[":
            pos += 1
            steps.append(_bracket(expr, start, pos))
            pos = start + len(steps[-1].text)
        else:
            raise _syntax(expr, pos, '".name" or "[...]"')
    return tuple(steps)


def _bracket(expr: str, start: int, pos: int) -> _Step:
    """The step of the ``[...]`` opening at ``start`` (``pos`` is just after the bracket)."""

    def close(at: int) -> int:
        if expr.startswith("]", at):
            return at + 1
        raise _syntax(expr, at, '"]"')

    if expr.startswith("*", pos):
        end = close(pos + 1)
        return _Step("each", start, expr[start:end])
    quoted = _QUOTED.match(expr, pos)
    if quoted is not None:
        raw = quoted.group(1) if quoted.group(1) is not None else quoted.group(2)
        name = re.sub(r"\\(.)", r"\1", raw)
        end = close(quoted.end())
        return _Step("field", start, expr[start:end], name=name)
    bounds: list[int | None] = []
    at = pos
    while True:
        m = _INT.match(expr, at)
        bounds.append(int(m.group()) if m is not None else None)
        at = m.end() if m is not None else at
        if len(bounds) < 3 and expr.startswith(":", at):
            at += 1
            continue
        break
    if len(bounds) == 1:
        if bounds[0] is None:
            raise _syntax(expr, at, 'an integer, a slice "a:b", "*" or a quoted field name')
        end = close(at)
        return _Step("index", start, expr[start:end], index=bounds[0])
    end = close(at)
    step = bounds[2] if len(bounds) == 3 and bounds[2] is not None else 1
    if step < 1:
        raise _syntax(expr, at - len(str(step)), "a slice step of at least 1")
    return _Step("slice", start, expr[start:end], start=bounds[0], stop=bounds[1], step=step)


def _storage(t: pa.DataType) -> pa.DataType:
    return t.storage_type if isinstance(t, pa.ExtensionType) else t


def _is_list(t: pa.DataType) -> bool:
    return bool(pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t))


def _mismatch(expr: str, step: _Step, t: pa.DataType, needs: str) -> ConfigError:
    detail = ""
    if pa.types.is_struct(t):
        fields = [t.field(i).name for i in range(t.num_fields)]
        detail = f"; its fields are {fields}"
    elif _is_list(t):
        detail = "; it is a list, so index it first ('[0]', '[-1]' or '[*]')"
    return ConfigError(
        f"select expression {expr!r}: {step.text!r} at position {step.pos} needs {needs}, "
        f"but the value there has type {t}{detail}"
    )


def _walk_types(expr: str, data_type: pa.DataType) -> list[pa.DataType]:
    """The type each step is applied to, checked; the last entry is the result's item type."""
    types = [data_type]
    t = data_type
    for step in _parse(expr):
        t = _storage(t)
        if step.kind == "field":
            if not pa.types.is_struct(t):
                raise _mismatch(expr, step, t, f"a struct with a field {step.name!r}")
            index = t.get_field_index(step.name)
            if index < 0:
                fields = [t.field(i).name for i in range(t.num_fields)]
                raise ConfigError(
                    f"select expression {expr!r}: {step.text!r} at position {step.pos}: the "
                    f"struct {t} has no field {step.name!r}; its fields are {fields}"
                )
            t = t.field(index).type
        else:
            if not _is_list(t):
                raise _mismatch(expr, step, t, "a list")
            t = t.value_type
        types.append(t)
    return types


def select_type(data_type: pa.DataType, expr: str) -> pa.DataType:
    """The type `apply_select` returns for a column of ``data_type`` (checks the expression)."""
    steps = _parse(expr)
    types = _walk_types(expr, data_type)
    out = types[-1]
    for step, before in zip(reversed(steps), reversed(types[:-1]), strict=True):
        if step.kind in ("each", "slice"):
            out = pa.large_list(out) if pa.types.is_large_list(_storage(before)) else pa.list_(out)
    return out


def apply_select(array: pa.Array | pa.ChunkedArray, expr: str) -> pa.Array:
    """``expr`` applied to every row of ``array`` (see the module docstring for the syntax)."""
    _walk_types(expr, array.type)  # every error before any work, naming the type
    if isinstance(array, pa.ChunkedArray):
        parts = [_apply(chunk, expr) for chunk in array.chunks]
        if not parts:
            return pa.array([], type=select_type(array.type, expr))
        return parts[0] if len(parts) == 1 else pa.concat_arrays(parts)
    return _apply(array, expr)


def _apply(array: pa.Array, expr: str) -> pa.Array:
    values = array
    # Each "[*]" or slice leaves a list layer: its offsets and null rows, to wrap the end result.
    layers: list[tuple[np.ndarray, np.ndarray | None, bool]] = []
    for step in _parse(expr):
        if isinstance(values.type, pa.ExtensionType):
            values = values.storage
        if step.kind == "field":
            values = pc.struct_field(values, [values.type.get_field_index(step.name)])
            continue
        lengths, nulls = _lengths(values)
        flat = values.flatten()
        starts = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1], out=starts[1:])
        if step.kind == "index":
            item = step.index if step.index >= 0 else lengths + step.index
            ok = (item >= 0) & (item < lengths)
            if nulls is not None:
                ok &= ~nulls
            take = np.where(ok, starts + item, 0)
            values = flat.take(pa.array(take, mask=~ok))
        elif step.kind == "each":
            layers.append((_offsets(lengths), nulls, pa.types.is_large_list(values.type)))
            values = flat
        else:
            first, count = _slice_bounds(lengths, step)
            per_item = np.arange(int(count.sum()), dtype=np.int64)
            out_starts = np.zeros(len(count), dtype=np.int64)
            np.cumsum(count[:-1], out=out_starts[1:])
            group = np.repeat(np.arange(len(count)), count)
            within = per_item - out_starts[group]
            take = starts[group] + first[group] + within * step.step
            layers.append((_offsets(count), nulls, pa.types.is_large_list(values.type)))
            values = flat.take(pa.array(take))
    for offsets, nulls, large in reversed(layers):
        values = _wrap(values, offsets, nulls, large)
    return values


def _lengths(values: pa.Array) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-row list lengths (0 for a null row) and the null rows (``None`` if there are none)."""
    raw = pc.list_value_length(values)
    nulls = None
    if raw.null_count:
        nulls = raw.is_null().to_numpy(zero_copy_only=False)
        raw = raw.fill_null(0)
    return raw.to_numpy(zero_copy_only=False).astype(np.int64, copy=False), nulls


def _offsets(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def _wrap(items: pa.Array, offsets: np.ndarray, nulls: np.ndarray | None, large: bool) -> pa.Array:
    cls = pa.LargeListArray if large else pa.ListArray
    off = pa.array(offsets, type=pa.int64() if large else pa.int32())
    mask = pa.array(nulls) if nulls is not None else None
    return cls.from_arrays(off, items, mask=mask)


def _slice_bounds(lengths: np.ndarray, step: _Step) -> tuple[np.ndarray, np.ndarray]:
    """First item and item count of ``[start:stop:step]`` in each row (Python's slice rules)."""

    def resolve(bound: int | None, default: np.ndarray) -> np.ndarray:
        if bound is None:
            return default
        at = np.full(len(lengths), bound, dtype=np.int64)
        if bound < 0:
            at = at + lengths
        return np.clip(at, 0, lengths)

    first = resolve(step.start, np.zeros(len(lengths), dtype=np.int64))
    stop = resolve(step.stop, lengths)
    count = np.maximum(0, (stop - first + step.step - 1) // step.step)
    return first, count

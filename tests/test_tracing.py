"""Tracing: OpenTelemetry spans around framefeed's stages and user code, and nothing when off.

Spans are collected with the SDK's `InMemorySpanExporter`. The global tracer provider is
patched per test (and restored), so no other test module runs with tracing on.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from opentelemetry.util._once import Once

import framefeed
from framefeed.tracing import reset_tracing, tracing_enabled

pytestmark = pytest.mark.timeout(60)

TOP = "observation.images.top"
IMAGE = "observation.images.front"


@pytest.fixture(autouse=True)
def _fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No provider, no OTEL_* switches, no cached decision; all restored afterwards."""
    for name in ("OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER", "OTEL_PYTHON_TRACER_PROVIDER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", None)
    monkeypatch.setattr(trace, "_TRACER_PROVIDER_SET_ONCE", Once())
    reset_tracing()
    yield
    reset_tracing()


@pytest.fixture
def exporter(monkeypatch: pytest.MonkeyPatch) -> InMemorySpanExporter:
    """An SDK tracer provider, installed as the global one, that keeps spans in memory."""
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    trace.set_tracer_provider(provider)
    return spans


def _ancestors(span: ReadableSpan, by_id: dict[int, ReadableSpan]) -> list[str]:
    names = []
    parent = span.parent
    while parent is not None:
        up = by_id[parent.span_id]
        names.append(up.name)
        parent = up.parent
    return names


def _one_batch(root: Path, *, decode_threads: int = 2) -> dict[str, Any]:
    ds = framefeed.MapDataset(root, decode_threads=decode_threads)
    try:
        loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=framefeed.collate)
        batch: dict[str, Any] = next(iter(loader))
        return batch
    finally:
        ds.close()


def test_span_tree_of_one_batch(plain_root: Path, exporter: InMemorySpanExporter) -> None:
    assert tracing_enabled()
    with framefeed.tracing_scope("train.step", step=7) as step:
        assert step is not None and step.is_recording()
        batch = _one_batch(plain_root)
    assert batch[TOP].shape[0] == 4

    spans = exporter.get_finished_spans()
    by_id = {s.context.span_id: s for s in spans}
    roots = [s for s in spans if s.parent is None]
    assert [r.name for r in roots] == ["train.step"]
    assert dict(roots[0].attributes or {}) == {"step": 7}
    assert {s.context.trace_id for s in spans} == {roots[0].context.trace_id}
    names = [s.name for s in spans]

    decodes = [s for s in spans if s.name == "framefeed.decode"]
    assert decodes, names
    # the PNG image column decodes in a span of its own, named by its column
    images = [s for s in decodes if (s.attributes or {}).get("column") == IMAGE]
    assert len(images) == 1 and (images[0].attributes or {})["images"] == 4
    for s in decodes:
        assert "train.step" in _ancestors(s, by_id)
        assert "framefeed.collate" not in _ancestors(s, by_id)

    # Both cameras' files are read, on the engine's pool threads (2 decode threads, 2 files),
    # and every read nests under a decode span: the trace context crosses the thread pool.
    reads = [s for s in spans if s.name == "framefeed.read"]
    read_paths = {str((s.attributes or {})["path"]) for s in reads}
    assert any("observation.images.top" in p for p in read_paths), read_paths
    assert any("observation.images.wrist" in p for p in read_paths), read_paths
    for s in reads:
        attrs = s.attributes or {}
        assert int(attrs["stop"]) > int(attrs["start"]) >= 0  # type: ignore[call-overload]
        assert "framefeed.decode" in _ancestors(s, by_id), _ancestors(s, by_id)

    collates = [s for s in spans if s.name == "framefeed.collate"]
    assert len(collates) == 1
    assert _ancestors(collates[0], by_id) == ["train.step"]
    # collate runs after the batch was decoded
    assert collates[0].start_time is not None
    assert all(d.end_time is not None and d.end_time <= collates[0].start_time for d in decodes)


def test_user_spans_nest_and_record_errors(exporter: InMemorySpanExporter) -> None:
    @framefeed.with_tracing("user.inner")
    def inner(x: int) -> int:
        """Doubles."""
        return 2 * x

    @framefeed.with_tracing()
    def failing() -> None:
        raise RuntimeError("boom")

    assert inner.__name__ == "inner" and inner.__doc__ == "Doubles."
    with framefeed.tracing_scope("user.outer", epoch=1):
        assert inner(21) == 42
        with pytest.raises(RuntimeError, match="boom"):
            failing()

    spans = {s.name: s for s in exporter.get_finished_spans()}
    default_name = f"{__name__}.test_user_spans_nest_and_record_errors.<locals>.failing"
    assert set(spans) == {"user.outer", "user.inner", default_name}
    outer = spans["user.outer"]
    assert outer.parent is None
    for name in ("user.inner", default_name):
        assert spans[name].parent is not None
        assert spans[name].parent.span_id == outer.context.span_id
    assert spans[default_name].status.status_code is StatusCode.ERROR
    assert any(e.name == "exception" for e in spans[default_name].events)
    assert spans["user.inner"].status.status_code is not StatusCode.ERROR


def _assert_off() -> None:
    assert not tracing_enabled()
    scope = framefeed.tracing_scope("anything", a=1)
    assert scope is framefeed.tracing_scope("other")  # one shared no-op object
    with scope as span:
        assert span is None

    @framefeed.with_tracing("off")
    def f() -> int:
        return 3

    assert f() == 3


def test_without_a_provider_scopes_are_no_ops(plain_root: Path) -> None:
    _assert_off()
    assert trace.get_current_span() is trace.INVALID_SPAN
    _one_batch(plain_root)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("OTEL_SDK_DISABLED", "true"),
        ("OTEL_SDK_DISABLED", "TRUE"),
        ("OTEL_TRACES_EXPORTER", "none"),
    ],
)
def test_switched_off_by_environment_records_nothing(
    plain_root: Path,
    exporter: InMemorySpanExporter,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    value: str,
) -> None:
    monkeypatch.setenv(name, value)
    _assert_off()
    with framefeed.tracing_scope("train.step"):
        _one_batch(plain_root)
    assert exporter.get_finished_spans() == ()


def test_other_values_of_the_switches_keep_it_on(
    exporter: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "false")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp,console")
    with framefeed.tracing_scope("on"):
        pass
    assert [s.name for s in exporter.get_finished_spans()] == ["on"]


def test_without_opentelemetry_installed(
    exporter: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # import now raises ImportError
    _assert_off()
    assert exporter.get_finished_spans() == ()


def test_provider_named_by_environment_turns_it_on(monkeypatch: pytest.MonkeyPatch) -> None:
    # The API builds the SDK provider from this variable (an entry point of opentelemetry-sdk).
    monkeypatch.setenv("OTEL_PYTHON_TRACER_PROVIDER", "sdk_tracer_provider")
    assert tracing_enabled()
    with framefeed.tracing_scope("env") as span:
        assert span is not None and span.is_recording()


def test_decision_is_cached_until_reset(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not tracing_enabled()
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    trace.set_tracer_provider(provider)
    with framefeed.tracing_scope("before reset"):
        pass
    assert spans.get_finished_spans() == ()
    reset_tracing()
    with framefeed.tracing_scope("after reset"):
        pass
    assert [s.name for s in spans.get_finished_spans()] == ["after reset"]

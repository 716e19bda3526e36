"""Tracing: OpenTelemetry spans around user code and framefeed's own stages, free when off.

``tracing_scope("name", key=value)`` is a context manager and ``@with_tracing("name")`` a
decorator. Both open a span when **tracing is on**, and do nothing otherwise. framefeed opens
``framefeed.plan``, ``framefeed.read``, ``framefeed.decode`` and ``framefeed.collate`` spans
around its own stages the same way.

Tracing is on when all of these hold:

- ``opentelemetry-api`` is importable (``pip install 'framefeed[otel]'``);
- the standard switches do not turn it off: ``OTEL_SDK_DISABLED`` is not ``true`` (any case;
  the specification's only true value) and ``OTEL_TRACES_EXPORTER`` is not ``none``;
- a real tracer provider is installed: one set with ``opentelemetry.trace.set_tracer_provider``
  (programmatically, or by ``opentelemetry-instrument``'s auto-configuration) or named by
  ``OTEL_PYTHON_TRACER_PROVIDER``. The API's default proxy / no-op provider records nothing,
  so framefeed does not even create spans for it.

The decision is made once, at the first scope opened in the process (importing framefeed does
not import OpenTelemetry), and cached; a forked worker inherits it. A provider installed after
that first scope is picked up after `reset_tracing()`. When off, a scope costs one global
lookup and a shared no-op context manager.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, ParamSpec, TypeVar

__all__ = [
    "in_current_context",
    "reset_tracing",
    "tracing_enabled",
    "tracing_scope",
    "with_tracing",
]

P = ParamSpec("P")
R = TypeVar("R")


class _NoScope(AbstractContextManager[None]):
    """The scope of disabled tracing: enters and exits, does nothing, yields ``None``."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        return None


_NO_SCOPE = _NoScope()
_UNDECIDED: Any = object()
# The cached decision: the tracer to use, None when tracing is off, _UNDECIDED before the first
# scope. A cache of the environment, not configuration: `reset_tracing` forgets it.
_tracer: Any = _UNDECIDED
_lock = threading.Lock()


def _flag(name: str) -> str:
    return os.environ.get(name, "").strip().lower()


def _find_tracer() -> Any:
    """framefeed's tracer if tracing is on (see the module docstring), else ``None``."""
    if _flag("OTEL_SDK_DISABLED") == "true" or _flag("OTEL_TRACES_EXPORTER") == "none":
        return None
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    provider = trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        return None
    from . import __version__

    return provider.get_tracer("framefeed", __version__)


def _decide() -> Any:
    global _tracer
    with _lock:
        if _tracer is _UNDECIDED:
            _tracer = _find_tracer()
        return _tracer


def reset_tracing() -> None:
    """Forget the cached decision; the next scope looks at the environment again.

    Call it after installing a tracer provider once framefeed has already opened a scope.
    """
    global _tracer
    with _lock:
        _tracer = _UNDECIDED


def tracing_enabled() -> bool:
    """Whether scopes open spans (decides now if no scope has decided yet)."""
    tracer = _tracer if _tracer is not _UNDECIDED else _decide()
    return tracer is not None


def tracing_scope(name: str, **attributes: Any) -> AbstractContextManager[Any]:
    """A span named ``name`` with ``attributes`` around a ``with`` block, when tracing is on.

    The span becomes the current span, so scopes and framefeed's stages opened inside it are
    its children; an exception leaving the block is recorded on the span and re-raised. The
    ``with`` target is the span (``None`` when tracing is off). Attribute values must be
    ``str``, ``bool``, ``int``, ``float`` or sequences of one of those (OpenTelemetry's rule).
    """
    tracer = _tracer if _tracer is not _UNDECIDED else _decide()
    if tracer is None:
        return _NO_SCOPE
    scope: AbstractContextManager[Any] = tracer.start_as_current_span(
        name, attributes=attributes or None
    )
    return scope


def with_tracing(name: str | None = None) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorator: every call of the function runs inside ``tracing_scope(name)``.

    ``name`` defaults to the function's module and qualified name. When tracing is off the
    wrapper calls the function directly.
    """

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        span_name = name if name is not None else f"{fn.__module__}.{fn.__qualname__}"

        @functools.wraps(fn)
        def traced(*args: P.args, **kwargs: P.kwargs) -> R:
            tracer = _tracer if _tracer is not _UNDECIDED else _decide()
            if tracer is None:
                return fn(*args, **kwargs)
            with tracer.start_as_current_span(span_name):
                return fn(*args, **kwargs)

        return traced

    return decorate


def in_current_context(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn`` bound to the caller's trace context, for running it on a pool thread.

    Thread pools do not carry the current span over; spans opened by ``fn`` on a worker thread
    then become children of the span that was current here. Returns ``fn`` itself when
    tracing is off.
    """
    tracer = _tracer if _tracer is not _UNDECIDED else _decide()
    if tracer is None:
        return fn
    from opentelemetry import context

    ctx = context.get_current()

    @functools.wraps(fn)
    def bound(*args: P.args, **kwargs: P.kwargs) -> R:
        token = context.attach(ctx)
        try:
            return fn(*args, **kwargs)
        finally:
            context.detach(token)

    return bound

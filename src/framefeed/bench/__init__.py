"""The benchmark harness behind ``framefeed bench``."""

from __future__ import annotations

from .epochs import format_stage_records
from .proc import PeakMemory, cpu_busy_seconds, tree_cpu_seconds, tree_memory
from .run import BenchConfig, run_bench

__all__ = [
    "BenchConfig",
    "PeakMemory",
    "cpu_busy_seconds",
    "format_stage_records",
    "run_bench",
    "tree_cpu_seconds",
    "tree_memory",
]

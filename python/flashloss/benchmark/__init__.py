"""Benchmark harness behind `flashloss bench` (DESIGN.md §7): a registry of cases, timing,
subprocess peak-memory measurement, the machine ceiling, and the report (table, JSON, markdown,
PNG plots). The cases themselves live in `flashloss.benchmark.cases`."""
from .harness import BenchCase, Impl, all_cases, get_case, register_case
from .memory import measure_peak_extra

__all__ = ["BenchCase", "Impl", "all_cases", "get_case", "register_case", "measure_peak_extra"]

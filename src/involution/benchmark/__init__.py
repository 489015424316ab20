"""Measuring the involution op and models: timing, peak memory, bandwidth, tables and charts.

``timing`` and ``memory`` hold the two measurements; ``op`` compares the op's backends with
convolutions at the same shape; ``model`` compares registered models; ``report`` turns rows of
results into a terminal table, CSV, JSON or a bar chart. The ``involution bench`` command is a
thin layer over these.
"""

from .memory import peak_memory
from .op import OpShape, benchmark_op, copy_bandwidth
from .timing import Timing, measure_time

__all__ = ["OpShape", "Timing", "benchmark_op", "copy_bandwidth", "measure_time", "peak_memory"]

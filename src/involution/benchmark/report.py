"""Rows of benchmark results as a terminal table, CSV, JSON or a PNG bar chart.

A row is a flat dict whose keys name the quantity and its unit (``median_ms``, ``peak_mib``); the
same keys head the table and the CSV columns and name the JSON fields.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch

__all__ = ["FORMATS", "bar_chart", "environment", "format_rows", "format_table"]

FORMATS = ("table", "csv", "json")

Row = Mapping[str, object]


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(rows: Sequence[Row]) -> str:
    """An aligned plain-text table; text columns align left, numbers right."""
    if not rows:
        return "(no results)"
    keys = list(rows[0])
    cells = [[_cell(row.get(k)) for k in keys] for row in rows]
    widths = [max(len(k), *(len(line[i]) for line in cells)) for i, k in enumerate(keys)]
    numeric = [all(isinstance(row.get(k), int | float | None) for row in rows) for k in keys]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(keys), rule, *(line(c) for c in cells)])


def format_rows(rows: Sequence[Row], fmt: str, metadata: Mapping[str, object] | None = None) -> str:
    """``rows`` as text in ``fmt``, one of ``FORMATS``.

    ``metadata`` (the environment, the command) heads the table as ``key: value`` lines and is
    the ``"metadata"`` field of the JSON document (next to ``"rows"``); CSV holds the rows only.

    Raises:
        ValueError: an unknown format.
    """
    if fmt == "table":
        head = [f"{key}: {_cell(value)}" for key, value in (metadata or {}).items()]
        return "\n".join([*head, "", format_table(rows)] if head else [format_table(rows)])
    if fmt == "csv":
        buffer = io.StringIO()
        if rows:
            writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
        return buffer.getvalue()
    if fmt == "json":
        return json.dumps({"metadata": dict(metadata or {}), "rows": list(rows)}, indent=2)
    raise ValueError(f"format ({fmt!r}) must be one of {FORMATS}")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for text in f:
                if text.startswith("model name"):
                    return text.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device | str = "cpu") -> dict[str, object]:
    """Where and when the numbers were taken: date, device, cores, threads, versions."""
    device = torch.device(device)
    info: dict[str, object] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    info["cpu"] = _cpu_name()
    info["cpu_cores"] = os.cpu_count()
    info["torch_threads"] = torch.get_num_threads()
    info["torch"] = torch.__version__
    info["python"] = platform.python_version()
    return info


def bar_chart(
    rows: Sequence[Row],
    path: str | os.PathLike[str],
    value: str,
    category: str,
    series: str | None = None,
    panel: str | None = None,
    title: str = "",
    log: bool = False,
    ylabel: str | None = None,
) -> Path:
    """Writes a PNG bar chart of ``row[value]``: one bar group per ``category``, one bar per
    ``series`` within a group, one panel per distinct ``panel`` value; ``log`` gives a
    logarithmic value axis, for values that span orders of magnitude; ``ylabel`` names the
    value axis (default: ``value``).

    Raises:
        ImportError: matplotlib is not installed (it comes with the ``demo`` extra).
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("bar charts need matplotlib: pip install 'involution[demo]'") from error

    def distinct(key: str | None) -> list[object]:
        return list(dict.fromkeys(row[key] for row in rows)) if key else [None]

    panels, categories, names = distinct(panel), distinct(category), distinct(series)
    figure = Figure(
        figsize=(max(6.0, 1.2 * len(categories) * max(1, len(names)) ** 0.5), 3.2 * len(panels))
    )
    axes = figure.subplots(len(panels), 1, squeeze=False)[:, 0]
    width = 0.8 / len(names)
    for ax, panel_value in zip(axes, panels, strict=True):
        for i, name in enumerate(names):
            heights = []
            for cat in categories:
                match = [
                    r
                    for r in rows
                    if r[category] == cat
                    and (series is None or r[series] == name)
                    and (panel is None or r[panel] == panel_value)
                ]
                height = match[0][value] if match else None
                heights.append(float(height) if isinstance(height, int | float) else 0.0)
            positions = [c + (i - (len(names) - 1) / 2) * width for c in range(len(categories))]
            ax.bar(positions, heights, width, label=None if name is None else str(name))
        ax.set_xticks(range(len(categories)), [str(c) for c in categories])
        ax.set_ylabel(ylabel or value)
        if log:
            ax.set_yscale("log")
        ax.set_title(" ".join(str(t) for t in (title, panel_value) if t))
        if series is not None:
            ax.legend(fontsize="small")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=100)
    return path

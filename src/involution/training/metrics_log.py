"""Per-epoch metrics to CSV (and TensorBoard when it is installed) and final metrics to JSON.

The whole history is kept in the checkpoint, so a resumed run rewrites a complete CSV.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["MetricsLogger", "write_json"]

logger = logging.getLogger(__name__)


def write_json(data: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Writes ``data`` as indented JSON (non-finite floats as null), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, Mapping):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        return value

    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(clean(dict(data)), indent=2) + "\n")
    os.replace(tmp, path)
    return path


class MetricsLogger:
    """Writes the epoch history of a run under ``output_dir``.

    Args:
        output_dir: where ``metrics.csv`` (and ``tensorboard/``) go.
        tensorboard: also log to TensorBoard when ``torch.utils.tensorboard`` imports.
    """

    def __init__(self, output_dir: str | os.PathLike, tensorboard: bool = True) -> None:
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.output_dir / "metrics.csv"
        self._writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.debug("tensorboard is not installed; metrics go to CSV only")
            else:
                self._writer = SummaryWriter(str(self.output_dir / "tensorboard"))

    def log_epoch(self, history: Sequence[Mapping[str, float]]) -> None:
        """Rewrites the CSV with ``history`` and sends its last row to TensorBoard."""
        if not history:
            return
        fields = list(history[0])
        tmp = self.csv_path.with_name(f".{self.csv_path.name}.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(history)
        os.replace(tmp, self.csv_path)
        if self._writer is not None:
            row = history[-1]
            for key, value in row.items():
                if key != "epoch" and value is not None:
                    self._writer.add_scalar(key, value, int(row["epoch"]))
            self._writer.flush()

    def close(self) -> None:
        """Closes the TensorBoard writer, if any."""
        if self._writer is not None:
            self._writer.close()

"""Run logs: a CSV file and TensorBoard, written side by side."""

from __future__ import annotations

import csv
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter


class RunLogger:
    def __init__(self, directory: Path, enabled: bool = True) -> None:
        self.enabled = enabled
        self.directory = directory
        self._writers: dict[str, tuple[object, csv.DictWriter]] = {}
        self.tensorboard = SummaryWriter(str(directory / "tensorboard")) if enabled else None

    def log(self, kind: str, step: int, values: dict[str, float]) -> None:
        """Append a row to ``<kind>.csv`` and the scalars to TensorBoard under ``kind/``."""
        if not self.enabled:
            return
        row = {"step": step, **values}
        if kind not in self._writers:
            path = self.directory / f"{kind}.csv"
            handle = open(path, "a", newline="")  # noqa: SIM115  (kept open for the run; closed in close())
            writer = csv.DictWriter(handle, fieldnames=list(row), extrasaction="ignore")
            if path.stat().st_size == 0:
                writer.writeheader()
            self._writers[kind] = (handle, writer)
        handle, writer = self._writers[kind]
        writer.writerow(row)
        handle.flush()  # type: ignore[attr-defined]
        assert self.tensorboard is not None
        for key, value in values.items():
            self.tensorboard.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        for handle, _ in self._writers.values():
            handle.close()  # type: ignore[attr-defined]
        if self.tensorboard is not None:
            self.tensorboard.close()

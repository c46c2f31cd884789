"""Training logs: JSON lines (one object per logged step) and TensorBoard, written by the main process only.

Every record is flushed as it is written, so a killed run loses nothing it logged; a resumed run first cuts the logs
back to its checkpoint (tasks/common/workdir.py), so every step appears once.
"""

from __future__ import annotations

import json
from pathlib import Path


class MetricWriter:
    """``log.jsonl`` plus TensorBoard events under ``tb/``; ``patch_sizes.jsonl`` records the size of every step."""

    def __init__(self, workdir: str | Path, enabled: bool = True, start_step: int = 0):
        self.enabled = enabled
        if not enabled:
            return
        workdir = Path(workdir)
        self._log = open(workdir / "log.jsonl", "a")  # noqa: SIM115 (closed in close())
        self._patches = open(workdir / "patch_sizes.jsonl", "a")  # noqa: SIM115
        try:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides the events a killed run wrote after the checkpoint this run resumed from.
            self._tb = SummaryWriter(str(workdir / "tb"), purge_step=start_step + 1 if start_step else None)
        except ImportError:  # tensorboard is optional for library users
            self._tb = None

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self._log.write(json.dumps({"step": step, **metrics}) + "\n")
        self._log.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, int | float):
                    self._tb.add_scalar(key, value, step)

    def record_patch(self, step: int, patch) -> None:
        if self.enabled:
            self._patches.write(json.dumps({"step": step, "patch_size": patch}) + "\n")
            self._patches.flush()

    def close(self) -> None:
        if self.enabled:
            self._log.close()
            self._patches.close()
            if self._tb is not None:
                self._tb.close()

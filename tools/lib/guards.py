"""What the training engine (tools/train.py) watches while it trains, without reading the device every step: a
non-finite loss and processes that disagree (:class:`StepChecks`), and Ctrl-C (:class:`CtrlC`)."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

import torch

from tasks.common import distributed
from tasks.common.train_state import latest_checkpoint


class StepChecks:
    """The engine's per-step checks, kept on the device and read on the steps that read values anyway.

    Reading a GPU value (``.item()``, ``if tensor``) waits until the GPU has run all it was given; done every step,
    the host cannot queue step s+1 while the GPU runs step s. So :meth:`record` only updates device tensors (the first
    step whose all-reduced loss was non-finite, and that loss; the first step whose step number or patch size
    differed between processes), and :meth:`read`, on log, evaluation and checkpoint steps, reads them in one go and
    raises. Since every checkpoint step reads before the update and the save, no checkpoint holds weights updated
    by a step whose loss was non-finite; the steps between such a step and the next read do run (on NaN weights).
    """

    def __init__(self, device: torch.device):
        self.bad_step = torch.full((), -1.0, dtype=torch.float64, device=device)  # -1: none yet
        self.bad_loss = torch.zeros((), dtype=torch.float64, device=device)
        self.mismatch_step = torch.full((), -1.0, dtype=torch.float64, device=device)
        self.patches: dict[int, object] = {}  # step -> patch size, since the last read (host values, for the message)

    def record(self, step: int, patch, loss: torch.Tensor, mismatch: torch.Tensor | None) -> None:
        """Note step ``step``'s all-reduced ``loss`` and whether the processes disagreed (None: one process)."""
        self.patches[step] = patch
        first = ~torch.isfinite(loss) & (self.bad_step < 0)
        self.bad_step = torch.where(first, step, self.bad_step)
        self.bad_loss = torch.where(first, loss.double(), self.bad_loss)
        if mismatch is not None:
            self.mismatch_step = torch.where(mismatch & (self.mismatch_step < 0), step, self.mismatch_step)

    def read(self, step: int, *, stop_flag: torch.Tensor, workdir: Path) -> bool:
        """Raise on a non-finite loss or a disagreement since the last read; else whether any rank got Ctrl-C."""
        bad_step, bad_loss, mismatch_step, stop = torch.stack(
            [self.bad_step, self.bad_loss, self.mismatch_step, stop_flag.double()]
        ).tolist()
        patches, self.patches = self.patches, {}
        if mismatch_step >= 0:
            raise RuntimeError(
                f"the step or the patch size differs between processes from step {int(mismatch_step)} on: rank "
                f"{distributed.rank()} trained step {int(mismatch_step)} at patch size {patches[int(mismatch_step)]}"
            )
        if bad_step >= 0:
            bad_step = int(bad_step)
            ran = (
                "stopped before updating the weights"
                if bad_step == step
                else f"steps {bad_step}-{step - 1} updated the weights (the loss is read on log and checkpoint steps "
                f"only); stopped before step {step}'s update and before any checkpoint"
            )
            raise FloatingPointError(
                f"non-finite loss {bad_loss} at step {bad_step} (patch size {patches[bad_step]}); {ran}. "
                f"Last good checkpoint: {latest_checkpoint(workdir) or 'none yet'}"
            )
        return stop > 0


def device_scalar(value, like: torch.Tensor) -> torch.Tensor:
    """A float32 scalar on ``like``'s device: a fill kernel, not a copy from host memory (which waits for the GPU)."""
    if isinstance(value, torch.Tensor):
        return value.to(like.device)
    return torch.full((), value, dtype=torch.float32, device=like.device)


class CtrlC:
    """Ctrl-C ends training at the end of the current step, with a checkpoint there and the command that resumes;
    a second Ctrl-C stops at once (the last checkpoint is then the previous one). Only the main thread can handle
    signals, so elsewhere (a library caller's thread) Ctrl-C keeps Python's default."""

    def __init__(self, workdir: Path, resume_command: str):
        self.workdir, self.resume_command, self.requested, self._previous = workdir, resume_command, False, None

    def __enter__(self) -> CtrlC:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: stopping after this step with a checkpoint (Ctrl-C again stops at once)", flush=True)

    def stopped(self, step: int, steps: int) -> None:
        self._exit(f"stopped by Ctrl-C after step {step} of {steps}; checkpoint {latest_checkpoint(self.workdir)}")

    def _exit(self, what: str) -> None:
        print(f"{what}. Resume with: {self.resume_command}", file=sys.stderr, flush=True)
        raise SystemExit(130)  # the shell's code for a process ended by SIGINT

    def __exit__(self, kind, error, traceback) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        if kind is KeyboardInterrupt:
            self._exit(f"stopped at once by a second Ctrl-C; last checkpoint {latest_checkpoint(self.workdir)}")

"""How the training loop shows its progress: a bar on a terminal, plain lines in a log, or nothing.

On a terminal a tqdm bar redraws in place. When stdout is a file or a pipe (a job log, `| tee`,
`nohup`), a bar would write its redraws into the file (a line of thousands of characters), so
instead one plain line is printed every `train.log_every` steps, at the last step and at every
checkpoint:

    step 40/40  loss 0.1234  lr 1.00e-04  0.512 s/step  ETA 0:00:00

(`s/step` over the steps since the previous line; `ETA` for the steps left at that pace). `quiet`
prints nothing but the final summary and errors.
"""

from __future__ import annotations

import sys
import time
from typing import Callable


def _eta(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class TrainProgress:
    """``update(step, loss, lr)`` after every optimizer step, ``note(text)`` for events (checkpoints,
    samples), ``close()`` at the end. `mode`: ``bar``, ``lines``, ``off`` or ``auto`` (bar when stdout
    is a terminal, else lines)."""

    def __init__(self, total: int, start: int, every: int, mode: str = "auto",
                 log: Callable[[str], None] = print):
        if mode == "auto":
            mode = "bar" if sys.stdout.isatty() else "lines"
        self.mode, self.total, self.every, self.log = mode, total, max(1, every), log
        self._bar = None
        if mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=start, desc="training", unit="step", dynamic_ncols=True)
        self._mark = (start, time.perf_counter())  # (step, time) of the previous plain line
        self._last: tuple[int, float, float] | None = None
        self._printed = start

    def update(self, step: int, loss: float, lr: float) -> None:
        self._last = (step, loss, lr)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        elif self.mode == "lines" and (step % self.every == 0 or step == self.total):
            self._line()

    def _line(self) -> None:
        if self._last is None or self._last[0] == self._printed:
            return
        step, loss, lr = self._last
        now = time.perf_counter()
        per_step = (now - self._mark[1]) / max(1, step - self._mark[0])
        self.log(f"step {step}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  {per_step:.3f} s/step  "
                 f"ETA {_eta(per_step * (self.total - step))}")
        self._mark, self._printed = (step, now), step

    def note(self, message: str) -> None:
        """An event line (e.g. a checkpoint): above the bar, or after a step line in a log."""
        if self._bar is not None:
            self._bar.write(message)
        elif self.mode == "lines":
            self._line()
            self.log(message)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def quiet_diffusers_bars() -> None:
    """Turn off diffusers' own progress bars ("Loading pipeline components") where the CLI asked for
    quiet libraries (every command without ``--verbose``; see cli.py)."""
    import os

    if os.environ.get("DIFFTUNE_QUIET_LIBRARIES") == "1":
        import diffusers

        diffusers.utils.logging.disable_progress_bar()

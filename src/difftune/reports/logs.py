"""The per-run logs under ``OUTPUT_DIR/logs`` that reports, sweeps and comparisons read.

Each is a JSON-lines file written by the training loop, one object a line:

- ``loss.jsonl``: ``{"step", "loss", "lr", "grad_norm"?}`` after every optimizer step;
- ``validation.jsonl``: ``{"step", "val_loss"}`` at every validation (step 0 = the base model);
- ``sessions.jsonl``: ``{"session", "step", "time", "event"}`` where ``event`` is ``start`` when a
  process starts (or resumes) training at ``step`` and ``progress`` as it goes, so the time spent
  across resumes, and where they happened, can be told afterwards.

A resumed run cuts ``loss.jsonl`` and ``validation.jsonl`` back to its checkpoint's step (the later
lines are written again); ``sessions.jsonl`` is never cut, it is the history.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

LOSS = "logs/loss.jsonl"
VALIDATION = "logs/validation.jsonl"
SESSIONS = "logs/sessions.jsonl"
#: what the run is (family, trainable parameters, training and validation images with their prompts),
#: written when training starts, for the report's data section
RUN = "logs/run.json"


def read_jsonl(path: str | Path) -> list[dict]:
    """Every well-formed object of a JSON-lines file (a torn last line from a killed run is passed over)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def append_jsonl(path: str | Path, row: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")


def truncate_jsonl(path: str | Path, step: int) -> None:
    """Keep only the lines with ``step <= step`` (a resumed run writes the later ones again)."""
    path = Path(path)
    if path.exists():
        kept = [row for row in read_jsonl(path) if isinstance(row.get("step"), int) and row["step"] <= step]
        path.write_text("".join(json.dumps(row) + "\n" for row in kept), encoding="utf-8")


class SessionLog:
    """Appends this process's start and progress to ``sessions.jsonl`` (main process only)."""

    def __init__(self, output_dir: str | Path, start_step: int):
        self.path = Path(output_dir) / SESSIONS
        previous = read_jsonl(self.path)
        self.session = 1 + max((r.get("session", 0) for r in previous), default=0)
        append_jsonl(self.path, {"session": self.session, "event": "start", "step": start_step, "time": time.time()})

    def progress(self, step: int) -> None:
        append_jsonl(self.path, {"session": self.session, "event": "progress", "step": step, "time": time.time()})


@dataclass
class Session:
    """One process's part of a run: steps ``first``..``last`` (``first`` = the step it resumed from)."""

    number: int
    first: int
    last: int
    seconds: float
    started: float

    @property
    def steps(self) -> int:
        return self.last - self.first

    @property
    def seconds_per_step(self) -> float | None:
        return self.seconds / self.steps if self.steps > 0 else None


def sessions(output_dir: str | Path) -> list[Session]:
    """The run's sessions in order; time counts from each start to its last progress line."""
    found: dict[int, Session] = {}
    for row in read_jsonl(Path(output_dir) / SESSIONS):
        n, step, t = row.get("session"), row.get("step"), row.get("time")
        if not isinstance(n, int) or not isinstance(step, int) or not isinstance(t, (int, float)):
            continue
        if row.get("event") == "start" or n not in found:
            found[n] = Session(n, step, step, 0.0, t)
        else:
            s = found[n]
            s.last, s.seconds = step, t - s.started
    return [found[n] for n in sorted(found)]

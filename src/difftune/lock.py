"""One run per output_dir: an OS-level lock on ``OUTPUT_DIR/.difftune.lock``.

Two trainings writing into one folder corrupt each other (interleaved logs, checkpoints written by
both). `OutputLock` takes an exclusive ``flock`` on a file in the folder: the kernel releases it
when the holder exits in any way, including ``kill -9``, so a lock never outlives its process on a
local disk. On NFS, Linux sends ``flock`` to the server as a whole-file lock (NFSv3 NLM, NFSv4 built
in), so it also holds between machines sharing a network disk; there a crashed *machine*'s lock is
cleared by the server after its lease (typically 90 s). ``flock`` rather than ``lockf``: a POSIX
record lock is dropped as soon as the process closes *any* descriptor of the file, e.g. when some
code merely reads the lock file.

The holder writes its host, pid and start time into the file, so a refused run names it. The file
itself stays (deleting a lock file while another process waits on it would let two runs in); it
holds no lock when nobody runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Iterator

from . import DifftuneError

LOCK_FILE = ".difftune.lock"


class OutputDirBusy(DifftuneError):
    """Another process holds the lock on this output_dir."""


def describe_holder(path: Path) -> str:
    """`pid N on host H since T`, from what the holder wrote into the lock file (or a fallback)."""
    try:
        info = json.loads(path.read_text(encoding="utf-8") or "{}")
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info["started"]))
        return f"pid {info['pid']} on host {info['host']}, since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not written its name yet"


class OutputLock:
    """``with OutputLock(output_dir):`` holds the folder for this process, or raises `OutputDirBusy`.

    The folder is created if needed. Locks are per process: a second `OutputLock` on the same
    folder in the same process is refused as well (the file is opened once and kept open).
    """

    _held: dict[str, "OutputLock"] = {}

    def __init__(self, output_dir: str | Path):
        self.dir = Path(output_dir)
        self.path = self.dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "OutputLock":
        import fcntl

        key = str(self.path.resolve())
        if key in OutputLock._held:
            raise OutputDirBusy(f"output_dir {self.dir} is already in use by this process")
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise OutputDirBusy(
                f"output_dir {self.dir} is in use by another difftune run ({describe_holder(self.path)}); wait "
                "for it to finish or choose another output_dir. If that process is gone (its machine died), "
                f"the lock clears by itself; on a network disk within a few minutes, or delete {self.path}"
            ) from None
        info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        OutputLock._held[key] = self
        return self

    def release(self) -> None:
        """Let the next run in (closing the file drops the lock)."""
        if self._fd is None:
            return
        OutputLock._held.pop(str(self.path.resolve()), None)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def claim_output_dir(output_dir: str | Path, hold: bool = True) -> Iterator[None]:
    """Hold `output_dir` for a run (`hold=False` on the other processes of a multi-GPU run, which
    share the main process's claim). A run that fails before writing anything into a folder it
    created leaves no empty folder behind."""
    out = Path(output_dir)
    created = not out.exists()
    if not hold:
        yield
        return
    lock = OutputLock(out).acquire()
    try:
        yield
    except BaseException:
        lock.release()
        if created and [p.name for p in out.iterdir()] == [LOCK_FILE]:
            shutil.rmtree(out, ignore_errors=True)
        raise
    lock.release()

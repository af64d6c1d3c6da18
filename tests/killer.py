"""Run `difftune train ...` in this process and stop it at a chosen point, for the resume tests.

    python killer.py MODE N train CONFIG [overrides...]

MODE: ``kill-micro`` (SIGKILL just before the N-th micro-batch), ``term-micro`` (SIGTERM there: a
spot-instance notice), ``kill-save`` (SIGKILL inside the N-th checkpoint save, after its optimizer
file is written and before its completion marker).
"""

import os
import signal
import sys

import torch

torch.set_num_threads(int(os.environ.get("DIFFTUNE_TEST_THREADS", "1")))

import difftune.checkpoint as checkpoint  # noqa: E402
import difftune.train as train  # noqa: E402
from difftune.cli import main  # noqa: E402

mode, n, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
calls = {"n": 0}

if mode in ("kill-micro", "term-micro"):
    original = train.micro_step
    sig = signal.SIGKILL if mode == "kill-micro" else signal.SIGTERM

    def micro_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            os.kill(os.getpid(), sig)
        return original(*args, **kwargs)

    train.micro_step = micro_step
elif mode == "kill-save":
    original_fsync = checkpoint.fsync_file

    def fsync_file(path):
        original_fsync(path)
        if path.name == "optimizer.pt":
            calls["n"] += 1
            if calls["n"] == n:
                os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.fsync_file = fsync_file
else:
    raise SystemExit(f"unknown mode {mode}")

sys.exit(main(argv))

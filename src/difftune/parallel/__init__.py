"""Several processes: how trained weights are spread over them, and everything that must agree across them.

The training loop holds one `Parallel` (made by `setup`) and calls it; it never asks which strategy it
has. A strategy owns wrapping (`shard` before the optimizer exists, `prepare` after), unwrapping,
`no_sync`, backward and clipping, gathered state dicts for the final outputs, and the weight files
of a checkpoint. The collectives (`any`, `all_finite`, agreement on the checkpoint to resume) and the
checkpoint protocol (every rank writes into one temporary folder, the marker comes last, then an
atomic rename) are the same for every strategy.

Strategies (``parallel.strategy``):

- ``none`` (one process) and ``ddp``: the trained weights are replicated (accelerate's DDP);
- ``fsdp``: torch's FSDP2 ``fully_shard``, one unit per block the family names, then the part itself;
  checkpoints are torch.distributed.checkpoint (DCP) shards, which any number of processes reads back;
- ``deepspeed``: DeepSpeed ZeRO-2/3 through accelerate's plugin; checkpoints are DeepSpeed's own files.

Processes and machines come from the launcher (``accelerate launch``, ``torchrun``); "global main" is
rank 0, "local main" the first process of each machine. Logs and final outputs are written by the
global main process; checkpoints and feature caches by it too, or by each machine's local main
process with ``parallel.disk: per_node``.
"""

from __future__ import annotations

from .core import Parallel, setup

__all__ = ["Parallel", "setup"]

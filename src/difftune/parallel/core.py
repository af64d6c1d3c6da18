"""`Parallel`: the one object the training loop asks about processes, and `setup`, which picks the strategy.

The base class is the replicated strategy (one process, or accelerate's DDP); `fsdp.FullShard` and
`zero.DeepSpeedZero` override what sharding changes. Every method that has "collective" in its
docstring must be called by every process, in the same order.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from .. import DifftuneError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..config import Config

#: how the strategies are shown in the start-of-run log line
DESCRIPTIONS = {
    "none": "none (one process)",
    "ddp": "ddp (replicated weights)",
    "fsdp": "fsdp (full shard, FSDP2)",
    "deepspeed": "deepspeed",
}


class Parallel:
    """Replicated weights: one process, or DDP through accelerate (``parallel.strategy: ddp``)."""

    #: the strategy's name in logs and tests: none, ddp, fsdp, deepspeed
    name = "ddp"
    #: every process runs validation sampling (the weights are sharded, so forward passes are collective)
    sample_on_every_rank = False

    def __init__(self, cfg: "Config", accelerator: Any):
        self.cfg = cfg
        self.accelerator = accelerator
        self.world = accelerator.num_processes
        self.rank = accelerator.process_index
        self.local_rank = accelerator.local_process_index
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
        self.machines = max(1, self.world // max(1, local_world))
        if self.world == 1:
            self.name = "none"
        self.is_main = accelerator.is_main_process
        #: writes checkpoints and feature caches: the global main process on a shared disk, else each machine's
        self.is_writer = self.is_main if cfg.parallel.disk == "shared" else accelerator.is_local_main_process

    # ---- facts -----------------------------------------------------------------------------

    @property
    def device(self) -> Any:
        return self.accelerator.device

    def describe(self) -> str:
        """The start-of-run line, e.g. ``parallel: fsdp (full shard, FSDP2), 2 processes on 1 machine``."""
        procs = f"{self.world} process{'es' if self.world != 1 else ''}"
        machines = f"{self.machines} machine{'s' if self.machines != 1 else ''}"
        extra = self._details()
        return f"parallel: {DESCRIPTIONS[self.name]}{extra}, {procs} on {machines} ({self.device.type})"

    def _details(self) -> str:
        return ""

    def cache_share(self) -> tuple[int, int]:
        """(index, count) of this process among those that fill a feature cache on its disk."""
        if self.cfg.parallel.disk == "per_node":
            return self.local_rank, self.world // self.machines
        return self.rank, self.world

    def plan_line(self, family: Any, names: list[str]) -> str:
        """The memory planner's estimate for this strategy and run (see `difftune plan`), for the log."""
        from .plan import GB, count, estimates

        t = self.cfg.train
        rows = {r.strategy: r for r in estimates(count(self.cfg, family.parts, family, names), gpus=self.world,
                                                  precision=t.precision, batch=t.batch_size,
                                                  checkpointing=t.gradient_checkpointing, optimizer=t.optimizer)}
        row = rows.get(self._plan_row(), rows["ddp"])
        act = "" if row.activations is not None else " (activations not estimated)"
        return f"memory plan: about {row.total / GB:.1f} GB per device{act}; `difftune plan` compares strategies"

    def _plan_row(self) -> str:
        return "ddp"

    # ---- wrapping --------------------------------------------------------------------------

    def shard(self, family: Any, names: list[str]) -> None:
        """Before the optimizer exists: spread the trained parts over the processes (nothing to do here)."""

    def prepare(self, parts: dict, names: list[str], optimizer: Any, scheduler: Any,
                on_host: frozenset = frozenset()) -> tuple[Any, Any]:
        """After the optimizer exists: wrap the trained parts (DDP) and the optimizer. Returns (optimizer,
        scheduler). `on_host`: parts accelerate must leave where they are (block swap moves their weights)."""
        for name in names:
            parts[name] = self.accelerator.prepare(parts[name], device_placement=[name not in on_host])
        return self.accelerator.prepare(optimizer), scheduler

    def unwrap(self, module: Any) -> Any:
        """The module under DDP / torch.compile wrappers (sharded modules stay sharded)."""
        from ..families.base import unwrap

        return unwrap(module)

    def no_sync(self, parts: dict, names: list[str], sync: bool):
        """Context for one micro-batch: skip the gradient reduction unless `sync` (the last of a step)."""
        if sync or self.world == 1:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        for name in names:
            stack.enter_context(self.accelerator.no_sync(parts[name]))
        return stack

    def backward(self, loss: Any) -> None:
        self.accelerator.backward(loss)

    def clip_grad_norm(self, params: list, max_norm: float) -> Any:
        """Collective: clip the global gradient norm; returns the norm before clipping (a plain tensor)."""
        return self.accelerator.clip_grad_norm_(params, max_norm)

    def optimizer_step(self, optimizer: Any) -> None:
        optimizer.step()

    # ---- collectives -------------------------------------------------------------------------

    def any(self, flag: bool) -> bool:
        """Collective: True if `flag` is True on any process."""
        import torch

        if self.world == 1:
            return bool(flag)
        return bool(self.accelerator.reduce(torch.tensor(float(flag), device=self.device), "max") > 0)

    def total(self, n: int) -> int:
        """Collective: the sum of `n` over processes."""
        import torch

        if self.world == 1:
            return int(n)
        return int(self.accelerator.reduce(torch.tensor(n, device=self.device), "sum"))

    def all_finite(self, params: Any) -> bool:
        """Collective: every element of every tensor in `params` is finite on every process (each
        process checks the shards it holds, so a NaN on another process's shard is seen too)."""
        import torch

        local = all(bool(torch.isfinite(_local(p)).all()) for p in params)
        return not self.any(not local)

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def finish(self) -> None:
        """End the run: trackers close and the process group goes (``accelerator.end_training``).

        With several processes on gloo, a last barrier first, then a short wait with the GIL released:
        gloo's worker thread frees finished collectives (and the tensors they hold, which needs the
        GIL) after the caller has returned from them. If the process group were destroyed while
        that is pending, the destructor (holding the GIL) and the worker (waiting for it) would
        deadlock, and a finished run would hang instead of exiting."""
        if self.world > 1:
            import time

            self.barrier()
            time.sleep(0.5)
        self.accelerator.end_training()

    def agree(self, value: Any, what: str) -> Any:
        """Collective: the writers' `value` (others pass anything); an error if two writers disagree."""
        if self.world == 1:
            return value
        from accelerate.utils import gather_object

        values = gather_object([(self.is_writer, value)])
        seen = [v for writer, v in values if writer]
        if any(v != seen[0] for v in seen):
            raise DifftuneError(f"the machines see different {what}: {seen}; give every machine the same output_dir contents")
        return seen[0]

    def mean(self, value: Any) -> float:
        """Collective: the mean of a scalar tensor over processes (the loss of the global batch)."""
        if self.world == 1:
            return float(value)
        return float(self.accelerator.reduce(value.detach().float().to(self.device), "mean"))

    # ---- checkpoints -------------------------------------------------------------------------

    def find_resume(self, find: Callable[[], Any]) -> Any:
        """Collective: the checkpoint to resume from, decided by the writers (`find` reads their disk) and
        the same on every process."""
        return self.agree(find() if self.is_writer else None, "checkpoints to resume from")

    def save_checkpoint(self, step: int, parts: dict, names: list[str], optimizer: Any,
                        trainable_tensors: Callable[[], dict], state: dict, config_yaml: str) -> Path:
        """Collective: write the checkpoint of `step` atomically. The writer makes the temporary folder, every
        process writes its files into it (its RNG states, and its weight shards when sharded), the writer adds
        the small files, then, once all are done, writes the marker last and renames the folder into place."""
        import json

        from ..checkpoint import CheckpointError, checkpoints_dir, seal_checkpoint, start_checkpoint, write_failed, write_rng

        out, keep = self.cfg.output_dir, self.cfg.checkpoint.keep
        root = checkpoints_dir(out)
        error: Exception | None = None
        tmp, final = root / f".tmp-step-{step:08d}", root / f"step-{step:08d}"  # as start_checkpoint names them
        if self.is_writer:
            try:
                start_checkpoint(out, step, self._checkpoint_bytes(optimizer))
            except CheckpointError as e:
                error = e
        if self.any(error is not None):
            raise error or CheckpointError(f"another process could not start the checkpoint of step {step}")
        try:
            write_rng(tmp, self.rank, *rng_state(self.device))
            self.save_weights(tmp, parts, names, optimizer, trainable_tensors)
            if self.is_writer:
                (tmp / "state.json").write_text(json.dumps(state, indent=1))
                (tmp / "config.yaml").write_text(config_yaml)
        except OSError as e:
            error = e
        if self.any(error is not None):
            raise write_failed(tmp, step, root, error) if error else CheckpointError(
                f"another process could not write its part of the checkpoint of step {step}; earlier checkpoints are intact")
        self.barrier()
        if self.is_writer:
            seal_checkpoint(out, tmp, final, step, keep)
        self.barrier()
        return final

    def _checkpoint_bytes(self, optimizer: Any) -> int:
        """About how many bytes a checkpoint takes on the writer's disk (weights and optimizer states)."""
        local = sum(_local(p).numel() * _local(p).element_size() for g in optimizer.param_groups for p in g["params"])
        return 3 * local * (self.world if self.sharded else 1) + (1 << 20)

    #: whether each process holds only a shard of the trained weights
    sharded = False

    def load_checkpoint(self, path: Path, parts: dict, names: list[str], optimizer: Any,
                        restore: Callable[[dict], None]) -> None:
        """Collective: restore weights, optimizer state and this process's RNG states from `path` (any number
        of processes may have written it; a process that did not exist then keeps its seeded RNG)."""
        from ..checkpoint import read_rng

        self.load_weights(path, parts, names, optimizer, restore)
        rng = read_rng(path, self.rank)
        if rng is not None:  # a process that did not exist in the saving run keeps its seeded RNG
            set_rng_state(self.device, *rng)

    # ---- weights: checkpoints and final outputs ------------------------------------------------

    def save_weights(self, folder: Path, parts: dict, names: list[str], optimizer: Any,
                     trainable_tensors: Callable[[], dict]) -> None:
        """Collective: write the trained weights and optimizer state into the checkpoint's `folder`.
        Replicated: one copy, by the writer (``trainable.safetensors`` in the method's naming, ``optimizer.pt``)."""
        from safetensors.torch import save_file
        import torch

        from ..util.tensors import for_safetensors

        if self.is_writer:
            save_file(for_safetensors(trainable_tensors()), str(folder / "trainable.safetensors"))
            torch.save(optimizer.state_dict(), folder / "optimizer.pt")

    def load_weights(self, folder: Path, parts: dict, names: list[str], optimizer: Any,
                     restore: Callable[[dict], None]) -> None:
        """Collective: restore weights and optimizer state from a checkpoint folder written by any strategy
        that this one reads (replicated files, or DCP shards from `fsdp` with any number of processes)."""
        import torch
        from safetensors.torch import load_file

        from ..checkpoint import CheckpointError

        if (folder / DCP_FOLDER).is_dir():
            load_dcp(folder / DCP_FOLDER, {n: self.unwrap(parts[n]) for n in names}, optimizer)
            return
        if not (folder / "trainable.safetensors").is_file():
            raise CheckpointError(f"checkpoint {folder} was not written by ddp or fsdp; resume it with the strategy that wrote it")
        restore(load_file(str(folder / "trainable.safetensors")))
        try:
            optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint optimizer state does not fit this run: {e}") from None

    @contextlib.contextmanager
    def full_parts(self, parts: dict, names: list[str]) -> Iterator[bool]:
        """Collective context for writing final outputs: inside it, on the global main process, ``parts[n]``
        are plain, whole modules (gathered if sharded), so the family's and method's save code works as on
        one process. Yields True on the process that writes."""
        saved = {n: parts[n] for n in names}
        try:
            for n in names:
                parts[n] = self.unwrap(parts[n])
            yield self.is_main
        finally:
            parts.update(saved)
        self.barrier()


def rng_state(device: Any) -> tuple[dict, dict]:
    """This process's RNG states: torch CPU and the accelerator's (whatever it is), python, numpy."""
    import random

    import numpy as np
    import torch

    tensors = {"torch_cpu": torch.get_rng_state()}
    if device.type != "cpu":
        tensors[f"{device.type}"] = torch.get_device_module(device.type).get_rng_state(device)
    py = random.getstate()
    npstate = np.random.get_state()
    plain = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [npstate[0], npstate[1].tolist(), int(npstate[2]), int(npstate[3]), float(npstate[4])],
    }
    return tensors, plain


def set_rng_state(device: Any, tensors: dict, plain: dict) -> None:
    """Restore what `rng_state` saved (the accelerator's state only on the same kind of device)."""
    import random

    import numpy as np
    import torch

    torch.set_rng_state(tensors["torch_cpu"])
    if device.type != "cpu" and device.type in tensors:
        torch.get_device_module(device.type).set_rng_state(tensors[device.type], device)
    py = plain["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = plain["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))


def _local(t: Any) -> Any:
    """The part of `t` this process holds (a DTensor's local shard, a ZeRO-3 partition, else `t`)."""
    to_local = getattr(t, "to_local", None)
    if to_local is not None:
        return to_local()
    return getattr(t, "ds_tensor", None) if getattr(t, "ds_tensor", None) is not None else t


#: sub-folder of a checkpoint holding torch.distributed.checkpoint shards
DCP_FOLDER = "sharded"


def _dcp_container(modules: dict) -> Any:
    import torch

    return torch.nn.ModuleDict(modules)


def save_dcp(folder: Path, modules: dict, optimizer: Any) -> None:
    """Collective: the trained parameters (frozen ones left out) and optimizer state as DCP shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_sd, optim_sd = get_state_dict(_dcp_container(modules), optimizer,
                                        options=StateDictOptions(ignore_frozen_params=True))
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(folder))


def load_dcp(folder: Path, modules: dict, optimizer: Any) -> None:
    """Collective: restore DCP shards written by any number of processes into these modules (sharded or not)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    from ..checkpoint import CheckpointError

    container = _dcp_container(modules)
    options = StateDictOptions(ignore_frozen_params=True)
    model_sd, optim_sd = get_state_dict(container, optimizer, options=options)
    state = {"model": model_sd, "optimizer": optim_sd}
    try:
        dcp.load(state, checkpoint_id=str(folder))
    except Exception as e:  # DCP wraps missing keys and shape mismatches in CheckpointException
        raise CheckpointError(f"checkpoint {folder.parent} does not fit this run: {str(e).splitlines()[0][:300]}") from None
    set_state_dict(container, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))


def processes() -> int:
    """How many processes the launcher started (1 without a launcher), before anything is initialised."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check(cfg: "Config", world: int) -> str:
    """The strategy `parallel.strategy` means for `world` processes; a clear error for combinations that
    cannot run. Needs no model."""
    import torch

    p, t, m = cfg.parallel, cfg.train, cfg.method
    if t.precision == "fp16" and (not torch.accelerator.is_available() or os.environ.get("ACCELERATE_USE_CPU") == "true"):
        raise DifftuneError("train.precision=fp16 needs an accelerator (GPU, NPU, ...); use bf16 or no on a CPU")
    name = p.strategy if p.strategy != "auto" else ("ddp" if world > 1 else "none")
    if name == "ddp" and world == 1:
        name = "none"
    if name in ("fsdp", "deepspeed") and world == 1:
        raise DifftuneError(
            f"parallel.strategy={name} needs several processes: start with `accelerate launch --num_processes N "
            f"-m difftune train ...` (one process trains with parallel.strategy=auto)"
        )
    if p.cpu_offload and name not in ("fsdp", "deepspeed"):
        raise DifftuneError("parallel.cpu_offload needs parallel.strategy=fsdp or deepspeed")
    if name == "fsdp" and t.precision == "fp16":
        raise DifftuneError("parallel.strategy=fsdp trains in bf16 or fp32: set train.precision=bf16 (or no)")
    if name == "fsdp" and cfg.speed.compile == "full":
        raise DifftuneError("parallel.strategy=fsdp works with speed.compile=regional or none, not full")
    if name == "deepspeed" and m.train_text_encoder:
        raise DifftuneError("parallel.strategy=deepspeed trains one part: set method.train_text_encoder=false, or use fsdp")
    if name in ("fsdp", "deepspeed") and t.optimizer != "adamw":
        raise DifftuneError(f"parallel.strategy={name} shards the optimizer states, which 8-bit AdamW cannot hold: "
                            "set train.optimizer=adamw")
    if p.disk == "per_node" and name in ("fsdp", "deepspeed"):
        raise DifftuneError(
            f"parallel.strategy={name} writes each process's shard of a checkpoint: output_dir must be on a disk "
            "every machine sees (parallel.disk=shared)"
        )
    return name


def setup(cfg: "Config") -> Parallel:
    """Start (or join) the processes the launcher made and return the strategy that `parallel.strategy`
    selects. Raises DifftuneError, before any model is loaded, for combinations that cannot run."""
    from accelerate import Accelerator

    name = check(cfg, processes())
    kwargs: dict[str, Any] = {}
    strategy_cls: type[Parallel] = Parallel
    if name == "fsdp":
        from .fsdp import FullShard

        strategy_cls = FullShard
    elif name == "deepspeed":
        from .zero import DeepSpeedZero, plugin, process_group_kwargs

        strategy_cls = DeepSpeedZero
        kwargs["deepspeed_plugin"] = plugin(cfg)
        kwargs["kwargs_handlers"] = process_group_kwargs()
    out = Path(cfg.output_dir)
    accelerator = Accelerator(mixed_precision=cfg.train.precision, log_with=list(cfg.train.report_to) or None,
                              project_dir=str(out / "logs"), **kwargs)
    if name != "none" and accelerator.num_processes != processes():
        raise DifftuneError(f"the launcher started {processes()} processes but {accelerator.num_processes} joined the group")
    return strategy_cls(cfg, accelerator)

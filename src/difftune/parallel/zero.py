"""DeepSpeed ZeRO-2/3 through accelerate's plugin (``parallel.strategy: deepspeed``, ``parallel.zero_stage``).

DeepSpeed owns more of the step than the other strategies: its engine scales the loss for gradient
accumulation, clips (``train.max_grad_norm``) and steps the optimizer and the schedule at the end of
each accumulation, inside ``backward``. So here ``backward`` hands it the unscaled loss, the optimizer
step is the engine's, and the gradient norm is the one the engine measured. A non-finite step is
reported by the loop as usual, but DeepSpeed has already applied it (in bf16 and fp32 it does not skip
steps), so the check after the run and before every checkpoint is what keeps a NaN from being saved.

Checkpoints are DeepSpeed's own files (per-rank ZeRO partitions) inside difftune's temporary folder,
sealed with the same marker; they resume on the same number of processes.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator

from .core import Parallel
from .fsdp import plain_copy

#: sub-folder of a checkpoint holding DeepSpeed's files
DS_FOLDER = "deepspeed"
TAG = "state"


def plugin(cfg: Any) -> Any:
    """accelerate's DeepSpeedPlugin for the config (ZeRO stage, accumulation, clipping, offload)."""
    from accelerate.utils import DeepSpeedPlugin

    from .. import DifftuneError

    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise DifftuneError("parallel.strategy=deepspeed needs DeepSpeed: pip install deepspeed") from None
    p, t = cfg.parallel, cfg.train
    offload = "cpu" if p.cpu_offload else "none"
    ds = DeepSpeedPlugin(
        zero_stage=p.zero_stage,
        gradient_accumulation_steps=t.grad_accum,
        gradient_clipping=t.max_grad_norm if t.max_grad_norm is not None else 0.0,
        offload_optimizer_device=offload,
        offload_param_device=offload if p.zero_stage == 3 else "none",
        zero3_save_16bit_model=True,
        zero3_init_flag=False,
    )
    ds.deepspeed_config["train_micro_batch_size_per_gpu"] = t.batch_size
    return ds


def process_group_kwargs() -> list:
    """accelerate's process-group settings for DeepSpeed: none on GPUs; the backend of DeepSpeed's CPU
    accelerator (gloo) on a machine without them. accelerate takes its CPU path only with ACCELERATE_USE_CPU,
    which also turns DeepSpeed off; without it and without a GPU it picks no backend, and then counts one
    process on every rank (accelerate/state.py, `PartialState.__init__`: ``if self.backend is None:``)."""
    from accelerate.utils import InitProcessGroupKwargs
    from deepspeed.accelerator import get_accelerator

    ds = get_accelerator()
    if ds.device_name() != "cpu":
        return []
    return [InitProcessGroupKwargs(backend=ds.communication_backend_name())]


class DeepSpeedZero(Parallel):
    """``parallel.strategy: deepspeed``."""

    name = "deepspeed"

    def __init__(self, cfg, accelerator):
        from transformers.integrations import unset_hf_deepspeed_config

        from .. import DifftuneError

        if accelerator.distributed_type.value != "DEEPSPEED":
            raise DifftuneError(
                "parallel.strategy=deepspeed: accelerate did not start DeepSpeed (it never does with "
                "ACCELERATE_USE_CPU=true or --cpu); on a machine without GPUs launch with `accelerate launch "
                "--use_deepspeed --num_processes N` and without them"
            )
        # accelerate registers its ZeRO config with transformers, whose from_pretrained would then partition
        # every transformers model it loads (ZeRO-3), frozen text encoders included; only the trained part
        # is DeepSpeed's, through `prepare`
        unset_hf_deepspeed_config()
        super().__init__(cfg, accelerator)
        self.sharded = True
        self.sample_on_every_rank = cfg.parallel.zero_stage == 3
        self.engine: Any = None

    def _details(self) -> str:
        offload = ", CPU offload" if self.cfg.parallel.cpu_offload else ""
        return f" (ZeRO-{self.cfg.parallel.zero_stage}{offload})"

    def _plan_row(self) -> str:
        return f"deepspeed zero_stage={self.cfg.parallel.zero_stage}"

    def prepare(self, parts, names, optimizer, scheduler, on_host=frozenset()):
        (name,) = names  # `check` allows one trained part
        self.engine, optimizer, scheduler = self.accelerator.prepare(parts[name], optimizer, scheduler)
        parts[name] = self.engine
        return optimizer, scheduler

    def unwrap(self, module: Any) -> Any:
        from accelerate.utils import extract_model_from_parallel

        return extract_model_from_parallel(module)

    @contextlib.contextmanager
    def no_sync(self, parts, names, sync):
        """The engine accumulates and reduces at its own boundary, which accelerate's `backward` sets from
        `sync_gradients` (True outside `accelerator.accumulate`): so each micro-batch says whether it is the last."""
        state = self.accelerator.gradient_state
        state._set_sync_gradients(sync)
        try:
            yield
        finally:
            state._set_sync_gradients(True)

    def backward(self, loss: Any) -> None:
        # the loop divides by grad_accum; the engine divides again unless told not to
        self.accelerator.backward(loss, scale_wrt_gas=False)

    def clip_grad_norm(self, params: list, max_norm: float) -> Any:
        import torch

        norm = self.engine.get_global_grad_norm()  # measured (and clipped) by the engine's step
        return torch.as_tensor(float("nan") if norm is None else float(norm))

    def optimizer_step(self, optimizer: Any) -> None:
        """The engine stepped at the end of `backward`."""

    def save_weights(self, folder: Path, parts, names, optimizer, trainable_tensors: Callable[[], dict]) -> None:
        self.engine.save_checkpoint(str(folder / DS_FOLDER), tag=TAG, save_latest=False,
                                    exclude_frozen_parameters=True)  # a LoRA checkpoint holds the LoRA only

    def load_weights(self, folder: Path, parts, names, optimizer, restore: Callable[[dict], None]) -> None:
        from ..checkpoint import CheckpointError

        if not (folder / DS_FOLDER).is_dir():
            raise CheckpointError(f"checkpoint {folder} was not written by deepspeed; resume it with the strategy that wrote it")
        path, _ = self.engine.load_checkpoint(str(folder / DS_FOLDER), tag=TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=False, load_module_strict=False)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not read the checkpoint in {folder}")

    @contextlib.contextmanager
    def full_parts(self, parts: dict, names: list[str]) -> Iterator[bool]:
        saved = {n: parts[n] for n in names}
        try:
            for n in names:
                state = self.accelerator.get_state_dict(parts[n])  # ZeRO-3: gathered onto the main process
                if self.is_main:
                    parts[n] = plain_copy(self.unwrap(saved[n]), state)
            yield self.is_main
        finally:
            parts.update(saved)
        self.barrier()

"""FSDP2 (torch's public ``fully_shard``): weights, gradients and optimizer states sharded over the processes.

Each trained part gets one FSDP unit per block class its family names (``Family.shard_blocks``), then
one for the part itself (embeddings, norms, projections). LoRA and full fine-tunes work the same way:
frozen and trainable weights may share a unit. Mixed precision stays what it is on one process
(autocast over fp32 trained weights), so a sharded run computes what a replicated one does.

Checkpoints are torch.distributed.checkpoint (DCP) shards of the trainable parameters and optimizer
state, which any number of processes (one included) reads back. Final outputs are gathered into a
plain copy of each part on the global main process and written by the usual save code.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator

from .. import DifftuneError
from .core import DCP_FOLDER, Parallel, load_dcp, save_dcp


def block_modules(module: Any, class_names: tuple[str, ...]) -> list[Any]:
    """Sub-modules of `module` whose class is one of `class_names`, innermost first (each becomes a unit)."""
    found = [m for m in module.modules() if m is not module and type(m).__name__ in class_names]
    return list(reversed(found))


def original_class(module: Any) -> type:
    """The model class under ``fully_shard``'s dynamic ``FSDP<Class>`` subclass."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(module)
    if issubclass(cls, FSDPModule):
        return next(b for b in cls.__mro__[1:] if not issubclass(b, FSDPModule) and b is not object)
    return cls


def plain_copy(module: Any, state: dict) -> Any:
    """A plain (unsharded) module of the same class, config and adapters as `module`, holding `state`
    (a full state dict). Built on the meta device, so no second random initialisation is paid for."""
    import torch

    cls = original_class(module)
    with torch.device("meta"):
        copy = cls.from_config(module.config) if hasattr(cls, "from_config") else cls(module.config)
        for adapter, config in getattr(module, "peft_config", {}).items():
            copy.add_adapter(config, adapter_name=adapter)
    missing, unexpected = copy.load_state_dict(state, strict=False, assign=True)
    buffers = dict(module.named_buffers())
    for name in missing:  # non-persistent buffers are not in a state dict; FSDP leaves buffers unsharded
        if name not in buffers:
            raise DifftuneError(f"cannot gather {cls.__name__}: {name} is missing from its state dict")
        parent, _, leaf = name.rpartition(".")
        copy.get_submodule(parent).register_buffer(leaf, buffers[name].detach().clone().cpu(), persistent=False)
    for name, b in copy.named_buffers():
        if b.is_meta:
            parent, _, leaf = name.rpartition(".")
            copy.get_submodule(parent).register_buffer(leaf, buffers[name].detach().clone().cpu(), persistent=False)
    if unexpected:
        raise DifftuneError(f"cannot gather {cls.__name__}: unexpected weights {unexpected[:3]}")
    return copy.eval()


class FullShard(Parallel):
    """``parallel.strategy: fsdp``."""

    name = "fsdp"
    sample_on_every_rank = True
    sharded = True

    def _details(self) -> str:
        return ", CPU offload" if self.cfg.parallel.cpu_offload else ""

    def _plan_row(self) -> str:
        return "fsdp + cpu_offload" if self.cfg.parallel.cpu_offload else "fsdp"

    def shard(self, family: Any, names: list[str]) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

        mesh = init_device_mesh(self.device.type, (self.world,))
        kwargs: dict[str, Any] = {"mesh": mesh}
        if self.cfg.parallel.cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy()
        for name in names:
            module = self.unwrap(family.parts[name])
            blocks = block_modules(module, family.shard_blocks(name, module))
            for block in blocks:
                fully_shard(block, **kwargs)
            fully_shard(module, **kwargs)
            family.parts[name] = module

    def prepare(self, parts, names, optimizer, scheduler, on_host=frozenset()):
        return optimizer, scheduler  # fully_shard already wrapped the parts; the optimizer holds their shards

    def no_sync(self, parts: dict, names: list[str], sync: bool):
        if sync:
            return contextlib.nullcontext()
        return _gradient_sync_off([parts[n] for n in names])

    def clip_grad_norm(self, params: list, max_norm: float) -> Any:
        import torch

        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def save_weights(self, folder: Path, parts: dict, names: list[str], optimizer: Any,
                     trainable_tensors: Callable[[], dict]) -> None:
        save_dcp(folder / DCP_FOLDER, {n: parts[n] for n in names}, optimizer)

    def load_weights(self, folder: Path, parts: dict, names: list[str], optimizer: Any,
                     restore: Callable[[dict], None]) -> None:
        from ..checkpoint import CheckpointError

        if not (folder / DCP_FOLDER).is_dir():
            raise CheckpointError(
                f"checkpoint {folder} holds whole weights (written by ddp or one process): resume it with "
                "parallel.strategy=ddp, or start a new output_dir for fsdp"
            )
        load_dcp(folder / DCP_FOLDER, {n: parts[n] for n in names}, optimizer)

    @contextlib.contextmanager
    def full_parts(self, parts: dict, names: list[str]) -> Iterator[bool]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        saved = {n: parts[n] for n in names}
        try:
            for n in names:
                state = get_model_state_dict(parts[n], options=StateDictOptions(full_state_dict=True, cpu_offload=True))
                if self.is_main:
                    parts[n] = plain_copy(saved[n], state)
                del state
            yield self.is_main
        finally:
            parts.update(saved)
        self.barrier()


@contextlib.contextmanager
def _gradient_sync_off(modules: list) -> Iterator[None]:
    """FSDP2: accumulate unreduced gradient shards on micro-batches before the last of a step."""
    for m in modules:
        m.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        for m in modules:
            m.set_requires_gradient_sync(True)

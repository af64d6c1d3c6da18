"""Low-VRAM training: block swap and activation offloading (``speed.block_swap``, ``speed.offload_activations``).

**Block swap** keeps the frozen weights of N transformer blocks in host memory (pinned on CUDA) and
gives each block a device copy only while it runs:

- forward: a block's pre-hook makes its device copy (already under way if it was prefetched), the
  block runs, its post-hook drops the copy and starts copying the *next* swapped block on a side
  CUDA stream, so the transfer overlaps with the compute in between;
- backward: an identity autograd function on the block's outputs fires when the gradients reach
  the block, before its own backward, and loads the block again (prefetching the block before it);
  one on its inputs fires after the block's backward and drops the copy. The end of the backward
  pass drops whatever is still loaded (a first block whose inputs need no gradient has no such
  input node).

The swap works by pointing each frozen tensor's ``.data`` at the host or the device copy. Autograd
keeps the very tensor objects it saved (a frozen weight is saved as itself, not copied), so it
finds the device copy again when the backward needs it, and the device memory of a block is freed
when its copy is dropped. The weights are frozen (LoRA), so nothing is ever copied back: dropping
the device copy is all the "move to the host" there is. Trained parameters (the LoRA layers) stay on
the device. Under gradient checkpointing, the block's recomputation during the backward runs while
the block is loaded for its backward, and its post-hook then leaves it loaded.

Which blocks exist is the family's business: ``Family.block_lists`` names the denoiser's block
lists in the order they run (FLUX: its double-stream then its single-stream blocks); the *first*
N blocks of that order are swapped. On a CPU "device" and "host" are the same memory: the
mechanism runs the same (a device copy is a fresh copy made before the block runs and dropped
after), which is what the tests check; the memory saving needs a GPU.

**Activation offloading** moves the tensors that the denoiser's forward saves for the backward to
host memory as they are saved and back when the backward needs them (torch's saved-tensor hooks,
`torch.autograd.graph.save_on_cpu`'s mechanism, pinned memory on CUDA). Weights are left where
they are: only tensors with a ``grad_fn`` (activations of the graph) move.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from . import DifftuneError


def blocks_of(module: Any, block_lists: Sequence[str]) -> list[torch.nn.Module]:
    """The blocks named by `block_lists` (attribute names of ``nn.ModuleList``s or single blocks of
    `module`), in that order."""
    blocks: list[torch.nn.Module] = []
    for name in block_lists:
        found = getattr(module, name, None)
        if isinstance(found, torch.nn.ModuleList):
            blocks.extend(found)
        elif isinstance(found, torch.nn.Module):
            blocks.append(found)
        else:
            raise DifftuneError(f"speed.block_swap: {type(module).__name__} has no block list {name!r}")
    return blocks


class _Slot:
    """One swapped block: its frozen tensors, their host copies, and the device copies while loaded."""

    def __init__(self, block: torch.nn.Module, tensors: list[torch.Tensor], host: list[torch.Tensor]):
        self.block = block
        self.tensors = tensors
        self.host = host
        self.copies: list[torch.Tensor] | None = None  # device copies, made (or being made) while loaded
        self.ready: Any = None  # CUDA event: the copies are complete
        self.active = False  # the tensors point at the device copies
        self.in_backward = False


class BlockSwap:
    """Keeps the frozen weights of `blocks[:n]` on the host, each on `device` only while it runs."""

    def __init__(self, blocks: list[torch.nn.Module], n: int, device: torch.device):
        if n > len(blocks):
            raise DifftuneError(f"speed.block_swap={n}: the denoiser has only {len(blocks)} blocks")
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        self.slots: list[_Slot] = []
        for block in blocks[:n]:
            tensors = [t for t in block.parameters() if not t.requires_grad] + list(block.buffers())
            host = []
            for t in tensors:
                h = t.data.to("cpu", copy=True)
                host.append(h.pin_memory() if cuda else h)
                t.data = host[-1]  # the device memory (if the model was there) is released here
            self.slots.append(_Slot(block, tensors, host))
        self.loads = 0  # device copies made: a counter for tests and logs
        self._callback_queued = False
        self.handles = []
        for k, slot in enumerate(self.slots):
            self.handles.append(slot.block.register_forward_pre_hook(self._pre_hook(k), with_kwargs=True))
            self.handles.append(slot.block.register_forward_hook(self._post_hook(k)))

    # ---- moving ------------------------------------------------------------------------------

    def _fetch(self, k: int) -> None:
        """Start making block k's device copies (on the side stream on CUDA)."""
        slot = self.slots[k]
        if slot.copies is not None:
            return
        self.loads += 1
        if self.stream is None:
            slot.copies = [h.to(self.device, copy=True) for h in slot.host]
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            slot.copies = [h.to(self.device, non_blocking=True) for h in slot.host]
            slot.ready = self.stream.record_event()

    def _use(self, k: int) -> None:
        """Block k is about to run: its tensors point at complete device copies."""
        slot = self.slots[k]
        if slot.active:
            return
        self._fetch(k)
        if slot.ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(slot.ready)
            for c in slot.copies:  # made on the side stream, used on this one: keep the allocator from
                c.record_stream(current)  # reusing their memory before this stream is done with them
            slot.ready = None
        for t, c in zip(slot.tensors, slot.copies):
            t.data = c
        slot.active = True

    def _drop(self, k: int) -> None:
        """Block k is done: its tensors point at the host copies again, the device copies are freed."""
        slot = self.slots[k]
        if slot.active:
            for t, h in zip(slot.tensors, slot.host):
                t.data = h
        slot.copies, slot.ready, slot.active, slot.in_backward = None, None, False, False

    def drop_all(self) -> None:
        for k in range(len(self.slots)):
            self._drop(k)
        self._callback_queued = False

    def on_host(self) -> bool:
        """Every swapped tensor points at its host copy (true between steps)."""
        return all(t.data_ptr() == h.data_ptr() for s in self.slots for t, h in zip(s.tensors, s.host))

    # ---- hooks -------------------------------------------------------------------------------

    def _pre_hook(self, k: int):
        def hook(block, args, kwargs):
            slot = self.slots[k]
            self._use(k)
            if slot.in_backward:  # recomputation under gradient checkpointing: leave everything as it is
                return None
            if k + 1 < len(self.slots):
                self._fetch(k + 1)
            if not torch.is_grad_enabled():
                return None
            leaves, spec = tree_flatten((args, kwargs))
            marked = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor) and x.requires_grad]
            if not marked:
                return None
            outs = _AfterBackward.apply(self, k, *(leaves[i] for i in marked))
            for i, o in zip(marked, outs):
                leaves[i] = o
            return tree_unflatten(leaves, spec)

        return hook

    def _post_hook(self, k: int):
        def hook(block, args, output):
            slot = self.slots[k]
            if slot.in_backward:
                return None
            self._drop(k)
            if not torch.is_grad_enabled():
                return None
            leaves, spec = tree_flatten(output)
            marked = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor) and x.requires_grad]
            if not marked:
                return None
            outs = _BeforeBackward.apply(self, k, *(leaves[i] for i in marked))
            for i, o in zip(marked, outs):
                leaves[i] = o
            return tree_unflatten(leaves, spec)

        return hook

    def _enter_backward(self, k: int) -> None:
        if not self._callback_queued:
            torch.autograd.Variable._execution_engine.queue_callback(self.drop_all)
            self._callback_queued = True
        for j, slot in enumerate(self.slots):  # blocks after k (in run order) are done with their backward
            if j > k and slot.active:
                self._drop(j)
        self._use(k)
        self.slots[k].in_backward = True
        if k > 0:
            self._fetch(k - 1)

    def remove(self) -> None:
        """Take the hooks off and leave every weight on the device (for tests and tools)."""
        for h in self.handles:
            h.remove()
        for slot in self.slots:
            for t, h in zip(slot.tensors, slot.host):
                t.data = h.to(self.device)
        self.slots = []


def _views(tensors: tuple) -> tuple:
    return tuple(t.view_as(t) for t in tensors)


class _BeforeBackward(torch.autograd.Function):
    """Identity on a swapped block's outputs; its backward runs before the block's: load the block."""

    @staticmethod
    def forward(ctx, swap, k, *tensors):
        ctx.swap, ctx.k = swap, k
        ctx.set_materialize_grads(False)
        return _views(tensors)

    @staticmethod
    def backward(ctx, *grads):
        ctx.swap._enter_backward(ctx.k)
        return (None, None, *grads)


class _AfterBackward(torch.autograd.Function):
    """Identity on a swapped block's inputs; its backward runs after the block's: drop the block."""

    @staticmethod
    def forward(ctx, swap, k, *tensors):
        ctx.swap, ctx.k = swap, k
        ctx.set_materialize_grads(False)
        return _views(tensors)

    @staticmethod
    def backward(ctx, *grads):
        ctx.swap._drop(ctx.k)
        return (None, None, *grads)


def place(module: torch.nn.Module, device: torch.device, keep: set[int]) -> None:
    """Move every parameter and buffer of `module` to `device`, except the tensors whose ``id`` is in
    `keep` (the swapped weights, which stay on the host)."""
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in keep and t.device != torch.device(device):
            t.data = t.data.to(device)


# ---- activation offloading ------------------------------------------------------------------------


class OffloadActivations(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks that keep the activations a forward saves for its backward in host memory
    (pinned on CUDA), as `torch.autograd.graph.save_on_cpu` does, but leave weights (tensors without
    a ``grad_fn``) where they are. ``packed`` counts the tensors moved."""

    def __init__(self, pin_memory: bool):
        self.packed = 0

        def pack(t: torch.Tensor) -> Any:
            if t.grad_fn is None:  # a weight or an input: leave it, it lives on anyway
                return t
            self.packed += 1
            host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=pin_memory,
                               device="cpu") if t.device.type != "cpu" else torch.empty_like(t)
            host.copy_(t, non_blocking=pin_memory)
            return (t.device, host)

        def unpack(packed: Any) -> torch.Tensor:
            if isinstance(packed, torch.Tensor):
                return packed
            device, host = packed
            return host.to(device, non_blocking=pin_memory)

        super().__init__(pack, unpack)


def offload_activations(module: torch.nn.Module, device: torch.device) -> OffloadActivations:
    """Offload the activations of every forward of `module` (hooks enter and leave the context)."""
    hooks = OffloadActivations(pin_memory=torch.device(device).type == "cuda")
    module.register_forward_pre_hook(lambda m, args: hooks.__enter__())
    module.register_forward_hook(lambda m, args, out: hooks.__exit__(None, None, None))
    module._difftune_offload_activations = hooks
    return hooks


# ---- entry point (speed.apply) --------------------------------------------------------------------


def apply(module: torch.nn.Module, cfg: Any, block_lists: Sequence[str], device: Any) -> None:
    """Set up ``speed.block_swap`` and ``speed.offload_activations`` on the denoiser `module`, then
    put whatever is not swapped on `device` (the denoiser may come from the host, so that the
    swapped weights never reach the device all at once)."""
    s = cfg.speed
    keep: set[int] = set()
    if s.block_swap:
        if not block_lists:
            raise DifftuneError(
                f"speed.block_swap={s.block_swap}: this model family names no transformer blocks to swap; "
                "use speed.block_swap=0")
        swap = BlockSwap(blocks_of(module, block_lists), s.block_swap, device)
        module._difftune_block_swap = swap
        keep = {id(t) for slot in swap.slots for t in slot.tensors}
    if device is not None:
        place(module, device, keep)
    if s.offload_activations:
        offload_activations(module, device if device is not None else torch.device("cpu"))


def describe(module: Any) -> dict:
    """What `apply` did to `module`, for logs and tests: swapped blocks, loads so far, tensors offloaded."""
    swap = getattr(module, "_difftune_block_swap", None)
    act = getattr(module, "_difftune_offload_activations", None)
    return {"swapped_blocks": len(swap.slots) if swap else 0, "loads": swap.loads if swap else 0,
            "offloaded_tensors": act.packed if act else 0}

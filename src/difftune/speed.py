"""Speed and memory switches: the ``speed:`` config section, applied in one place.

train.py (and bench/runners.py, which times the same step) calls three functions, in this order:

1. `setup(cfg, device)` once the accelerator exists and *before any model is loaded*: checks that
   every switch can run on this machine (a one-line `DifftuneError` naming what is missing, so a
   run does not load a 12B model first and fail after) and sets the process-wide matmul flags (TF32).
2. `apply(module, cfg, compute_dtype, block_lists, device, compile_pays)` on the denoiser after the method (LoRA or
   full) is attached and gradient checkpointing is set, before ``accelerator.prepare``: storage of the
   frozen base weights (fp8 / nf4), channels_last, the attention backend, torch.compile, then block
   swap and activation offloading (`difftune.offload`), in that order.
3. `adamw_options(cfg, params)` when the optimizer is built: the fused AdamW kernel where torch has
   one for the parameters' device.

What does not need a switch is always on: attention goes through PyTorch's
``scaled_dot_product_attention`` (diffusers' ``AttnProcessor2_0`` in UNets, the ``native`` dispatch
backend in FLUX), which picks FlashAttention or memory-efficient kernels on CUDA by itself.
"""

from __future__ import annotations

import importlib.util
import shutil
from typing import TYPE_CHECKING, Any, Iterable

import torch  # this module is imported by train.py and bench/ at run time only, never by the CLI

from . import DifftuneError
from .methods import get_method_class

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .config import Config

#: attention backends that run on a CPU (all others need CUDA kernels)
CPU_ATTENTION_BACKENDS = ("native", "_native_math")

#: name patterns of linear layers that fp8 / nf4 leave in the compute dtype: the embedders (timestep,
#: text, patch and position embeddings: few weights, every token depends on them), the model's first
#: and last projection, and the LoRA layers, which are trained and stay fp32. Only ``nn.Linear``
#: layers are ever stored in low precision, so norms and convolutions are untouched anyway; the
#: AdaLN modulation layers (``norm1.linear`` in FLUX: a quarter of its weights) are stored too, as
#: bitsandbytes' and torchao's quantisers do.
KEEP_PRECISION_PATTERNS = ("embed", "^proj_in$", "^proj_out$", "lora_")


#: ``speed.compile: auto`` compiles a family's denoiser regionally for runs of at least this many steps,
#: where the family says it pays (``Family.compile_pays``: FLUX, 0.42 s/step compiled against 0.60 s eager on
#: an H200 after under a minute of warm-up, BENCHMARKS.md). Others stay eager until a GPU run measures them.
AUTO_COMPILE_MIN_STEPS = 500


def compile_mode(cfg: "Config", device: Any = None, compile_pays: bool = False) -> str:
    """What ``speed.compile`` means on `device`: the setting itself, or for ``auto`` ``regional`` where
    the family's `compile_pays` and the run match what was measured, and ``none`` elsewhere."""
    s = cfg.speed
    if s.compile != "auto":
        return s.compile
    on_cuda = device is not None and torch.device(device).type == "cuda"
    # only the setting that was measured: one process, no gradient checkpointing, no block swap, bf16/fp32 base
    several = torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1
    pays = (on_cuda and compile_pays and cfg.train.steps >= AUTO_COMPILE_MIN_STEPS
            and not (s.block_swap or cfg.train.gradient_checkpointing or several) and s.base_weights == "auto")
    return "regional" if pays and _has_triton() else "none"


def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def denoiser_on_host(cfg: "Config") -> bool:
    """Whether training loads the denoiser into host memory (``Family.load(denoiser_on_host=True)``) and
    leaves it there until `apply` puts it on the device: under block swap (the swapped blocks never go there) and with an fp8 base, which is stored
    in fp8 first, so the device never holds the bf16 weights (FLUX.1-dev: 23.8 GB, against 12 in fp8)."""
    return bool(cfg.speed.block_swap) or cfg.speed.base_weights == "fp8"


def describe(cfg: "Config", device: Any = None, compile_pays: bool = False) -> str:
    """One line with the switches that differ from plain eager PyTorch, for the run log (with `device`
    and the family's `compile_pays`, what ``speed.compile: auto`` chose)."""
    s = cfg.speed
    parts = [f"attention={s.attention_backend}"]
    mode = compile_mode(cfg, device, compile_pays)
    if mode != "none":
        parts.append(f"compile={mode}" + (" (auto: the first steps compile, about a minute)" if s.compile == "auto" else ""))
    if s.base_weights != "auto":
        parts.append(f"base_weights={s.base_weights}")
    if s.channels_last:
        parts.append("channels_last")
    if s.fused_optimizer:
        parts.append("fused_adamw")
    if s.block_swap:
        parts.append(f"block_swap={s.block_swap}")
    if s.offload_activations:
        parts.append("offload_activations")
    if cfg.train.gradient_checkpointing:
        parts.append("gradient_checkpointing")
    return ", ".join(parts)


# ---- 1. before loading ---------------------------------------------------------------------------


def setup(cfg: "Config", device: torch.device) -> None:
    """Check that every speed switch can run on `device`, then set the global matmul flags."""
    s = cfg.speed
    cuda = device.type == "cuda"
    if s.base_weights != "auto" and not get_method_class(cfg.method.kind).low_precision_base:
        raise DifftuneError(
            f"speed.base_weights={s.base_weights} stores the frozen base weights in low precision, which "
            f"method.kind={cfg.method.kind} cannot use; use method.kind=lora or speed.base_weights=auto"
        )
    if s.base_weights == "nf4":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise DifftuneError(
                "speed.base_weights=nf4 needs bitsandbytes (pip install 'difftune[gpu]'), best on a CUDA GPU; "
                "or use speed.base_weights=fp8, which needs nothing extra"
            ) from None
    if s.block_swap < 0:
        raise DifftuneError(f"speed.block_swap must be 0 (off) or a number of blocks, got {s.block_swap}")
    if s.block_swap and not get_method_class(cfg.method.kind).adapter:
        raise DifftuneError(
            f"speed.block_swap={s.block_swap} swaps frozen base weights, which only adapter methods (LoRA) have, "
            f"not method.kind={cfg.method.kind}; use method.kind=lora")
    if s.block_swap and s.compile not in ("none", "auto"):
        raise DifftuneError(
            f"speed.block_swap={s.block_swap} moves weights between blocks, which speed.compile={s.compile} "
            "cannot trace; use one of them")
    _check_attention_backend(s.attention_backend, device)
    if s.compile not in ("none", "auto"):
        if cuda:
            try:
                import triton  # noqa: F401
            except ImportError:
                raise DifftuneError(
                    f"speed.compile={s.compile} on CUDA needs triton (it comes with the CUDA build of torch)") from None
        elif device.type == "cpu" and shutil.which("g++") is None and shutil.which("c++") is None:
            raise DifftuneError(
                f"speed.compile={s.compile} on a CPU needs a C++ compiler (g++); install one or use speed.compile=none")
    if cuda:
        precision = "tf32" if s.tf32 else "ieee"
        torch.backends.cuda.matmul.fp32_precision = precision
        torch.backends.cudnn.conv.fp32_precision = precision
        # PyTorch SDPA may pick its cuDNN kernel on Hopper. On an H200 (torch 2.11, CUDA 13) that choice made
        # the backward of a FLUX.1 LoRA step fail with an illegal memory access; the flash and
        # memory-efficient kernels ran it (BENCHMARKS.md). `native` therefore leaves cuDNN out; the
        # `_native_cudnn` backend still asks for it explicitly.
        torch.backends.cuda.enable_cudnn_sdp(s.attention_backend == "_native_cudnn")


def _check_attention_backend(name: str, device: torch.device) -> None:
    if name == "native":
        return
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    if name not in {b.value for b in AttentionBackendName}:
        public = [b.value for b in AttentionBackendName if not b.value.startswith("_")]
        raise DifftuneError(f"speed.attention_backend: unknown backend {name!r}; one of {', '.join(public)}")
    if device.type == "cpu" and name not in CPU_ATTENTION_BACKENDS:
        raise DifftuneError(
            f"speed.attention_backend={name} needs a CUDA GPU; on a CPU use one of {', '.join(CPU_ATTENTION_BACKENDS)}"
        )
    try:
        _check_attention_backend_requirements(AttentionBackendName(name))
    except (RuntimeError, ImportError) as e:  # names the missing package, e.g. flash-attn, kernels
        raise DifftuneError(f"speed.attention_backend={name}: {e}") from None


# ---- 2. on the denoiser, after the method is attached ----------------------------------------------


def apply(module: Any, cfg: "Config", compute_dtype: torch.dtype, block_lists: Iterable[str] = (),
          device: Any = None, compile_pays: bool = False) -> None:
    """Apply the model-level switches to `module` (the denoiser, LoRA attached) in place.

    `compute_dtype` is the dtype the frozen weights are used in (train.precision's); fp8 and nf4
    weights are turned back into it layer by layer, as each layer runs. `block_lists` (the family's
    ``block_lists``) and `device` serve block swap and activation offloading (`difftune.offload`):
    with `device` given, the denoiser ends on it, but for the swapped weights. `compile_pays` is the
    family's (``speed.compile: auto``, `compile_mode`).
    """
    s = cfg.speed
    if s.base_weights == "fp8":
        store_fp8(module, compute_dtype)
    elif s.base_weights == "nf4":
        store_nf4(module, compute_dtype)
    if s.channels_last:
        # only 4-D weights (convolutions) change layout; transformers without convolutions are untouched
        module.to(memory_format=torch.channels_last)
    if s.attention_backend != "native":
        set_attention_backend(module, s.attention_backend)
    mode = compile_mode(cfg, device, compile_pays)
    if mode != "none":
        compile_model(module, mode)
    if s.block_swap or s.offload_activations or device is not None:
        from . import offload

        offload.apply(module, cfg, tuple(block_lists), device)


def _skip_patterns(module: Any) -> tuple[str, ...]:
    """`KEEP_PRECISION_PATTERNS` plus the modules the model itself says must stay fp32."""
    return KEEP_PRECISION_PATTERNS + tuple(getattr(module, "_keep_in_fp32_modules", None) or ())


def store_fp8(module: Any, compute_dtype: torch.dtype) -> None:
    """Replace the frozen linear layers of `module` by `Fp8Linear` (float8_e4m3fn weights, one scale
    per output row): half the bytes of bf16, a quarter of fp32.

    Under LoRA a peft layer keeps calling its ``base_layer``, which becomes the fp8 layer; the LoRA
    layers (fp32, trained) and the precision-critical layers (`KEEP_PRECISION_PATTERNS`) stay as
    they are, and so do convolutions (UNets keep theirs; a FLUX transformer is linear layers only).
    """
    _replace_linear(module, lambda linear: Fp8Linear(linear, compute_dtype), "fp8")


FP8_MAX = 448.0  # the largest finite float8_e4m3fn


class _Fp8LinearFunction(torch.autograd.Function):
    """``x @ dequantize(w8, scale).T + bias`` that keeps nothing for the backward but the fp8 weight
    and its scales (which the layer holds anyway): the compute-dtype weight is made again when the
    input gradient needs it. A plain linear layer with a weight cast on the fly would instead keep
    every layer's cast weight alive from the forward to the backward, which is the memory fp8 is
    meant to save. The weight is frozen, so only the input gets a gradient."""

    @staticmethod
    def forward(ctx, x, w8, scale, bias, dtype):
        ctx.save_for_backward(w8, scale)
        ctx.dtype, ctx.x_dtype = dtype, x.dtype
        return torch.nn.functional.linear(x.to(dtype), w8.to(dtype) * scale.to(dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        w8, scale = ctx.saved_tensors
        weight = w8.to(ctx.dtype) * scale.to(ctx.dtype)
        return (grad.to(ctx.dtype) @ weight).to(ctx.x_dtype), None, None, None, None


class Fp8Linear(torch.nn.Module):
    """A frozen linear layer stored in float8_e4m3fn with an fp32 scale per output row
    (``weight ~= weight_fp8 * weight_scale``, row absmax mapped to 448, the format's largest value),
    computed in `compute_dtype`. The fp8 data are buffers, not parameters, so nothing mistakes the
    model's dtype for float8; ``weight`` gives the dequantised weight for code that reads it."""

    def __init__(self, linear: torch.nn.Linear, compute_dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = compute_dtype
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
        self.register_buffer("weight_fp8", (w / scale).to(torch.float8_e4m3fn))
        self.register_buffer("weight_scale", scale)
        bias = linear.bias
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_fp8.to(self.compute_dtype) * self.weight_scale.to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Fp8LinearFunction.apply(x, self.weight_fp8, self.weight_scale, self.bias, self.compute_dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 -> {self.compute_dtype}"


def _replace_linear(module: Any, make: Any, what: str) -> None:
    """Swap every frozen ``nn.Linear`` of `module` not matching the keep patterns for ``make(linear)``."""
    import re

    patterns = _skip_patterns(module)
    replaced = 0
    for name, child in list(module.named_modules()):
        if type(child) is not torch.nn.Linear or child.weight.requires_grad:
            continue
        if any(re.search(p, name) for p in patterns):
            continue
        parent_name, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, attr, make(child))
        replaced += 1
    if not replaced:
        raise DifftuneError(f"speed.base_weights={what}: the denoiser has no frozen linear layer to store that way")


def store_nf4(module: Any, compute_dtype: torch.dtype) -> None:
    """Replace the frozen linear layers of `module` by bitsandbytes 4-bit NormalFloat layers (QLoRA),
    computed in `compute_dtype`; the same layers as `store_fp8` are kept."""
    import bitsandbytes as bnb

    def make(linear: torch.nn.Linear) -> Any:
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, quant_type="nf4", device="meta")
        q.weight = bnb.nn.Params4bit(linear.weight.data.to(compute_dtype).cpu(), requires_grad=False, quant_type="nf4")
        if linear.bias is not None:
            q.bias = torch.nn.Parameter(linear.bias.data.to(compute_dtype), requires_grad=False)
        try:
            return q.to(linear.weight.device)  # bitsandbytes quantises when the weight moves to its device
        except Exception as e:  # no kernels for this device in the installed bitsandbytes
            raise DifftuneError(
                f"speed.base_weights=nf4: bitsandbytes cannot quantise on {linear.weight.device} "
                f"({type(e).__name__}: {e}); use a CUDA GPU or speed.base_weights=fp8"
            ) from None

    _replace_linear(module, make, "nf4")


def set_attention_backend(module: Any, name: str) -> None:
    """Route `module`'s attention through diffusers' dispatcher backend `name` (e.g. ``flash``)."""
    dispatching = [m for m in module.modules() if hasattr(getattr(m, "processor", None), "_attention_backend")]
    if not dispatching:
        kinds = sorted({type(m.processor).__name__ for m in module.modules() if hasattr(m, "processor")})
        raise DifftuneError(
            f"speed.attention_backend={name}: {type(module).__name__} runs attention through "
            f"{', '.join(kinds) or 'its own code'}, "
            "which always uses PyTorch SDPA; backends apply to models with diffusers' attention dispatch (e.g. FLUX)"
        )
    module.set_attention_backend(name)


def compile_model(module: Any, mode: str) -> None:
    """torch.compile `module` in place (the object stays the same, so saving and LoRA code see it).

    ``regional`` compiles each of the model's repeated blocks (diffusers' ``_repeated_blocks``: the
    transformer blocks); blocks of one shape share one compiled graph, so warm-up costs a few
    blocks' compile time instead of the whole model's. ``full`` compiles the whole forward.
    """
    if mode == "full":
        module.compile()
        return
    blocks = tuple(getattr(module, "_repeated_blocks", None) or ())
    found = [m for m in module.modules() if type(m).__name__ in blocks]
    if not found:
        raise DifftuneError(
            f"speed.compile=regional: {type(module).__name__} has no repeated blocks that diffusers knows "
            f"({', '.join(blocks) or 'none declared'}); use speed.compile=full"
        )
    for block in found:
        block.compile()


# ---- 3. the optimizer ------------------------------------------------------------------------------------


def adamw_options(cfg: "Config", params: Iterable[torch.nn.Parameter]) -> dict:
    """Extra ``torch.optim.AdamW`` keyword arguments: ``fused=True`` when asked for and every
    parameter is a floating-point tensor on a device with a fused kernel (CUDA, CPU, ...)."""
    if not cfg.speed.fused_optimizer:
        return {}
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    supported = set(_get_fused_kernels_supported_devices())
    params = list(params)
    if params and all(p.is_floating_point() and p.device.type in supported for p in params):
        return {"fused": True}
    return {}

"""`difftune bench`: how fast difftune trains a family at a given size on this machine, against the
machine's limit.

One *case* is a family, a size preset, a resolution, a batch size, a method and a mode; each prints
one table row on stdout and, with ``--json FILE``, appends one JSON object to FILE. Measured:
seconds per step (median over the timed steps, after warm-up) and images per second, time to first
step (from the start of the case until the first optimizer step has finished: model build,
compilation and the step itself), peak memory (CUDA: ``torch.cuda.max_memory_allocated``; CPU:
the peak resident set size of the process, sampled every 5 ms, so it includes Python and torch
themselves) and model FLOPs utilisation (MFU).

Modes:

- ``train``: difftune's own optimizer step, with **cached inputs**: random latents and random prompt
  embeddings of the exact shapes and dtypes the family's encoders produce (the case of a run whose
  features are in the cache), fed through `train.micro_step` (timesteps, noise, the family's
  ``predict``, the objective's loss), ``accelerator.backward``, gradient clipping and the optimizer,
  with every `speed` switch of the config applied as `train` applies it.
- ``bare``: only the denoiser's forward and backward on the very tensors ``predict`` gave it in a
  ``train`` step, a mean-squared loss and the same optimizer: the floor difftune's step is compared with.
- ``overhead``: ``train`` and ``bare`` steps taking turns in one process; the row adds
  ``overhead_ratio``, the median of the step-by-step ratios (so a machine whose load drifts, like a
  shared CI box, slows both alike), on wall-clock and on process-CPU time.
- ``baseline``: a re-creation of the per-step work of a diffusers example training script (for
  FLUX: ``examples/dreambooth/train_dreambooth_lora_flux.py``, see ``families/flux/peer.py``).
- ``compare``: ``train`` and ``baseline`` steps taking turns; the row adds ``speedup_vs_baseline``.
- ``generate``: one pipeline call (``--gen-steps`` denoising steps) of the family's sampling pipeline.
- ``e2e`` / ``baseline-e2e``: a whole run of ``--steps`` steps, from loading the model to the saved
  LoRA, on generated images (tiny preset only): ``difftune train`` against the re-created script.
- ``flops``: nothing runs; the FLOPs of one step of any preset, counted on the ``meta`` device (the
  real FLUX.1-dev on a laptop), and with ``--peak-tflops`` the seconds per step at 100% MFU.

Models: ``tiny`` is the pipeline of `difftune.tiny.make_tiny`; ``small`` swaps in a larger denoiser
(CPU-sized); ``real`` builds the published architecture of FLUX.1-dev, SD 1.5 or the Kandinsky 2.2
decoder from its config (each family folder's ``presets.py``) with random weights: the denoiser directly on the device in the
weight dtype, the encoders on the ``meta`` device, where running them costs nothing and yields the
shapes of the cached inputs (``generate`` builds every part on the device). No download is needed.

MFU: FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` over the denoiser's forward
and backward on the exact inputs of one step, on a ``meta`` copy of the denoiser (no memory, no
time; gradient checkpointing off there, so recomputation is not counted: *model* FLOPs), divided by
seconds per step and by the peak: ``--peak-tflops`` if given, else the best of a few large matmuls
in the compute dtype, measured here (``peak_source`` in the row says which). ``generate`` counts
the FLOPs of one real pipeline call. Only matmuls, convolutions and attention are counted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import DifftuneError
from .families.base import Preset
from .methods import get_method, get_method_class, method_kinds

EXAMPLES = """examples:
  difftune bench --family sd --steps 5                                   # tiny SD LoRA on this machine
  difftune bench --family flux --preset small --resolution 256 --json bench.jsonl
  difftune bench --family flux --mode overhead --steps 30                # difftune's step / the bare model's
  difftune bench --family flux --mode compare --steps 30                 # against diffusers' FLUX DreamBooth LoRA
  difftune bench --family flux --preset real --mode flops --peak-tflops 989   # FLOPs of FLUX.1-dev, anywhere
  difftune bench --family flux --preset real --resolution 1024 --precision bf16 --rank 16 \\
      train.gradient_checkpointing=true speed.base_weights=fp8 --json bench.jsonl   # on a GPU
  difftune bench --family sd --preset real --resolution 512 --precision bf16 --batch 8,16,32,64
  difftune bench --family flux --preset real --resolution 1024 --precision bf16 --mode generate --gen-steps 28
  difftune bench --suite gpu --out gpu-results --peer-scripts peer-scripts   # every GPU goal, <= 9 min on one H100
  difftune bench --suite gpu --out /tmp/suite --tiny                         # the same suite on tiny models (CPU)
  difftune bench --suite peers --preset small --peer-scripts peer-scripts --out peers   # against diffusers' scripts

Trailing key.path=value pairs set config keys as in `difftune train` (speed.*, train.*, method.*, objective.*).
"""

MODES = ("train", "bare", "overhead", "baseline", "compare", "generate", "e2e", "baseline-e2e", "flops")

PROMPT = "a photo of sks dog"


def family_presets(family: str) -> dict[str, Preset]:
    """The bench presets of `family` (its folder's ``presets.py``)."""
    from .families.registry import FAMILIES, family_module

    if family not in FAMILIES:
        raise DifftuneError(f"--family {family!r}: one of {', '.join(FAMILIES)}")
    module = family_module(family, "presets")
    presets = getattr(module, "PRESETS", {}).get(family)
    if not presets:
        have = [n for n in FAMILIES if getattr(family_module(n, "presets"), "PRESETS", {}).get(n)]
        raise DifftuneError(f"--family {family!r}: the bench knows {', '.join(have)}")
    return presets


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .families.registry import FAMILIES

    first = next(iter(FAMILIES))
    parser.add_argument("--family", default=first, help=f"model family: {', '.join(FAMILIES)} (default {first})")
    parser.add_argument("--preset", default="tiny", help="model size: tiny, small or real (default tiny)")
    parser.add_argument("--resolution", type=int, help="image side in pixels (default: the preset's)")
    parser.add_argument("--batch", default="1", help="batch size, or a comma list to sweep (default 1)")
    parser.add_argument("--method", choices=method_kinds(), default="lora")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--precision", choices=["no", "fp16", "bf16"],
                        help="mixed precision (default: bf16 on a GPU, no on a CPU)")
    parser.add_argument("--mode", choices=MODES, default="train", help="what is timed (default train)")
    parser.add_argument("--steps", type=int, help="timed steps (default 10; generate: 3 calls; e2e: 20 steps)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--gen-steps", type=int, default=28, help="denoising steps per generate call (default 28)")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s (default: measured matmul)")
    parser.add_argument("--json", type=Path, help="append one JSON line per case to this file")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="config keys (speed.*, train.*, ...)")
    suite = parser.add_argument_group("suites (bench_suite.py)")
    suite.add_argument("--suite", choices=["gpu", "peers"],
                       help="gpu: every GPU goal's case, each in its own process, into --out; "
                            "peers: difftune against diffusers' example scripts (--peer-scripts) on --preset")
    suite.add_argument("--out", type=Path, help="suite output folder (results.jsonl, results.md, logs/)")
    suite.add_argument("--tiny", action="store_true", help="the suite's cases on the tiny models (a CPU proof run)")
    suite.add_argument("--budget", type=float, default=540.0, help="the gpu suite's time budget in seconds (540)")
    suite.add_argument("--peer-scripts", type=Path,
                       help="folder with diffusers' train_dreambooth_lora_flux.py and train_text_to_image_lora.py")
    suite.add_argument("--rounds", type=int, default=3, help="peers suite: turns of each side (3)")


@dataclass
class Case:
    """One benchmark case; `overrides` are config `key.path=value` strings."""

    family: str = "sd"
    preset: str = "tiny"
    resolution: int | None = None
    batch: int = 1
    method: str = "lora"
    rank: int = 16
    precision: str | None = None
    mode: str = "train"
    steps: int | None = None
    warmup: int = 2
    gen_steps: int = 28
    peak_tflops: float | None = None
    overrides: list[str] = field(default_factory=list)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "suite", None):
        from .bench_suite import run as run_suite

        return run_suite(args)
    try:
        batches = [int(b) for b in str(args.batch).split(",") if b.strip()]
    except ValueError:
        raise DifftuneError(f"--batch must be an integer or a comma list of integers, got {args.batch!r}") from None
    import diffusers
    import transformers

    # the row is the output: no per-file loading bars from the libraries in between
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    rows = []
    with tempfile.TemporaryDirectory(prefix="difftune-bench-") as work:
        for batch in batches:
            case = Case(args.family, args.preset, args.resolution, batch, args.method, args.rank, args.precision,
                        args.mode, args.steps, args.warmup, args.gen_steps, args.peak_tflops, list(args.overrides))
            print(f"bench: {args.family}/{args.preset} {args.mode}, batch {batch} ...", file=sys.stderr, flush=True)
            row = run_case(case, Path(work))
            row["command"] = command_line(args, batch)
            if not rows:
                print(table_header(), flush=True)
            print(table_row(row), flush=True)
            rows.append(row)
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                with args.json.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
    return 0


def command_line(args: argparse.Namespace, batch: int) -> str:
    """The `difftune bench` command that reruns exactly this case (for BENCHMARKS.md)."""
    parts = ["difftune bench", f"--family {args.family}", f"--preset {args.preset}", f"--batch {batch}",
             f"--mode {args.mode}", f"--method {args.method}"]
    for flag, value in (("--resolution", args.resolution), ("--rank", args.rank if get_method_class(args.method).adapter else None),
                        ("--precision", args.precision), ("--steps", args.steps), ("--warmup", args.warmup),
                        ("--peak-tflops", args.peak_tflops)):
        if value is not None:
            parts.append(f"{flag} {value}")
    if args.mode == "generate":
        parts.append(f"--gen-steps {args.gen_steps}")
    return " ".join(parts + list(args.overrides))


# ---- the table ------------------------------------------------------------------------------------

_COLUMNS = [  # (title, width, formatter)
    ("family", 20, lambda r: r["family"]), ("preset", 6, lambda r: r["preset"]), ("mode", 12, lambda r: r["mode"]),
    ("method", 7, lambda r: r["method_label"]), ("res", 5, lambda r: str(r["resolution"])),
    ("batch", 5, lambda r: str(r["batch"])), ("prec", 4, lambda r: r["precision"]),
    ("s/step", 8, lambda r: _num(r.get("sec_per_step"), "{:.4f}")),
    ("img/s", 8, lambda r: _num(r.get("images_per_s"), "{:.2f}")),
    ("first_s", 8, lambda r: _num(r.get("first_step_s"), "{:.2f}")),
    ("peak_GB", 8, lambda r: _num(r.get("peak_mem_gb"), "{:.2f}")),
    ("steps_GB", 8, lambda r: _num(r.get("steps_peak_mem_gb"), "{:.2f}")),
    ("FLOP/step", 9, lambda r: _flops(r.get("flops_per_step"))),
    ("MFU", 7, lambda r: f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"),
    ("", 0, lambda r: _note(r)),
]


def _note(row: dict) -> str:
    if "overhead_ratio" in row:
        return f"x{row['overhead_ratio']:.2f} the bare step ({row['bare_sec_per_step']:.4f} s)"
    if "speedup_vs_baseline" in row:
        return f"{row['speedup_vs_baseline']:.2f}x faster than the baseline ({row['baseline_sec_per_step']:.4f} s)"
    if "e2e_s" in row:
        return f"{row['e2e_s']:.2f} s for {row['steps']} steps, end to end"
    if "sec_per_step_at_peak" in row:
        return f"{row['sec_per_step_at_peak']:.4f} s/step at {row['peak_tflops']:g} TFLOP/s"
    return ""


def _num(value: Any, spec: str) -> str:
    return "-" if value is None else spec.format(value)


def _flops(value: Any) -> str:
    if not value:
        return "-"
    return f"{value / 1e12:.1f}T" if value >= 1e12 else f"{value / 1e9:.2f}G"


def table_header() -> str:
    return "  ".join(title.rjust(width) for title, width, _ in _COLUMNS).rstrip()


def table_row(row: dict) -> str:
    return "  ".join(fmt(row).rjust(width) for _, width, fmt in _COLUMNS).rstrip()


# ---- measuring ------------------------------------------------------------------------------------


class PeakMemory:
    """Peak memory over a `with` block: CUDA allocator peak on a GPU, sampled process RSS on a CPU."""

    def __init__(self, device: Any):
        self.device = device
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def kind(self) -> str:
        return "cuda_max_allocated" if self.device.type == "cuda" else "process_rss"

    def __enter__(self) -> "PeakMemory":
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            import psutil

            process = psutil.Process()

            def sample() -> None:
                while not self._stop.wait(0.005):
                    self.peak = max(self.peak, process.memory_info().rss)

            self.peak = process.memory_info().rss
            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()


def synchronize(device: Any) -> None:
    """Wait for queued accelerator work, so wall-clock times measure it."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak_tflops(device: Any, dtype: Any) -> float:
    """Best TFLOP/s of a few large square matmuls in `dtype` on `device` (the achievable peak)."""
    import torch

    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = float("inf")
    for _ in range(2):  # warm-up: kernel selection, clocks
        a @ b
    synchronize(device)
    reps = 10 if device.type == "cuda" else 3
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        synchronize(device)
        best = min(best, (time.perf_counter() - t) / reps)
    return 2 * n**3 / best / 1e12


def count_flops(module: Any, args: tuple, kwargs: dict) -> tuple[int, int]:
    """FLOPs of (the forward, forward + backward) of `module(*args, **kwargs)`, counted on a ``meta`` copy.

    The copy shares nothing with `module` (parameters are replaced by empty meta tensors, fp32 so
    LoRA and base layers agree without autocast), keeps which weights need gradients (so a frozen
    base gets no weight-gradient matmuls, as in training) and runs without gradient checkpointing.
    Only matmuls, convolutions and attention count (``FlopCounterMode``'s formulas).
    """
    import copy

    import torch
    from torch.utils._pytree import tree_map
    from torch.utils.flop_counter import FlopCounterMode

    def meta_like(t: Any) -> Any:
        return torch.empty_like(t, device="meta", dtype=torch.float32 if t.is_floating_point() else t.dtype)

    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = torch.nn.Parameter(meta_like(p), requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = meta_like(b)
    twin = copy.deepcopy(module, memo)
    if getattr(twin, "is_gradient_checkpointing", False):
        twin.disable_gradient_checkpointing()

    def to_meta(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        return meta_like(x).requires_grad_(x.requires_grad and x.is_floating_point())

    with FlopCounterMode(display=False) as counter:
        out = twin(*tree_map(to_meta, args), **tree_map(to_meta, kwargs))[0]
        forward = counter.get_total_flops()
        out.float().pow(2).mean().backward()
    return int(forward), int(counter.get_total_flops())


# ---- building models --------------------------------------------------------------------------------


@contextlib.contextmanager
def _default_dtype(dtype: Any):
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_part(like: Any, overrides: dict, device: Any, dtype: Any) -> Any:
    """A randomly initialised module of `like`'s class with `like`'s config updated by `overrides`,
    created directly on `device` (``meta``: no memory) in `dtype`, frozen, in eval mode."""
    import torch

    cls = type(like)
    with torch.device(device), _default_dtype(dtype):
        if hasattr(like.config, "to_dict"):  # transformers: a PretrainedConfig object
            config = type(like.config).from_dict({**like.config.to_dict(), **overrides})
            module = cls(config)
        else:  # diffusers: a FrozenDict of __init__ arguments
            config = {k: v for k, v in dict(like.config).items() if not k.startswith("_")}
            module = cls.from_config({**config, **overrides})
    return module.to(device=device, dtype=dtype).requires_grad_(False).eval()


def _tiny_model(family: str, work: Path) -> dict[str, str]:
    """Config keys naming the tiny pipeline of `family` (and any companion), written once under `work`."""
    from .tiny import make_tiny, tiny_config, tiny_folder

    folder = tiny_folder(family)
    root = work / f"tiny-{folder}"
    if not root.exists():
        make_tiny(folder, root)
    return tiny_config(root, family)


def _case_config(case: Case, model: dict[str, str], resolution: int, precision: str, out: Path,
                 data_dir: Path | None = None) -> Any:
    from .config import load_config

    items = {
        **model, "model.family": case.family, "method.kind": case.method, "method.rank": case.rank,
        "data.resolution": resolution, "train.batch_size": case.batch, "train.precision": precision,
        "checkpoint.every": 0, "output_dir": str(out),
    }
    if data_dir is not None:
        items["data.concepts"] = f"[{{dir: '{data_dir}', prompt: '{PROMPT}'}}]"
    if case.steps is not None:
        items["train.steps"] = case.steps
    return load_config(None, [f"{k}={v}" for k, v in items.items()] + list(case.overrides))


def build_family(cfg: Any, device: Any, weight_dtype: Any, preset: Preset, everything_on_device: bool = False) -> Any:
    """The family of `cfg`, loaded from its tiny pipeline, with the preset's parts swapped in: the denoiser
    on `device` (fp32 if fully trained), the other swapped parts on ``meta`` unless `everything_on_device`."""
    import torch

    from .families.registry import get_family

    family = get_family(cfg.model.family)(cfg, device, weight_dtype)
    family.load()
    trained = set(family.trainable_part_names())
    trained_dtype = get_method(cfg.method).part_dtype(weight_dtype)
    meta = torch.device("meta")
    on_device = {name: everything_on_device or name == family.denoiser for name in preset.parts}
    if device.type != "meta":  # fail before building what cannot fit (the real FLUX on a laptop)
        shapes = {name: build_part(family.parts[name], preset.parts[name], meta, torch.float32)
                  for name, here in on_device.items() if here}
        need = sum(p.numel() * (trained_dtype.itemsize if name in trained else weight_dtype.itemsize)
                   for name, part in shapes.items() for p in part.parameters())
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else _available_ram()
        if need > free:
            raise DifftuneError(
                f"{preset.note} ({', '.join(shapes)}): {need / 1e9:.1f} GB of weights alone, but the {device.type} has "
                f"{free / 1e9:.1f} GB free; use a smaller preset, or --mode flops to count its FLOPs without running it")
    for name, overrides in preset.parts.items():
        dtype = trained_dtype if name in trained else weight_dtype
        family.parts[name] = build_part(family.parts[name], overrides, device if on_device[name] else meta, dtype)
    return family


def _available_ram() -> int:
    import psutil

    return psutil.virtual_memory().available


def cached_inputs(family: Any, resolution: int, batch: int, encoders_device: Any, seed: int = 0) -> tuple[dict, dict]:
    """Random (image features, prompt features) for a batch, shaped and typed as the family's encoders
    output them at `resolution`: floating tensors are standard normal (like scaled latents and
    embeddings), integer and boolean ones (token masks) all ones. The encoders run once, on
    `encoders_device` (``meta`` for the real presets), just for the shapes."""
    import torch

    device = family.device
    family.device = encoders_device
    try:
        with torch.no_grad():
            pixels = torch.zeros(1, 3, resolution, resolution, device=encoders_device)
            image = family.encode_images(pixels)
            prompt = family.encode_prompts([PROMPT])
    finally:
        family.device = device
    generator = torch.Generator().manual_seed(seed)

    def fill(t: Any) -> Any:
        shape = (batch, *t.shape[1:])
        if t.is_floating_point():
            return torch.randn(shape, generator=generator).to(device=device, dtype=t.dtype)
        return torch.ones(shape, dtype=t.dtype, device=device)

    return {k: fill(v) for k, v in image.items()}, {k: fill(v) for k, v in prompt.items()}


def denoiser_call(family: Any, objective: Any, images: dict, prompts: dict) -> tuple[tuple, dict]:
    """The positional and keyword arguments `family.predict` passes to the denoiser for these cached
    inputs (at timesteps the objective draws): what ``bare`` mode and the FLOP count run it on."""
    import torch

    from .families.base import unwrap

    features = {k: v for k, v in images.items() if k != "x0"}
    features.update(prompts)
    x0 = images["x0"].float()
    generator = torch.Generator().manual_seed(0)
    t = objective.sample_timesteps(x0, generator)
    x_t = torch.randn(x0.shape, generator=generator).to(x0.device)
    seen: dict[str, Any] = {}
    hook = unwrap(family.parts[family.denoiser]).register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(args=args, kwargs=kwargs), with_kwargs=True)
    try:
        with torch.no_grad():
            family.predict(x_t, t, features)
    finally:
        hook.remove()
    return seen["args"], seen["kwargs"]


# ---- one case ---------------------------------------------------------------------------------------------


def run_case(case: Case, work: Path) -> dict:
    """Run one benchmark case; returns its result row (also what ``--json`` writes)."""
    import torch

    if case.mode not in MODES:
        raise DifftuneError(f"--mode {case.mode!r}: one of {', '.join(MODES)}")
    presets = family_presets(case.family)
    if case.preset not in presets:
        raise DifftuneError(f"--preset {case.preset!r}: one of {', '.join(presets)} for {case.family}")
    if case.batch < 1 or case.warmup < 0 or (case.steps is not None and case.steps < 1):
        raise DifftuneError("--batch and --steps must be >= 1, --warmup >= 0")
    preset = presets[case.preset]
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    precision = case.precision or ("bf16" if cuda else "no")
    resolution = case.resolution or preset.resolution
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    model = _tiny_model(case.family, work)
    out = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    cfg = _case_config(case, model, resolution, precision, out)
    if cfg.method.train_text_encoder:
        raise DifftuneError("the bench times the denoiser with cached prompt embeddings; drop method.train_text_encoder")

    row: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"), "family": case.family, "preset": case.preset, "mode": case.mode,
        "method": case.method, "rank": case.rank if get_method_class(case.method).adapter else None,
        "method_label": get_method(cfg.method).label(),
        "resolution": resolution, "batch": case.batch, "precision": precision, "device": _device_name(device),
        "threads": torch.get_num_threads(), "overrides": list(case.overrides),
        "gradient_checkpointing": cfg.train.gradient_checkpointing, "speed": asdict(cfg.speed),
        "torch": torch.__version__,
    }
    if case.mode == "flops":
        row.update(_run_flops(case, cfg, preset))
        row["device"] = "meta (counted, not run)"
        if case.peak_tflops:
            row["peak_tflops"], row["peak_source"] = case.peak_tflops, "given"
            row["sec_per_step_at_peak"] = row["flops_per_step"] / (case.peak_tflops * 1e12)
        return row
    runner = {"train": _run_train, "bare": _run_train, "overhead": _run_train, "compare": _run_train,
              "baseline": _run_baseline, "generate": _run_generate, "e2e": _run_e2e, "baseline-e2e": _run_e2e}[case.mode]
    with PeakMemory(device) as memory:
        try:
            measured = runner(case, cfg, preset, device, weight_dtype, work)
        except torch.OutOfMemoryError:
            raise DifftuneError(f"out of accelerator memory in case {table_row_label(row)}") from None
    row.update(measured)
    setup_peak, steps_peak = row.pop("setup_peak", None), row.pop("steps_peak", None)
    # CUDA: the whole case's peak (building and converting the model included) and the steps' own peak
    row["peak_mem_gb"] = max(memory.peak, setup_peak or 0, steps_peak or 0) / 1e9
    if steps_peak is not None:
        row["steps_peak_mem_gb"] = steps_peak / 1e9
    row["peak_mem_kind"] = memory.kind
    times = row.pop("step_times")
    row["sec_per_step"] = statistics.median(times)
    row["sec_per_step_mean"] = statistics.fmean(times)
    row["sec_per_step_min"] = min(times)
    row["timed_steps"] = len(times)
    row["images_per_s"] = case.batch / row["sec_per_step"]
    if row.get("flops_per_step"):
        if case.peak_tflops:
            row["peak_tflops"], row["peak_source"] = case.peak_tflops, "given"
        else:
            row["peak_tflops"], row["peak_source"] = measure_peak_tflops(device, weight_dtype), f"measured {weight_dtype}"
        row["achieved_tflops"] = row["flops_per_step"] / row["sec_per_step"] / 1e12
        row["mfu"] = row["achieved_tflops"] / row["peak_tflops"]
    return row


def table_row_label(row: dict) -> str:
    return f"{row['family']}/{row['preset']} {row['mode']} {row['method_label']} {row['resolution']}px batch {row['batch']}"


def _device_name(device: Any) -> str:
    import os
    import platform

    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def _timed(steps: list[Callable[[int], Any]], device: Any, warmup: int, n: int, t_start: float) -> dict:
    """Run `warmup` then `n` rounds of `steps` (several step functions take turns, so a machine whose
    load drifts slows each of them alike). Returns per step function the wall-clock and process-CPU
    seconds of each timed step, and the time from `t_start` to the end of the first step."""
    import torch

    first = None
    setup_peak = None
    wall: list[list[float]] = [[] for _ in steps]
    cpu: list[list[float]] = [[] for _ in steps]
    if device.type == "cuda":  # the steps' own peak, apart from building and converting the model
        synchronize(device)
        setup_peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup + n):
        for j, step in enumerate(steps):
            t, c = time.perf_counter(), time.process_time()
            step(i)
            synchronize(device)
            now = time.perf_counter()
            if first is None:
                first = now - t_start
            if i >= warmup:
                wall[j].append(now - t)
                cpu[j].append(time.process_time() - c)
    steps_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"wall": wall, "cpu": cpu, "first": first, "setup_peak": setup_peak, "steps_peak": steps_peak}


def _peaks(timed: dict) -> dict:
    return {"setup_peak": timed["setup_peak"], "steps_peak": timed["steps_peak"]}


def _run_train(case: Case, cfg: Any, preset: Preset, device: Any, weight_dtype: Any, work: Path) -> dict:
    """``train`` and ``bare``: difftune's step with cached inputs, or the denoiser alone on the same tensors."""
    import torch
    from accelerate import Accelerator

    from . import speed
    from .families.base import unwrap
    from .train import attach_method, make_optimizer, micro_seed, micro_step

    t_start = time.perf_counter()
    accelerator = Accelerator(mixed_precision=cfg.train.precision)
    speed.setup(cfg, device)
    torch.manual_seed(cfg.train.seed)
    family = build_family(cfg, device, weight_dtype, preset)
    part_names = attach_method(family, cfg)
    encoders_device = torch.device("meta") if set(preset.parts) - {family.denoiser} else device
    images, prompts = cached_inputs(family, cfg.data.resolution, case.batch, encoders_device)
    objective = family.make_objective()
    features = {**images, **prompts}  # a cached batch, as `FeatureRoute.features` hands it to the step

    # measurement only, not part of a training run's first step: the denoiser's inputs and FLOPs
    t_probe = time.perf_counter()
    denoiser = unwrap(family.parts[family.denoiser])
    with accelerator.autocast():
        args, kwargs = denoiser_call(family, objective, images, prompts)
    forward_flops, flops = count_flops(denoiser, args, kwargs)
    probe_s = time.perf_counter() - t_probe

    speed.apply(family.parts[family.denoiser], cfg, weight_dtype, family.block_lists, device)
    method = get_method(cfg.method)
    groups = [{"params": method.trainable_parameters(family.parts[name]), "lr": cfg.train.lr} for name in part_names]
    params = [p for g in groups for p in g["params"]]
    optimizer = accelerator.prepare(make_optimizer(cfg, groups))
    for name in part_names:  # block swap keeps weights on the host: as in train.py
        placement = not (name == family.denoiser and cfg.speed.block_swap)
        family.parts[name] = accelerator.prepare(family.parts[name], device_placement=[placement])
    max_norm = cfg.train.max_grad_norm

    def train_step(k: int) -> None:
        with accelerator.autocast():
            loss = micro_step(family, objective, features, micro_seed(0, k))
        finite = bool(torch.isfinite(loss))  # the loop checks every loss (one sync per step, as there)
        accelerator.backward(loss)
        if max_norm is not None:
            accelerator.clip_grad_norm_(params, max_norm)
        if finite:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float(loss.detach())  # logged every step by the loop

    model = family.parts[family.denoiser]
    target = None

    def bare_step(k: int) -> None:
        nonlocal target
        with accelerator.autocast():
            out = model(*args, **kwargs)[0]
            if target is None:
                target = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(out.device)
            loss = (out.float() - target).pow(2).mean()
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    steps = {"train": [train_step], "bare": [bare_step], "overhead": [train_step, bare_step]}.get(case.mode)
    if case.mode == "compare":
        baseline = _make_baseline(case, cfg, device, weight_dtype)
        pixels = torch.rand(case.batch, 3, cfg.data.resolution, cfg.data.resolution,
                            generator=torch.Generator().manual_seed(0)).to(device) * 2 - 1
        steps = [train_step, lambda k: baseline.step(pixels, [PROMPT] * case.batch)]
    timed = _timed(steps, device, case.warmup, case.steps or 10, t_start)
    result = {
        "step_times": timed["wall"][0], "cpu_sec_per_step": statistics.median(timed["cpu"][0]),
        **_peaks(timed), "first_step_s": timed["first"] - probe_s, "flops_per_step": flops, "flops_forward": forward_flops,
        "params_total": sum(p.numel() for p in unwrap(family.parts[family.denoiser]).parameters()),
        "params_trained": sum(p.numel() for p in params),
    }
    if len(steps) == 2:  # overhead: difftune / bare; compare: baseline / difftune
        other = "bare" if case.mode == "overhead" else "baseline"
        theirs = timed["wall"][1]
        result[f"{other}_sec_per_step"] = statistics.median(theirs)
        result[f"{other}_cpu_sec_per_step"] = statistics.median(timed["cpu"][1])
        # the median of step-by-step ratios: each pair ran back to back, under the same machine load
        key = "overhead_ratio" if other == "bare" else "speedup_vs_baseline"
        for suffix, (a_times, b_times) in (("", timed["wall"]), ("_cpu", timed["cpu"])):
            pairs = list(zip(a_times, b_times))
            ratios = [a / b for a, b in pairs] if other == "bare" else [b / a for a, b in pairs]
            result[key + suffix] = statistics.median(ratios)
    return result


def _run_flops(case: Case, cfg: Any, preset: Preset) -> dict:
    """``flops``: the model FLOPs of one training step, everything on the ``meta`` device (any preset,
    any machine: the real FLUX.1-dev counts in seconds on a laptop). Nothing runs, nothing is timed."""
    import torch

    from .families.base import unwrap
    from .train import attach_method

    meta = torch.device("meta")
    # fp32 throughout: meta tensors have no autocast, and FLOPs do not depend on the dtype
    family = build_family(cfg, meta, torch.float32, preset, everything_on_device=True)
    part_names = attach_method(family, cfg)
    denoiser = unwrap(family.parts[family.denoiser]).to(meta)  # LoRA layers are created on the CPU
    images, prompts = cached_inputs(family, cfg.data.resolution, case.batch, meta)
    args, kwargs = denoiser_call(family, family.make_objective(), images, prompts)
    forward, total = count_flops(denoiser, args, kwargs)
    return {
        "flops_per_step": total,
        "flops_forward": forward,
        "params_total": sum(p.numel() for p in denoiser.parameters()),
        "params_trained": sum(p.numel() for n in part_names for p in get_method(cfg.method).trainable_parameters(family.parts[n])),
    }


def _run_generate(case: Case, cfg: Any, preset: Preset, device: Any, weight_dtype: Any, work: Path) -> dict:
    """One pipeline call per step: `--gen-steps` denoising steps at the case's resolution and batch."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    t_start = time.perf_counter()
    torch.manual_seed(cfg.train.seed)
    family = build_family(cfg, device, weight_dtype, preset, everything_on_device=True)
    pipe = family.sampling_pipeline()
    pipe.set_progress_bar_config(disable=True)
    size = cfg.data.resolution

    def call(k: int) -> None:
        with torch.no_grad():
            type(family).sample(pipe, PROMPT, steps=case.gen_steps, guidance=family.default_guidance, width=size,
                                height=size, generator=torch.Generator().manual_seed(k), num=case.batch)

    call(0)  # warm-up, then one counted call
    synchronize(device)
    first = time.perf_counter() - t_start
    # attention through SDPA's math path while counting: FlopCounterMode has no formula for the
    # fused CPU kernel, and the math path does the same FLOPs as every fused one
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        call(1)
    timed = _timed([call], device, 0, case.steps or 3, t_start)
    return {"step_times": timed["wall"][0], "cpu_sec_per_step": statistics.median(timed["cpu"][0]), **_peaks(timed),
            "first_step_s": first, "flops_per_step": int(counter.get_total_flops()), "gen_steps": case.gen_steps}


def _make_baseline(case: Case, cfg: Any, device: Any, weight_dtype: Any) -> Any:
    baseline = baseline_for(case.family)
    if case.preset != "tiny" or case.method != baseline.method:
        raise DifftuneError(f"--mode {case.mode} loads the diffusers pipeline folder: tiny preset, "
                            f"method {baseline.method} only")
    return baseline(cfg, device, weight_dtype)


def _run_baseline(case: Case, cfg: Any, preset: Preset, device: Any, weight_dtype: Any, work: Path) -> dict:
    """The re-created diffusers example step, with the images and prompts it would encode every step."""
    import torch

    t_start = time.perf_counter()
    baseline = _make_baseline(case, cfg, device, weight_dtype)
    generator = torch.Generator().manual_seed(0)
    pixels = (torch.rand(case.batch, 3, cfg.data.resolution, cfg.data.resolution, generator=generator) * 2 - 1).to(device)
    prompts = [PROMPT] * case.batch
    timed = _timed([lambda k: baseline.step(pixels, prompts)], device, case.warmup, case.steps or 10, t_start)
    return {"step_times": timed["wall"][0], "cpu_sec_per_step": statistics.median(timed["cpu"][0]), **_peaks(timed),
            "first_step_s": timed["first"], "params_trained": baseline.n_trained}


def _run_e2e(case: Case, cfg: Any, preset: Preset, device: Any, weight_dtype: Any, work: Path) -> dict:
    """A whole run on generated images: `difftune train`, or the re-created diffusers script."""
    from .train import train

    if case.preset != "tiny":
        raise DifftuneError(f"--mode {case.mode} trains from a pipeline folder on disk: tiny preset only")
    steps = case.steps or 20
    data_dir = _write_images(work / "images", cfg.data.resolution)
    out = Path(tempfile.mkdtemp(prefix="e2e-", dir=work))
    run_cfg = _case_config(Case(**{**asdict(case), "steps": steps}), _tiny_model(case.family, work),
                           cfg.data.resolution, cfg.train.precision, out, data_dir)
    t = time.perf_counter()
    if case.mode == "e2e":
        train(run_cfg, log=lambda *_: None)
    else:
        baseline_for(case.family).run(run_cfg, device, weight_dtype, data_dir, steps, out)
    total = time.perf_counter() - t
    return {"step_times": [total / steps] * steps, "first_step_s": None, "e2e_s": total, "steps": steps}


def _write_images(folder: Path, size: int, n: int = 4) -> Path:
    """`n` PNGs (a disc on a plain ground) with caption files, once."""
    from PIL import Image, ImageDraw

    if folder.exists():
        return folder
    folder.mkdir(parents=True)
    for i in range(n):
        image = Image.new("RGB", (size, size), (0, 128, 128))
        r = size // 4 + i
        ImageDraw.Draw(image).ellipse((size // 2 - r, size // 2 - r, size // 2 + r, size // 2 + r), fill=(255, 140, 0))
        image.save(folder / f"img-{i}.png")
        (folder / f"img-{i}.txt").write_text(PROMPT)
    return folder


# ---- the re-created diffusers example ------------------------------------------------------------------


def baseline_for(family: str) -> Any:
    """The re-created diffusers example `family` is compared with (its folder's ``peer.py``: ``PEER``)."""
    from .families.registry import FAMILIES, family_module

    peer = getattr(family_module(family, "peer"), "PEER", None)
    if peer is None:
        have = [n for n in FAMILIES if getattr(family_module(n, "peer"), "PEER", None) is not None]
        raise DifftuneError(f"no re-created diffusers script for {family} (have: {', '.join(have)})")
    return peer

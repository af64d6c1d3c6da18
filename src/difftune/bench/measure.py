"""What the bench measures, and how: step timers, peak memory, FLOP counting, MFU, and the table a
result row prints as.

MFU: FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` over the denoiser's forward
and backward on the exact inputs of one step, on a ``meta`` copy of the denoiser (no memory, no
time; gradient checkpointing off there, so recomputation is not counted: *model* FLOPs), divided by
seconds per step and by the peak: ``--peak-tflops`` if given, else the best of a few large matmuls
in the compute dtype, measured here (``peak_source`` in the row says which). ``generate`` counts
the FLOPs of one real pipeline call. Only matmuls, convolutions and attention are counted.
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any, Callable


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


def device_name(device: Any) -> str:
    import os
    import platform

    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def time_steps(steps: list[Callable[[int], Any]], device: Any, warmup: int, n: int, t_start: float) -> dict:
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


def peaks(timed: dict) -> dict:
    return {"setup_peak": timed["setup_peak"], "steps_peak": timed["steps_peak"]}


def step_figures(row: dict, memory: PeakMemory, batch: int, peak_tflops: float | None, device: Any,
                 dtype: Any) -> None:
    """Turn a runner's raw measurements in `row` (``step_times``, ``setup_peak``, ``steps_peak``,
    ``flops_per_step``) into the row's figures: peak memory, s/step, images/s, and the MFU against
    `peak_tflops` (given) or the matmul peak measured in `dtype`."""
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
    row["images_per_s"] = batch / row["sec_per_step"]
    if row.get("flops_per_step"):
        if peak_tflops:
            row["peak_tflops"], row["peak_source"] = peak_tflops, "given"
        else:
            row["peak_tflops"], row["peak_source"] = measure_peak_tflops(device, dtype), f"measured {dtype}"
        row["achieved_tflops"] = row["flops_per_step"] / row["sec_per_step"] / 1e12
        row["mfu"] = row["achieved_tflops"] / row["peak_tflops"]


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

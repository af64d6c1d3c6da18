"""One case, run: `run_case` checks it, builds its config and hands it to its mode's runner (``train``,
``bare``, ``overhead`` and ``compare`` share one; ``flops``, ``generate``, ``baseline``, ``e2e``), then
adds the figures every row has (`measure.step_figures`)."""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .. import DifftuneError
from ..families.base import Preset
from ..methods import get_method, get_method_class
from .cases import (MODES, PROMPT, Case, baseline_for, build_family, cached_inputs, case_config, denoiser_call,
                    family_presets, tiny_model)
from .measure import PeakMemory, count_flops, device_name, peaks, step_figures, synchronize, time_steps


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
    model = tiny_model(case.family, work)
    out = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    cfg = case_config(case, model, resolution, precision, out)
    if cfg.method.train_text_encoder:
        raise DifftuneError("the bench times the denoiser with cached prompt embeddings; drop method.train_text_encoder")

    row: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"), "family": case.family, "preset": case.preset, "mode": case.mode,
        "method": case.method, "rank": case.rank if get_method_class(case.method).adapter else None,
        "method_label": get_method(cfg.method).label(),
        "resolution": resolution, "batch": case.batch, "precision": precision, "device": device_name(device),
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
    step_figures(row, memory, case.batch, case.peak_tflops, device, weight_dtype)
    return row


def table_row_label(row: dict) -> str:
    return f"{row['family']}/{row['preset']} {row['mode']} {row['method_label']} {row['resolution']}px batch {row['batch']}"


def _run_train(case: Case, cfg: Any, preset: Preset, device: Any, weight_dtype: Any, work: Path) -> dict:
    """``train`` and ``bare``: difftune's step with cached inputs, or the denoiser alone on the same tensors."""
    import torch
    from accelerate import Accelerator

    from .. import speed
    from ..families.base import unwrap
    from ..train import attach_method, make_optimizer, micro_seed, micro_step

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

    speed.apply(family.parts[family.denoiser], cfg, weight_dtype, family.block_lists, device, family.compile_pays)
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
    timed = time_steps(steps, device, case.warmup, case.steps or 10, t_start)
    result = {
        "step_times": timed["wall"][0], "cpu_sec_per_step": statistics.median(timed["cpu"][0]),
        **peaks(timed), "first_step_s": timed["first"] - probe_s, "flops_per_step": flops, "flops_forward": forward_flops,
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

    from ..families.base import unwrap
    from ..train import attach_method

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
    timed = time_steps([call], device, 0, case.steps or 3, t_start)
    return {"step_times": timed["wall"][0], "cpu_sec_per_step": statistics.median(timed["cpu"][0]), **peaks(timed),
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
    timed = time_steps([lambda k: baseline.step(pixels, prompts)], device, case.warmup, case.steps or 10, t_start)
    return {"step_times": timed["wall"][0], "cpu_sec_per_step": statistics.median(timed["cpu"][0]), **peaks(timed),
            "first_step_s": timed["first"], "params_trained": baseline.n_trained}


def _run_e2e(case: Case, cfg: Any, preset: Preset, device: Any, weight_dtype: Any, work: Path) -> dict:
    """A whole run on generated images: `difftune train`, or the re-created diffusers script."""
    from ..train import train

    if case.preset != "tiny":
        raise DifftuneError(f"--mode {case.mode} trains from a pipeline folder on disk: tiny preset only")
    steps = case.steps or 20
    data_dir = _write_images(work / "images", cfg.data.resolution)
    out = Path(tempfile.mkdtemp(prefix="e2e-", dir=work))
    run_cfg = case_config(Case(**{**asdict(case), "steps": steps}), tiny_model(case.family, work),
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

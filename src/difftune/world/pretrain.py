"""`difftune world pretrain {sd,flux} OUT`: small world base models trained from scratch on a CPU.

Four stages (FLUX has no refining stage yet), each resumable (run the same command again after an
interruption):

1. **skeleton**: a random-initialised pipeline in the diffusers layout (`models.build`), with the
   byte-level tokenizers (`tokenizers`) and frozen random text encoders;
2. **VAE**: the autoencoder learns to reconstruct world images mixed with random gratings, checkers
   and dots (so textures that only fine-tuning brings, like held-out styles, survive decoding); its
   latent scaling (and FLUX's shift) is then measured on world images, as the real models' were;
3. **denoiser**: an ordinary ``difftune train`` full fine-tune of the skeleton (UNet or FLUX
   transformer) on rendered world scenes with captions and 10% caption dropout, so classifier-free
   guidance works. The held-out styles, places and 64 (colour, shape, background) triples never
   appear (`scenes.unseen_triples`), so the base-quality benchmark measures generalisation. The
   text encoders train with the denoiser (random frozen ones leave colour words too close to each
   other for a small denoiser to read in the time there is); fine-tunes freeze them again.
4. **refine** (SD's plan): the same training again from the trained denoiser, on as many fresh
   scenes, at half the learning rate and twice the batch, for 2400 steps, with the loss weighted by
   min-SNR (gamma 5), which moves the weight from the nearly clean steps to the noisier ones where
   the object's outline is decided: shape right 51% -> 95% on the base-quality benchmark (800 steps:
   77%; the same refining without min-SNR: 52%; min-SNR from the start: 58%, then refined 62%;
   BENCHMARKS.md section 5).
   Changing only the refining stage (``--refine-steps``) reruns only it.

Everything is seeded: the same seed and minutes give the same weights. The final pipeline is
written to OUT with fp16 weights and a model card; `work/` under OUT keeps the stages' state until
the end (delete it to reclaim space, or keep it to continue training: the same command with a
larger ``--denoiser-steps`` resumes the denoiser from its last checkpoint; its cosine schedule is
stretched to the new length, so the learning rate rises again, a warm restart).
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import numpy as np

from .. import DifftuneError
from . import models, scenes

#: reference step counts per family for `DEFAULT_MINUTES` on 2 CPU cores; --minutes scales them
PLANS = {
    # sd: a refining stage with min-SNR loss weighting (gamma 5), at half the learning rate and twice the
    # batch, on fresh scenes, draws the asked shape far more often (51% -> 95%; BENCHMARKS.md section 5).
    # The denoiser stage at batch 32 for half the steps (the same images, 15 instead of 26 min) was
    # tried to fit the 45-minute budget: shape 56% after refining, so the plan keeps batch 16.
    # Refining 2400 steps instead of 1600, from the same from-scratch denoiser stage: shape 71.9% -> 89.1%,
    # colour 94.5% -> 99.2%, the whole plan 37.9 -> 44.4 min on 2 idle cores (2200 steps: 84.4%, 42.1 min).
    "sd": {"vae_steps": 2000, "vae_batch": 16, "denoiser_steps": 3000, "batch": 16, "lr": 1e-3, "images": 4000,
           "refine_steps": 2400, "refine_lr": 5e-4, "refine_batch": 32, "refine_min_snr_gamma": 5.0},
    # flux: the denoiser stage feeds the transformer 32 T5 tokens per caption, the refining stage the 512 that
    # FluxPipeline always feeds it. With the local T5 every padding token far from the words has the same
    # vector, and FLUX gives all text tokens one position, so more padding only weighs one repeated key more;
    # the transformer step is 6x cheaper (0.1 against 0.61 s at batch 16), and 4x the steps on twice the scenes
    # took the object colour from 63% to 87% (shape 40% -> 38%), 22.8 min from scratch (BENCHMARKS.md section 5).
    # The earlier refining stage (800 steps of 32 at 512 tokens, logit-normal timesteps) did not help.
    "flux": {"vae_steps": 1500, "vae_batch": 16, "denoiser_steps": 8000, "batch": 16, "lr": 1e-3, "images": 8000,
             "text_tokens": 32, "refine_steps": 600, "refine_lr": 3e-4, "refine_batch": 16, "refine_text_tokens": 512},
}
#: the VAE (convolutional) learns on random crops of this side: 4x cheaper than whole images
VAE_CROP = 32
DEFAULT_MINUTES = 40.0
VAE_SHARE = 0.2


def steps_for(family: str, minutes: float) -> dict:
    """The plan of `family` scaled to `minutes` (step counts only; batch sizes and data stay)."""
    plan = dict(PLANS[family])
    k = minutes / DEFAULT_MINUTES
    plan["vae_steps"] = max(10, round(plan["vae_steps"] * k))
    plan["denoiser_steps"] = max(10, round(plan["denoiser_steps"] * k))
    if plan.get("refine_steps"):
        plan["refine_steps"] = max(10, round(plan["refine_steps"] * k))
    return plan


# ------------------------------------------------------------------------------------------------
# VAE stage


def pattern(rng: random.Random) -> np.ndarray:
    """A random texture in two palette colours: a grating at any angle, a checkerboard or dots."""
    a, b = rng.sample(list(scenes.COLOURS.values()), 2)
    yy, xx = np.mgrid[0 : scenes.SIZE, 0 : scenes.SIZE].astype(np.float32)
    kind = rng.randrange(3)
    period = rng.uniform(3, 14)
    if kind == 0:
        angle = rng.uniform(0, np.pi)
        on = ((xx * np.cos(angle) + yy * np.sin(angle)) / period + rng.random()) % 1 < 0.5
    elif kind == 1:
        on = ((xx // (period / 2)) + (yy // (period / 2))) % 2 == 0
    else:
        r = rng.uniform(0.15, 0.4) * period
        on = ((xx % period) - period / 2) ** 2 + ((yy % period) - period / 2) ** 2 > r * r
    image = np.empty((scenes.SIZE, scenes.SIZE, 3), dtype=np.uint8)
    image[:] = a
    image[on] = b
    if rng.random() < 0.5:  # textures confined to a shape, as styled objects are
        scene = scenes.random_scene(rng)
        mask = scenes.shape_mask(scene.shape, scene.x, scene.y, scene.side)
        image[~mask] = scenes.COLOURS[scene.background]
    return image


def vae_batch(seed: int, step: int, n: int) -> "torch.Tensor":
    """Batch `step` of the VAE stage: half world scenes (any style, places too), half textures; [-1, 1]."""
    import torch

    rng = random.Random(f"{seed}:vae:{step}")
    images = []
    for i in range(n):
        if i % 2:
            images.append(pattern(rng))
        elif rng.random() < 0.1:
            images.append(scenes.render(scenes.random_place(rng, rng.choice(list(scenes.PLACES)))))
        else:
            images.append(scenes.render(scenes.random_scene(rng, style=rng.choice([None, *scenes.STYLES]))))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x


def train_vae(vae, work: Path, steps: int, batch: int, seed: int, log=print):
    """Train `vae` in place for `steps` steps, checkpointing to ``work/vae-state.pt`` every 100 steps."""
    import torch
    from tqdm.auto import tqdm

    state_path = work / "vae-state.pt"
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * (0.1 + 0.9 * (1 - s / steps)))
    start = 0
    if state_path.is_file():
        state = torch.load(state_path, weights_only=False)
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start = state["step"]
        log(f"VAE: resuming at step {start} of {steps}")
    vae.train()
    vae.requires_grad_(True)
    bar = tqdm(total=steps, initial=start, desc="VAE", unit="step", dynamic_ncols=True)
    for step in range(start, steps):
        x = vae_batch(seed, step, batch)
        ox, oy = random.Random(f"{seed}:crop:{step}").sample(range(0, scenes.SIZE - VAE_CROP + 1, 8), 2)
        x = x[:, :, oy : oy + VAE_CROP, ox : ox + VAE_CROP]
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        kl = posterior.kl().mean() / x[0].numel()
        loss = (recon - x).abs().mean() + (recon - x).pow(2).mean() + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % 100 == 0 or step + 1 == steps:
            tmp = state_path.with_suffix(".tmp")
            torch.save({"model": vae.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "step": step + 1}, tmp)
            tmp.replace(state_path)
    bar.close()
    vae.eval()
    vae.requires_grad_(False)
    return vae


def latent_statistics(vae, seed: int) -> tuple[float, float]:
    """Mean and standard deviation of the VAE's posterior means over 256 world scenes."""
    import torch

    with torch.no_grad():
        x = torch.cat([vae_batch(seed + 1, s, 32)[::2] for s in range(16)])
        z = vae.encode(x).latent_dist.mean
    return float(z.mean()), float(z.std())


# ------------------------------------------------------------------------------------------------
# Denoiser stage: an ordinary difftune full fine-tune


def write_pretraining_data(folder: Path, n: int, seed: int) -> Path:
    """`n` captioned pretraining scenes (seen triples only, plain or in held-in styles)."""
    done = folder / "COMPLETE"
    if done.is_file() and done.read_text().strip() == f"{n}:{seed}":
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    rng = random.Random(f"{seed}:data")
    held_out = set(scenes.unseen_triples())
    scenes.write_dataset(folder, [scenes.pretraining_scene(rng, held_out) for _ in range(n)])
    done.write_text(f"{n}:{seed}")
    return folder


def denoiser_config(skeleton: Path, data: Path, run: Path, plan: dict, seed: int, warmup: int = 200) -> dict:
    """The difftune training config of the denoiser stage (plain data, as a YAML file would hold it).

    The text encoders train alongside (FLUX: CLIP only; training T5 too with ``model.options.train_t5``
    was measured: no better, at 3x the time per step, BENCHMARKS.md section 5). A plan's ``text_tokens``
    sets FLUX's T5 sequence length for the stage (``model.options.max_sequence_length``)."""
    tokens = {"options": {"max_sequence_length": plan["text_tokens"]}} if plan.get("text_tokens") else {}
    return {
        "model": {"path": str(skeleton), **tokens},
        "method": {"kind": "full", "train_text_encoder": True},
        "data": {"resolution": scenes.SIZE, "concepts": [{"dir": str(data), "caption_dropout": 0.1}]},
        "train": {"steps": plan["denoiser_steps"], "batch_size": plan["batch"], "lr": plan["lr"],
                  "lr_scheduler": "cosine", "lr_warmup_steps": min(warmup, plan["denoiser_steps"] // 10),
                  "seed": seed, "precision": "no", "weight_decay": 0.0, "log_every": 50},
        "checkpoint": {"every": 250, "keep": 1},
        "output_dir": str(run),
        **({"objective": objective} if (objective := stage_objective(plan)) else {}),
    }


def refine_stage(plan: dict) -> dict:
    """The refining stage's plan: the denoiser stage's, with the ``refine_*`` settings in its place."""
    return {**plan, "denoiser_steps": plan["refine_steps"], "lr": plan["refine_lr"], "batch": plan["refine_batch"],
            "min_snr_gamma": plan.get("refine_min_snr_gamma"),
            "text_tokens": plan.get("refine_text_tokens")}


def stage_objective(plan: dict) -> dict:
    """The objective settings a stage changes: min-SNR loss weighting (SD's refining stage). Logit-normal
    timesteps for FLUX's refining stage were tried and dropped (no gain; BENCHMARKS.md section 5)."""
    objective = {}
    if plan.get("min_snr_gamma"):
        objective["min_snr_gamma"] = plan["min_snr_gamma"]
    return objective


# ------------------------------------------------------------------------------------------------


def to_fp16(folder: Path) -> None:
    """Store every safetensors file under `folder` in float16 (diffusers loads it into fp32 modules)."""
    import torch
    from safetensors.torch import load_file, save_file

    for f in folder.rglob("*.safetensors"):
        tensors = {k: (v.half() if v.is_floating_point() else v) for k, v in load_file(f).items()}
        save_file({k: v.contiguous() for k, v in tensors.items()}, f, metadata={"format": "pt"})
    del torch


def extends(before: dict, now: dict) -> bool:
    """Whether plan `now` only trains the denoiser of plan `before` for more steps (`--minutes` and the
    refining stage aside: it runs again after a longer denoiser stage)."""
    def rest(plan):
        return {k: v for k, v in plan.items() if k not in ("denoiser_steps", "minutes") and not k.startswith("refine_")}
    return rest(before) == rest(now) and now["denoiser_steps"] > before["denoiser_steps"]


def refines(before: dict, now: dict) -> bool:
    """Whether plan `now` differs from plan `before` only in its refining stage (added, changed or dropped)."""
    def stages(plan):
        return {k: v for k, v in plan.items() if k != "minutes" and not k.startswith("refine_")}
    return stages(before) == stages(now) and before != now


def forget_refining(work: Path) -> None:
    """Drop the refining stage's state, so that it runs again from the (new) denoiser stage's output."""
    (work / "refine-done").unlink(missing_ok=True)
    if (work / "refine").exists():
        shutil.rmtree(work / "refine")
    timings = work / "timings.json"
    if timings.is_file():
        times = json.loads(timings.read_text())
        times.pop("refine_seconds", None)
        timings.write_text(json.dumps(times))


def pretrain(family: str, out: str | Path, minutes: float = DEFAULT_MINUTES, seed: int = 0,
             images: int | None = None, vae_steps: int | None = None, denoiser_steps: int | None = None,
             refine_steps: int | None = None, log=print) -> Path:
    """Pretrain the world base model of `family` into `out` (resumable); returns `out`.

    `minutes` scales the reference plan's step counts (`steps_for`); `images` overrides how many
    scenes the denoiser stage renders (tests use few); `vae_steps`, `denoiser_steps` and `refine_steps`,
    when given, replace the scaled step counts (``refine_steps=0``: no refining stage)."""
    import torch

    torch.set_flush_denormal(True)  # tiny weights late in training must not slow the CPU down
    from ..config import config_from_dict
    from ..train import train

    if family not in models.FAMILIES:
        raise DifftuneError(f"unknown world family {family!r}; choose one of {', '.join(models.FAMILIES)}")
    if minutes <= 0:
        raise DifftuneError(f"--minutes must be positive, got {minutes}")
    out = Path(out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    plan = steps_for(family, minutes)
    if refine_steps is not None:
        if refine_steps < 0:
            raise DifftuneError(f"refine_steps must be at least 0, got {refine_steps}")
        if refine_steps == 0:
            plan = {k: v for k, v in plan.items() if not k.startswith("refine_")}
        else:
            plan = {**plan, "refine_steps": refine_steps, "refine_lr": plan.get("refine_lr", plan["lr"] / 2)}
            plan.setdefault("refine_batch", plan["batch"])
    for key, value in (("images", images), ("vae_steps", vae_steps), ("denoiser_steps", denoiser_steps)):
        if value is not None:
            if value < 1:
                raise DifftuneError(f"{key} must be at least 1, got {value}")
            plan[key] = value
    meta_path = work / "plan.json"
    meta = {"family": family, "seed": seed, "minutes": minutes, **plan}
    if meta_path.is_file():
        before = json.loads(meta_path.read_text())
        if extends(before, meta):  # more denoiser steps, all else equal: continue from the last checkpoint
            log(f"continuing the denoiser from {before['denoiser_steps']} to {meta['denoiser_steps']} steps")
            (work / "denoiser-done").unlink(missing_ok=True)
            forget_refining(work)
        elif refines(before, meta):  # the first stages stand; only the refining stage runs (again)
            log(f"refining the trained denoiser: {meta.get('refine_steps') or 0} steps")
            forget_refining(work)
        elif before != meta:
            raise DifftuneError(f"{work} holds a pretraining with other settings ({meta_path}); use another OUT, "
                                f"or only raise --denoiser-steps (from {before.get('denoiser_steps')}) to train on")
    meta_path.write_text(json.dumps(meta, indent=1))
    timings = json.loads((work / "timings.json").read_text()) if (work / "timings.json").is_file() else {}
    t0 = time.time()
    torch.manual_seed(seed)

    skeleton = work / "skeleton"
    if not (skeleton / "model_index.json").is_file():
        models.build(family, seed).save_pretrained(skeleton)
        models.write_tokenizer_files(family, skeleton)
        log(f"[1/3] random {family} skeleton in {skeleton}")

    if not (work / "vae-done").is_file():
        from diffusers import AutoencoderKL

        t = time.time()
        vae = AutoencoderKL.from_pretrained(skeleton / "vae")
        train_vae(vae, work, plan["vae_steps"], plan["vae_batch"], seed, log)
        mean, std = latent_statistics(vae, seed)
        models.set_latent_scaling(vae, family, mean, std)
        vae.save_pretrained(skeleton / "vae")
        timings["vae_seconds"] = timings.get("vae_seconds", 0) + time.time() - t
        (work / "timings.json").write_text(json.dumps(timings))
        (work / "vae-done").write_text("ok")
        log(f"[2/3] VAE trained ({plan['vae_steps']} steps); latent mean {mean:.3f}, std {std:.3f}")

    data = write_pretraining_data(work / "data", plan["images"], seed)
    run = work / "run"
    if not (work / "denoiser-done").is_file():
        t = time.time()
        cfg = config_from_dict(denoiser_config(skeleton, data, run, plan, seed))
        train(cfg, log=log)
        timings["denoiser_seconds"] = timings.get("denoiser_seconds", 0) + time.time() - t
        (work / "timings.json").write_text(json.dumps(timings))
        (work / "denoiser-done").write_text("ok")
        log(f"[3/3] denoiser trained ({plan['denoiser_steps']} steps)")

    if plan.get("refine_steps"):  # the same training again, from the trained denoiser, on fresh scenes
        refined = work / "refine"
        if not (work / "refine-done").is_file():
            t = time.time()
            fresh = write_pretraining_data(work / "refine-data", plan["images"], seed + 1)
            stage = refine_stage(plan)
            train(config_from_dict(denoiser_config(run, fresh, refined, stage, seed + 1, warmup=50)), log=log)
            timings["refine_seconds"] = timings.get("refine_seconds", 0) + time.time() - t
            (work / "timings.json").write_text(json.dumps(timings))
            (work / "refine-done").write_text("ok")
            log(f"[3/3] denoiser refined ({plan['refine_steps']} steps at lr {plan['refine_lr']:g})")
        run = refined

    index = json.loads((run / "model_index.json").read_text())
    for name in [k for k, v in index.items() if isinstance(v, list) and v[0]] + ["model_index.json"]:
        source, target = run / name, out / name  # the full fine-tune's output is a complete pipeline
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        shutil.copytree(source, target) if source.is_dir() else shutil.copy2(source, target)
        if target.is_dir():
            to_fp16(target)
    timings["total_seconds_this_run"] = time.time() - t0
    models.write_card(out, family, meta, timings)
    refining = f", refining {timings['refine_seconds'] / 60:.1f} min" if plan.get("refine_steps") else ""
    log(f"world {family} base model in {out} (VAE {timings.get('vae_seconds', 0) / 60:.1f} min, denoiser "
        f"{timings.get('denoiser_seconds', 0) / 60:.1f} min{refining})")
    return out

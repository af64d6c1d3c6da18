"""Base quality of a world model: the oracle on prompts the base never saw.

`base_quality` draws each of `scenes.unseen_triples()` (64 (colour, shape, background) triples kept
out of pretraining) with two seeds through the plain diffusers pipeline at its default guidance and
30 steps, and reports how often the background, object colour and shape are right.
"""

from __future__ import annotations

import inspect
import json
import time
from pathlib import Path

from . import models, oracle, scenes


def resolve_model(model: str) -> str:
    """``world-sd`` / ``world-flux`` name the shipped models; anything else is a folder."""
    for family in models.FAMILIES:
        if model == f"world-{family}":
            return str(models.shipped(family))
    return model


def load_pipeline(model: str):
    """The plain diffusers pipeline of a world model folder (CPU, fp32), progress bars off."""
    from diffusers import DiffusionPipeline

    from .. import DifftuneError

    path = resolve_model(model)
    if not (Path(path) / "model_index.json").is_file():
        raise DifftuneError(f"{model}: not a diffusers pipeline folder (no model_index.json)")
    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def draw(pipe, prompts: list[str], seed: int, steps: int = 30, **kwargs):
    """Images for `prompts` at 64x64 with the pipeline's default guidance, one generator per call."""
    import torch

    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(prompts, height=scenes.SIZE, width=scenes.SIZE, num_inference_steps=steps,
                generator=generator, **kwargs).images


def guidance_kwargs(pipe, guidance: float | None) -> dict:
    """The pipeline's keyword for a classifier-free guidance scale: FLUX without a guidance embedding
    guides through ``true_cfg_scale`` (with an empty negative prompt), the others through ``guidance_scale``."""
    if guidance is None:
        return {}
    if "true_cfg_scale" in inspect.signature(pipe.__call__).parameters:
        return {"true_cfg_scale": guidance, "negative_prompt": ""}
    return {"guidance_scale": guidance}


def base_quality(model: str, out: Path | None = None, n_prompts: int = 64, seeds: int = 2, steps: int = 30,
                 log=print, guidance: float | None = None) -> dict:
    """Oracle figures of `model` on `n_prompts` unseen prompts x `seeds` seeds; also written to `out`.
    `guidance` sets the classifier-free guidance scale (None: the pipeline's default)."""
    t0 = time.time()
    pipe = load_pipeline(model)
    prompts = [scenes.prompt(*t) for t in scenes.unseen_triples()[:n_prompts]]
    results = []
    for seed in range(seeds):
        for i in range(0, len(prompts), 16):
            chunk = prompts[i : i + 16]
            for j, image in enumerate(draw(pipe, chunk, seed, steps, **guidance_kwargs(pipe, guidance))):
                r = oracle.score(image, chunk[j])
                results.append({"prompt": chunk[j], "seed": seed, **r})
                if out is not None:
                    (out / "images").mkdir(parents=True, exist_ok=True)
                    image.save(out / "images" / f"{i + j:03d}-seed{seed}.png")
    summary = {k: round(v, 4) for k, v in oracle.summarise(results).items() if k != "style"}
    summary.update(images=len(results), seconds=round(time.time() - t0, 1), guidance=guidance)
    g = "the pipeline's default guidance" if guidance is None else f"guidance {guidance:g}"
    log(f"{model}: {len(results)} images of {len(prompts)} unseen prompts x {seeds} seeds, {steps} steps, {g}: "
        + ", ".join(f"{k} right {100 * summary[k]:.1f}%" for k in ("background", "colour", "shape")))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"summary": summary, "results": results}, indent=1))
    return summary

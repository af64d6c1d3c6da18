"""`difftune generate`: a base model (or a full fine-tune) plus any LoRAs and ControlNets -> PNGs,
from a prompt alone (text2img), from an init image (img2img) or an init image and a mask (inpainting).

Every input is checked before the model loads where it can be (paths, LoRA and ControlNet families,
sizes, strength, scheduler, what the task's diffusers pipeline accepts), each mistake one line.
Each PNG carries its parameters in text chunks (`naming.png_info`) and gets one line in the folder's
``images.jsonl``; names never collide with earlier files (`naming`). Image ``i`` of a run uses seed
``seed + i``, so any single image can be reproduced on its own.

``--strength 0`` (or so low that no step is left) runs no denoising step: the result is the init
image through the model's autoencoder (diffusers' img2img pipelines fail on zero steps).

Size: ``--width`` / ``--height``, else the init image's, else the control image's (both rounded down
to what the model needs), else the resolution the (first) LoRA was trained at, else the model's default.
"""

from __future__ import annotations

import argparse
import inspect as pyinspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import DifftuneError
from . import controlnet as cn
from . import schedulers
from .img2img import check_strength, fit, open_image, round_trip, zero_steps
from .loras import LoraSpec, check_exists, check_family, check_fits_files, inspect, parse_spec
from .naming import append_record, contact_sheet, save_new_image, slug

EXAMPLES = """examples:
  difftune generate --model runs/tiny-sd-full --prompt "a photo of sks dog" --out out/
  difftune generate --model runs/tiny-sd --lora runs/style-lora:0.8 --prompt "a red cat" --negative-prompt blurry \\
      --steps 25 --seed 7 --num 4 --grid --out out/
  difftune generate --model stable-diffusion-v1-5/stable-diffusion-v1-5 --lora runs/faces \\
      --controlnet lllyasviel/sd-controlnet-canny --control-image face.jpg --control canny \\
      --scheduler unipc --steps 50 --guidance 7.5 --prompt "a photo of sks person" --out out/
  difftune generate --model runs/tiny-sd --init-image photo.png --strength 0.6 --prompt "in sks style" --out out/
  difftune generate --model runs/tiny-sd --init-image photo.png --mask mask.png --prompt "a red hat" --out out/
  difftune generate --model black-forest-labs/FLUX.1-dev --lora runs/stalenhag --guidance 3.5 --steps 25 \\
      --width 1024 --height 1024 --prompt "the Kremlin in sksartist style" --out out/
  difftune generate --model k22/decoder --prior k22/prior --prior-lora runs/prior-lora --lora runs/decoder-lora \\
      --prompt "a red pokemon" --out out/

Files: OUT/NNNN-PROMPT-seedS.png (numbers continue after the folder's highest, so nothing is ever
replaced), one JSON line per image in OUT/images.jsonl, the control images used as
NNNN-control-*.png and, with --grid, one labelled contact sheet NNNN-grid-*.png.
"""


def pick_device(name: str = "auto") -> Any:
    import torch

    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def task_name(controlnets: bool, init_image: bool, mask: bool) -> str:
    base = "inpaint" if mask else "img2img" if init_image else "text2img"
    return ("controlnet" if base == "text2img" else f"controlnet-{base}") if controlnets else base


@dataclass
class Plan:
    """Everything `generate` checked before loading the model."""

    family: Any
    task: str
    loras: list[LoraSpec]
    width: int | None
    height: int | None
    init_image: Any = None
    mask: Any = None
    control_sources: list[Any] = field(default_factory=list)
    inputs: dict[str, Any] = field(default_factory=dict)


def _side(value: int | None, multiple: int, flag: str) -> None:
    if value is not None and (value <= 0 or value % multiple):
        raise DifftuneError(f"{flag} {value}: must be a positive multiple of {multiple} for this model "
                            f"(e.g. {max(multiple, (max(value, 1) // multiple) * multiple)})")


def _round_down(size: tuple[int, int], multiple: int) -> tuple[int, int]:
    w, h = (max(multiple, s // multiple * multiple) for s in size)
    return w, h


def plan(model: str, out: Path, *, family: str, loras: list[tuple[str, float]], controlnets: list[tuple[str, float]],
         control_images: list[str], init_image: str | None, mask: str | None, strength: float | None,
         width: int | None, height: int | None, scheduler: str, negative_prompt: str | None,
         true_cfg: float | None) -> Plan:
    """Check the inputs (one line for the first problem) without loading any model."""
    from ..families.registry import resolve_family

    if out.exists() and not out.is_dir():
        raise DifftuneError(f"--out {out}: is a file; give a folder (it is created if needed)")
    check_exists(model, "--model")
    family_cls = resolve_family(model, family)
    specs = [inspect(p, s) for p, s in loras]
    for spec in specs:
        check_family(spec, family_cls)
        check_fits_files(spec, family_cls, model)
    schedulers.check(scheduler, family_cls)
    if mask and not init_image:
        raise DifftuneError("--mask needs --init-image (the image whose masked part is repainted)")
    check_strength(strength, bool(init_image))
    if control_images and not controlnets:
        raise DifftuneError("--control-image needs --controlnet PATH_OR_ID")
    if controlnets and not control_images:
        raise DifftuneError("--controlnet needs --control-image IMG (the image that guides it)")
    cn.check(controlnets, family_cls)
    task = task_name(bool(controlnets), bool(init_image), bool(mask))
    if not family_cls.task_pipelines and family_cls.generate_hint:
        raise DifftuneError(family_cls.generate_hint.format(path=model))
    if task not in family_cls.task_pipelines:
        flag = "--mask" if mask else "--init-image"
        raise DifftuneError(f"{flag}: the {family_cls.name} family has no {task} pipeline")
    p = Plan(family_cls, task, specs, width, height)
    p.init_image = open_image(init_image, "--init-image") if init_image else None
    p.mask = open_image(mask, "--mask", "L") if mask else None
    p.control_sources = [open_image(c, "--control-image") for c in control_images]

    multiple = family_cls.resolution_multiple(model)
    _side(width, multiple, "--width")
    _side(height, multiple, "--height")
    source = p.init_image or (p.control_sources[0] if p.control_sources else None)
    if source is not None:
        w, h = _round_down(source.size, multiple)
    else:
        trained = next((s.resolution for s in specs if s.resolution), None)
        w = h = trained if trained and trained % multiple == 0 else None
    p.width, p.height = width or w, height or h

    import diffusers

    pipeline_cls = getattr(diffusers, family_cls.task_pipelines[task])
    accepted = pyinspect.signature(pipeline_cls.__call__).parameters
    wanted = {"negative_prompt": ("--negative-prompt", negative_prompt), "true_cfg_scale": ("--true-cfg", true_cfg),
              "strength": ("--strength", strength)}
    for key, (flag, value) in wanted.items():
        if value is None:
            continue
        if key not in accepted:
            raise DifftuneError(f"{flag}: {pipeline_cls.__name__} (the {family_cls.name} {task} pipeline) does not take it")
        p.inputs[key] = value
    if negative_prompt is not None and "true_cfg_scale" in accepted and not (true_cfg and true_cfg > 1):
        raise DifftuneError(f"--negative-prompt: {pipeline_cls.__name__} uses a negative prompt only with true "
                            "classifier-free guidance; add --true-cfg 4 (or any value above 1; each step costs twice)")
    return p


def generate(
    model: str,
    prompt: str,
    out: str | Path,
    *,
    loras: list[tuple[str, float]] = (),
    negative_prompt: str | None = None,
    steps: int = 25,
    guidance: float | None = None,
    true_cfg: float | None = None,
    width: int | None = None,
    height: int | None = None,
    seed: int = 0,
    num: int = 1,
    scheduler: str = "default",
    controlnets: list[tuple[str, float]] = (),
    control_images: list[str] = (),
    control: list[str] = (),
    canny: tuple[int, int] = (100, 200),
    depth_model: str | None = None,
    init_image: str | None = None,
    mask: str | None = None,
    strength: float | None = None,
    grid: bool = False,
    family: str = "auto",
    device: str = "auto",
    extra: dict | None = None,
    progress: bool = True,
) -> list[Path]:
    """Generate `num` images for `prompt` into the folder `out`; returns the PNG paths (the contact
    sheet last, with `grid`)."""
    import torch

    if num < 1 or steps < 1:
        raise DifftuneError("--num and --steps must be >= 1")
    out_dir = Path(out)
    controlnets, control_images = list(controlnets), list(control_images)
    p = plan(model, out_dir, family=family, loras=list(loras), controlnets=controlnets, control_images=control_images,
             init_image=init_image, mask=mask, strength=strength, width=width, height=height, scheduler=scheduler,
             negative_prompt=negative_prompt, true_cfg=true_cfg)
    kinds = cn.per_controlnet(list(control), len(controlnets), "--control", "none")
    sources = cn.per_controlnet(p.control_sources, len(controlnets), "--control-image")
    for kind in kinds:
        if kind not in cn.KINDS:
            raise DifftuneError(f"--control {kind}: choose one of {', '.join(cn.KINDS)}")
        if kind == "depth" and not depth_model:
            cn.depth(None, None)  # the one-line "needs --depth-model" error, before loading anything

    family_cls = p.family
    dev = pick_device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    pipe = family_cls.load_pipeline(model, dev, dtype, extra or {})
    family_cls.apply_loras(pipe, p.loras)
    scheduler_class = schedulers.apply(pipe, scheduler)
    controlnet = cn.load(controlnets, family_cls, dtype) if controlnets else None
    if controlnet is not None:
        for m in controlnet if isinstance(controlnet, list) else [controlnet]:
            m.to(dev)
    pipe = family_cls.task_pipeline(pipe, p.task, controlnet)
    pipe.set_progress_bar_config(disable=not progress)
    guidance = family_cls.default_guidance if guidance is None else guidance

    inputs = dict(p.inputs)
    accepted = pyinspect.signature(type(pipe).__call__).parameters
    name = slug(prompt)
    params: dict[str, Any] = {
        "prompt": prompt, "negative_prompt": negative_prompt, "steps": steps, "guidance": guidance,
        "true_cfg": true_cfg, "model": model, "family": family_cls.name, "task": p.task,
        "scheduler": scheduler, "scheduler_class": scheduler_class,
        "loras": [{"path": s.path, "scale": s.scale} for s in p.loras],
    }
    if p.init_image is not None:
        size = (p.width, p.height) if p.width and p.height else p.init_image.size
        inputs["image"] = fit(p.init_image, *size)
        params.update(init_image=str(init_image), strength=strength if strength is not None
                      else accepted["strength"].default if "strength" in accepted else None)
    if p.mask is not None:
        inputs["mask_image"] = fit(p.mask, *inputs["image"].size)
        params["mask"] = str(mask)
    if controlnets:
        made = [cn.make(src, kind, thresholds=canny, depth_model=depth_model) for src, kind in zip(sources, kinds)]
        if p.width and p.height:
            made = [fit(m, p.width, p.height) for m in made]
        saved = [save_new_image(m, out_dir, f"control{j}-{kind}-{name}") for j, (m, kind) in enumerate(zip(made, kinds))]
        scales = [s for _, s in controlnets]
        one = len(made) == 1
        # SD's text2img ControlNet pipeline takes the control image as `image`; the others as `control_image`
        key = "control_image" if "control_image" in accepted else "image"
        inputs[key] = made[0] if one else made
        inputs["controlnet_conditioning_scale"] = scales[0] if one else scales
        if not one and "control_mode" in accepted:
            # FLUX's multi-ControlNet pipelines drop every ControlNet when no mode list is given (None = plain)
            inputs["control_mode"] = [None] * len(made)
        params.update(controlnets=[{"path": c, "scale": s} for c, s in controlnets], control=kinds,
                      control_images=[str(c) for c in control_images], control_files=[s.name for s in saved])
    params.update({k: v for k, v in (extra or {}).items() if v})

    paths, images = [], []
    for i in range(num):
        generator = torch.Generator("cpu").manual_seed(seed + i)
        if p.init_image is not None and zero_steps(steps, strength):
            image = round_trip(pipe, family_cls.autoencoder, inputs["image"])
        else:
            (image,) = family_cls.sample(pipe, prompt, steps=steps, guidance=guidance, width=p.width,
                                         height=p.height, generator=generator, num=1, **inputs)
        record = {**params, "seed": seed + i, "width": image.size[0], "height": image.size[1]}
        path = save_new_image(image, out_dir, f"{name}-seed{seed + i}", record)
        append_record(out_dir, {"file": path.name, **record})
        paths.append(path)
        images.append(image)
    if grid:
        sheet = contact_sheet(images, [f"seed {seed + i}" for i in range(num)], prompt)
        paths.append(save_new_image(sheet, out_dir, f"grid-{name}", {"prompt": prompt, "images": [q.name for q in paths]}))
    return paths


def _thresholds(text: str) -> tuple[int, int]:
    try:
        low, high = (int(v) for v in text.split(","))
    except ValueError:
        raise DifftuneError(f"--canny {text}: write LOW,HIGH, e.g. 100,200") from None
    return low, high


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="base model (hub id or folder) or a full fine-tune's output_dir")
    parser.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                        help="a LoRA folder or .safetensors file (diffusers or kohya layout), with an optional scale "
                        "(repeatable)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt", default=None, help="what the image should not show")
    parser.add_argument("--steps", type=int, default=25, help="inference steps (default 25)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the family's)")
    parser.add_argument("--true-cfg", type=float, default=None,
                        help="FLUX: true classifier-free guidance scale (> 1), needed for --negative-prompt")
    parser.add_argument("--width", type=int, default=None,
                        help="default: the init or control image's, else the LoRA's training resolution, else the model's")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed+i")
    parser.add_argument("--num", type=int, default=1, help="number of images")
    parser.add_argument("--out", required=True, help="output folder (files are added, never replaced)")
    parser.add_argument("--grid", action="store_true", help="also write one labelled contact sheet of the images")
    parser.add_argument("--scheduler", default="default", choices=schedulers.NAMES,
                        help="sampler (SD family; default: the one the model ships with)")
    parser.add_argument("--controlnet", action="append", default=[], metavar="PATH_OR_ID[:SCALE]",
                        help="a ControlNet (repeatable: several act together), optional conditioning scale")
    parser.add_argument("--control-image", action="append", default=[], metavar="IMG",
                        help="the control image, or the photo to make it from (one for all ControlNets or one each)")
    parser.add_argument("--control", action="append", default=[], choices=cn.KINDS,
                        help="make the control image from the photo: canny edges, depth map, or none (use as is)")
    parser.add_argument("--canny", default="100,200", metavar="LOW,HIGH", help="Canny thresholds (default 100,200)")
    parser.add_argument("--depth-model", default=None, help="transformers depth-estimation model for --control depth")
    parser.add_argument("--init-image", default=None, metavar="IMG", help="img2img: start from this image")
    parser.add_argument("--strength", type=float, default=None,
                        help="img2img/inpainting: 0 keeps the init image, 1 ignores it (default: the pipeline's)")
    parser.add_argument("--mask", default=None, metavar="IMG", help="inpainting: white = repaint, black = keep")
    parser.add_argument("--family", default="auto", help="model family (default: detected from model_index.json)")
    parser.add_argument("--device", default="auto", help="cuda, mps, cpu or auto")
    parser.add_argument("--prior", default=None, help="Kandinsky 2.2: the prior pipeline (base or fine-tuned)")
    parser.add_argument("--prior-lora", action="append", default=[], metavar="PATH[:SCALE]",
                        help="Kandinsky 2.2: a LoRA for the prior (repeatable)")


def run(args: argparse.Namespace) -> int:
    extra = {"prior": args.prior, "prior_loras": [parse_spec(s, "--prior-lora") for s in args.prior_lora]}
    paths = generate(
        args.model, args.prompt, args.out, loras=[parse_spec(s) for s in args.lora],
        negative_prompt=args.negative_prompt, steps=args.steps, guidance=args.guidance, true_cfg=args.true_cfg,
        width=args.width, height=args.height, seed=args.seed, num=args.num, scheduler=args.scheduler,
        controlnets=cn.parse(args.controlnet), control_images=args.control_image, control=args.control,
        canny=_thresholds(args.canny), depth_model=args.depth_model, init_image=args.init_image,
        mask=args.mask, strength=args.strength, grid=args.grid, family=args.family, device=args.device, extra=extra,
    )
    for p in paths:
        print(p)
    return 0

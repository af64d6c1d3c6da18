"""`difftune generate`: a base model (or a full fine-tune) plus any number of LoRAs -> PNGs.

Each PNG carries its parameters in text chunks: ``difftune`` (JSON: prompt, seed, steps, guidance,
size, model, LoRAs and scales) and ``parameters`` (a one-line summary other tools display). Image
``i`` of a run uses seed ``seed + i``, so any single image can be reproduced on its own.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from . import DifftuneError

EXAMPLES = """examples:
  difftune generate --model runs/tiny-sd-full --prompt "a photo of sks dog" --out out/
  difftune generate --model runs/tiny-sd --lora runs/style-lora:0.8 --prompt "a red cat" --steps 25 --seed 7 --num 4 --out out/
  difftune generate --model black-forest-labs/FLUX.1-dev --lora runs/stalenhag --guidance 3.5 --steps 25 \\
      --width 1024 --height 1024 --prompt "the Kremlin in sksartist style" --out out/
  difftune generate --model k22/decoder --prior k22/prior --prior-lora runs/prior-lora --lora runs/decoder-lora \\
      --prompt "a red pokemon" --out out/
"""


def save_image(image: Any, path: Path, params: dict) -> None:
    """Write `image` as PNG with `params` in its text chunks; atomically (temp file, then rename)."""
    from PIL.PngImagePlugin import PngInfo

    from .util.atomic import atomic_write

    info = PngInfo()
    info.add_text("difftune", json.dumps(params, ensure_ascii=False))
    summary = ", ".join(f"{k}: {v}" for k, v in params.items() if k != "prompt")
    info.add_text("parameters", f"{params.get('prompt', '')}\n{summary}")
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def read_params(path: str | Path) -> dict:
    """The ``difftune`` parameters stored in a PNG made by difftune."""
    from PIL import Image

    with Image.open(path) as im:
        return json.loads(im.text["difftune"])


def parse_lora(spec: str) -> tuple[str, float]:
    """``PATH[:SCALE]`` -> (path, scale); the scale defaults to 1.0."""
    path, scale = spec, 1.0
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            path, scale = head, float(tail)
        except ValueError:
            path = spec
    if not Path(path).exists() and (path.startswith((".", "/", "~")) or Path(path).suffix == ".safetensors"):
        raise DifftuneError(f"--lora: not found: {path}")
    return path, scale


def pick_device(name: str = "auto") -> Any:
    import torch

    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def generate(
    model: str,
    prompt: str,
    out: str | Path,
    *,
    loras: list[tuple[str, float]] = (),
    steps: int = 25,
    guidance: float | None = None,
    width: int | None = None,
    height: int | None = None,
    seed: int = 0,
    num: int = 1,
    family: str = "auto",
    device: str = "auto",
    extra: dict | None = None,
    progress: bool = True,
) -> list[Path]:
    """Generate `num` images for `prompt`; returns the PNG paths."""
    import torch

    from .families.registry import resolve_family

    family_cls = resolve_family(model, family)
    dev = pick_device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    pipe = family_cls.load_pipeline(model, dev, dtype, extra or {})
    family_cls.apply_loras(pipe, list(loras))
    pipe.set_progress_bar_config(disable=not progress)
    guidance = family_cls.default_guidance if guidance is None else guidance
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(num):
        generator = torch.Generator("cpu").manual_seed(seed + i)
        (image,) = family_cls.sample(pipe, prompt, steps=steps, guidance=guidance, width=width, height=height,
                                     generator=generator, num=1)
        params = {
            "prompt": prompt, "seed": seed + i, "steps": steps, "guidance": guidance,
            "width": image.size[0], "height": image.size[1], "model": model,
            "loras": [{"path": p, "scale": s} for p, s in loras], "family": family_cls.name,
        }
        params.update({k: v for k, v in (extra or {}).items() if v})
        path = out_dir / f"{i:03d}-seed{seed + i}.png"
        save_image(image, path, params)
        paths.append(path)
    return paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="base model (hub id or folder) or a full fine-tune's output_dir")
    parser.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                        help="a LoRA folder or .safetensors file, with an optional scale (repeatable)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--steps", type=int, default=25, help="inference steps (default 25)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the family's)")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed+i")
    parser.add_argument("--num", type=int, default=1, help="number of images")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--family", default="auto", help="model family (default: detected from model_index.json)")
    parser.add_argument("--device", default="auto", help="cuda, mps, cpu or auto")
    parser.add_argument("--prior", default=None, help="Kandinsky 2.2: the prior pipeline (base or fine-tuned)")
    parser.add_argument("--prior-lora", action="append", default=[], metavar="PATH[:SCALE]",
                        help="Kandinsky 2.2: a LoRA for the prior (repeatable)")


def run(args: argparse.Namespace) -> int:
    if args.num < 1 or args.steps < 1:
        raise DifftuneError("--num and --steps must be >= 1")
    extra = {"prior": args.prior, "prior_loras": [parse_lora(s) for s in args.prior_lora]}
    paths = generate(
        args.model, args.prompt, args.out, loras=[parse_lora(s) for s in args.lora], steps=args.steps,
        guidance=args.guidance, width=args.width, height=args.height, seed=args.seed, num=args.num,
        family=args.family, device=args.device, extra=extra,
    )
    for p in paths:
        print(p)
    return 0

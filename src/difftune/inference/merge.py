"""`difftune merge BASE --lora PATH[:SCALE]... --out DIR`: LoRAs fused into the base model's weights,
written as a complete diffusers pipeline folder that plain ``DiffusionPipeline.from_pretrained`` loads,
or (``--format single-file``, SD 1.x) as the one-file checkpoint ComfyUI and A1111 load
(``Family.save_single_file``).

The LoRAs are loaded exactly as `difftune generate` loads them (same checks, same scales), fused with
the pipeline's own ``fuse_lora`` (W += scale * B @ A per adapted layer), their layers removed, and the
pipeline saved with ``save_pretrained`` into a temporary folder beside ``--out`` that is renamed into
place once complete; an existing non-empty ``--out`` is refused. Images from the merged folder equal
those of base + LoRAs (tests/test_inference.py checks within 1e-4).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from .. import DifftuneError
from .loras import check_exists, check_family, check_fits_files, inspect, parse_spec

EXAMPLES = """examples:
  difftune merge runs/tiny-sd --lora runs/disc-lora --out runs/tiny-sd-disc
  difftune merge stable-diffusion-v1-5/stable-diffusion-v1-5 --lora runs/faces:0.8 --lora runs/style:0.5 \\
      --out models/faces-merged --dtype fp16
  difftune merge black-forest-labs/FLUX.1-dev --lora runs/stalenhag --out models/flux-stalenhag --dtype bf16
  difftune merge stable-diffusion-v1-5/stable-diffusion-v1-5 --lora runs/faces --format single-file \
      --out models/faces.safetensors --dtype fp16                 # for ComfyUI / A1111

The result loads without difftune: DiffusionPipeline.from_pretrained("models/faces-merged").
"""

DTYPES = ("fp32", "fp16", "bf16")
FORMATS = ("diffusers", "single-file")


def merge(base: str, loras: list[tuple[str, float]], out: str | Path, *, dtype: str = "fp32",
          family: str = "auto", fmt: str = "diffusers") -> Path:
    """Fuse `loras` ((path, scale) pairs) into `base` and write the pipeline folder `out` (or, with
    ``fmt="single-file"``, the one-file checkpoint `out`); returns it."""
    import diffusers
    import torch

    from ..families.registry import resolve_family

    out = Path(out)
    if fmt not in FORMATS:
        raise DifftuneError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    if fmt == "single-file":
        if out.suffix != ".safetensors":
            raise DifftuneError(f"--out {out}: with --format single-file, name a .safetensors file")
        if out.exists():
            raise DifftuneError(f"--out {out}: exists; choose a new file name")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DifftuneError(f"--out {out}: exists and is not an empty folder; choose a new one")
    if not loras:
        raise DifftuneError("--lora: give at least one LoRA to merge")
    if dtype not in DTYPES:
        raise DifftuneError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    check_exists(base, "BASE")
    family_cls = resolve_family(base, family)
    if not hasattr(getattr(diffusers, family_cls.pipeline_classes[0]), "fuse_lora"):
        raise DifftuneError(f"merge: diffusers cannot fuse LoRAs into a {family_cls.pipeline_classes[0]} "
                            f"(the {family_cls.name} family)")
    if fmt == "single-file" and not family_cls.single_file_format:
        raise DifftuneError(f"--format single-file: the {family_cls.name} family has no one-file checkpoint layout")
    specs = [inspect(p, s) for p, s in loras]
    for spec in specs:
        check_family(spec, family_cls)
        check_fits_files(spec, family_cls, base)

    # fuse in fp32 whatever the saved dtype, so the sum is exact before any rounding
    pipe = family_cls.load_pipeline(base, torch.device("cpu"), torch.float32, {})
    family_cls.apply_loras(pipe, specs)
    pipe.fuse_lora(adapter_names=[f"lora{i}" for i in range(len(specs))], lora_scale=1.0)
    pipe.unload_lora_weights()
    pipe.to(dtype={"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype])

    if fmt == "single-file":
        return family_cls.save_single_file(pipe, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.merging")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    if out.exists():
        out.rmdir()  # empty, checked above
    tmp.rename(out)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base", help="base model: hub id or pipeline folder (or a full fine-tune's output_dir)")
    parser.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]", required=True,
                        help="a LoRA folder or .safetensors file (diffusers or kohya layout), optional scale (repeatable)")
    parser.add_argument("--out", required=True,
                        help="the new pipeline folder (must not exist, or be empty), or .safetensors file (single-file)")
    parser.add_argument("--format", default="diffusers", choices=FORMATS,
                        help="diffusers: a pipeline folder (default); single-file: one .safetensors checkpoint in the "
                        "original layout ComfyUI and A1111 load (SD 1.x)")
    parser.add_argument("--dtype", default="fp32", choices=DTYPES, help="weights dtype of the saved model (default fp32)")
    parser.add_argument("--family", default="auto", help="model family (default: detected from model_index.json)")


def run(args: argparse.Namespace) -> int:
    out = merge(args.base, [parse_spec(s) for s in args.lora], args.out, dtype=args.dtype, family=args.family,
                fmt=args.format)
    print(out)
    return 0

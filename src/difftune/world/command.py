"""`difftune world ...`: the procedural world, its oracle and its base models, from the command line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .. import DifftuneError

EXAMPLES = """examples:
  difftune world render data/zdots --style dotted -n 12      # 12 captioned images of a held-out style
  difftune world render data/zkrem --place kremlin -n 12
  difftune world score out/*.png --prompt "a red circle on a blue background"
  difftune world score img.png                               # what the oracle sees
  difftune world bench world-sd --out bench-sd               # base quality on 64 unseen prompts x 2 seeds
  difftune world pretrain sd runs/world-sd --minutes 40       # from scratch; rerun to resume
  difftune world journey --family sd                          # forgetting: style, then a place, by every remedy
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="world_command", metavar="ACTION", required=True)

    p = sub.add_parser("pretrain", help="train a world base model from scratch (VAE, then denoiser); resumable")
    p.add_argument("family", choices=("sd", "flux"))
    p.add_argument("out", type=Path, help="folder for the pipeline (its work/ subfolder keeps the stages' state)")
    p.add_argument("--minutes", type=float, default=None,
                   help="scale the reference plan (40 min on 2 cores) to about this many minutes")
    p.add_argument("--vae-steps", type=int, default=None, help="VAE steps instead of the scaled plan's")
    p.add_argument("--denoiser-steps", type=int, default=None, help="denoiser steps instead of the scaled plan's")
    p.add_argument("--refine-steps", type=int, default=None,
                   help="refining steps (the denoiser trained again at half the learning rate on fresh scenes) "
                        "instead of the scaled plan's; 0 for none")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("score", help="what the oracle sees in images, or how well they match a prompt")
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--prompt", default=None, help="a world caption the images should show")
    p.add_argument("--json", action="store_true", help="one JSON object per image")

    p = sub.add_parser("render", help="write captioned world images (a held-out style or place) to a folder")
    p.add_argument("out", type=Path)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--style", choices=("striped", "hatched", "dotted", "checkered", "outline"))
    group.add_argument("--place", choices=("kremlin", "university", "city"))
    p.add_argument("-n", type=int, default=12, help="how many images (default 12)")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("bench", help="base quality: the oracle on 64 prompts the base never saw, 2 seeds each")
    p.add_argument("model", help="a world pipeline folder, or world-sd / world-flux for the shipped ones")
    p.add_argument("--out", type=Path, default=None, help="also write the images and results.json here")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: the pipeline's own, 7.5 for SD)")

    from . import journey

    p = sub.add_parser("journey", help="style LoRA, then a place, by every remedy for forgetting: the results table",
                       epilog=journey.EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    journey.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    if args.world_command == "journey":
        from .journey import run as journey

        return journey(args)
    return {"pretrain": _pretrain, "score": _score, "render": _render, "bench": _bench}[args.world_command](args)


def _pretrain(args) -> int:
    from .pretrain import DEFAULT_MINUTES, pretrain

    pretrain(args.family, args.out, minutes=args.minutes or DEFAULT_MINUTES, seed=args.seed,
             vae_steps=args.vae_steps, denoiser_steps=args.denoiser_steps, refine_steps=args.refine_steps)
    return 0


def _score(args) -> int:
    from . import oracle, scenes

    if args.prompt is not None:
        try:
            scenes.parse_caption(args.prompt)
        except ValueError as e:
            raise DifftuneError(f"--prompt: {e}") from None
    results = []
    for path in args.images:
        if not path.is_file():
            raise DifftuneError(f"{path}: no such image")
        try:
            r = oracle.score(path, args.prompt) if args.prompt else {"seen": oracle.analyse(path)}
        except OSError as e:
            raise DifftuneError(f"{path}: cannot read the image ({e})") from None
        results.append(r)
        if args.json:
            print(json.dumps({"image": str(path), **r}))
        else:
            checks = "  ".join(f"{k}={'ok' if v else 'WRONG'}" for k, v in r.items() if k != "seen")
            seen = ", ".join(f"{k} {v}" for k, v in r["seen"].items() if v)
            print(f"{path}: {seen}" + (f"  [{checks}]" if checks else ""))
    if args.prompt and len(results) > 1 and not args.json:
        summary = oracle.summarise(results)
        print("right: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in summary.items()))
    return 0


def _render(args) -> int:
    from . import scenes

    if args.n < 1:
        raise DifftuneError(f"-n must be at least 1, got {args.n}")
    if args.style:
        items = scenes.style_set(args.style, args.n, args.seed)
    else:
        items = scenes.place_set(args.place, args.n, args.seed)
    scenes.write_dataset(args.out, items)
    print(f"wrote {len(items)} images with captions to {args.out} (e.g. {items[0].caption!r})")
    return 0


def _bench(args) -> int:
    from .bench import base_quality

    if args.guidance is not None and args.guidance < 1:
        from .. import DifftuneError

        raise DifftuneError(f"--guidance must be at least 1 (1 = no guidance), got {args.guidance}")
    base_quality(args.model, args.out, args.prompts, args.seeds, args.steps, guidance=args.guidance)
    return 0

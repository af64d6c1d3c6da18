"""`difftune eval`: score runs and their checkpoints, per concept, against the base model."""

from __future__ import annotations

import argparse
from pathlib import Path

EXAMPLES = """examples:
  difftune eval runs/style                         # base, every checkpoint and the final weights
  difftune eval runs/style runs/style-then-place --select zdots.score
  difftune eval runs/style/checkpoints/step-00000200
  difftune eval runs/seed001/lora                  # a sweep folder: each of its runs
  difftune eval runs/dog --prompts eval-prompts.yaml --clip-model openai/clip-vit-base-patch32

Writes RUN/eval.json (format in the README) and prints a table per run. Scores: the world oracle when
every prompt is a world caption, else CLIP text-image, CLIP/DINOv2 image similarity to the concept's
training images and DINOv2 drift from the base's images (same seeds).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN_OR_CHECKPOINT",
                        help="run output_dir(s), checkpoint folder(s), or sweep folder(s) (with sweep.json: all their runs)")
    parser.add_argument("--prompts", default=None, metavar="FILE",
                        help="YAML/JSON with `concepts: {NAME: [PROMPT...]}` and `neutral: [PROMPT...]`")
    parser.add_argument("--select", default=None, metavar="METRIC",
                        help="name the best weights by METRIC (score, drift, CONCEPT.score, neutral.correct, ...)")
    parser.add_argument("--scorer", default="auto", choices=["auto", "world", "encoders"])
    parser.add_argument("--clip-model", default=None, help="CLIP hub id or folder (default openai/clip-vit-large-patch14)")
    parser.add_argument("--dino-model", default=None, help="DINOv2 hub id or folder (default facebook/dinov2-small)")
    parser.add_argument("--steps", type=int, default=None, help="inference steps (default the run's validation.steps)")
    parser.add_argument("--num", type=int, default=None, help="images per prompt (default validation.num_images)")
    parser.add_argument("--seed", type=int, default=None, help="seed (default validation.seed)")
    parser.add_argument("--per-concept", type=int, default=4, help="default prompts per concept (default 4)")
    parser.add_argument("--device", default="auto")


def run(args: argparse.Namespace) -> int:
    from .. import DifftuneError
    from ..reports.compare import expand
    from .core import evaluate_run, table

    for value, name in ((args.steps, "--steps"), (args.num, "--num"), (args.per_concept, "--per-concept")):
        if value is not None and value < 1:
            raise DifftuneError(f"{name} must be >= 1")
    runs: list = []
    for path in args.runs:  # a sweep folder stands for the runs its sweep.json names
        runs += expand([path], print) if (Path(path) / "sweep.json").is_file() else [path]
    for run_dir in runs:
        data = evaluate_run(run_dir, prompts_file=args.prompts, scorer_kind=args.scorer, clip_model=args.clip_model,
                            dino_model=args.dino_model, steps=args.steps, num=args.num, seed=args.seed,
                            per_concept=args.per_concept, device=args.device, select_metric=args.select)
        print(table(data["results"], run_dir))
        if "select" in data:
            s = data["select"]
            print(f"best by {s['metric']}: {s['best']} ({s['value']:.3f})")
        print(f"wrote {run_dir}/eval.json\n")
    return 0

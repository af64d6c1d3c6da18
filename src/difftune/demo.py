"""`difftune demo`: the whole journey on a built-in tiny model, offline, in a few minutes on a CPU.

1. write a tiny random Stable Diffusion pipeline (`difftune tiny sd`),
2. draw a small synthetic dataset (a concept "sks" = an orange disc on a teal ground, with captions),
3. train a LoRA on it from a config file written beside it (checkpoints, samples, tensorboard),
4. generate the same prompt and seed before and after with `difftune generate`,
5. print where everything is, how the training loss moved, and how much the LoRA changed the image.

The tiny model is random, so the images are not pretty; what the demo shows is that every stage
runs and hands off through files, exactly as with a real model.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

EXAMPLES = """examples:
  difftune demo                      # writes ./demo-out
  difftune demo --out /tmp/demo --steps 200
"""

CONCEPT_COLOR = (255, 140, 0)
GROUND_COLOR = (0, 128, 128)


def make_dataset(folder: Path, n: int = 8, size: int = 64, seed: int = 0) -> Path:
    """`n` images of the demo concept with sidecar captions."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(n):
        image = Image.new("RGB", (size, size), GROUND_COLOR)
        draw = ImageDraw.Draw(image)
        r = rng.randint(size // 5, size // 3)
        cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=CONCEPT_COLOR)
        image.save(folder / f"disc-{i:02d}.png")
        (folder / f"disc-{i:02d}.txt").write_text("a photo of sks disc", encoding="utf-8")
    return folder


def _config_text(model: Path, data: Path, output: Path, steps: int, resolution: int) -> str:
    return f"""# Written by `difftune demo`. Run it yourself with: difftune train {output.parent / 'demo.yaml'}
model:
  path: {model}
method:
  kind: lora
  rank: 8
  alpha: 8
data:
  resolution: {resolution}
  concepts:
    - dir: {data}
      prompt: "a photo of sks disc"
      repeats: 2
train:
  steps: {steps}
  batch_size: 2
  lr: 1.0e-3
  seed: 0
  precision: "no"
  log_every: 10
checkpoint:
  every: {max(1, steps // 2)}
  keep: 2
validation:
  prompts: ["a photo of sks disc"]
  steps: 10
output_dir: {output}
"""


def _mean_abs_difference(a: Path, b: Path) -> float:
    """Mean absolute difference of two images, in 8-bit levels."""
    import numpy as np
    from PIL import Image

    pa = np.asarray(Image.open(a).convert("RGB"), dtype=np.float32)
    pb = np.asarray(Image.open(b).convert("RGB"), dtype=np.float32)
    return float(np.abs(pa - pb).mean())


def run_demo(out: Path, steps: int = 150) -> dict:
    """Run the demo into `out`; returns the paths and figures it printed."""
    from .config import load_config
    from .inference.generate import generate
    from .tiny import make_tiny, tiny_resolution
    from .train import read_losses, train

    t0 = time.time()
    out = out.resolve()
    resolution = tiny_resolution("sd")
    model = make_tiny("sd", out / "tiny-sd")
    data = make_dataset(out / "data", size=resolution)
    run_dir = out / "run"
    config_path = out / "demo.yaml"
    config_path.write_text(_config_text(model, data, run_dir, steps, resolution))
    print(f"[1/4] tiny model in {model}, {len(list(data.glob('*.png')))} images in {data}, config {config_path}")

    prompt = "a photo of sks disc"
    before = generate(str(model), prompt, out / "before", steps=20, seed=0, width=resolution, height=resolution,
                      progress=False)[0]
    print(f"[2/4] before training: {before}")

    train(load_config(config_path))
    print(f"[3/4] trained LoRA: {run_dir / 'pytorch_lora_weights.safetensors'}")

    after = generate(str(model), prompt, out / "after", loras=[(str(run_dir), 1.0)], steps=20, seed=0,
                     width=resolution, height=resolution, progress=False)[0]
    changed = _mean_abs_difference(before, after)
    losses = [r["loss"] for r in read_losses(run_dir)]
    window = max(1, len(losses) // 5)
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    print(f"[4/4] after training:  {after}")
    print(f"training loss: {first:.4f} (first {window} steps) -> {last:.4f} (last {window}); "
          f"the LoRA changed the image by {changed:.1f} levels per pixel on average (same prompt and seed)")
    print(f"samples: {run_dir / 'samples'}   checkpoints: {run_dir / 'checkpoints'}   "
          f"tensorboard: tensorboard --logdir {run_dir / 'logs'}")
    print(f"demo finished in {time.time() - t0:.0f}s")
    return {"before": before, "after": after, "run": run_dir, "loss_first": first, "loss_last": last, "changed": changed}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo-out", help="folder for everything the demo writes (default demo-out)")
    parser.add_argument("--steps", type=int, default=150, help="training steps (default 150)")


def run(args: argparse.Namespace) -> int:
    run_demo(Path(args.out), args.steps)
    return 0

"""`difftune demo`: a real (small) base model fine-tuned on a style it has never seen, measured, in a few
minutes on a CPU (how well it learns today: BENCHMARKS.md section 5).

1. copy the shipped world-sd base model (a Stable Diffusion pipeline trained from scratch on difftune's
   procedural world, see `difftune.world`) and render 12 training images of a held-out style
   ("dotted", trigger word ``zdots``) over varied shapes and colours, with captions;
2. train a LoRA on them with the shipped recipe ``configs/world-sd-style-lora.yaml``;
3. draw held-out prompts (colour/shape/background combinations absent from the training set) with the
   trigger word, with and without the LoRA, same seeds;
4. write a labelled grid (rows: prompts; columns: base, with LoRA, a training image) and print what the
   world's oracle measures in the pixels: how often the style is present and the object colour right,
   before and after.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

EXAMPLES = """examples:
  difftune demo                      # writes ./demo-out (grid.png, figures.json, the run)
  difftune demo --out /tmp/demo --steps 200
"""

STYLE = "dotted"
RECIPE = "world-sd-style-lora.yaml"
N_PROMPTS = 6
SEEDS = (0, 1)
DRAW_STEPS = 20


def recipe_text(name: str = RECIPE) -> str:
    """The shipped style recipe, from the checkout's configs/ (a clone or `pip install -e .`)."""
    path = Path(__file__).resolve().parents[2] / "configs" / name
    if not path.is_file():
        from . import DifftuneError

        raise DifftuneError(f"the recipe {path} is missing: run the demo from a difftune checkout (pip install -e .)")
    return path.read_text()


def eval_prompts(train_scenes, n: int = N_PROMPTS) -> list[str]:
    """`n` styled prompts whose (colour, shape, background) none of the training images has, all shapes."""
    import random

    from .world import scenes

    seen = {(s.colour, s.shape, s.background) for s in train_scenes}
    seen_pairs = {(s.colour, s.shape) for s in train_scenes}
    candidates = [t for t in scenes.all_triples() if t not in seen and (t[0], t[1]) not in seen_pairs]
    random.Random(3).shuffle(candidates)
    chosen = []
    for shape in scenes.SHAPES * n:
        pick = next((t for t in candidates if t[1] == shape and t not in chosen), None)
        if pick:
            chosen.append(pick)
        if len(chosen) == n:
            break
    return [scenes.prompt(*t, style=STYLE) for t in chosen]


def _grid(rows: list[tuple[str, list]], headers: list[str], path: Path, scale: int = 2) -> Path:
    """A labelled grid PNG: a header row, then per prompt its images side by side and the prompt below."""
    from PIL import Image, ImageDraw

    cell, pad, text_h = 64 * scale, 6, 14
    width = pad + len(headers) * (cell + pad)
    height = text_h + pad + len(rows) * (cell + text_h + pad)
    grid = Image.new("RGB", (max(width, 420), height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for j, h in enumerate(headers):
        draw.text((pad + j * (cell + pad), 2), h, fill=(0, 0, 0))
    for i, (label, images) in enumerate(rows):
        y = text_h + pad + i * (cell + text_h + pad)
        for j, image in enumerate(images):
            grid.paste(image.convert("RGB").resize((cell, cell), Image.NEAREST), (pad + j * (cell + pad), y))
        draw.text((pad, y + cell + 1), label, fill=(0, 0, 0))
    grid.save(path)
    return path


def run_demo(out: Path, steps: int | None = None) -> dict:
    """Run the demo into `out`; returns the figures it printed."""
    import yaml

    from .config import config_from_dict
    from .preflight import finished_step
    from .train import train
    from .world import models, oracle, scenes
    from .world.bench import draw, load_pipeline

    t0 = time.time()
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    model = out / "world-sd"
    if not (model / "model_index.json").is_file():
        models.write_shipped("sd", model)
    train_scenes = scenes.style_set(STYLE, 12, seed=0)
    data = out / "data"
    scenes.write_dataset(data, train_scenes)
    config = yaml.safe_load(recipe_text())
    config["model"]["path"] = str(model)
    config["data"]["concepts"][0]["dir"] = str(data)
    config["output_dir"] = str(out / "run")
    if steps is not None:
        config["train"]["steps"] = steps
    (out / "demo.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    prompts = eval_prompts(train_scenes)
    print(f"[1/4] base model {model}; 12 '{scenes.style_word(STYLE)}' training images in {data}; "
          f"recipe {out / 'demo.yaml'}")

    pipe = load_pipeline(str(model))
    before = [im for seed in SEEDS for im in draw(pipe, prompts, seed, DRAW_STEPS)]
    print(f"[2/4] base model drew {len(before)} images of {len(prompts)} held-out prompts")

    t_train = time.time()
    cfg = config_from_dict(config)
    done, _ = finished_step(cfg)
    weights = out / "run" / "pytorch_lora_weights.safetensors"
    if done == cfg.train.steps and weights.is_file():  # a rerun on the same folder keeps the finished LoRA
        print(f"[3/4] LoRA already trained ({done} steps) in an earlier run: {weights} (delete {out / 'run'} "
              "to train it again)")
    else:
        if done > cfg.train.steps:  # an earlier demo trained longer: start this one over
            cfg = config_from_dict({**config, "checkpoint": {**config.get("checkpoint", {}), "resume": "never"}})
        train(cfg, log=lambda *a: None)
        print(f"[3/4] LoRA trained in {time.time() - t_train:.0f}s: {weights}")
    t_train = time.time() - t_train

    pipe.load_lora_weights(str(out / "run"))
    after = [im for seed in SEEDS for im in draw(pipe, prompts, seed, DRAW_STEPS)]
    labels = prompts * len(SEEDS)
    for name, images in (("base", before), ("lora", after)):
        (out / name).mkdir(exist_ok=True)
        for k, image in enumerate(images):
            image.save(out / name / f"{k % len(prompts):03d}-seed{k // len(prompts)}.png")

    def figures(images):
        results = [oracle.score(im, p) for im, p in zip(images, labels)]
        s = oracle.summarise(results)
        return {"style_present": s["style"], "colour_right": s["colour"], "shape_right": s["shape"],
                "background_right": s["background"]}

    fig = {"before": figures(before), "after": figures(after), "prompts": prompts, "seeds": list(SEEDS),
           "train_seconds": round(t_train, 1)}
    examples = [scenes.to_pil(scenes.render(s)) for s in train_scenes]
    rows = [(p, [before[i], after[i], examples[i % len(examples)]]) for i, p in enumerate(prompts)]
    grid = _grid(rows, ["base", "with LoRA", "a training image"], out / "grid.png")
    b, a = fig["before"], fig["after"]
    print(f"[4/4] grid: {grid}")
    print(f"oracle, {len(labels)} images ({len(prompts)} held-out prompts x {len(SEEDS)} seeds):")
    print(f"  style '{STYLE}' present: {100 * b['style_present']:.0f}% before -> {100 * a['style_present']:.0f}% after")
    print(f"  object colour right:     {100 * b['colour_right']:.0f}% before -> {100 * a['colour_right']:.0f}% after")
    print(f"  shape right:             {100 * b['shape_right']:.0f}% before -> {100 * a['shape_right']:.0f}% after")
    print(f"  background right:        {100 * b['background_right']:.0f}% before -> {100 * a['background_right']:.0f}% after")
    fig["seconds"] = round(time.time() - t0, 1)
    (out / "figures.json").write_text(json.dumps(fig, indent=1))
    print(f"demo finished in {fig['seconds']:.0f}s (training {t_train:.0f}s); figures in {out / 'figures.json'}")
    return fig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo-out", help="folder for everything the demo writes (default demo-out)")
    parser.add_argument("--steps", type=int, default=None, help="LoRA training steps (default: the recipe's)")


def run(args: argparse.Namespace) -> int:
    run_demo(Path(args.out), args.steps)
    return 0

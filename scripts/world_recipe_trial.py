"""Try a change to a world style recipe and score it with the oracle (the figures of BENCHMARKS.md section 5).

    python scripts/world_recipe_trial.py OUT [family=sd] [style=dotted] [model=FOLDER] [guidance=G] [key.path=value ...]

Renders 12 training images of a held-out style, trains `configs/world-<family>-style-lora.yaml` with the
given overrides, and prints one JSON line: the oracle's figures on the demo's 6 held-out prompts x 2 seeds
before and after, and on the same prompts without the trigger after, drawn with the pipeline's default
guidance or `guidance=G`. Writes OUT/grid.png (base | LoRA).
"""

import json
import sys
import time
from pathlib import Path

import yaml

from difftune import demo
from difftune.config import config_from_dict
from difftune.train import train
from difftune.world import models, oracle, scenes
from difftune.world.bench import draw, guidance_kwargs, load_pipeline


def main(argv: list[str]) -> None:
    out = Path(argv[0])
    over = dict(a.split("=", 1) for a in argv[1:])
    family, style = over.pop("family", "sd"), over.pop("style", "dotted")
    guidance = float(over.pop("guidance")) if "guidance" in over else None
    out.mkdir(parents=True, exist_ok=True)
    model = Path(over.pop("model", out / f"world-{family}"))
    if not (model / "model_index.json").is_file():
        models.write_shipped(family, model)
    train_scenes = scenes.style_set(style, 12, seed=0)
    scenes.write_dataset(out / "data", train_scenes)
    cfg = yaml.safe_load(demo.recipe_text(f"world-{family}-style-lora.yaml"))
    cfg["model"]["path"], cfg["output_dir"] = str(model), str(out / "run")
    cfg["data"]["concepts"][0]["dir"] = str(out / "data")
    for key, value in over.items():
        node, parts = cfg, key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(value)
    demo.STYLE = style
    prompts = demo.eval_prompts(train_scenes)
    plain = [p.rsplit(" in ", 1)[0] for p in prompts]
    pipe = load_pipeline(str(model))
    kw = guidance_kwargs(pipe, guidance)

    def figures(images, labels):
        return {k: round(v, 2) for k, v in oracle.summarise([oracle.score(i, p) for i, p in zip(images, labels)]).items()}

    before = [im for seed in (0, 1) for im in draw(pipe, prompts, seed, 20, **kw)]
    t0 = time.time()
    train(config_from_dict(cfg), log=lambda *a: None)
    seconds = round(time.time() - t0)
    pipe.load_lora_weights(str(out / "run"))
    after = [im for seed in (0, 1) for im in draw(pipe, prompts, seed, 20, **kw)]
    plain_after = [im for seed in (0, 1) for im in draw(pipe, plain, seed, 20, **kw)]
    print(json.dumps({"overrides": over, "style": style, "guidance": guidance, "train_seconds": seconds,
                      "before": figures(before, prompts * 2), "after": figures(after, prompts * 2),
                      "plain_after": figures(plain_after, plain * 2)}))
    demo._grid([(p, [before[i], after[i]]) for i, p in enumerate(prompts)], ["base", "with LoRA"], out / "grid.png")


if __name__ == "__main__":
    main(sys.argv[1:])

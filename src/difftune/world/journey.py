"""`difftune world journey`: seed 000's story on a world model, measured, with every remedy.

A style LoRA is trained on 12 images of a held-out style (``zdots``); then a place (``zkrem``, the
stand-in for the Kremlin) is added by each *strategy*, and the oracle measures, with the same
prompts and seeds for all: the style score (objects drawn ``in zdots style``), the place score
(``a zkrem on a ... background``), and the drift on trigger-free prompts against the base model.

Strategies (`STRATEGIES`; each is the config overrides of its place stage, or the LoRAs it combines):

- ``style-only`` / ``place-only``: the references (one LoRA each, from the base);
- ``sequential``: ``method.init_lora`` = the style LoRA, trained on the place alone (the seed's failure);
- ``replay``: as sequential, plus ``data.replay`` of the style run (half of every batch: the default ratio);
- ``replay-75`` / ``replay-80``: as replay, with 75% / 80% of every batch replayed (``data.replay_ratio``);
- ``joint``: one LoRA on both concepts from the base, as many steps as both stages together;
- ``prior``: as sequential, plus prior preservation with base-drawn class images;
- ``output``: as sequential, plus output preservation on trigger-free prompts;
- ``c-lora``: as sequential, plus the rehearsal-free continual penalty;
- ``separate``: the style LoRA and the place-only LoRA combined at generation (scale 1 each).

Every run lands in ``OUT/runs/<name>`` and resumes there; the table goes to ``OUT/journey.md`` and
``OUT/journey.json``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import DifftuneError

EXAMPLES = """examples:
  difftune world journey --family sd --out runs/journey-sd
  difftune world journey --family flux --steps 300 --strategies sequential,replay,separate
  difftune world journey --family sd --model runs/my-world-sd --config configs/world-sd-style-lora.yaml
  difftune world journey --family sd --config configs/world-sd-style-lora.yaml --steps 300 train.lr=2e-3

Trains a style LoRA, then adds a place by each strategy, and prints a table: style score, place score
(each also as a share of its single-concept reference) and drift, measured by the world oracle.
"""

STYLE, PLACE = "dotted", "kremlin"


@dataclass
class Strategy:
    """The place stage of one strategy: `overrides` of its training config (None: no training of its
    own), and `loras`, the LoRA runs whose weights are combined at generation."""

    doc: str
    overrides: Callable[["Journey"], dict] | None = None
    loras: Callable[["Journey"], list[str]] | None = None


def _continuing(extra: Callable[["Journey"], dict] = lambda j: {}) -> Callable[["Journey"], dict]:
    return lambda j: {"method.init_lora": str(j.run("style-only")), **j.place_data(), **extra(j)}


def _replay(ratio: float) -> Strategy:
    return Strategy(f"sequential + data.replay of the style run at ratio {ratio}",
                    _continuing(lambda j: {"data.replay": [str(j.run("style-only"))], "data.replay_ratio": ratio}))


STRATEGIES: dict[str, Strategy] = {
    "style-only": Strategy("the style LoRA alone (reference)", lambda j: j.style_data()),
    "place-only": Strategy("a place LoRA from the base (reference)", lambda j: j.place_data()),
    "sequential": Strategy("init_lora = style, trained on the place", _continuing()),
    "replay": _replay(0.5),
    "replay-75": _replay(0.75),
    "replay-80": _replay(0.8),
    "joint": Strategy("one LoRA on both concepts, both stages' steps",
                      lambda j: {"data.concepts": j.style_data()["data.concepts"] + j.place_data()["data.concepts"],
                                 "train.steps": 2 * j.steps}),
    "prior": Strategy("sequential + prior preservation (base-drawn class images)",
                      _continuing(lambda j: {"data.concepts": [{**j.place_data()["data.concepts"][0],
                                                                "class_prompt": "a red square on a blue background",
                                                                "class_images": 12, "prior_loss_weight": 1.0}],
                                                 "data.cache_dir": str(j.out / "cache"),
                                                 "validation.steps": j.eval_steps})),
    "output": Strategy("sequential + output preservation on trigger-free prompts",
                       _continuing(lambda j: {"preserve.output_weight": 1.0, "preserve.prompts": ["", *j.neutral_train]})),
    "c-lora": Strategy("sequential + rehearsal-free continual penalty",
                       _continuing(lambda j: {"preserve.clora_weight": 1.0})),
    "separate": Strategy("style LoRA + place-only LoRA combined at generation",
                         loras=lambda j: [str(j.run("style-only")), str(j.run("place-only"))]),
}

#: the stage recipe when no --config is given (the world models' scale: 64 px, CPU-sized)
DEFAULT_STAGE = {
    "method.kind": "lora", "method.rank": 8, "data.resolution": 64, "train.batch_size": 4, "train.lr": 1.0e-3,
    "train.precision": "no", "checkpoint.every": 0, "train.max_grad_norm": 1.0,
}


@dataclass
class Journey:
    family: str
    model: str
    out: Path
    steps: int
    config: str | None = None
    eval_steps: int = 30
    num: int = 2
    per_concept: int = 8
    log: Callable = print
    neutral_train: list[str] = field(default_factory=list)
    settings: list[str] = field(default_factory=list)  # the user's key=value overrides of every stage

    def run(self, name: str) -> Path:
        return self.out / "runs" / name.replace(" ", "-")

    def _folder(self, name: str, scenes_: list) -> str:
        from . import scenes

        folder = self.out / "data" / name
        if not (folder / "done").is_file():
            scenes.write_dataset(folder, scenes_)
            (folder / "done").write_text("")
        return str(folder)

    def style_data(self) -> dict:
        from . import scenes

        return {"data.concepts": [{"dir": self._folder("style", scenes.style_set(STYLE, n=12, seed=0))}]}

    @staticmethod
    def place_scenes() -> list:
        from . import scenes

        return scenes.place_set(PLACE, 12, seed=1)

    def place_data(self) -> dict:
        return {"data.concepts": [{"dir": self._folder("place", self.place_scenes())}]}

    def config_for(self, name: str, overrides: dict):
        """The resolved config of one stage: the recipe, then the user's settings, then the strategy's."""
        import yaml

        from ..config import load_config

        def pairs(items: dict) -> list[str]:
            return [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
                    for k, v in items.items()]

        return load_config(self.config, pairs({} if self.config else DEFAULT_STAGE) + self.settings + pairs(
            {"model.path": self.model, "output_dir": str(self.run(name)), "train.steps": self.steps, **overrides}))

    def train(self, name: str, overrides: dict) -> Path:
        from ..train import train

        cfg = self.config_for(name, overrides)
        self.log(f"--- {name}: training {cfg.train.steps} steps")
        return train(cfg, log=lambda *_: None)


def _images_for(family_cls, model: str, loras: list[str], steps: int, guidance: float, size: int, seed: int, num: int):
    """prompts -> images of the base model with `loras` (scale 1 each), as `difftune generate` draws them."""
    import torch

    from ..inference.generate import pick_device

    device = pick_device()
    pipe = family_cls.load_pipeline(model, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    from ..inference.loras import inspect

    family_cls.apply_loras(pipe, [inspect(p, 1.0) for p in loras])
    pipe.set_progress_bar_config(disable=True)

    def images_for(prompts: list[str]) -> dict[str, list]:
        out = {}
        with torch.no_grad():
            for prompt in dict.fromkeys(prompts):
                out[prompt] = family_cls.sample(pipe, prompt, steps=steps, guidance=guidance, width=size, height=size,
                                                generator=torch.Generator("cpu").manual_seed(seed), num=num)
        return out
    return images_for


def run_journey(family: str, out: str | Path, *, model: str | None = None, steps: int = 200,
                strategies: list[str] | None = None, config: str | None = None, eval_steps: int = 30, num: int = 2,
                per_concept: int = 8, settings: list[str] | None = None, log=print) -> dict:
    """Train and score every strategy; returns (and writes) the results."""
    from ..evaluate.core import score_model, write_json
    from ..evaluate.prompts import EvalPrompts, default_prompts, world_neutral
    from ..evaluate.scorers import WorldScorer
    from ..families.registry import resolve_family
    from . import scenes

    names = strategies or list(STRATEGIES)
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown:
        raise DifftuneError(f"--strategies: unknown {', '.join(map(repr, unknown))}; known: {', '.join(STRATEGIES)}")
    if model is None:
        try:
            from .models import shipped
        except ImportError:
            raise DifftuneError(f"no shipped world-{family} model in this installation; pass --model FOLDER") from None
        model = str(shipped(family))
    family_cls = resolve_family(model, "auto")
    if family_cls.name != family:
        raise DifftuneError(f"--model {model} is a {family_cls.name} model, not {family}")
    out = Path(out)
    j = Journey(family, model, out, steps, config, eval_steps, num, per_concept, log, settings=list(settings or []))
    j.neutral_train = world_neutral(8, seed=99)
    j.config_for("check", {})  # a bad recipe or setting fails here, before anything is written
    needed = dict.fromkeys(["style-only", "place-only", *names])  # the references are always measured

    from ..reports.logs import sessions

    timings = {}
    for name in needed:
        strategy = STRATEGIES[name]
        if strategy.overrides is not None:
            j.train(name, strategy.overrides(j))
            # from the run's own session log: a resumed journey still reports the whole training time
            timings[name] = round(sum(s.seconds for s in sessions(j.run(name))), 1)

    style_prompts = [s.caption for s in scenes.style_set(STYLE, n=12, seed=0)]
    prompts = default_prompts({"style": style_prompts, "place": [s.caption for s in j.place_scenes()]}, per_concept)
    prompts = EvalPrompts(prompts.concepts, world_neutral(per_concept))
    guidance = family_cls.default_guidance
    scorer = WorldScorer()
    sampler = lambda loras: _images_for(family_cls, model, loras, eval_steps, guidance, 64, 0, num)  # noqa: E731
    base_images = sampler([])
    base_neutral = base_images(prompts.neutral)
    rows = {"base": score_model(base_images, prompts, scorer, base_neutral)}
    for name in needed:
        strategy = STRATEGIES[name]
        loras = strategy.loras(j) if strategy.loras else [str(j.run(name))]
        log(f"--- {name}: scoring")
        rows[name] = score_model(sampler(loras), prompts, scorer, base_neutral)
    ref_style, ref_place = rows["style-only"]["style.score"], rows["place-only"]["place.score"]
    for name, m in rows.items():
        m["style_kept"] = m["style.score"] / ref_style if ref_style else 0.0
        m["place_learned"] = m["place.score"] / ref_place if ref_place else 0.0
    result = {
        "format": 1, "family": family, "model": model, "steps_per_stage": steps, "config": config,
        "overrides": j.settings,
        "settings": {"eval_steps": eval_steps, "images_per_prompt": num, "prompts_per_concept": per_concept,
                     "guidance": guidance},
        "prompts": {"concepts": prompts.concepts, "neutral": prompts.neutral},
        "strategies": {n: STRATEGIES[n].doc for n in needed},
        "results": rows, "train_seconds": timings,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "journey.json", result)
    (out / "journey.md").write_text(journey_table(result) + "\n")
    return result


def journey_table(result: dict) -> str:
    """Markdown: one row per strategy, style and place scores (and as shares of their references), drift."""
    lines = ["| strategy | style score | style kept | place score | place learned | drift | neutral correct |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, m in result["results"].items():
        lines.append(f"| {name} | {m['style.score']:.2f} | {m['style_kept']:.0%} | {m['place.score']:.2f} | "
                     f"{m['place_learned']:.0%} | {m.get('drift', 0.0):.2f} | {m['neutral.correct']:.2f} |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--family", required=True, choices=["sd", "flux"])
    parser.add_argument("--out", default=None, help="output folder (default runs/journey-FAMILY)")
    parser.add_argument("--model", default=None, help="a world model folder (default: the shipped world-FAMILY)")
    parser.add_argument("--steps", type=int, default=200, help="training steps per stage (default 200)")
    parser.add_argument("--strategies", default=None, help=f"comma-separated subset of: {', '.join(STRATEGIES)}")
    parser.add_argument("--config", default=None, help="stage recipe YAML (default: a built-in 64 px LoRA recipe)")
    parser.add_argument("--eval-steps", type=int, default=30, help="inference steps when scoring (default 30)")
    parser.add_argument("--num", type=int, default=2, help="images per prompt (default 2)")
    parser.add_argument("--per-concept", type=int, default=8, help="prompts per concept and neutral (default 8)")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value",
                        help="settings for every stage, over the recipe (e.g. train.lr=2e-3 train.batch_size=8)")


def run(args: argparse.Namespace) -> int:
    for value, name in ((args.steps, "--steps"), (args.eval_steps, "--eval-steps"), (args.num, "--num"),
                        (args.per_concept, "--per-concept")):
        if value < 1:
            raise DifftuneError(f"{name} must be >= 1")
    strategies = [s.strip() for s in args.strategies.split(",")] if args.strategies else None
    t0 = time.time()
    result = run_journey(args.family, args.out or f"runs/journey-{args.family}", model=args.model, steps=args.steps,
                         strategies=strategies, config=args.config, eval_steps=args.eval_steps, num=args.num,
                         per_concept=args.per_concept, settings=args.overrides)
    print(journey_table(result))
    print(f"journey of {args.family} in {time.time() - t0:.0f}s; table in {args.out or f'runs/journey-{args.family}'}/journey.md")
    return 0

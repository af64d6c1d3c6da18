"""Scoring weights: generate each prompt's images with fixed seeds, score them, tabulate.

`score_model(make_images, prompts, scorer, base_neutral, references)` is the one scoring step; the
rest finds the weights of a run (its final weights and every complete checkpoint), loads each into
the trained parts exactly as training left them (`train.load_trainable_tensors`), and writes
``eval.json``::

    {"format": 1, "run": RUN_DIR, "model": BASE_MODEL, "scorer": "world" | "encoders",
     "settings": {"steps", "guidance", "seed", "images_per_prompt", "resolution"},
     "prompts": {"concepts": {NAME: [PROMPT, ...]}, "neutral": [PROMPT, ...]},
     "results": [{"weights": "base" | "step-00000200" | "final", "step": N, "metrics": {METRIC: VALUE}}],
     "select": {"metric": METRIC, "best": WEIGHTS, "value": VALUE}}      # only with --select

Metric names: ``NAME.METRIC`` per concept (e.g. ``zdots.score``, ``zdots.colour``), ``neutral.METRIC``
for trigger-free prompts (``neutral.drift`` against the base, same seeds), and two summaries:
``score`` (mean of the concepts' scores) and ``drift`` (= ``neutral.drift``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .. import DifftuneError
from .prompts import EvalPrompts, concept_name, default_prompts, load_prompts
from .scorers import LOWER_IS_BETTER, pick_scorer

ImagesFor = Callable[[list[str]], dict[str, list]]  # prompts -> {prompt: images (seeded, same order each call)}


def score_model(images_for: ImagesFor, prompts: EvalPrompts, scorer: Any, base_neutral: dict[str, list] | None,
                references: dict[str, list] | None = None) -> dict[str, float]:
    """Flat metrics of one model (see the module docstring) from its images for `prompts`."""
    images = images_for(prompts.all())
    metrics: dict[str, float] = {}
    scores = []
    for name, ps in prompts.concepts.items():
        flat = [(im, p) for p in ps for im in images[p]]
        result = scorer.concept([im for im, _ in flat], [p for _, p in flat], (references or {}).get(name))
        metrics.update({f"{name}.{k}": v for k, v in result.items()})
        scores.append(result["score"])
    if prompts.neutral:
        flat = [(im, p, i) for p in prompts.neutral for i, im in enumerate(images[p])]
        base = [base_neutral[p][i] for _, p, i in flat] if base_neutral is not None else None
        result = scorer.neutral([im for im, _, _ in flat], [p for _, p, _ in flat], base)
        metrics.update({f"neutral.{k}": v for k, v in result.items()})
        if "drift" in result:
            metrics["drift"] = result["drift"]
    if scores:
        metrics["score"] = sum(scores) / len(scores)
    return metrics


def select(results: list[dict], metric: str) -> dict:
    """The best weights by `metric` (lowest for drift-like metrics, else highest); one line if unknown."""
    known = sorted({k for r in results for k in r["metrics"]})
    if metric not in known:
        import difflib

        close = difflib.get_close_matches(metric, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DifftuneError(f"--select: unknown metric {metric!r}{hint}; known: {', '.join(known)}")
    lower = metric.split(".")[-1] in LOWER_IS_BETTER
    candidates = [r for r in results if metric in r["metrics"] and r["weights"] != "base"] or results
    best = (min if lower else max)(candidates, key=lambda r: r["metrics"][metric])
    return {"metric": metric, "best": best["weights"], "value": best["metrics"][metric]}


def table(results: list[dict], run: str | None = None) -> str:
    """A Markdown table: one row per weights, one column per metric."""
    keys = sorted({k for r in results for k in r["metrics"]}, key=lambda k: (k.count("."), k))
    head = ["weights", *keys]
    lines = ([f"**{run}**", ""] if run else []) + ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in results:
        cells = [r["weights"]] + [f"{r['metrics'][k]:.3f}" if k in r["metrics"] else "" for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path: Path, data: dict) -> None:
    """Write atomically (temp file, then rename): a failed eval leaves no half-written eval.json."""
    import os

    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# Sampling with a family's current parts


@dataclass
class Sampler:
    """Images from a loaded family's current weights: for each prompt `num` images, seeded with `seed`."""

    family: Any
    steps: int
    guidance: float
    size: int
    seed: int
    num: int
    autocast: Any = None

    def __call__(self, prompts: list[str]) -> dict[str, list]:
        import contextlib

        import torch

        pipe = self.family.build_pipeline()
        pipe.set_progress_bar_config(disable=True)
        out: dict[str, list] = {}
        with torch.no_grad(), (self.autocast() if self.autocast else contextlib.nullcontext()):
            for prompt in dict.fromkeys(prompts):
                generator = torch.Generator("cpu").manual_seed(self.seed)
                out[prompt] = self.family.sample(pipe, prompt, steps=self.steps, guidance=self.guidance,
                                                 width=self.size, height=self.size, generator=generator, num=self.num)
        return out


def concept_names(cfg) -> list[str]:
    """Each concept's name in tables (`concept_name`; a repeated name gets its index appended)."""
    names = [concept_name(c, i) for i, c in enumerate(cfg.data.concepts)]
    return [n if names.count(n) == 1 else f"{n}-{i}" for i, n in enumerate(names)]


def concept_sources(cfg, items) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(name -> training prompts, name -> training image paths) per concept of a run."""
    from ..data.dataset import prompt_for

    names = concept_names(cfg)
    prompts: dict[str, list[str]] = {}
    paths: dict[str, list[str]] = {}
    for item in items:
        if item.concept >= len(names):
            continue  # replayed concepts and class images (data/mix.py) are not this run's concepts
        name = names[item.concept]
        prompts.setdefault(name, []).append(prompt_for(item, cfg.data.concepts[item.concept]))
        paths.setdefault(name, []).append(item.path)
    return prompts, paths


def check_metric_name(metric: str, concepts: list[str]) -> None:
    """Fail before any work for a `--select` metric that cannot exist for these concepts."""
    head = metric.split(".")[0]
    if metric not in ("score", "drift") and (metric.count(".") != 1 or head not in [*concepts, "neutral"]):
        raise DifftuneError(f"--select: unknown metric {metric!r}; use score, drift, neutral.METRIC or "
                            f"CONCEPT.METRIC with a concept among {', '.join(concepts)}")


class TrainingEval:
    """``validation.eval_every``: the same scores during training, logged next to the loss.

    The base images for drift are drawn when the evaluator is made (before the first step of a fresh
    run, so from the base model; a run that starts from ``method.init_lora`` measures drift from that
    LoRA). A resumed run draws them again from its resumed weights only if none are stored, so its
    drift is then relative to the resume point (said in the log).
    """

    def __init__(self, family, cfg, items, autocast, log):
        v = cfg.validation
        self.every = v.eval_every
        self.log_file = Path(cfg.output_dir) / "logs" / "eval.jsonl"
        trained, self.references = concept_sources(cfg, items)
        self.prompts = load_prompts(v.eval_prompts) if v.eval_prompts else default_prompts(trained, v.eval_prompts_per_concept)
        self.scorer = pick_scorer(v.eval_scorer, self.prompts.all(), v.clip_model, v.dino_model, family.device)
        guidance = v.guidance if v.guidance is not None else family.default_guidance
        self.sample = Sampler(family, v.steps, guidance, cfg.data.resolution, v.seed, v.num_images, autocast)
        self.family, self.cfg = family, cfg
        with _sampling(family, cfg, release=False):  # made before the prompt cache: text encoders stay
            self.base = self.sample(self.prompts.neutral) if self.prompts.neutral else None
        family.sampling_prompts += self.prompts.all()
        log(f"eval every {self.every} steps with the {self.scorer.name} scorer; scores in {self.log_file}")

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def __call__(self, step: int) -> dict[str, float]:
        with _sampling(self.family, self.cfg):
            metrics = score_model(self.sample, self.prompts, self.scorer, self.base, self.references)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("a") as fh:
            fh.write(json.dumps({"step": step, **metrics}) + "\n")
        return {f"eval/{k}": v for k, v in metrics.items()}


class _sampling:
    """Trained parts in eval mode and text encoders on the device while sampling; back afterwards
    (`release`: hand the text encoders back through the family's hook, as after the prompt cache)."""

    def __init__(self, family, cfg, release: bool = True):
        self.family, self.cfg, self.release = family, cfg, release

    def __enter__(self):
        self.trained = [self.family.parts[n] for n in self.family.trainable_part_names()]
        self.modes = [m.training for m in self.trained]
        for m in self.trained:
            m.eval()
        self.family.text_encoders_to(self.family.device)

    def __exit__(self, *exc):
        for m, mode in zip(self.trained, self.modes):
            m.train(mode)
        if self.release and not self.cfg.method.train_text_encoder:
            self.family.after_prompt_cache()


# ------------------------------------------------------------------------------------------------
# The weights of a run


@dataclass
class Weights:
    """One set of weights of a run: ``base``, a checkpoint ``step-N`` or the ``final`` weights."""

    name: str
    step: int
    load: Callable[[], dict]  # -> the trained tensors, ``{part}.{name}`` keys


def _run_config(folder: Path):
    import yaml

    from ..config import config_from_dict

    cfg_file = folder / "config.yaml"
    if not cfg_file.is_file():
        raise DifftuneError(f"{folder}: not a difftune run or checkpoint (no config.yaml)")
    try:
        return config_from_dict(yaml.safe_load(cfg_file.read_text()))
    except DifftuneError as e:
        raise DifftuneError(f"{cfg_file}: {e}") from None


def _final_tensors(folder: Path, cfg, family, part_names) -> Callable[[], dict] | None:
    """A loader of the final weights in `folder`, or None if it holds none (a LoRA file or a pipeline)."""
    lora_file = folder / "pytorch_lora_weights.safetensors"
    if lora_file.is_file():
        def load_lora() -> dict:
            from safetensors.torch import load_file

            return load_file(str(lora_file))
        return load_lora
    if (folder / "model_index.json").is_file():
        def load_full() -> dict:
            from ..families.base import load_part, read_model_index

            index = read_model_index(str(folder))
            tensors = {}
            for name in part_names:
                part = load_part(str(folder), name, index[name])
                tensors.update({f"{name}.{k}": v for k, v in part.state_dict().items()})
            return tensors
        return load_full
    return None


def run_weights(folder: Path) -> tuple[Any, list[Weights]]:
    """(config, the weights in `folder`): a run's complete checkpoints and final weights, or one checkpoint."""
    from ..checkpoint import MARKER, list_checkpoints, verify

    folder = Path(folder)
    if not folder.is_dir():
        raise DifftuneError(f"{folder}: no such folder")
    cfg = _run_config(folder)

    def from_checkpoint(path: Path) -> Callable[[], dict]:
        def load() -> dict:
            from safetensors.torch import load_file

            return load_file(str(path / "trainable.safetensors"))
        return load

    if (folder / MARKER).is_file() or (folder / "trainable.safetensors").is_file():
        reason = verify(folder)
        if reason:
            raise DifftuneError(f"{folder}: checkpoint cannot be used: {reason}")
        step = json.loads((folder / "state.json").read_text())["step"]
        return cfg, [Weights(folder.name, step, from_checkpoint(folder))]
    good, _ = list_checkpoints(folder)
    weights = [Weights(c.path.name, c.step, from_checkpoint(c.path)) for c in good]
    final = _final_tensors(folder, cfg, None, None)
    if final is not None:
        weights.append(Weights("final", weights[-1].step if weights else cfg.train.steps, None))  # loader set later
    if not weights:
        raise DifftuneError(f"{folder}: no weights to evaluate (no pytorch_lora_weights.safetensors, no pipeline, "
                            "no complete checkpoint)")
    return cfg, weights


def evaluate_run(folder: str | Path, *, prompts_file: str | None = None, scorer_kind: str = "auto",
                 clip_model: str | None = None, dino_model: str | None = None, steps: int | None = None,
                 num: int | None = None, seed: int | None = None, per_concept: int = 4, device: str = "auto",
                 select_metric: str | None = None, log=print) -> dict:
    """Score the base and every weights of `folder` (a run or one checkpoint); writes ``eval.json`` there."""
    import torch

    from ..data.dataset import build_items
    from ..families.registry import resolve_family
    from ..inference.generate import pick_device
    from ..methods import get_method
    from ..train import attach_method, load_trainable_tensors, trainable_tensors

    folder = Path(folder)
    cfg, weights = run_weights(folder)
    prompts = load_prompts(prompts_file) if prompts_file else None
    dev = pick_device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    family_cls = resolve_family(cfg.model.path, cfg.model.family, cfg.model.revision)
    items = build_items(cfg.data, log=lambda *_: None)
    trained_prompts, references = concept_sources(cfg, items)
    prompts = prompts or default_prompts(trained_prompts, per_concept)
    if select_metric:
        check_metric_name(select_metric, list(prompts.concepts))
    v = cfg.validation
    scorer = pick_scorer(scorer_kind, prompts.all(), clip_model or v.clip_model, dino_model or v.dino_model, dev)

    family = family_cls(cfg, dev, dtype)
    family.load()
    part_names = attach_method(family, cfg)
    method = get_method(cfg.method)
    base_tensors = {k: t.detach().clone() for k, t in trainable_tensors(family, method, part_names).items()}
    final = _final_tensors(folder, cfg, family, part_names)
    for w in weights:
        if w.name == "final":
            w.load = final
    guidance = v.guidance if v.guidance is not None else family.default_guidance
    sampler = Sampler(family, steps or v.steps, guidance, cfg.data.resolution,
                      v.seed if seed is None else seed, num or v.num_images)
    log(f"{folder}: {len(weights)} weights, {len(prompts.all())} prompts x {sampler.num} images, {scorer.name} scorer")

    results = []
    base_neutral = None
    from tqdm.auto import tqdm

    for w in tqdm([Weights("base", 0, lambda: base_tensors), *weights], desc="eval", unit="weights", disable=None):
        load_trainable_tensors(family, method, part_names, w.load(), where=f"{folder} {w.name}")
        with _sampling(family, cfg, release=False):
            if w.name == "base":
                base_neutral = sampler(prompts.neutral) if prompts.neutral else None
            metrics = score_model(sampler, prompts, scorer, base_neutral, references)
        results.append({"weights": w.name, "step": w.step, "metrics": metrics})
    data = {
        "format": 1, "run": str(folder), "model": cfg.model.path, "scorer": scorer.name,
        "settings": {"steps": sampler.steps, "guidance": guidance, "seed": sampler.seed,
                     "images_per_prompt": sampler.num, "resolution": cfg.data.resolution},
        "prompts": {"concepts": prompts.concepts, "neutral": prompts.neutral},
        "results": results,
    }
    if select_metric:
        data["select"] = select(results, select_metric)
    write_json(folder / "eval.json", data)
    return data

"""Everything a report says about one run, read back from the files the run wrote.

`load_run(folder)` works on any output folder, finished or not, and on folders of older runs that
lack some files: what is missing is simply left out of the report.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .. import DifftuneError
from . import logs


class NotARun(DifftuneError):
    """A folder that holds no run (no config.yaml or no loss log)."""


@dataclass
class Sample:
    step: int
    prompt: str
    index: int
    path: Path


@dataclass
class Run:
    """One run's config, logs, samples and scores."""

    folder: Path
    config: dict
    losses: list[dict]
    validation: list[dict]
    sessions: list[logs.Session]
    facts: dict
    samples: list[Sample] = field(default_factory=list)
    scores: dict | None = None
    label: str | None = None

    @property
    def name(self) -> str:
        return self.label or self.folder.name

    @property
    def steps_done(self) -> int:
        return self.losses[-1]["step"] if self.losses else 0

    @property
    def steps_planned(self) -> int:
        return int(self.config.get("train", {}).get("steps", 0))

    @property
    def finished(self) -> bool:
        """Final weights written for every planned step (a rerun with more steps is not finished)."""
        return has_weights(self.folder) and self.steps_done >= self.steps_planned

    @property
    def family(self) -> str:
        return self.facts.get("family") or self.config.get("model", {}).get("family", "?")

    def sample_steps(self) -> list[int]:
        return sorted({s.step for s in self.samples})

    def sample_prompts(self) -> list[str]:
        return list(dict.fromkeys(s.prompt for s in sorted(self.samples, key=lambda s: (s.step, s.path.name))))

    def sample(self, step: int, prompt: str, index: int = 0) -> Sample | None:
        for s in self.samples:
            if s.step == step and s.prompt == prompt and s.index == index:
                return s
        return None


def has_weights(folder: Path) -> bool:
    """Whether a run folder holds final weights (a LoRA file, or a full pipeline)."""
    return (folder / "pytorch_lora_weights.safetensors").exists() or (folder / "model_index.json").exists()


def _samples(folder: Path, prompts: list[str]) -> list[Sample]:
    """Samples under ``samples/step-N/PP-II.png``; the prompt is read from the PNG's metadata, or
    from the config's prompt list by the file's number."""
    from PIL import Image

    found = []
    for path in sorted((folder / "samples").glob("step-*/*.png")):
        try:
            step = int(path.parent.name.split("-")[-1])
            p, i = (int(x) for x in path.stem.split("-")[:2])
        except ValueError:
            continue
        prompt = prompts[p] if p < len(prompts) else f"prompt {p}"
        try:
            with Image.open(path) as image:
                prompt = json.loads(image.info.get("difftune", "{}")).get("prompt", prompt)
        except (OSError, json.JSONDecodeError, AttributeError):
            pass
        found.append(Sample(step, prompt, i, path))
    return found


def load_run(folder: str | Path) -> Run:
    """Read a run folder; raises `NotARun` naming the folder when it holds no run logs."""
    import yaml

    folder = Path(folder)
    config_path = folder / "config.yaml"
    if not config_path.is_file():
        raise NotARun(f"{folder}: no config.yaml (not a difftune run folder)")
    losses = logs.read_jsonl(folder / logs.LOSS)
    if not losses:
        raise NotARun(f"{folder}: no training logs (logs/loss.jsonl is missing or empty)")
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        raise NotARun(f"{folder}: config.yaml is not valid YAML") from None
    facts_path = folder / logs.RUN
    try:
        facts = json.loads(facts_path.read_text(encoding="utf-8")) if facts_path.is_file() else {}
    except json.JSONDecodeError:
        facts = {}
    scores = None
    eval_path = folder / "eval.json"
    if eval_path.is_file():
        try:
            scores = json.loads(eval_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            scores = None
    prompts = list(config.get("validation", {}).get("prompts") or [])
    by_step = {r["step"]: r for r in logs.read_jsonl(folder / logs.VALIDATION)
               if isinstance(r.get("step"), int) and isinstance(r.get("val_loss"), (int, float))}
    validation = [by_step[k] for k in sorted(by_step)]  # a rerun of a finished run scores its last step again
    return Run(folder, config, losses, validation, logs.sessions(folder), facts,
               _samples(folder, prompts), scores)


def flat_scores(scores: object, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of an ``eval.json`` as ``{"a/b/c": value}`` (lists by index). The file
    `difftune eval` writes (``results``: one entry per set of weights) gives the metrics of the run's
    final weights (else its last entry): the run's own result, comparable across runs."""
    results = scores.get("results") if isinstance(scores, dict) and not prefix else None
    if isinstance(results, list) and results and all(isinstance(r, dict) and "metrics" in r for r in results):
        final = next((r for r in results if r.get("weights") == "final"), results[-1])
        return flat_scores(final["metrics"], "")
    out: dict[str, float] = {}
    if isinstance(scores, bool):
        return out
    if isinstance(scores, (int, float)):
        out[prefix or "score"] = float(scores)
    elif isinstance(scores, dict):
        for k, v in scores.items():
            if k in ("lower_is_better", "higher_is_better"):
                continue
            out.update(flat_scores(v, f"{prefix}/{k}" if prefix else str(k)))
    elif isinstance(scores, list):
        for i, v in enumerate(scores):
            out.update(flat_scores(v, f"{prefix}/{i}" if prefix else str(i)))
    return out


#: words in a score's name that mean smaller is better (everything else: larger is better)
LOWER_IS_BETTER = ("loss", "drift", "distance", "error", "fid", "lpips", "mse")


def lower_is_better(name: str, scores: object = None) -> bool:
    """Whether a smaller value of score `name` is better: ``eval.json`` may say so in its
    ``lower_is_better`` / ``higher_is_better`` lists, otherwise the name decides."""
    if isinstance(scores, dict):
        for key, lower in (("lower_is_better", True), ("higher_is_better", False)):
            listed = scores.get(key)
            if isinstance(listed, list) and any(name == n or name.endswith("/" + str(n)) for n in listed):
                return lower
    return any(word in name.lower() for word in LOWER_IS_BETTER)


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (as TensorBoard's smoothing, debiased)."""
    out, avg = [], 0.0
    for n, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** n))
    return out

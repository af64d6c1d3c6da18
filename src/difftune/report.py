"""`OUTPUT_DIR/report.md`: what a finished run did and how to use what it made.

Written at the end of `difftune train` from files the run already wrote (config, loss log, samples),
so it can also be rebuilt for any output folder with `write_report(output_dir)`.
"""

from __future__ import annotations

import json
from pathlib import Path

from .run_layout import RunLayout


def _loss_summary(losses: list[dict]) -> str:
    if not losses:
        return "no steps were logged"
    values = [r["loss"] for r in losses]
    window = max(1, len(values) // 10)
    first = sum(values[:window]) / window
    last = sum(values[-window:]) / window
    return (f"{len(values)} steps; mean loss {first:.4f} over the first {window} step(s), "
            f"{last:.4f} over the last {window} (change {100 * (last - first) / first:+.1f}%)")


def family_of(cfg: dict, facts: dict | None = None):
    """The Family class of a run (from the facts the run passed, else its config)."""
    from .families.registry import get_family, resolve_family

    name = (facts or {}).get("family") or cfg["model"].get("family") or "auto"
    if name != "auto":
        return get_family(name)
    return resolve_family(cfg["model"]["path"], "auto", cfg["model"].get("revision"))


def usage(output_dir: str | Path):
    """The family's `Usage` (generate command, Python script) for a finished run's output folder."""
    import yaml

    layout = RunLayout(output_dir)
    cfg = yaml.safe_load(layout.config.read_text())
    return family_of(cfg).usage(layout.root, cfg)


def write_report(output_dir: str | Path, facts: dict | None = None) -> Path:
    """Write ``report.md`` in `output_dir`; `facts` adds figures only the run knew (timings, counts)."""
    import yaml

    layout = RunLayout(output_dir)
    out = layout.root
    cfg = yaml.safe_load(layout.config.read_text())
    losses_path = layout.loss_log
    losses = [json.loads(line) for line in losses_path.read_text().splitlines() if line.strip()] if losses_path.exists() else []
    facts = facts or {}
    model, method = cfg["model"], cfg["method"]
    family = family_of(cfg, facts)
    lines = [f"# difftune run: {out.name}", ""]
    lines += [f"- model: `{model['path']}` (family `{family.name}`)",
              f"- method: {facts.get('method', method['kind'])}"]
    if method.get("init_lora"):
        lines.append(f"- started from LoRA: `{method['init_lora']}`")
    lines.append(f"- training: {_loss_summary(losses)}")
    timed = [r["seconds"] for r in losses if "seconds" in r]
    if timed:  # per-step durations in the log: they cover every resumed part of the run
        facts = {**facts, "total_seconds": sum(timed), "seconds_per_step": sum(timed) / len(timed)}
    for key, label in (("images", "training images"), ("trainable_parameters", "trainable parameters"),
                       ("seconds_per_step", "seconds per step"), ("total_seconds", "training time, all sessions (s)")):
        if key in facts:
            value = facts[key]
            lines.append(f"- {label}: {value:,}" if isinstance(value, int) else f"- {label}: {value:.3f}")
    usage = family.usage(out, cfg)
    lines += ["", "## Use it", "", "```bash", usage.command, "```", "", "In Python:", "", "```python",
              usage.python.rstrip("\n"), "```"]
    samples = sorted(layout.samples.glob("step-*/*.png")) if layout.samples.exists() else []
    if samples:
        lines += ["", "## Samples", ""]
        for path in samples:
            lines.append(f"![{path.parent.name}/{path.name}]({path.relative_to(out).as_posix()})")
    lines += ["", "Logs: `tensorboard --logdir " + str(layout.logs) + "`; per-step numbers in `" + str(layout.loss_log.relative_to(out)) + "`.", ""]
    report = layout.report
    report.write_text("\n".join(lines), encoding="utf-8")
    return report

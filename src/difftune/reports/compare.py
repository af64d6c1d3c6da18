"""`difftune compare`: one self-contained page comparing runs (or whole sweeps).

It shows the config keys whose values differ as a table, the loss and validation-loss curves
overlaid, the final numbers and ``eval.json`` scores with the best of each column marked, and the
sample grids side by side: for each prompt one table, a row per run and a column per step, the same
prompt and seed in every cell (step 0 is each run's base model). Runs of different families compare
too (their family is one of the differing keys). A folder without training logs is named and skipped.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Callable

from .. import DifftuneError
from .html import data_uri, esc, fmt, image_uri, img, page, table
from .plots import loss_plot, validation_plot
from .run import NotARun, Run, load_run, smooth
from .run_page import scores_table

EXAMPLES = """examples:
  difftune compare runs/rank-4 runs/rank-16 --out runs/rank-compare
  difftune compare runs/sweep-rank-lr --out runs/sweep-rank-lr/compare     # a sweep folder: all its runs
  difftune compare runs/lora runs/full runs/other-sweep --out compare/

Writes OUT/compare.html (one file, pictures inlined). Folders without training logs are named and skipped.
"""

#: config keys that always differ between runs and say nothing about the setting
IGNORED_KEYS = ("output_dir",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN_OR_SWEEP", help="run folders or sweep folders (with sweep.json)")
    parser.add_argument("--out", required=True, help="folder for compare.html")


def expand(paths: list[str | Path], log: Callable[[str], None]) -> list[Path]:
    """Run folders from the arguments: a sweep folder stands for the runs its ``sweep.json`` names."""
    folders: list[Path] = []
    for p in map(Path, paths):
        sweep = p / "sweep.json"
        if sweep.is_file():
            try:
                names = [r["dir"] for r in json.loads(sweep.read_text(encoding="utf-8"))["runs"]]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DifftuneError(f"{sweep}: not a sweep file difftune wrote") from None
            folders += [Path(d) if Path(d).is_absolute() else p / d for d in names]
        elif p.is_dir():
            folders.append(p)
        else:
            log(f"skipping {p}: no such folder")
    return list(dict.fromkeys(folders))


def _flatten(data: object, prefix: str = "") -> dict[str, object]:
    if isinstance(data, dict):
        out: dict[str, object] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(data, list) and data and all(isinstance(v, dict) for v in data):
        out = {}
        for i, v in enumerate(data):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: data}


def differing_keys(runs: list[Run]) -> list[str]:
    """Config keys (and the detected family) whose values are not the same in every run."""
    flat = [dict(_flatten(r.config), family=r.family) for r in runs]
    keys = sorted(set().union(*flat), key=lambda k: (k != "family", k))
    return [k for k in keys if k not in IGNORED_KEYS and len({json.dumps(f.get(k, "(absent)"), sort_keys=True, default=str)
                                                                for f in flat}) > 1]


def _numbers(runs: list[Run]) -> str:
    """Final smoothed loss and validation loss per run, the lowest marked."""
    cols = {"final loss (smoothed)": lambda r: smooth([x["loss"] for x in r.losses])[-1],
            "final validation loss": lambda r: r.validation[-1]["val_loss"] if r.validation else None,
            "validation loss change from step 0": lambda r: (r.validation[-1]["val_loss"] - r.validation[0]["val_loss"])
            if len(r.validation) > 1 else None}
    values = {name: [f(r) for r in runs] for name, f in cols.items()}
    values = {k: v for k, v in values.items() if any(x is not None for x in v)}
    rows = []
    for i, run in enumerate(runs):
        row = [esc(run.name), (f"{run.steps_done} / {run.steps_planned}", "num")]
        for name, column in values.items():
            x = column[i]
            best = len(runs) > 1 and x is not None and x == min(v for v in column if v is not None)
            row.append(("" if x is None else f"{x:.4g}" + (" ★" if best else ""), "num best" if best else "num"))
        row.append((f"{sum(s.seconds for s in run.sessions):.1f}", "num"))
        rows.append(row)
    return table(["run", "steps"] + list(values) + ["training seconds"], rows)


def _samples(runs: list[Run]) -> str:
    prompts = list(dict.fromkeys(p for r in runs for p in r.sample_prompts()))
    if not prompts:
        return '<p class="muted">No run has samples (validation.prompts).</p>'
    steps = sorted(set().union(*(r.sample_steps() for r in runs)))
    parts = []
    for prompt in prompts:
        rows = []
        for run in runs:
            cells = [(esc(run.name), "prompt")]
            for step in steps:
                sample = run.sample(step, prompt)
                uri = image_uri(sample.path) if sample else None
                cells.append(img(uri, f"{run.name}: {prompt}, step {step}") if uri else '<span class="muted">-</span>')
            rows.append(cells)
        parts.append(f"<h3>{esc(prompt)}</h3>" + table(["run"] + [f"step {s}" + (" (base)" if s == 0 else "") for s in steps],
                                                       rows, "grid"))
    return "\n".join(parts)


def render_compare(runs: list[Run], skipped: list[str]) -> str:
    keys = differing_keys(runs)
    flat = [dict(_flatten(r.config), family=r.family) for r in runs]
    body = [f"<h1>difftune comparison of {len(runs)} run(s)</h1>"]
    if skipped:
        body.append("<p class=\"muted\">Skipped: " + "; ".join(esc(s) for s in skipped) + "</p>")
    body.append("<h2>What differs</h2>")
    if keys:
        body.append(table(["run"] + keys, [[esc(r.name)] + [esc(fmt(f.get(k, "(absent)"))) for k in keys]
                                          for r, f in zip(runs, flat)]))
    else:
        body.append("<p>The runs' configs are the same (apart from output_dir).</p>")
    families = {r.family for r in runs}
    if len(families) > 1:
        body.append(f"<p>These runs are of different families ({esc(', '.join(sorted(families)))}): their losses "
                    "are on different scales, compare their samples and scores rather than their curves.</p>")
    body += ["<h2>Numbers</h2>", _numbers(runs)]
    scores = scores_table(runs)
    if scores:
        body += ["<h2>Scores (eval.json)</h2>", scores]
    body += ["<h2>Curves</h2>", '<div class="plots">',
             img(data_uri(loss_plot(runs, "training loss (smoothed)"), "image/svg+xml"), "training loss of every run")]
    val = validation_plot(runs)
    if val:
        body.append(img(data_uri(val, "image/svg+xml"), "validation loss of every run"))
    body += ["</div>", "<h2>Samples</h2>",
             '<p class="muted">Each prompt with the same seed in every run and at every step; step 0 is the base model.</p>',
             _samples(runs)]
    body.append("<h2>Runs</h2>" + table(["run", "folder", "family"],
                                        [[esc(r.name), f"<code>{esc(r.folder.resolve())}</code>", esc(r.family)] for r in runs]))
    return page("difftune comparison", body)


def write_compare(paths: list[str | Path], out: str | Path, log: Callable[[str], None] = print) -> Path:
    """Write ``OUT/compare.html`` for the runs among `paths`; folders without logs are named and skipped."""
    runs, skipped = [], []
    for folder in expand(paths, log):
        try:
            runs.append(load_run(folder))
        except NotARun as e:
            log(f"skipping {e}")
            skipped.append(str(e))
    if not runs:
        raise DifftuneError("nothing to compare: none of the folders holds a run with training logs")
    names = [r.name for r in runs]
    if len(set(names)) < len(names):  # runs of different sweeps may share a name: add the parent folder
        for r in runs:
            r.label = f"{r.folder.parent.name}/{r.folder.name}"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "compare.html"
    tmp = path.with_name(".compare.html.tmp")
    tmp.write_text(render_compare(runs, skipped), encoding="utf-8")
    os.replace(tmp, path)
    return path


def run(args: argparse.Namespace) -> int:
    path = write_compare(args.runs, args.out)
    print(f"comparison written to {path}")
    return 0

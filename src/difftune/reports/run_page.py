"""``OUTPUT_DIR/report.html``: one self-contained page per run.

Written when training ends and refreshed at every checkpoint (a run stopped half-way on a spot
machine still has a current one); `write_run_report(folder)` rebuilds it for any run folder. It
shows the resolved config, the data (counts, thumbnails, captions), loss (raw and smoothed),
learning rate, gradient norm, validation loss, the sample grid (rows: prompts; columns: steps,
step 0 being the base model), ``eval.json`` scores if present, timing across resumes, and how to
use the outputs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from . import logs
from .html import data_uri, esc, fmt, image_uri, img, markdown_block, page, table
from .plots import loss_plot, scalar_plot, validation_plot
from .run import Run, flat_scores, load_run, lower_is_better, smooth

#: at most this many thumbnails per concept in the data section
THUMBNAILS = 16


def write_run_facts(out: str | Path, family: str, trainable_parameters: int, data: Any, val_loss: Any) -> Path:
    """``logs/run.json``: what only the training process knows (family, parameter count, the items
    it trains on with their prompts, the validation images)."""
    from ..data.dataset import prompt_for

    def item_rows(items, concepts, prompts=None):
        return [{"path": it.path, "concept": it.concept,
                 "prompt": prompts[i] if prompts else prompt_for(it, concepts[it.concept])} for i, it in enumerate(items)]

    facts = {
        "family": family,
        "trainable_parameters": trainable_parameters,
        "items": item_rows(data.items, data.concepts),
        "validation_items": item_rows(val_loss.data.items, None, val_loss.prompts) if val_loss is not None else [],
    }
    path = Path(out) / logs.RUN
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(facts, indent=1), encoding="utf-8")
    return path


def _plot(svg: bytes | None, alt: str) -> str:
    return img(data_uri(svg, "image/svg+xml"), alt) if svg else ""


def sample_grid(run: Run, steps: list[int] | None = None) -> str:
    """Rows: prompt (written beside its row) x image index; columns: training steps."""
    steps = steps if steps is not None else run.sample_steps()
    indices = sorted({s.index for s in run.samples})
    rows = []
    for prompt in run.sample_prompts():
        for index in indices:
            cells = [(esc(prompt) + (f' <span class="muted">#{index}</span>' if len(indices) > 1 else ""), "prompt")]
            for step in steps:
                sample = run.sample(step, prompt, index)
                uri = image_uri(sample.path) if sample else None
                cells.append(img(uri, f"{prompt}, step {step}") if uri else '<span class="muted">-</span>')
            rows.append(cells)
    header = ["prompt"] + [f"step {s}" + (" (base)" if s == 0 else "") for s in steps]
    return table(header, rows, "grid")


def _summary(run: Run) -> str:
    c = run.config
    method = c.get("method", {})
    losses = [r["loss"] for r in run.losses]
    rows = [
        ["model", f"<code>{esc(c.get('model', {}).get('path', '?'))}</code> (family {esc(run.family)})"],
        ["method", esc(method.get("kind", "?")) + (f", rank {method.get('rank')}, alpha {method.get('alpha') or method.get('rank')}"
                                                   if method.get("kind") == "lora" else "")],
        ["steps", f"{run.steps_done} of {run.steps_planned}" + ("" if run.finished else " (not finished)")],
        ["learning rate", fmt(c.get("train", {}).get("lr"))],
    ]
    if "trainable_parameters" in run.facts:
        rows.append(["trainable parameters", fmt(run.facts["trainable_parameters"])])
    if losses:
        rows.append(["loss (smoothed), first / last", f"{smooth(losses)[0]:.4g} / {smooth(losses)[-1]:.4g}"])
    if run.validation:
        rows.append(["validation loss, step 0 / last",
                     f"{run.validation[0]['val_loss']:.4g} / {run.validation[-1]['val_loss']:.4g} "
                     f"(step {run.validation[-1]['step']})"])
    total = sum(s.seconds for s in run.sessions)
    if run.sessions:
        rows.append(["training time", f"{total:.1f} s in {len(run.sessions)} session(s)"])
    return table(["", ""], rows)


def _timing(run: Run) -> str:
    if not run.sessions:
        return '<p class="muted">no timing log (logs/sessions.jsonl)</p>'
    from datetime import datetime, timezone

    rows = []
    for s in run.sessions:
        started = datetime.fromtimestamp(s.started, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        how = "started" if s.first == 0 else f"resumed at step {s.first}"
        rows.append([str(s.number), esc(started), how, f"{s.first} - {s.last}", (f"{s.seconds:.1f}", "num"),
                     (f"{s.seconds_per_step:.3f}" if s.seconds_per_step else "-", "num")])
    total = sum(s.seconds for s in run.sessions)
    steps = sum(s.steps for s in run.sessions)
    note = (f"<p>{total:.1f} s over {steps} trained step(s) in all sessions"
            + (f", {total / steps:.3f} s/step (checkpoints and samples included)" if steps else "")
            + (". Steps after the last checkpoint of an interrupted session were trained again." if len(run.sessions) > 1 else ".")
            + "</p>")
    return table(["session", "started", "how", "steps", "seconds", "s/step"], rows) + note


def scores_table(runs: list[Run]) -> str:
    """eval.json scores, one row per run, the best of each column marked."""
    flat = {run.name: flat_scores(run.scores) for run in runs if run.scores is not None}
    if not flat:
        return ""
    names = sorted({k for scores in flat.values() for k in scores})
    best = {}
    for name in names:
        values = [scores[name] for scores in flat.values() if name in scores]
        scores_doc = next((r.scores for r in runs if r.scores is not None), None)
        best[name] = (min if lower_is_better(name, scores_doc) else max)(values)
    rows = []
    for run_name, scores in flat.items():
        row = [esc(run_name)]
        for name in names:
            if name in scores:
                mark = len(flat) > 1 and scores[name] == best[name]
                row.append((f"{scores[name]:.4g}" + (" ★" if mark else ""), "num best" if mark else "num"))
            else:
                row.append("")
        rows.append(row)
    arrows = [f"{n} ({'lower' if lower_is_better(n, next((r.scores for r in runs if r.scores), None)) else 'higher'} is better)"
              for n in names]
    return table(["run"] + arrows, rows)


def _data(run: Run) -> str:
    items = run.facts.get("items") or []
    concepts = run.config.get("data", {}).get("concepts") or []
    parts = []
    rows = []
    for i, concept in enumerate(concepts):
        count = sum(1 for it in items if it.get("concept") == i)
        rows.append([str(i), f"<code>{esc(concept.get('dir') or concept.get('hf'))}</code>",
                     (fmt(count) if items else "?", "num"), (fmt(concept.get("repeats", 1)), "num"),
                     esc(concept.get("prompt", ""))])
    parts.append(table(["concept", "source", "images", "repeats", "fallback prompt"], rows))
    val = run.facts.get("validation_items") or []
    v = run.config.get("validation", {})
    if val:
        where = f"the folder <code>{esc(v.get('images'))}</code>" if v.get("images") else \
            f"{v.get('holdout')} of the training images, held out"
        parts.append(f"<p>Validation loss on {len(val)} image(s) from {where}, {v.get('loss_draws')} fixed noise draw(s) each.</p>")
    for title, rows_ in (("training images", items), ("validation images", val)):
        if not rows_:
            continue
        figures = []
        for concept in sorted({it.get("concept", 0) for it in rows_}):
            chosen = [it for it in rows_ if it.get("concept", 0) == concept][:THUMBNAILS]
            for it in chosen:
                uri = image_uri(it["path"], 140)
                if uri:
                    figures.append(f"<figure>{img(uri, it['prompt'])}<figcaption>{esc(it['prompt'])}</figcaption></figure>")
        more = len(rows_) - len(figures)
        parts.append(f"<h3>{title}</h3><div class=\"thumbs\">{''.join(figures)}</div>"
                     + (f'<p class="muted">{more} more not shown (or no longer on disk)</p>' if more > 0 else ""))
    return "\n".join(parts)


def _usage(run: Run) -> str:
    """report.md's "Use it" section (written by the run for its family) once the run has finished;
    how to continue it before."""
    if not run.finished:
        return (f"<p>This run is not finished ({run.steps_done} of {run.steps_planned} steps). Run the same "
                f"command again to continue from its newest checkpoint:</p><pre>difftune train {esc(run.folder / 'config.yaml')}</pre>")
    md = run.folder / "report.md"
    if md.is_file():
        text = md.read_text(encoding="utf-8")
        start = text.find("## Use it")
        if start >= 0:
            body = text[start:].split("\n", 1)[1]
            end = body.find("\n## ")
            return markdown_block(body if end < 0 else body[:end])
    return "<p>See report.md in the run folder.</p>"


def render_run(run: Run) -> str:
    import yaml

    status = "finished" if run.finished else f"in progress or stopped at step {run.steps_done} of {run.steps_planned}"
    body = [f"<h1>difftune run: {esc(run.name)}</h1>", f'<p class="muted">{esc(run.folder.resolve())} - {status}</p>',
            _summary(run), "<h2>Curves</h2>", '<div class="plots">',
            _plot(loss_plot([run]), "training loss, raw and smoothed"),
            _plot(validation_plot([run]), "validation loss"),
            _plot(scalar_plot(run, "lr", "learning rate"), "learning rate"),
            _plot(scalar_plot(run, "grad_norm", "gradient norm (before clipping)", log_scale=True), "gradient norm"),
            "</div>"]
    if not run.validation:
        body.append('<p class="muted">No validation loss: set <code>validation.images</code> or '
                    '<code>validation.holdout</code>.</p>')
    body.append("<h2>Samples</h2>")
    if run.samples:
        body.append('<p class="muted">Same prompts and seed at every step; step 0 is the base model before training.</p>')
        body.append(sample_grid(run))
    else:
        body.append('<p class="muted">No samples: set <code>validation.prompts</code>.</p>')
    if run.scores is not None:
        body += ["<h2>Scores (eval.json)</h2>", scores_table([run])]
    body += ["<h2>Timing</h2>", _timing(run), "<h2>Data</h2>", _data(run), "<h2>How to use the outputs</h2>", _usage(run),
             "<h2>Resolved config</h2>",
             f"<pre>{esc(yaml.safe_dump(run.config, sort_keys=False, allow_unicode=True))}</pre>",
             f'<p class="muted">Per-step numbers: <code>logs/loss.jsonl</code>, <code>logs/validation.jsonl</code>; '
             f'tensorboard: <code>tensorboard --logdir {esc(run.folder / "logs")}</code>.</p>']
    return page(f"difftune run {run.name}", body)


def refresh_run_report(folder: str | Path, log=print) -> Path | None:
    """`write_run_report` for the training loop: a report that cannot be drawn is said in one line and
    never stops the training it describes."""
    try:
        return write_run_report(folder)
    except Exception as e:  # noqa: BLE001 - the run matters more than its page
        log(f"warning: report.html not written ({type(e).__name__}: {e})")
        return None


def write_run_report(folder: str | Path) -> Path:
    """(Re)write ``report.html`` in a run folder, atomically; returns its path."""
    run = load_run(folder)
    path = run.folder / "report.html"
    tmp = path.with_name(".report.html.tmp")
    tmp.write_text(render_run(run), encoding="utf-8")
    os.replace(tmp, path)
    return path


EXAMPLES = """examples:
  difftune report runs/dog-lora                 # rewrite runs/dog-lora/report.html from its files
  difftune report runs/sweep/*/                 # several at once

Training writes report.html itself (at every checkpoint and at the end); this rebuilds it, e.g. after
`difftune eval` added eval.json or for a run copied from another machine.
"""


def add_arguments(parser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders")


def run(args) -> int:
    for folder in args.runs:
        print(f"{write_run_report(folder)}")
    return 0

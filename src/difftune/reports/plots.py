"""Plots as SVG, drawn by matplotlib (Agg-free: the SVG backend, no display needed)."""

from __future__ import annotations

import io

from .run import Run, smooth


def _figure(title: str, ylabel: str, width: float = 5.6, height: float = 3.2):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step", fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _svg(fig) -> bytes:
    import matplotlib

    matplotlib.rcParams["svg.hashsalt"] = "difftune"  # the same plot gives the same bytes
    buffer = io.BytesIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None})
    return buffer.getvalue()


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], float(r[key])) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def loss_plot(runs: list[Run], title: str = "training loss") -> bytes:
    """Raw loss (faint) and its smoothed curve per run, and validation loss as markers."""
    fig, ax = _figure(title, "loss")
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for run, colour in zip(runs, colours):
        steps, values = _series(run.losses, "loss")
        label = run.name if len(runs) > 1 else "smoothed"
        if len(runs) == 1:
            ax.plot(steps, values, color=colour, alpha=0.3, linewidth=0.8, label="raw")
        ax.plot(steps, smooth(values), color=colour, linewidth=1.6, label=label)
    ax.legend(fontsize=7)
    return _svg(fig)


def validation_plot(runs: list[Run]) -> bytes | None:
    """Validation loss over steps (step 0 = the base model); None if no run logged any."""
    if not any(run.validation for run in runs):
        return None
    fig, ax = _figure("validation loss", "loss (fixed timesteps and noise)")
    for i, run in enumerate(runs):
        steps, values = _series(run.validation, "val_loss")
        if steps:
            ax.plot(steps, values, marker="o", markersize=3, color=f"C{i % 10}", label=run.name)
    ax.legend(fontsize=7)
    return _svg(fig)


def scalar_plot(run: Run, key: str, title: str, log_scale: bool = False) -> bytes | None:
    steps, values = _series(run.losses, key)
    if not steps:
        return None
    fig, ax = _figure(title, key)
    ax.plot(steps, values, color="C0", linewidth=1.2)
    if log_scale and min(values) > 0:
        ax.set_yscale("log")
    return _svg(fig)

"""`difftune sweep`: run a planned sweep one run at a time, each in its own process.

Each run is ``difftune train CONFIG OVERRIDES... GRID... output_dir=OUT/NAME`` in a child process (a
crash or a memory leak in one run cannot take the others down, and the accelerator's memory is
handed back between runs). ``OUT/sweep.json`` names the runs and their state; it is rewritten
atomically after each run. A rerun of the same command skips the finished runs and lets the
interrupted one resume from its newest checkpoint (train's own resume), so a sweep survives a
killed machine. SIGTERM / SIGINT are passed to the running child, which saves a checkpoint; the
sweep then stops with exit code 75, like `difftune train`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from .. import DifftuneError
from .spec import parse_grid, plan

EXAMPLES = """examples:
  difftune sweep configs/sweeps/seed001-rank-lr.yaml --grid method.rank=4,16 --grid train.lr=1e-4,5e-4
  difftune sweep my.yaml --grid method.kind=lora,full --grid train.lr=1e-4,1e-5 --zip --out runs/lora-vs-full
  difftune sweep my.yaml --grid method.rank=4,8,16 --dry-run      # list the runs, train nothing
  difftune sweep my.yaml --grid method.rank=4,8 train.steps=200    # overrides after the config apply to every run

Every combination of the --grid values is a run (--zip: the first values together, then the second...).
Runs land in OUT/NAME (default OUT: the config's output_dir) with OUT/sweep.json naming them; rerun the
same command after a kill: finished runs are skipped, the interrupted one resumes. At the end
OUT/compare/compare.html compares the runs (see `difftune compare`).
"""

SWEEP_FILE = "sweep.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config every run starts from")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="overrides for every run")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                        help="a config key and its values (repeatable)")
    parser.add_argument("--zip", action="store_true", help="pair the values of the --grid keys instead of crossing them")
    parser.add_argument("--out", help="sweep folder (default: the config's output_dir)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and their state; train nothing")


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
    os.replace(tmp, path)


def _finished(run_dir: Path, steps: int) -> bool:
    from ..reports.run import NotARun, has_weights, load_run

    try:
        return has_weights(run_dir) and load_run(run_dir).steps_done >= steps
    except NotARun:
        return False


def _train(config: Path, overrides: list[str]) -> int:
    """One run in a child process; SIGTERM / SIGINT go on to it, and we wait for its checkpoint."""
    child = subprocess.Popen([sys.executable, "-m", "difftune", "train", str(config), *overrides])

    def forward(signum, frame):
        child.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return child.wait()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def run(args: argparse.Namespace) -> int:
    from ..config import load_config

    config = Path(args.config).resolve()
    base = load_config(config, args.overrides)  # the config and the shared overrides, checked first
    root = Path(args.out or base.output_dir or "")
    if not str(root) or str(root) == ".":
        raise DifftuneError("give --out DIR or an output_dir in the config: the sweep's runs go under it")
    root = root.resolve()
    axes = parse_grid(args.grid)
    runs = plan(config, list(args.overrides), axes, args.zip, root)

    state_path = root / SWEEP_FILE
    previous = {}
    if state_path.is_file():
        try:
            previous = {r["name"]: r for r in json.loads(state_path.read_text(encoding="utf-8")).get("runs", [])}
        except (json.JSONDecodeError, AttributeError, KeyError, TypeError):
            previous = {}
    rows = []
    for r in runs:
        row = r.as_dict(root)
        row["status"] = "done" if _finished(root / r.name, r.steps) else ("interrupted" if (root / r.name).exists() else "pending")
        if previous.get(r.name, {}).get("status") == "failed" and row["status"] != "done":
            row["status"] = "failed"
        rows.append(row)
    sweep = {"config": str(config), "overrides": list(args.overrides), "zip": args.zip,
             "grid": {a.key: a.values for a in axes}, "runs": rows}

    if args.dry_run:
        print(f"sweep of {len(rows)} run(s) in {root}:")
        for row in rows:
            print(f"  {row['name']:<32} {row['status']:<12} {' '.join(row['overrides'])}")
        return 0

    root.mkdir(parents=True, exist_ok=True)
    _write_json(state_path, sweep)
    failed = []
    for n, row in enumerate(rows, 1):
        if row["status"] == "done":
            print(f"[{n}/{len(rows)}] {row['name']}: finished before, skipped", flush=True)
            continue
        verb = "resuming" if row["status"] == "interrupted" else "training"
        print(f"[{n}/{len(rows)}] {verb} {row['name']} ({' '.join(row['overrides'])})", flush=True)
        row["status"] = "running"
        _write_json(state_path, sweep)
        code = _train(config, [*args.overrides, *row["overrides"], f"output_dir={row['dir']}"])
        if code == 0:
            row["status"] = "done"
        elif code == 75:  # the child saved a checkpoint after a signal: stop here, resume on the next call
            row["status"] = "interrupted"
            _write_json(state_path, sweep)
            raise _Interrupted(f"stopped during {row['name']}; run the same command again to resume")
        else:
            row["status"] = "failed"
            failed.append(row["name"])
        _write_json(state_path, sweep)
    done = [Path(r["dir"]) for r in rows if r["status"] == "done"]
    if done:
        from ..reports.compare import write_compare

        page = write_compare(done, root / "compare", log=print)
        print(f"comparison of {len(done)} run(s): {page}")
    if failed:
        raise DifftuneError(f"{len(failed)} run(s) failed: {', '.join(failed)} (their errors are above; rerun to retry)")
    return 0


class _Interrupted(DifftuneError):
    exit_code = 75

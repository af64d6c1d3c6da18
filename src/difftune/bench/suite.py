"""`difftune bench --suite gpu --out DIR`: every GPU figure the goals of difftune name, in one command.

Each case runs in its own process (``difftune bench ...`` or a peer run of `peers`), so a CUDA
error in one (an illegal memory access poisons the whole CUDA context) costs that case only. The
suite has a time budget (``--budget``, default 540 s, inside a 10-minute lease of one H100): each
case gets what is left of it as its timeout, and cases not started in time are recorded as
skipped. Everything lands in DIR: ``results.jsonl`` (one object per case: its status, goal, whether
the goal was met, and the bench rows with every field), ``results.md`` (the table for BENCHMARKS.md)
and ``logs/CASE.log`` (each case's output).

``--tiny`` runs the same cases on the tiny models at 64 px with a few steps: what a CPU can do in
a minute or two, to prove the suite itself (every case produces its row), not to measure.

``--peer-scripts DIR`` (a folder holding diffusers' ``train_dreambooth_lora_flux.py`` and
``train_text_to_image_lora.py``) adds the peer rows: the same FLUX and SD runs through those
scripts, and their s/step against difftune's (`peers`). Without it the peer rows say so.

``--suite peers`` is the CPU comparison of BENCHMARKS.md: difftune against the peer scripts on one
preset (default ``small``), both whole processes, taking turns ``--rounds`` times.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .. import DifftuneError

FLUX = ["--family", "flux", "--preset", "real", "--resolution", "1024", "--precision", "bf16", "--rank", "16"]
SD = ["--family", "sd", "--preset", "real", "--resolution", "512", "--precision", "bf16", "--rank", "16"]
CKPT = "train.gradient_checkpointing=true"
FP8 = "speed.base_weights=fp8"


@dataclass
class SuiteCase:
    """One row of the suite: a `difftune bench` command line (``bench``) or a peer run (``peer``)."""

    name: str
    goal: str
    bench: list[str] = field(default_factory=list)
    peer: dict[str, Any] | None = None  # family, batch, against (the case whose s/step is difftune's)
    check: Callable[[dict, dict], bool | None] = lambda row, results: None  # goal met?
    figure: Callable[[dict], str] = lambda row: ""  # the figure the goal is about


def _best(rows: list[dict], key: str) -> dict:
    return max(rows, key=lambda r: r.get(key) or 0)


def _steps_gb(row: dict) -> float:
    return row.get("steps_peak_mem_gb") or row.get("peak_mem_gb") or 0.0


def _sps(row: dict) -> str:
    return f"{row['sec_per_step']:.3f} s/step"


def gpu_cases() -> list[SuiteCase]:
    """The GPU suite, most important first (a budget that runs out skips the last ones)."""
    train = ["--steps", "8", "--warmup", "2"]
    return [
        SuiteCase("flux-lora", "<= 0.30 s/step", FLUX + train,
                  check=lambda r, _: r["sec_per_step"] <= 0.30, figure=_sps),
        SuiteCase("flux-lora-ckpt", "<= 0.40 s/step, <= 40 GB", FLUX + train + [CKPT],
                  check=lambda r, _: r["sec_per_step"] <= 0.40 and _steps_gb(r) <= 40,
                  figure=lambda r: f"{_sps(r)}, {_steps_gb(r):.1f} GB"),
        SuiteCase("flux-lora-fp8", "<= 24 GB (steps)", FLUX + train + [CKPT, FP8],
                  check=lambda r, _: _steps_gb(r) <= 24, figure=lambda r: f"{_steps_gb(r):.1f} GB, {_sps(r)}"),
        SuiteCase("flux-gen", "<= 4.3 s/image", FLUX + ["--mode", "generate", "--gen-steps", "28", "--steps", "2",
                                                        "--warmup", "1"],
                  check=lambda r, _: r["sec_per_step"] <= 4.3, figure=lambda r: f"{r['sec_per_step']:.2f} s/image"),
        SuiteCase("sd-lora", ">= 100 img/s (best batch)", SD + ["--batch", "32,48", "--steps", "8", "--warmup", "2"],
                  check=lambda r, _: r["images_per_s"] >= 100,
                  figure=lambda r: f"{r['images_per_s']:.1f} img/s at batch {r['batch']}"),
        SuiteCase("flux-lora-swap", "< 16 GB, <= 1.5x flux-lora-fp8's s/step",
                  FLUX + train + [CKPT, FP8, "speed.block_swap=30"],
                  check=lambda r, res: _steps_gb(r) < 16 and _ratio_ok(r, res.get("flux-lora-fp8"), 1.5),
                  figure=lambda r: f"{_steps_gb(r):.1f} GB, {_sps(r)}"),
        SuiteCase("flux-lora-compile", "<= 0.30 s/step", FLUX + train + ["speed.compile=regional"],
                  check=lambda r, _: r["sec_per_step"] <= 0.30, figure=_sps),
        SuiteCase("peer-sd", ">= 2x the peer's s/step",
                  peer={"family": "sd", "preset": "real", "resolution": 512, "batch": 32, "steps": 6,
                        "precision": "bf16", "against": "sd-lora"},
                  check=lambda r, _: r.get("peer_ratio", 0) >= 2, figure=_peer_figure),
        SuiteCase("peer-flux", ">= 2x the peer's s/step",
                  peer={"family": "flux", "preset": "real", "resolution": 1024, "batch": 1, "steps": 6,
                        "precision": "bf16", "against": "flux-lora"},
                  check=lambda r, _: r.get("peer_ratio", 0) >= 2, figure=_peer_figure),
    ]


def _ratio_ok(row: dict, base: dict | None, limit: float) -> bool | None:
    if not base or base.get("status") != "ok":
        return None
    return row["sec_per_step"] <= limit * base["row"]["sec_per_step"]


def _peer_figure(row: dict) -> str:
    ratio = row.get("peer_ratio")
    return f"peer {_sps(row)}" + (f", difftune {ratio:.2f}x faster" if ratio else "")


def tiny_case(case: SuiteCase) -> SuiteCase:
    """The same case on the tiny models, CPU-sized: 64 px, batch <= 2, 2 timed steps, 2 denoising steps."""
    args, out, skip = [], [], False
    replace = {"--preset": "tiny", "--resolution": "64", "--precision": "no", "--steps": "2", "--warmup": "1",
               "--gen-steps": "2", "--batch": "1,2"}
    for a in case.bench:
        if skip:
            out.append(replace[args[-1]])
            skip = False
        else:
            out.append(a)
            skip = a in replace
        args.append(a)
    # regional compile on a CPU takes half a minute to warm up: the tiny suite proves the row, not the speed
    out = [a for a in out if a != "speed.compile=regional"] + (
        ["speed.attention_backend=_native_math"] if "speed.compile=regional" in case.bench else [])
    out = [a.replace("speed.block_swap=30", "speed.block_swap=1") for a in out]
    peer = dict(case.peer, preset="tiny", resolution=64, batch=1, steps=5, precision="no") if case.peer else None
    return SuiteCase(case.name, case.goal, out, peer, case.check, case.figure)


# ---- running -----------------------------------------------------------------------------------------------


def _run(cmd: list[str], log: Path, timeout: float) -> tuple[str, int | None]:
    """Run `cmd` in its own process group; kill the group at `timeout`. Returns (status, exit code)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    src = str(Path(__file__).resolve().parents[2])  # the folder holding difftune/
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [os.environ.get("PYTHONPATH")])])
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return "timeout", None
    return ("ok" if rc == 0 else "failed"), rc


def _last_line(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "(no output)"


def run_case(case: SuiteCase, out: Path, timeout: float, peer_scripts: Path | None, results: dict) -> dict:
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{case.name}.log"
    rows_file = out / "rows" / f"{case.name}.jsonl"
    rows_file.parent.mkdir(parents=True, exist_ok=True)
    rows_file.unlink(missing_ok=True)
    result: dict[str, Any] = {"case": case.name, "goal": case.goal}
    if case.peer:
        p = case.peer
        if peer_scripts is None:
            return {**result, "status": "skipped", "reason": "no --peer-scripts folder given", "met": None}
        cmd = [sys.executable, "-m", "difftune.bench.peers", "peer", "--family", p["family"], "--preset", p["preset"],
               "--resolution", str(p["resolution"]), "--batch", str(p["batch"]), "--steps", str(p["steps"]),
               "--precision", p["precision"], "--rank", "16", "--peer-scripts", str(peer_scripts),
               "--work", str(out / "work"), "--json", str(rows_file)]
    else:
        cmd = [sys.executable, "-m", "difftune", "bench", *case.bench, "--json", str(rows_file)]
    result["command"] = " ".join(["python", *cmd[1:]]).replace("python -m difftune bench", "difftune bench", 1)
    t = time.time()
    status, rc = _run(cmd, log, timeout)
    result["wall_s"] = round(time.time() - t, 1)
    rows = [json.loads(ln) for ln in rows_file.read_text().splitlines()] if rows_file.exists() else []
    if status == "ok" and not rows:
        status = "failed"
    result["status"] = status
    if status != "ok":
        result["error"] = f"timed out after {timeout:.0f} s" if status == "timeout" else f"exit {rc}: {_last_line(log)}"
        result["rows"], result["met"] = rows, None
        return result
    row = _best(rows, "images_per_s") if len(rows) > 1 else rows[0]
    if case.peer:
        against = results.get(case.peer["against"])
        if against and against.get("status") == "ok" and against["row"].get("batch") == row["batch"]:
            row["peer_ratio"] = row["sec_per_step"] / against["row"]["sec_per_step"]
        elif against and against.get("status") == "ok":  # the SD sweep's best batch may differ: same batch
            same = [r for r in against["rows"] if r.get("batch") == row["batch"]]
            if same:
                row["peer_ratio"] = row["sec_per_step"] / same[0]["sec_per_step"]
    result["rows"], result["row"] = rows, row
    result["met"] = case.check(row, results)
    result["figure"] = case.figure(row)
    return result


def run_suite(out: Path, tiny: bool = False, budget: float = 540.0, peer_scripts: Path | None = None,
              cases: list[SuiteCase] | None = None, log: Callable[[str], None] = print) -> list[dict]:
    """Run the GPU suite (or its tiny version) into `out`; returns one result per case."""
    out.mkdir(parents=True, exist_ok=True)
    if peer_scripts is not None and not Path(peer_scripts).is_dir():
        raise DifftuneError(f"--peer-scripts {peer_scripts}: not a folder")
    cases = cases or gpu_cases()
    if tiny:
        cases = [tiny_case(c) for c in cases]
    start = time.time()
    results: dict[str, dict] = {}
    (out / "results.jsonl").unlink(missing_ok=True)
    for case in cases:
        left = budget - (time.time() - start)
        if left < 20:
            result = {"case": case.name, "goal": case.goal, "status": "skipped", "met": None,
                      "reason": f"the suite's {budget:.0f} s budget was spent"}
        else:
            log(f"suite: {case.name} ({left:.0f} s of the budget left) ...")
            result = run_case(case, out, left, peer_scripts, results)
        detail = result.get("figure") or result.get("error") or result.get("reason", "")
        log(f"suite: {case.name}: {result['status']} {detail}")
        results[case.name] = result
        with (out / "results.jsonl").open("a") as fh:
            fh.write(json.dumps(result) + "\n")
        (out / "results.md").write_text(markdown(list(results.values()), tiny, time.time() - start))
    return list(results.values())


def markdown(results: list[dict], tiny: bool, elapsed: float) -> str:
    device = next((r["row"].get("device") for r in results if r.get("row", {}).get("device")), "?")
    lines = [f"# difftune GPU suite{' (--tiny: proves the suite, not the speed)' if tiny else ''}", "",
             f"Device: {device}. Date: {time.strftime('%Y-%m-%d %H:%M')}. Suite time: {elapsed:.0f} s.", "",
             "| case | goal | measured | met | s/step | img/s | peak GB (steps) | MFU | status |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        row = r.get("row") or {}
        met = {True: "**met**", False: "not met", None: "-"}[r.get("met")]
        mfu = f"{100 * row['mfu']:.1f}%" if row.get("mfu") is not None else ""
        gb = _steps_gb(row) if row else None
        cells = [r["case"], r["goal"], r.get("figure", ""), met,
                 f"{row['sec_per_step']:.4f}" if row.get("sec_per_step") else "",
                 f"{row['images_per_s']:.2f}" if row.get("images_per_s") else "",
                 f"{gb:.2f}" if gb else (f"{row['cuda_peak_gb'] or row.get('peak_rss_gb', 0):.2f}" if row else ""),
                 mfu, r["status"] + (f": {r.get('error') or r.get('reason')}" if r["status"] != "ok" else "")]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    lines += ["", "Commands (one per case; every field of every row is in results.jsonl):", "", "```"]
    lines += [r["command"] for r in results if r.get("command")]
    lines += ["```", ""]
    return "\n".join(lines)


# ---- the CPU comparison against the peer scripts -------------------------------------------------------------


def run_peer_comparison(out: Path, peer_scripts: Path, preset: str = "small", steps: int = 6, rounds: int = 3,
                        families: tuple[str, ...] = ("flux", "sd"), log: Callable[[str], None] = print) -> list[dict]:
    """difftune against the peer scripts on `preset`, whole processes taking turns; rows into
    ``out/peers.jsonl`` and a table into ``out/peers.md``."""
    from . import peers

    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for family in families:
        row = peers.compare(family, preset, Path(peer_scripts), out / "work", steps, rounds, log=log)
        rows.append(row)
        with (out / "peers.jsonl").open("a") as fh:
            fh.write(json.dumps(row) + "\n")
    lines = ["| model | difftune s/step | peer s/step | per-step ratio (CPU time) | first step: difftune / peer "
             "| peak RSS: difftune / peer |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(
            f"| {r['family']}/{r['preset']} {r['resolution']} px, `{r['peer_script'].rsplit('/', 1)[-1]}` "
            f"| {r['difftune_sec_per_step']:.3f} | {r['peer_sec_per_step']:.3f} "
            f"| **{r['step_ratio']:.2f}x** ({r['step_ratio_cpu']:.2f}x) "
            f"| {r['difftune_first_step_s']:.1f} s / {r['peer_first_step_s']:.1f} s "
            f"| {r['difftune_peak_rss_gb']:.2f} / {r['peer_peak_rss_gb']:.2f} GB |")
    (out / "peers.md").write_text("\n".join(lines) + "\n")
    return rows


def run(args: Any) -> int:
    """`difftune bench --suite ...` (bench.cli.run hands over here)."""
    if args.out is None:
        raise DifftuneError("--suite needs --out DIR (where results.jsonl and results.md go)")
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if args.suite == "gpu":
        results = run_suite(args.out, args.tiny, args.budget, args.peer_scripts, log=say)
        print((args.out / "results.md").read_text())
        return 0 if all(r["status"] in ("ok", "skipped") for r in results) else 1
    if args.peer_scripts is None:
        raise DifftuneError("--suite peers needs --peer-scripts DIR (diffusers' example scripts)")
    run_peer_comparison(args.out, args.peer_scripts, "tiny" if args.tiny else args.preset, args.steps or 6,
                        args.rounds, log=say)
    print((args.out / "peers.md").read_text())
    return 0

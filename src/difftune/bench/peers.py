"""Peer runs: diffusers' own example training scripts, run as they are, on the bench's models.

The peers are the scripts a user would otherwise run: ``examples/dreambooth/train_dreambooth_lora_flux.py``
(FLUX) and ``examples/text_to_image/train_text_to_image_lora.py`` (SD) of the huggingface/diffusers
repository. They are not part of difftune and not installed with it: a folder holding them is given
(``--peer-scripts DIR``); `PEERS` says which file each family uses and how its command line is made.

A peer run:

1. writes a pipeline folder of the case's model (`write_pipeline`: the tiny pipeline with the preset's
   parts swapped in, random weights, saved with ``save_pretrained``) and an image folder;
2. runs the script in a fresh process at the same settings as difftune (resolution, LoRA rank and
   alpha, batch, precision, steps, learning rate, gradient checkpointing; latents cached where the
   script has ``--cache_latents``), under a *probe* (`probe`): a global
   ``torch.optim.Optimizer`` step post-hook that records the wall-clock time of every optimizer step
   (after a CUDA synchronise), and the process's peak RSS and CUDA peak at exit. The script's code is
   untouched; the probe only watches.

``difftune train`` is run under the same probe on the same folders (`run_difftune`), so both sides
are measured the same way: s/step is the median of the intervals between consecutive optimizer
steps after ``warmup`` of them, time to first step is from the moment the process is spawned to the
end of its first optimizer step, peak memory is the process's own.

On a machine without torchvision (PyPI has only CUDA builds of it, which a CPU torch cannot load)
the scripts get the stand-in in ``peer_shims/`` for the image transforms they use; the row says so.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .. import DifftuneError

PROMPT = "a photo of sks dog"


@dataclass(frozen=True)
class Setting:
    """What both sides run with."""

    model: Path
    images: Path
    resolution: int
    rank: int
    batch: int
    precision: str
    steps: int
    gradient_checkpointing: bool = False
    lr: float = 1e-4


def _flux_args(s: Setting, out: Path) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(s.model), "--instance_data_dir", str(s.images / "plain"),
        "--instance_prompt", PROMPT, "--output_dir", str(out), "--resolution", str(s.resolution),
        "--train_batch_size", str(s.batch), "--rank", str(s.rank), "--mixed_precision", s.precision,
        "--max_train_steps", str(s.steps), "--learning_rate", str(s.lr), "--lr_scheduler", "constant",
        "--lr_warmup_steps", "0", "--seed", "0", "--cache_latents", "--center_crop",
        "--checkpointing_steps", "1000000", "--dataloader_num_workers", "0",
        # difftune's LoRA: rank = alpha, the attention projections (the script's default adds the feed-forwards)
        "--lora_alpha", str(s.rank), "--lora_layers", ",".join(f"attn.{m}" for m in FLUX_ATTENTION),
    ] + (["--gradient_checkpointing"] if s.gradient_checkpointing else [])


#: the attention projections difftune's FLUX LoRA targets (families/flux/family.py ATTENTION)
FLUX_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def _sd_args(s: Setting, out: Path) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(s.model), "--train_data_dir", str(s.images / "imagefolder"),
        "--caption_column", "text", "--output_dir", str(out), "--resolution", str(s.resolution),
        "--train_batch_size", str(s.batch), "--rank", str(s.rank), "--mixed_precision", s.precision,
        "--max_train_steps", str(s.steps), "--learning_rate", str(s.lr), "--lr_scheduler", "constant",
        "--lr_warmup_steps", "0", "--seed", "0", "--center_crop",
        "--checkpointing_steps", "1000000", "--dataloader_num_workers", "0",
    ] + (["--gradient_checkpointing"] if s.gradient_checkpointing else [])


@dataclass(frozen=True)
class Peer:
    script: str  # file name in the --peer-scripts folder
    source: str  # where it lives in huggingface/diffusers
    args: Callable[[Setting, Path], list[str]]


#: family -> its peer script
PEERS: dict[str, Peer] = {
    "flux": Peer("train_dreambooth_lora_flux.py", "examples/dreambooth/train_dreambooth_lora_flux.py", _flux_args),
    "sd": Peer("train_text_to_image_lora.py", "examples/text_to_image/train_text_to_image_lora.py", _sd_args),
}


def peer_script(family: str, scripts: Path) -> Path:
    if family not in PEERS:
        raise DifftuneError(f"no peer script for family {family!r}; peers: {', '.join(PEERS)}")
    path = Path(scripts) / PEERS[family].script
    if not path.is_file():
        raise DifftuneError(f"{path}: missing; put diffusers' {PEERS[family].source} there")
    return path


# ---- inputs --------------------------------------------------------------------------------------------


def write_pipeline(family: str, preset: str, work: Path, device: Any = None, precision: str | None = None) -> Path:
    """A diffusers pipeline folder of the bench's `preset` model of `family` (random weights), once."""
    import torch

    from . import cases

    folder = work / f"pipeline-{family}-{preset}"
    if (folder / "model_index.json").exists():
        return folder
    tiny = cases.tiny_model(family, work)
    if preset == "tiny":
        return Path(tiny["model.path"])
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = precision or ("bf16" if device.type == "cuda" else "no")
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    case = cases.Case(family=family, preset=preset, precision=precision)
    presets = cases.family_presets(family)
    cfg = cases.case_config(case, tiny, presets[preset].resolution, precision, work / "unused")
    torch.manual_seed(0)
    fam = cases.build_family(cfg, device, dtype, presets[preset], everything_on_device=True)
    fam.build_pipeline().save_pretrained(str(folder), safe_serialization=True)
    del fam
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return folder


def write_images(work: Path, size: int, batch: int = 1) -> Path:
    """Images in the two layouts the scripts read: a plain folder (DreamBooth: every file is an image)
    and a datasets ``imagefolder`` with ``metadata.jsonl`` captions (text-to-image).

    At least `batch` of them: the scripts' data loaders do not repeat a smaller folder to fill a
    batch (they would train on batches of the folder's size and look faster than they are)."""
    from PIL import Image, ImageDraw

    n = max(4, batch)
    root = work / f"images-{size}-{n}"
    if root.exists():
        return root
    for sub in ("plain", "imagefolder"):
        (root / sub).mkdir(parents=True)
    lines = []
    for i in range(n):
        image = Image.new("RGB", (size, size), (0, 128, 128))
        r = size // 4 + i
        ImageDraw.Draw(image).ellipse((size // 2 - r, size // 2 - r, size // 2 + r, size // 2 + r), fill=(255, 140, 0))
        image.save(root / "plain" / f"img-{i}.png")
        image.save(root / "imagefolder" / f"img-{i}.png")
        lines.append(json.dumps({"file_name": f"img-{i}.png", "text": PROMPT}))
    (root / "imagefolder" / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def difftune_config(s: Setting, out: Path) -> Path:
    """The `difftune train` config of the same run."""
    import yaml

    cfg = {
        "model": {"path": str(s.model)},
        "method": {"kind": "lora", "rank": s.rank, "alpha": s.rank},
        "data": {"resolution": s.resolution, "concepts": [{"dir": str(s.images / "plain"), "prompt": PROMPT}]},
        "train": {"steps": s.steps, "batch_size": s.batch, "lr": s.lr, "lr_scheduler": "constant",
                  "precision": s.precision, "gradient_checkpointing": s.gradient_checkpointing, "seed": 0},
        "checkpoint": {"every": 0},
        "output_dir": str(out),
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# ---- the probe -----------------------------------------------------------------------------------------


def probe(record: Path, argv: list[str]) -> None:
    """Run `argv` (``SCRIPT.py ARGS...`` or ``-m MODULE ARGS...``) in this process as ``__main__``,
    recording the time of every optimizer step and the peak memory into `record` at exit."""
    import atexit
    import resource
    import runpy

    import torch

    steps: list[float] = []
    cpu: list[float] = []

    def after_step(optimizer, args, kwargs) -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        steps.append(time.time())
        cpu.append(time.process_time())

    from torch.optim.optimizer import register_optimizer_step_post_hook

    register_optimizer_step_post_hook(after_step)

    def write() -> None:
        cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        record.write_text(json.dumps({"step_times": steps, "step_cpu": cpu, "peak_rss": rss, "cuda_peak": cuda}))

    atexit.register(write)
    # The same attention kernels on both sides: difftune leaves PyTorch's cuDNN SDPA kernel out on CUDA
    # (speed.py: with it, every FLUX.1 LoRA backward on an H200 failed with an illegal memory access), so
    # the peer's process does too. Nothing else of the script's set-up is touched.
    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(False)
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        sys.path.insert(0, str(Path(argv[0]).parent))
        runpy.run_path(argv[0], run_name="__main__")


def run_probed(argv: list[str], work: Path, name: str, timeout: float | None = None, warmup: int = 2,
               extra_path: list[str] = ()) -> dict:
    """Run `argv` under the probe in a new process; returns s/step, first step, peak memory."""
    record = work / f"{name}.probe.json"
    record.unlink(missing_ok=True)
    log = work / f"{name}.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    src = str(Path(__file__).resolve().parents[2])  # the folder holding difftune/
    env["PYTHONPATH"] = os.pathsep.join([src, *extra_path, *filter(None, [os.environ.get("PYTHONPATH")])])
    t0 = time.time()
    with log.open("w") as fh:
        try:
            rc = subprocess.run([sys.executable, "-m", "difftune.bench.peers", "probe", str(record), *argv],
                                stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            raise DifftuneError(f"{name}: no result within {timeout:.0f} s (log: {log})") from None
    wall = time.time() - t0
    if rc != 0 or not record.exists():
        raise DifftuneError(f"{name} failed (exit {rc}): {_error_line(log)[:300]} (log: {log})")
    data = json.loads(record.read_text())
    times = data["step_times"]
    if len(times) < warmup + 2:
        raise DifftuneError(f"{name}: only {len(times)} optimizer steps seen; give more --steps")
    intervals = [b - a for a, b in zip(times, times[1:])][warmup:]
    cpu = data["step_cpu"]
    return {"sec_per_step": statistics.median(intervals), "first_step_s": times[0] - t0, "wall_s": wall,
            # process CPU time: what other processes on a shared machine do not inflate
            "cpu_sec_per_step": statistics.median([b - a for a, b in zip(cpu, cpu[1:])][warmup:]),
            "first_step_cpu_s": cpu[0],
            "peak_rss_gb": data["peak_rss"] / 1e9,
            "cuda_peak_gb": data["cuda_peak"] / 1e9 if data["cuda_peak"] is not None else None,
            "optimizer_steps": len(times)}


def _error_line(log: Path) -> str:
    """The last line of `log` that names an error (a progress bar is often the very last line)."""
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.search(r"(Error|Exception)\b|error:", ln)]
    return (errors or lines or ["(no output)"])[-1]


def _shim_path() -> list[str]:
    """The torchvision stand-in's folder, where torchvision itself is not installed."""
    if importlib.util.find_spec("torchvision") is not None:
        return []
    return [str(Path(__file__).resolve().parents[1] / "peer_shims")]  # difftune/peer_shims


def run_peer(family: str, scripts: Path, s: Setting, work: Path, name: str, timeout: float | None = None,
             warmup: int = 2) -> dict:
    out = work / f"{name}-out"
    script = peer_script(family, scripts)
    shim = _shim_path()
    row = run_probed([str(script), *PEERS[family].args(s, out)], work, name, timeout, warmup, shim)
    row["torchvision"] = "stand-in (peer_shims)" if shim else "installed"
    row["peer_script"] = PEERS[family].source
    return row


def run_difftune(s: Setting, work: Path, name: str, timeout: float | None = None, warmup: int = 2) -> dict:
    out = work / f"{name}-out"
    import shutil

    shutil.rmtree(out, ignore_errors=True)  # a fresh run each time (no resume)
    return run_probed(["-m", "difftune", "train", str(difftune_config(s, out))], work, name, timeout, warmup)


def compare(family: str, preset: str, scripts: Path, work: Path, steps: int, rounds: int = 3,
            resolution: int | None = None, rank: int = 16, batch: int = 1, precision: str | None = None,
            gradient_checkpointing: bool = False, log: Callable[[str], None] = print, warmup: int = 2) -> dict:
    """difftune and the peer script on the same model and images, taking turns `rounds` times;
    medians of the rounds, and peer / difftune ratios (above 1: difftune is faster or smaller)."""
    import torch

    from . import cases

    precision = precision or ("bf16" if torch.cuda.is_available() else "no")
    resolution = resolution or cases.family_presets(family)[preset].resolution
    model = write_pipeline(family, preset, work, precision=precision)
    s = Setting(model, write_images(work, resolution, batch), resolution, rank, batch, precision, steps,
                gradient_checkpointing)
    sides: dict[str, list[dict]] = {"difftune": [], "peer": []}
    for r in range(rounds):
        log(f"{family}/{preset}: round {r + 1} of {rounds}: difftune ...")
        sides["difftune"].append(run_difftune(s, work, f"{family}-{preset}-difftune-{r}", warmup=warmup))
        log(f"{family}/{preset}: round {r + 1} of {rounds}: {PEERS[family].script} ...")
        sides["peer"].append(run_peer(family, scripts, s, work, f"{family}-{preset}-peer-{r}", warmup=warmup))
    row: dict[str, Any] = {"family": family, "preset": preset, "resolution": resolution, "rank": rank,
                           "batch": batch, "precision": precision, "steps": steps, "warmup": warmup, "rounds": rounds,
                           "gradient_checkpointing": gradient_checkpointing,
                           "peer_script": PEERS[family].source, "torchvision": sides["peer"][0]["torchvision"],
                           "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}
    for side, runs in sides.items():
        for key in ("sec_per_step", "cpu_sec_per_step", "first_step_s", "first_step_cpu_s", "wall_s", "peak_rss_gb"):
            row[f"{side}_{key}"] = statistics.median(r[key] for r in runs)
        row[f"{side}_runs"] = runs
    row["step_ratio"] = row["peer_sec_per_step"] / row["difftune_sec_per_step"]
    row["step_ratio_cpu"] = row["peer_cpu_sec_per_step"] / row["difftune_cpu_sec_per_step"]
    row["first_step_ratio"] = row["peer_first_step_s"] / row["difftune_first_step_s"]
    row["rss_ratio"] = row["peer_peak_rss_gb"] / row["difftune_peak_rss_gb"]
    return row


# ---- command line (used by the suite's subprocesses) ---------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "probe":
        probe(Path(argv[1]), argv[2:])
        return 0
    parser = argparse.ArgumentParser(prog="python -m difftune.bench.peers")
    parser.add_argument("what", choices=["peer", "compare"])
    parser.add_argument("--family", required=True)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--peer-scripts", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--resolution", type=int)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--precision")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--json", type=Path, required=True)
    a = parser.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    from . import cases

    try:
        if a.what == "compare":
            row = compare(a.family, a.preset, a.peer_scripts, a.work, a.steps, a.rounds, a.resolution, a.rank,
                          a.batch, a.precision, a.gradient_checkpointing, log=lambda m: print(m, file=sys.stderr),
                          warmup=a.warmup)
        else:
            import torch

            precision = a.precision or ("bf16" if torch.cuda.is_available() else "no")
            resolution = a.resolution or cases.family_presets(a.family)[a.preset].resolution
            model = write_pipeline(a.family, a.preset, a.work, precision=precision)
            s = Setting(model, write_images(a.work, resolution, a.batch), resolution, a.rank, a.batch, precision, a.steps,
                        a.gradient_checkpointing)
            row = {"family": a.family, "preset": a.preset, "resolution": resolution, "rank": a.rank,
                   "batch": a.batch, "precision": precision, "steps": a.steps,
                   **run_peer(a.family, a.peer_scripts, s, a.work, f"{a.family}-{a.preset}-peer", warmup=a.warmup)}
    except DifftuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    a.json.parent.mkdir(parents=True, exist_ok=True)
    with a.json.open("a") as fh:
        fh.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`difftune bench`: how fast difftune trains a family at a given size on this machine, against the
machine's limit.

One *case* is a family, a size preset, a resolution, a batch size, a method and a mode; each prints
one table row on stdout and, with ``--json FILE``, appends one JSON object to FILE. Measured:
seconds per step (median over the timed steps, after warm-up) and images per second, time to first
step (from the start of the case until the first optimizer step has finished: model build,
compilation and the step itself), peak memory (CUDA: ``torch.cuda.max_memory_allocated``; CPU:
the peak resident set size of the process, sampled every 5 ms, so it includes Python and torch
themselves) and model FLOPs utilisation (MFU).

Modes:

- ``train``: difftune's own optimizer step, with **cached inputs**: random latents and random prompt
  embeddings of the exact shapes and dtypes the family's encoders produce (the case of a run whose
  features are in the cache), fed through `train.micro_step` (timesteps, noise, the family's
  ``predict``, the objective's loss), ``accelerator.backward``, gradient clipping and the optimizer,
  with every `speed` switch of the config applied as `train` applies it.
- ``bare``: only the denoiser's forward and backward on the very tensors ``predict`` gave it in a
  ``train`` step, a mean-squared loss and the same optimizer: the floor difftune's step is compared with.
- ``overhead``: ``train`` and ``bare`` steps taking turns in one process; the row adds
  ``overhead_ratio``, the median of the step-by-step ratios (so a machine whose load drifts, like a
  shared CI box, slows both alike), on wall-clock and on process-CPU time.
- ``baseline``: a re-creation of the per-step work of a diffusers example training script (for
  FLUX: ``examples/dreambooth/train_dreambooth_lora_flux.py``, see ``families/flux/peer.py``).
- ``compare``: ``train`` and ``baseline`` steps taking turns; the row adds ``speedup_vs_baseline``.
- ``generate``: one pipeline call (``--gen-steps`` denoising steps) of the family's sampling pipeline.
- ``e2e`` / ``baseline-e2e``: a whole run of ``--steps`` steps, from loading the model to the saved
  LoRA, on generated images (tiny preset only): ``difftune train`` against the re-created script.
- ``flops``: nothing runs; the FLOPs of one step of any preset, counted on the ``meta`` device (the
  real FLUX.1-dev on a laptop), and with ``--peak-tflops`` the seconds per step at 100% MFU.

The package: `cases` (what a case is and the models and inputs it runs on), `measure` (timers, peak
memory, FLOPs, MFU), `runners` (one case: each mode's runner), `suite` (``--suite``) and `peers`
(diffusers' example scripts run as they are). The ``train`` runner calls `train.make_optimizer` and
`train.micro_step`, the very functions the training loop calls.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from .. import DifftuneError
from ..methods import get_method_class, method_kinds
from .cases import MODES, Case
from .measure import table_header, table_row
from .runners import run_case

EXAMPLES = """examples:
  difftune bench --family sd --steps 5                                   # tiny SD LoRA on this machine
  difftune bench --family flux --preset small --resolution 256 --json bench.jsonl
  difftune bench --family flux --mode overhead --steps 30                # difftune's step / the bare model's
  difftune bench --family flux --mode compare --steps 30                 # against diffusers' FLUX DreamBooth LoRA
  difftune bench --family flux --preset real --mode flops --peak-tflops 989   # FLOPs of FLUX.1-dev, anywhere
  difftune bench --family flux --preset real --resolution 1024 --precision bf16 --rank 16 \\
      train.gradient_checkpointing=true speed.base_weights=fp8 --json bench.jsonl   # on a GPU
  difftune bench --family sd --preset real --resolution 512 --precision bf16 --batch 8,16,32,64
  difftune bench --family flux --preset real --resolution 1024 --precision bf16 --mode generate --gen-steps 28
  difftune bench --suite gpu --out gpu-results --peer-scripts peer-scripts   # every GPU goal, <= 9 min on one H100
  difftune bench --suite gpu --out /tmp/suite --tiny                         # the same suite on tiny models (CPU)
  difftune bench --suite peers --preset small --peer-scripts peer-scripts --out peers   # against diffusers' scripts

Trailing key.path=value pairs set config keys as in `difftune train` (speed.*, train.*, method.*, objective.*).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..families.registry import FAMILIES

    first = next(iter(FAMILIES))
    parser.add_argument("--family", default=first, help=f"model family: {', '.join(FAMILIES)} (default {first})")
    parser.add_argument("--preset", default="tiny", help="model size: tiny, small or real (default tiny)")
    parser.add_argument("--resolution", type=int, help="image side in pixels (default: the preset's)")
    parser.add_argument("--batch", default="1", help="batch size, or a comma list to sweep (default 1)")
    parser.add_argument("--method", choices=method_kinds(), default="lora")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--precision", choices=["no", "fp16", "bf16"],
                        help="mixed precision (default: bf16 on a GPU, no on a CPU)")
    parser.add_argument("--mode", choices=MODES, default="train", help="what is timed (default train)")
    parser.add_argument("--steps", type=int, help="timed steps (default 10; generate: 3 calls; e2e: 20 steps)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--gen-steps", type=int, default=28, help="denoising steps per generate call (default 28)")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s (default: measured matmul)")
    parser.add_argument("--json", type=Path, help="append one JSON line per case to this file")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="config keys (speed.*, train.*, ...)")
    suite = parser.add_argument_group("suites (bench/suite.py)")
    suite.add_argument("--suite", choices=["gpu", "peers"],
                       help="gpu: every GPU goal's case, each in its own process, into --out; "
                            "peers: difftune against diffusers' example scripts (--peer-scripts) on --preset")
    suite.add_argument("--out", type=Path, help="suite output folder (results.jsonl, results.md, logs/)")
    suite.add_argument("--tiny", action="store_true", help="the suite's cases on the tiny models (a CPU proof run)")
    suite.add_argument("--budget", type=float, default=540.0, help="the gpu suite's time budget in seconds (540)")
    suite.add_argument("--peer-scripts", type=Path,
                       help="folder with diffusers' train_dreambooth_lora_flux.py and train_text_to_image_lora.py")
    suite.add_argument("--rounds", type=int, default=3, help="peers suite: turns of each side (3)")


def run(args: argparse.Namespace) -> int:
    if getattr(args, "suite", None):
        from .suite import run as run_suite

        return run_suite(args)
    try:
        batches = [int(b) for b in str(args.batch).split(",") if b.strip()]
    except ValueError:
        raise DifftuneError(f"--batch must be an integer or a comma list of integers, got {args.batch!r}") from None
    import diffusers
    import transformers

    # the row is the output: no per-file loading bars from the libraries in between
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    rows = []
    with tempfile.TemporaryDirectory(prefix="difftune-bench-") as work:
        for batch in batches:
            case = Case(args.family, args.preset, args.resolution, batch, args.method, args.rank, args.precision,
                        args.mode, args.steps, args.warmup, args.gen_steps, args.peak_tflops, list(args.overrides))
            print(f"bench: {args.family}/{args.preset} {args.mode}, batch {batch} ...", file=sys.stderr, flush=True)
            row = run_case(case, Path(work))
            row["command"] = command_line(args, batch)
            if not rows:
                print(table_header(), flush=True)
            print(table_row(row), flush=True)
            rows.append(row)
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                with args.json.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
    return 0


def command_line(args: argparse.Namespace, batch: int) -> str:
    """The `difftune bench` command that reruns exactly this case (for BENCHMARKS.md)."""
    parts = ["difftune bench", f"--family {args.family}", f"--preset {args.preset}", f"--batch {batch}",
             f"--mode {args.mode}", f"--method {args.method}"]
    for flag, value in (("--resolution", args.resolution), ("--rank", args.rank if get_method_class(args.method).adapter else None),
                        ("--precision", args.precision), ("--steps", args.steps), ("--warmup", args.warmup),
                        ("--peak-tflops", args.peak_tflops)):
        if value is not None:
            parts.append(f"{flag} {value}")
    if args.mode == "generate":
        parts.append(f"--gen-steps {args.gen_steps}")
    return " ".join(parts + list(args.overrides))

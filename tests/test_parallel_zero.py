"""DeepSpeed ZeRO-2 on 2 CPU processes (gloo), started as users start it on a machine without GPUs:
`accelerate launch --use_deepspeed --num_processes 2` with DeepSpeed's CPU accelerator and WITHOUT
ACCELERATE_USE_CPU (with it, accelerate never starts DeepSpeed).

Every test first checks that 2 processes ran with strategy deepspeed (the start-of-run log line) and that
each process wrote its own ZeRO partition of the optimizer states, so a silent fallback to one process or
to DDP fails. The comparisons use test_parallel's settings (AdamW with a large epsilon, see there).
The first DeepSpeed start on a machine JIT-compiles its shared-memory op (C++ compiler, cached in
~/.cache/torch_extensions).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

if importlib.util.find_spec("deepspeed") is None:  # not importorskip: importing DeepSpeed here costs seconds
    if os.environ.get("CI"):  # the test extra installs it: missing in CI is a broken setup, not a skip
        pytest.fail("DeepSpeed is not installed (make test installs the test extra, deepspeed included)", pytrace=False)
    pytest.skip("DeepSpeed is not installed (pip install deepspeed)", allow_module_level=True)

from conftest import base_overrides  # noqa: E402
from test_parallel import (EXACT, assert_close, assert_lora_loads_and_changes_images, assert_ran,  # noqa: E402
                           assert_same_lora_and_losses, free_port, losses, one_process, part_weights, setup,
                           train_args)

assert setup  # test_parallel's module fixture (a folder, a config, the images), used here too


def ds_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    return dict(env, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")


def ds_launch(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--num_processes", str(nproc),
           "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "difftune", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=ds_env(), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def assert_zero2(done: subprocess.CompletedProcess, out: Path, processes: int = 2, stage: int = 2) -> None:
    """2 processes ran ZeRO-`stage`, and each wrote its own partition of the optimizer states."""
    assert_ran(done, "deepspeed", processes)
    assert f"(ZeRO-{stage})" in next(line for line in (done.stdout + done.stderr).splitlines() if line.startswith("parallel: "))
    newest = sorted((out / "checkpoints").glob("step-*"))[-1] / "deepspeed" / "state"
    parts = sorted(newest.glob("*optim_states.pt"))
    assert len(parts) == processes, sorted(p.name for p in newest.iterdir())


def lora_args(config, model, data, out, stage: int = 2) -> list[str]:
    extra = {"parallel.strategy": "deepspeed", "parallel.zero_stage": stage, "method.rank": 4, "method.dropout": 0.1,
             "train.batch_size": 1, "checkpoint.every": 2, "checkpoint.keep": 2}
    return ["train", str(config), *base_overrides(model, data, out, steps=4, **extra)]


@pytest.fixture(scope="module")
def lora_zero2(setup, tiny_sd):
    """LoRA with dropout (the global RNG, per process) under ZeRO-2, checkpoints every 2 of 4 steps."""
    root, config, data = setup
    out = root / "lora-zero2"
    args = lora_args(config, tiny_sd, data, out)
    return out, ds_launch(args), args


def test_zero2_lora_saves_a_file_diffusers_loads(lora_zero2, tiny_sd):
    out, done, _ = lora_zero2
    assert_zero2(done, out)
    assert_lora_loads_and_changes_images(tiny_sd, out)


def test_zero2_checkpoint_resumes_to_the_uninterrupted_run(setup, tiny_sd, lora_zero2):
    """The run stopped after its step-2 checkpoint: a rerun of the same command resumes from it on 2 processes
    and ends with the same LoRA weights and losses as the run that was not interrupted, bit for bit."""
    root, config, data = setup
    reference, _, _ = lora_zero2
    out = root / "lora-zero2-resumed"
    shutil.copytree(reference, out)  # then made as it was when the run stopped after step 2
    shutil.rmtree(out / "checkpoints" / "step-00000004")
    (out / "pytorch_lora_weights.safetensors").unlink()
    done = ds_launch(lora_args(config, tiny_sd, data, out))
    assert_zero2(done, out)
    assert "resuming from" in done.stdout + done.stderr and "(step 2 of 4)" in done.stdout + done.stderr
    assert_same_lora_and_losses(out, reference)


def test_zero2_full_fine_tune_with_accumulation_equals_one_process(setup, tiny_sd):
    """2 processes x 2 accumulated micro-batches under ZeRO-2 equal one process accumulating 4 (the same
    global batch): the engine steps once per accumulation, with the gradients of all 4 micro-batches."""
    root, config, data = setup
    out = root / "sd-zero2"
    done = ds_launch(train_args(config, tiny_sd, data, out, **EXACT, **{
        "parallel.strategy": "deepspeed", "parallel.zero_stage": 2, "train.grad_accum": 2, "checkpoint.every": 2}))
    assert_zero2(done, out)
    reference = one_process(tiny_sd, data, root / "sd-one-accum4", **{"train.grad_accum": 4})
    assert_close(part_weights(out, "unet"), part_weights(reference, "unet"))
    np.testing.assert_allclose(losses(out), losses(reference), rtol=0, atol=1e-6)
    base = part_weights(tiny_sd, "unet")
    assert max(float((part_weights(out, "unet")[k] - base[k]).abs().max()) for k in base) > 1e-3, "nothing trained"


def test_zero3_lora_partitions_only_the_trained_part_and_equals_zero2(setup, tiny_sd, lora_zero2):
    """ZeRO-3 (the default stage) partitions the trained UNet, not the frozen CLIP (which transformers would
    partition at load if accelerate's ZeRO config stayed registered with it), and gathers the same LoRA."""
    root, config, data = setup
    out = root / "lora-zero3"
    done = ds_launch(lora_args(config, tiny_sd, data, out, stage=3))
    assert_zero2(done, out, stage=3)
    a, b = load_file(str(out / "pytorch_lora_weights.safetensors")), load_file(str(lora_zero2[0] / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5

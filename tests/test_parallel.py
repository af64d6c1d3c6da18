"""Several processes on CPU (gloo), started the way users start them: `accelerate launch`.

Every multi-process test first checks that 2 processes really ran with the expected strategy (the
start-of-run log line, and for FSDP one checkpoint shard per process holding about half the weights),
so a silent fallback to one process or to DDP fails. Runs are tiny (2 steps, 64 px, one thread each).

Comparisons use AdamW with a large epsilon: its update is then about lr * gradient, so two runs whose
gradients differ only in float summation order (DDP's all-reduce, FSDP's reduce-scatter) stay within
1e-6, whereas with a tiny epsilon Adam turns rounding noise in near-zero gradients into full-size steps.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import base_overrides, make_images
from difftune.cli import main as cli
from difftune.config import load_config
from difftune.train import read_losses, train

PROMPT = "a photo of sks disc"
EXACT = {"train.adam_epsilon": 1.0, "train.lr": 0.1, "train.batch_size": 1, "method.kind": "full"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(nproc: int, args: list[str], port: int, machines: int = 1, machine_rank: int = 0) -> list[str]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
           "--num_machines", str(machines), "--main_process_port", str(port), "--mixed_precision", "no",
           "--dynamo_backend", "no"]
    if machines > 1:
        cmd += ["--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1"]
    return cmd + ["-m", "difftune", *args]


def env() -> dict:
    # ACCELERATE_USE_CPU with --multi_gpu is what gives real processes on a machine without GPUs
    # (`accelerate launch --cpu --num_processes 2` starts one)
    return dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")


def launch(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    done = subprocess.run(launcher(nproc, args, free_port()), capture_output=True, text=True, env=env(), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def train_args(config: Path, model: Path, data: Path, out: Path, **extra) -> list[str]:
    return ["train", str(config), *base_overrides(model, data, out, steps=2, **extra)]


def assert_ran(done: subprocess.CompletedProcess, strategy: str, processes: int = 2, machines: int = 1) -> None:
    text = done.stdout + done.stderr
    expected = f"parallel: {strategy} "
    line = next((line for line in text.splitlines() if line.startswith("parallel: ")), "")
    assert line.startswith(expected) and f"{processes} processes on {machines} machine" in line, line or text[-2000:]


def assert_lora_loads_and_changes_images(model: Path, out: Path) -> None:
    """The run's LoRA file loads in plain diffusers and changes what the pipeline draws."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)

    def image():
        return pipe(PROMPT, num_inference_steps=2, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images[0]

    base = image()
    pipe.load_lora_weights(str(out))
    assert len(pipe.unet.peft_config) == 1
    assert np.abs(image() - base).max() > 1e-4, "the LoRA did not change the images"


def assert_same_lora_and_losses(out: Path, reference: Path) -> None:
    """Bit for bit: the same LoRA tensors and the same logged losses."""
    a, b = load_file(str(out / "pytorch_lora_weights.safetensors")), load_file(str(reference / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(out) == losses(reference)


def assert_sharded(out: Path, processes: int = 2) -> None:
    """Each process wrote its own DCP shard, holding well under the whole of the weights."""
    newest = sorted((out / "checkpoints").glob("step-*"))[-1] / "sharded"
    shards = sorted(newest.glob("*.distcp"))
    assert len(shards) == processes, shards
    sizes = [f.stat().st_size for f in shards]
    assert max(sizes) < 0.75 * sum(sizes), sizes


def part_weights(out: Path, part: str) -> dict:
    return load_file(str(out / part / "diffusion_pytorch_model.safetensors"))


def assert_close(a: dict, b: dict, tol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    assert worst <= tol, f"largest weight difference {worst}"


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_losses(out)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    config = root / "empty.yaml"
    config.write_text("{}\n")
    return root, config, make_images(root / "data", n=4, caption=PROMPT)


def one_process(model, data, out, **extra) -> Path:
    """The reference: one process, in this one, with twice the accumulation (the same global batch)."""
    train(load_config(None, base_overrides(model, data, out, steps=2, **{**EXACT, "train.grad_accum": 2, **extra})),
          log=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def sd_ddp(setup, tiny_sd):
    root, config, data = setup
    out = root / "sd-ddp"
    return out, launch(train_args(config, tiny_sd, data, out, **EXACT, **{"parallel.strategy": "ddp"}))


@pytest.fixture(scope="module")
def sd_fsdp(setup, tiny_sd):
    root, config, data = setup
    out = root / "sd-fsdp"
    extra = {**EXACT, "parallel.strategy": "fsdp", "checkpoint.every": 1, "checkpoint.keep": 2,
             "validation.prompts": f"['{PROMPT}']", "validation.steps": 2}  # sampled by both processes
    return out, launch(train_args(config, tiny_sd, data, out, **extra))


def test_ddp_on_two_processes_equals_one_process_with_the_same_global_batch(setup, tiny_sd, sd_ddp):
    root, _, data = setup
    out, done = sd_ddp
    assert_ran(done, "ddp")
    reference = one_process(tiny_sd, data, root / "sd-one")
    assert_close(part_weights(out, "unet"), part_weights(reference, "unet"))
    np.testing.assert_allclose(losses(out), losses(reference), rtol=0, atol=1e-6)
    base = part_weights(tiny_sd, "unet")
    assert max(float((part_weights(out, "unet")[k] - base[k]).abs().max()) for k in base) > 1e-3, "nothing trained"


def test_fsdp_full_fine_tune_of_sd_equals_ddp(sd_fsdp, sd_ddp):
    out, done = sd_fsdp
    assert_ran(done, "fsdp")
    assert_sharded(out)
    assert_close(part_weights(out, "unet"), part_weights(sd_ddp[0], "unet"))
    np.testing.assert_allclose(losses(out), losses(sd_ddp[0]), rtol=0, atol=1e-6)
    assert (out / "samples" / "step-00000002" / "00-00.png").is_file(), "validation sampling on sharded weights"


def test_fsdp_full_fine_tune_of_flux_equals_one_process(setup, tiny_flux):
    """FLUX's transformer blocks as FSDP units; compared with one process (which DDP equals, above)."""
    root, config, data = setup
    out = root / "flux-fsdp"
    done = launch(train_args(config, tiny_flux, data, out, **EXACT, **{"parallel.strategy": "fsdp",
                                                                         "checkpoint.every": 2}))
    assert_ran(done, "fsdp")
    assert_sharded(out)
    reference = one_process(tiny_flux, data, root / "flux-one")
    assert_close(part_weights(out, "transformer"), part_weights(reference, "transformer"))


def test_two_process_fsdp_checkpoint_resumes_on_one_process(setup, tiny_sd, sd_fsdp):
    root, _, data = setup
    out = root / "sd-resumed"
    shutil.copytree(sd_fsdp[0], out)
    shutil.rmtree(out / "checkpoints" / "step-00000002")
    shutil.rmtree(out / "unet")
    lines: list[str] = []
    overrides = base_overrides(tiny_sd, data, out, steps=2, **{**EXACT, "train.grad_accum": 2, "checkpoint.every": 1})
    train(load_config(None, overrides), log=lines.append)
    assert any("step 1 of 2" in line for line in lines), lines
    assert any("written by 2 processes, this run has 1" in line for line in lines), lines
    assert_close(part_weights(out, "unet"), part_weights(sd_fsdp[0], "unet"))


@pytest.fixture(scope="module")
def lora_fsdp(setup, tiny_sd):
    """LoRA with dropout (the global RNG is used, per process) under FSDP, checkpoints every 2 of 6 steps."""
    root, config, data = setup
    out = root / "lora-fsdp"
    args = lora_args(config, tiny_sd, data, out)
    return out, launch(args), args


@pytest.fixture(scope="module")
def lora_ddp(setup, tiny_sd):
    """The same LoRA run under DDP."""
    root, config, data = setup
    out = root / "lora-ddp"
    args = lora_args(config, tiny_sd, data, out, strategy="ddp")
    return out, launch(args), args


def lora_args(config, model, data, out, strategy: str = "fsdp") -> list[str]:
    extra = {"parallel.strategy": strategy, "method.rank": 4, "method.dropout": 0.1, "train.batch_size": 1,
             "checkpoint.every": 2, "checkpoint.keep": 2}
    return ["train", str(config), *base_overrides(model, data, out, steps=6, **extra)]


def test_lora_under_fsdp_saves_a_file_diffusers_loads(lora_fsdp, tiny_sd):
    out, done, _ = lora_fsdp
    assert_ran(done, "fsdp")
    assert_sharded(out)
    assert_lora_loads_and_changes_images(tiny_sd, out)


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_sigkill_of_the_launcher_then_rerun_is_bit_identical(setup, tiny_sd, strategy, request):
    """The whole machine dies (launcher and workers, SIGKILL) after the step-2 checkpoint; a rerun of the same
    command resumes on 2 processes and ends with the same weights and losses, bit for bit."""
    root, config, data = setup
    reference, done_reference, _ = request.getfixturevalue(f"lora_{strategy}")
    assert_ran(done_reference, strategy, 2)
    out = root / f"lora-{strategy}-killed"
    args = lora_args(config, tiny_sd, data, out, strategy=strategy)
    proc = subprocess.Popen(launcher(2, args, free_port()), env=env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step-00000002" / "COMPLETE.json").exists() and proc.poll() is None:
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # a dead machine takes every process with it: the workers run in their own sessions, so kill them too
    import psutil

    workers = [p for p in psutil.process_iter(["cmdline"]) if str(out) in " ".join(p.info["cmdline"] or [])]
    for p in workers:
        p.kill()
    psutil.wait_procs(workers, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-2000:]
    assert not (out / "pytorch_lora_weights.safetensors").exists(), "the run ended before the kill"
    done = launch(args)
    assert "resuming from" in done.stdout + done.stderr
    assert_same_lora_and_losses(out, reference)


def test_two_machines_with_a_disk_each_train_and_agree_with_one(setup, tiny_sd, sd_ddp):
    """Two launchers on this host with --num_machines 2 (one process each) and a different output_dir each,
    as two machines with their own disks (parallel.disk=per_node): each machine's main process writes its
    checkpoints, only the global main writes logs and outputs, and the weights equal one launcher's."""
    root, config, data = setup
    outs = [root / "machine-0", root / "machine-1"]
    port = free_port()
    procs = [subprocess.Popen(launcher(2, train_args(config, tiny_sd, data, out, **EXACT, **{
        "parallel.strategy": "ddp", "parallel.disk": "per_node", "checkpoint.every": 1}), port, machines=2,
        machine_rank=r), env=env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for r, out in enumerate(outs)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    line = next(line for line in outputs[0].splitlines() if line.startswith("parallel: "))
    assert line.startswith("parallel: ddp") and "2 processes on 2 machines" in line, line
    assert not any(line.startswith("parallel: ") for line in outputs[1].splitlines()), "only the global main logs"
    assert_close(part_weights(outs[0], "unet"), part_weights(sd_ddp[0], "unet"))
    assert not (outs[1] / "unet").exists() and not (outs[1] / "logs" / "loss.jsonl").exists()
    for rank, out in enumerate(outs):  # each disk holds a complete checkpoint with its own process's RNG
        newest = out / "checkpoints" / "step-00000002"
        assert (newest / "COMPLETE.json").is_file() and (newest / "trainable.safetensors").is_file()
        assert [f.name for f in (newest / "rng").glob("*.safetensors")] == [f"rank-{rank:05d}.safetensors"]


def test_distributed_generation_writes_the_files_of_one_process(setup, tiny_sd):
    root, _, _ = setup
    args = ["generate", "--model", str(tiny_sd), "--prompt", PROMPT, "--steps", "2", "--width", "64",
            "--height", "64", "--num", "3", "--seed", "5", "--device", "cpu"]
    launch([*args, "--out", str(root / "gen-2")])
    assert cli([*args, "--out", str(root / "gen-1")]) == 0
    two, one = sorted((root / "gen-2").glob("*.png")), sorted((root / "gen-1").glob("*.png"))
    assert [p.name for p in two] == [p.name for p in one] and len(one) == 3
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(two, one))


@pytest.mark.parametrize("overrides, message", [
    (["parallel.strategy=fsdp"], "parallel.strategy=fsdp needs several processes"),
    (["parallel.cpu_offload=true"], "parallel.cpu_offload needs parallel.strategy=fsdp or deepspeed"),
])
def test_strategy_that_cannot_run_is_one_line(setup, tiny_sd, tmp_path, capsys, overrides, message):
    _, config, data = setup
    code = cli(["train", str(config), *base_overrides(tiny_sd, data, tmp_path / "out"), *overrides])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err

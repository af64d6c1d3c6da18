"""Spot-safe training: kill anywhere and rerun = the same weights and losses, bit for bit on CPU;
SIGTERM saves and exits 75; torn checkpoints are passed over; non-finite steps are skipped;
full disks fail clearly and keep the previous checkpoint."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import base_overrides, make_images
from difftune import DifftuneError
from difftune.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from difftune.config import load_config
from difftune.train import EXIT_INTERRUPTED, read_losses, train

HERE = Path(__file__).parent
STEPS = 6


def quiet(*_):
    pass


def overrides(model, data, out, **extra):
    # LoRA dropout makes the run use the global torch RNG, which resume must restore
    settings = {"train.grad_accum": 2, "checkpoint.every": 2, "checkpoint.keep": 2, "method.rank": 4,
                "method.dropout": 0.1, "data.concepts.0.repeats": 2}
    settings.update(extra)
    return base_overrides(model, data, out, steps=STEPS, **settings)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("resume") / "data", n=3, caption="a photo of sks disc")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_sd, data):
    out = tmp_path_factory.mktemp("reference") / "out"
    train(load_config(None, overrides(tiny_sd, data, out)), log=quiet)
    return out


def weights(out: Path) -> dict:
    return load_file(str(out / "pytorch_lora_weights.safetensors"))


def assert_same_run(out: Path, reference: Path) -> None:
    a, b = weights(out), weights(reference)
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst == 0.0, f"largest weight difference {worst}"
    assert [r["loss"] for r in read_losses(out)] == [r["loss"] for r in read_losses(reference)]


def run_killer(mode: str, n: int, args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, DIFFTUNE_TEST_THREADS=str(torch.get_num_threads()))
    return subprocess.run([sys.executable, str(HERE / "killer.py"), mode, str(n), "train", *args],
                          capture_output=True, text=True, env=env, timeout=300)


def write_config(tmp_path) -> str:
    path = tmp_path / "empty.yaml"
    path.write_text("{}\n")
    return str(path)


@pytest.mark.parametrize("micro", [3, 6, 11], ids=["mid-accumulation-before-first-ckpt", "mid-accumulation", "last-step"])
def test_sigkill_then_rerun_is_bit_identical(tmp_path, tiny_sd, data, reference, micro):
    out = tmp_path / "out"
    args = overrides(tiny_sd, data, out)
    killed = run_killer("kill-micro", micro, [write_config(tmp_path), *args])
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    lines = []
    train(load_config(None, args), log=lines.append)
    expected_start = ((micro - 1) // 2) // 2 * 2  # newest checkpoint before the kill (every 2 steps, 2 micro each)
    if expected_start:
        assert any(f"step {expected_start} of {STEPS}" in line for line in lines), lines
    assert_same_run(out, reference)


def test_sigterm_saves_exits_75_and_rerun_is_identical(tmp_path, tiny_sd, data, reference):
    out = tmp_path / "out"
    args = overrides(tiny_sd, data, out)
    stopped = run_killer("term-micro", 5, [write_config(tmp_path), *args])  # during step 3
    assert stopped.returncode == EXIT_INTERRUPTED, stopped.stderr[-2000:]
    assert "stopped by signal" in stopped.stderr and "Run the same command again" in stopped.stderr
    good, _ = list_checkpoints(out)
    assert good[-1].step == 3, "the step in flight is finished and checkpointed"
    train(load_config(None, args), log=quiet)
    assert_same_run(out, reference)


@pytest.mark.parametrize("damage", ["truncate", "no-marker"])
def test_torn_newest_checkpoint_is_passed_over(tmp_path, tiny_sd, data, reference, damage):
    out = tmp_path / "out"
    train(load_config(None, overrides(tiny_sd, data, out, **{"train.steps": 4})), log=quiet)
    newest = out / "checkpoints" / "step-00000004"
    if damage == "truncate":
        f = newest / "trainable.safetensors"
        f.write_bytes(f.read_bytes()[:100])
    else:
        (newest / "COMPLETE.json").unlink()
    lines = []
    train(load_config(None, overrides(tiny_sd, data, out)), log=lines.append)  # more steps: allowed
    assert any("passing over checkpoint step-00000004" in line for line in lines), lines
    assert any("step 2 of 6" in line for line in lines), lines
    assert_same_run(out, reference)


def test_keep_one_with_crash_mid_save_keeps_a_loadable_checkpoint(tmp_path, tiny_sd, data, reference):
    out = tmp_path / "out"
    args = overrides(tiny_sd, data, out, **{"checkpoint.keep": 1})
    crashed = run_killer("kill-save", 2, [write_config(tmp_path), *args])  # inside the save of step 4
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    good, torn = list_checkpoints(out)
    assert [c.step for c in good] == [2]
    load_checkpoint(good[0].path)  # verified and loadable
    train(load_config(None, args), log=quiet)
    assert_same_run(out, reference)
    good, _ = list_checkpoints(out)
    assert [c.step for c in good] == [STEPS]
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_nonfinite_step_is_skipped_and_named(tmp_path, tiny_sd, data, monkeypatch):
    import difftune.train as t

    original, calls = t.micro_step, {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = original(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(t, "micro_step", poisoned)
    lines = []
    out = train(load_config(None, overrides(tiny_sd, data, tmp_path / "out")), log=lines.append)
    skipped = [line for line in lines if "non-finite" in line]
    assert len(skipped) == 1 and "step 2" in skipped[0] and "img-0" in skipped[0]
    assert all(torch.isfinite(v).all() for v in weights(out).values())
    assert len(read_losses(out)) == STEPS


def test_nonfinite_k_in_a_row_stops(tmp_path, tiny_sd, data, monkeypatch):
    import difftune.train as t

    original = t.micro_step
    monkeypatch.setattr(t, "micro_step", lambda *a, **k: original(*a, **k) * float("nan"))
    with pytest.raises(DifftuneError, match="2 steps in a row had non-finite"):
        train(load_config(None, overrides(tiny_sd, data, tmp_path / "out", **{"train.max_nonfinite_steps": 2})), log=quiet)
    assert not (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()


def test_full_disk_is_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path, tiny_sd, data, monkeypatch):
    import difftune.checkpoint as ck

    out = tmp_path / "out"
    original, saves = ck.torch_save if hasattr(ck, "torch_save") else None, {"n": 0}
    real_save = torch.save

    def failing_save(obj, path, *a, **k):
        saves["n"] += 1
        if saves["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(CheckpointError, match="disk is full.*earlier checkpoints are intact"):
        train(load_config(None, overrides(tiny_sd, data, out)), log=quiet)
    good, torn = list_checkpoints(out)
    assert [c.step for c in good] == [2] and not torn
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert original is None


def test_not_enough_free_space_is_checked_before_writing(tmp_path, tiny_sd, data, monkeypatch):
    import difftune.checkpoint as ck

    monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 0))
    with pytest.raises(CheckpointError, match="not enough disk space"):
        train(load_config(None, overrides(tiny_sd, data, tmp_path / "out")), log=quiet)


def test_resume_refuses_a_changed_method_and_honours_never(tmp_path, tiny_sd, data):
    out = tmp_path / "out"
    train(load_config(None, overrides(tiny_sd, data, out, **{"train.steps": 2})), log=quiet)
    with pytest.raises(DifftuneError, match=r"cannot resume .*method.rank: 4 -> 8"):
        train(load_config(None, overrides(tiny_sd, data, out, **{"method.rank": 8})), log=quiet)
    lines = []
    train(load_config(None, overrides(tiny_sd, data, out, **{"method.rank": 8, "checkpoint.resume": "never",
                                                             "train.steps": 2})), log=lines.append)
    assert not any("resuming" in line for line in lines)


def test_flux_sigkill_mid_accumulation_then_rerun_is_bit_identical(tmp_path, data, tiny_flux):
    """The same guarantee for a second family (flow matching, packed latents, released T5)."""
    model = tiny_flux
    extra = {"model.options.max_sequence_length": 16, "objective.timestep_sampling": "logit_normal"}
    reference_out, out = tmp_path / "reference", tmp_path / "out"
    train(load_config(None, overrides(model, data, reference_out, **extra)), log=quiet)
    args = overrides(model, data, out, **extra)
    killed = run_killer("kill-micro", 7, [write_config(tmp_path), *args])  # step 4, first micro-batch
    assert killed.returncode == -9, killed.stderr[-2000:]
    lines = []
    train(load_config(None, args), log=lines.append)
    assert any("step 2 of 6" in line for line in lines), lines
    assert_same_run(out, reference_out)

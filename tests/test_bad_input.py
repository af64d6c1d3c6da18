"""Bad input, tried as a new user would (issue 11): each finding is the command, its exit code, one line
on stderr (no traceback), and nothing finished lost or half-written. Plus readable logs in a pipe."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import make_images

ROOT = Path(__file__).resolve().parents[1]


def difftune(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real command in a fresh process, stdout and stderr captured (a pipe, not a terminal)."""
    return subprocess.run([sys.executable, "-m", "difftune", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def refused(result: subprocess.CompletedProcess, command: str) -> str:
    """Exit code 2 and exactly one line on stderr naming the command; returns the line."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"difftune {command}: error: "), lines[0]
    return lines[0]


def write_config(path: Path, model, images, out, **sections) -> Path:
    """A small CPU config: tiny model, 64 px, fp32, one step, no checkpoints until the end."""
    cfg = {
        "model": {"path": str(model)},
        "data": {"resolution": 64, "concepts": [{"dir": str(images), "prompt": "a photo of sks disc"}]},
        "train": {"steps": 1, "batch_size": 2, "lr": 1e-3, "precision": "no"},
        "checkpoint": {"every": 0},
        "output_dir": str(out),
    }
    for key, value in sections.items():
        cfg.setdefault(key, {}).update(value) if isinstance(value, dict) else cfg.__setitem__(key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes (to show nothing was touched)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- 1. two runs on one output_dir ------------------------------------------------------------------------


HOLDER = "import sys, time; from difftune.lock import OutputLock; OutputLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)"


def test_a_second_run_on_a_busy_output_dir_is_refused_naming_the_holder(tmp_path, tiny_sd, images):
    from difftune.lock import OutputLock

    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        (out / "finished.txt").write_text("work of the first run")
        before = tree(out)
        line = refused(difftune("train", write_config(tmp_path / "c.yaml", tiny_sd, images, out)), "train")
        assert "in use by another difftune run" in line
        assert f"pid {holder.pid} on host {socket.gethostname()}" in line
        assert tree(out) == before  # the second run wrote nothing, not even its config.yaml
    finally:
        holder.kill()  # like kill -9: the kernel drops the lock with the process
        holder.wait()
    with OutputLock(out):  # free again, with no stale lock to clean up
        pass


def test_the_lock_is_per_process_too(tmp_path):
    from difftune.lock import OutputDirBusy, OutputLock

    with OutputLock(tmp_path / "run"):
        with pytest.raises(OutputDirBusy, match="already in use by this process"):
            OutputLock(tmp_path / "run").acquire()
    OutputLock(tmp_path / "run").acquire().release()


# ---- 3. one path rule ---------------------------------------------------------------------------------------


def test_paths_in_a_config_file_are_relative_to_it_and_on_the_command_line_to_the_cwd(tmp_path, tiny_sd):
    from difftune.config import load_config

    project = tmp_path / "project"
    make_images(project / "data" / "disc")
    (project / "models").mkdir()
    (project / "models" / "sd").symlink_to(tiny_sd)
    config = write_config(project / "configs" / "disc.yaml", "../models/sd", "../data/disc", "../runs/disc")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    result = difftune("config", "check", config, cwd=elsewhere)  # from any folder: relative to the file
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr
    cfg = load_config(config)
    assert cfg.model.path == str(project / "models" / "sd")
    assert cfg.data.concepts[0].dir == str(project / "data" / "disc")
    assert cfg.output_dir == str(project / "runs" / "disc")

    # on the command line, relative to the current directory
    ok = difftune("config", "check", config, "data.concepts.0.dir=project/data/disc", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    line = refused(difftune("config", "check", config, "data.concepts.0.dir=data/disc", cwd=tmp_path), "config")
    assert f"folder not found: {tmp_path / 'data' / 'disc'}" in line and "relative to its folder" in line


def test_a_missing_local_looking_model_path_is_refused_at_once_by_check_and_train_alike(tmp_path, tiny_sd, images):
    (tmp_path / "runs").mkdir()
    config = write_config(tmp_path / "c.yaml", tiny_sd, images, tmp_path / "out")
    lines = [refused(difftune(command, *extra, config, "model.path=runs/nope", cwd=tmp_path), command)
             for command, *extra in (("config", "check"), ("train",))]
    assert lines[0].split(": error: ")[1] == lines[1].split(": error: ")[1]
    assert f"model.path: not found: {tmp_path / 'runs' / 'nope'}" in lines[1]  # not sent to the hub
    assert not (tmp_path / "out").exists()


# ---- 4. resolution ---------------------------------------------------------------------------------------------


def test_resolution_is_checked_against_what_the_pipeline_needs_not_only_the_vae(tmp_path, tiny_sd, images):
    from difftune.families.registry import get_family

    # a custom VAE with 2 blocks (factor 2) on the tiny UNet (2 blocks: multiple 2): 2 * 2 = 4, but
    # StableDiffusionPipeline itself refuses sides that are not multiples of 8
    model = tmp_path / "custom-vae-sd"
    shutil.copytree(tiny_sd, model, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    vae_config = json.loads((model / "vae" / "config.json").read_text())
    vae_config["block_out_channels"] = vae_config["block_out_channels"][:2]
    (model / "vae" / "config.json").write_text(json.dumps(vae_config))
    assert get_family("sd").resolution_multiple(str(model)) == 8
    config = write_config(tmp_path / "c.yaml", model, images, tmp_path / "out", data={"resolution": 100})
    line = refused(difftune("config", "check", config), "config")
    assert "data.resolution 100 is not a multiple of 8" in line and "try 96" in line
    line = refused(difftune("train", config), "train")
    assert "data.resolution 100 is not a multiple of 8" in line and not (tmp_path / "out").exists()


# ---- 5. fewer steps than a finished run ------------------------------------------------------------------------


def test_fewer_steps_than_a_finished_run_is_refused_and_the_config_stays_true(tmp_path, tiny_sd, images):
    from difftune.config import load_config
    from difftune.train import train

    out = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", tiny_sd, images, out, train={"steps": 2})
    train(load_config(config), log=lambda *_: None, progress="off")
    before = tree(out)
    for command, *extra in (("config", "check"), ("train",)):
        line = refused(difftune(command, *extra, config, "train.steps=1"), command)
        assert "train.steps=1 but" in line and "already holds step 2" in line and "train.steps to 2 or more" in line
    assert tree(out) == before
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["steps"] == 2


# ---- 6. logs in a pipe, --quiet -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def piped_run(tmp_path_factory, tiny_sd):
    """A 40-step run with stdout and stderr going to a pipe, as in a job log."""
    root = tmp_path_factory.mktemp("piped")
    data = make_images(root / "data", caption="a photo of sks disc")
    out = root / "run"
    config = write_config(root / "c.yaml", tiny_sd, data, out, train={"steps": 40, "batch_size": 1, "log_every": 10},
                          checkpoint={"every": 20},
                          validation={"prompts": ["a photo of sks disc"], "every": 20, "steps": 2})
    result = difftune("train", config)
    assert result.returncode == 0, result.stderr
    return out, result


def test_a_piped_run_logs_a_few_plain_lines_with_step_loss_lr_speed_and_eta(piped_run):
    out, result = piped_run
    log = result.stdout + result.stderr
    lines = log.splitlines()
    assert len(lines) <= 30, log
    assert "\r" not in log and "Loading" not in log and "Traceback" not in log
    assert "step 40/40" in log
    steps = [line for line in lines if line.startswith("step ")]
    assert [line.split()[1] for line in steps] == ["10/40", "20/40", "30/40", "40/40"]
    assert all(re.fullmatch(r"step \d+/40  loss \d+\.\d{4}  lr \S+  \d+\.\d{3} s/step  ETA \d+:\d\d:\d\d", s)
               for s in steps), steps
    assert any(line.startswith("checkpoint step-00000020 saved") for line in lines)


def test_samples_and_checkpoints_are_numbered_alike(piped_run):
    out, _ = piped_run
    samples = {p.name for p in (out / "samples").iterdir()}
    checkpoints = {p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith(".")}
    # step 0: the base model's samples, drawn before training (the report's baseline)
    assert samples == {"step-00000000", "step-00000020", "step-00000040"} and "step-00000020" in checkpoints


def test_quiet_prints_nothing_but_errors(tmp_path, tiny_sd, images):
    result = difftune("train", write_config(tmp_path / "c.yaml", tiny_sd, images, tmp_path / "run"), "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()


# ---- 8. data check and config check refuse what train refuses -------------------------------------------------


def test_data_check_of_a_folder_honours_overrides_and_refuses_unknown_keys(images):
    result = difftune("data", "check", images, "data.resolution=32", "data.buckets=true")
    assert result.returncode == 0, result.stderr
    assert "buckets at resolution 32" in result.stdout
    line = refused(difftune("data", "check", images, "data.resolutoin=32"), "data")
    assert "unknown config key 'data.resolutoin'; did you mean 'data.resolution'?" in line


@pytest.mark.parametrize("content", ["empty", "broken"])
def test_check_commands_refuse_folders_that_train_refuses(tmp_path, tiny_sd, content):
    folder = tmp_path / "data"
    folder.mkdir()
    if content == "broken":
        (folder / "a.png").write_bytes(b"<html>not an image</html>")
    expected = f"no images found in {folder}" if content == "empty" else f"no usable images in {folder}: all 1 image"
    config = write_config(tmp_path / "c.yaml", tiny_sd, folder, tmp_path / "out")
    for command, args in (("data", ("check", folder)), ("data", ("check", config)), ("config", ("check", config)),
                          ("train", (config,))):
        result = difftune(command, *args)
        assert "Traceback" not in result.stderr and result.returncode == 2, result.stderr
        assert f"difftune {command}: error: {expected}" in result.stderr.splitlines()[-1]
    assert not (tmp_path / "out").exists()  # no empty output folder left behind


# ---- 10. smaller findings ---------------------------------------------------------------------------------------------


def test_an_empty_config_says_model_path_is_required(tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    for command, *extra in (("config", "check"), ("train",)):
        line = refused(difftune(command, *extra, tmp_path / "empty.yaml"), command)
        assert "model.path is required" in line


def test_a_missing_data_folder_is_refused_before_anything_is_loaded_or_created(tmp_path, tiny_sd):
    config = write_config(tmp_path / "c.yaml", tiny_sd, tmp_path / "nope", tmp_path / "out")
    probe = ("import sys, runpy; sys.argv = ['difftune', 'train', sys.argv[1]]\n"
             "try:\n    runpy.run_module('difftune', run_name='__main__')\n"
             "finally:\n    print('torch loaded' if 'torch' in sys.modules else 'nothing loaded', file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", probe, str(config)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 2
    assert f"data.concepts[0].dir: folder not found: {tmp_path / 'nope'}" in result.stderr
    assert result.stderr.splitlines()[-1] == "nothing loaded"  # refused before torch, let alone the model
    assert not (tmp_path / "out").exists()


def test_a_second_ctrl_c_says_what_happened(monkeypatch, capsys):
    from difftune import cli, commands
    from difftune.train import _StopFlag

    flag = _StopFlag()
    flag._handle(signal.SIGINT, None)  # the first asks for a checkpoint and a clean stop
    assert flag.signal == signal.SIGINT
    with pytest.raises(KeyboardInterrupt) as second:
        flag._handle(signal.SIGINT, None)

    def interrupted(args):
        raise second.value

    monkeypatch.setattr(commands, "run_train", interrupted)
    assert cli.main(["train", "x.yaml"]) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("difftune train: stopped at once by a second Ctrl-C") and "checkpoints are intact" in err


def test_help_examples_name_configs_that_exist():
    from difftune.cli import build_parser

    parser = build_parser()
    named = set()
    for action in parser._subparsers._group_actions:
        for sub in action.choices.values():
            named |= set(re.findall(r"configs/[\w./-]+\.yaml", sub.epilog or ""))
    assert named
    assert [name for name in sorted(named) if not (ROOT / name).is_file()] == []


def test_readme_tables_have_no_blank_line_inside():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and i + 2 < len(lines) and not lines[i + 1].strip():
            assert not lines[i + 2].startswith("|"), f"README.md:{i + 2}: a blank line splits a table"


def test_shipped_configs_and_their_comments_speak_to_users():
    for path in sorted(p for p in (ROOT / "configs").glob("*.yaml") if not p.name.startswith("world-")):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"\bseed \d{3}\b|\bissue \d+\b|[\u0400-\u04ff\u4e00-\u9fff]", text), path.name

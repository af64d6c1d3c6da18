"""The command line: one clear line and a non-zero exit on bad input; help is fast; the demo runs."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_images


def difftune(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "difftune", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def one_line_error(result: subprocess.CompletedProcess, command: str) -> str:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and "torchvision" not in line]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"difftune {command}: error: ")
    return lines[0]


def test_help_lists_commands_and_is_light():
    t = time.time()
    result = difftune("--help")
    elapsed = time.time() - t
    assert result.returncode == 0
    for command in ("train", "generate", "tiny", "demo", "fetch", "config"):
        assert command in result.stdout
    # --help imports no torch/diffusers: well under the seconds those take
    probe = subprocess.run([sys.executable, "-c", "import sys; from difftune.cli import build_parser; build_parser();"
                            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"],
                           capture_output=True, text=True)
    assert probe.stdout.strip() == "[]", probe.stdout
    assert elapsed < 30


@pytest.mark.parametrize("command", ["train", "generate", "tiny", "demo", "fetch", "config"])
def test_each_command_has_help_with_examples(command):
    result = difftune(command, "--help")
    assert result.returncode == 0 and "example" in result.stdout.lower()


def test_missing_config_file(tmp_path):
    line = one_line_error(difftune("train", str(tmp_path / "nope.yaml")), "train")
    assert "config file not found" in line and "nope.yaml" in line


def test_unknown_key_in_file(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  learning_rte: 1e-4\n")
    line = one_line_error(difftune("train", str(cfg)), "train")
    assert "'train.learning_rte'" in line


def test_missing_model_folder_and_data_folder(tmp_path, tiny_sd):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model:\n  path: {tmp_path / 'no-model'}\ndata:\n  concepts:\n    - dir: {tmp_path}\noutput_dir: {tmp_path / 'o'}\n")
    line = one_line_error(difftune("train", str(cfg)), "train")
    assert "no-model" in line
    cfg.write_text(f"model:\n  path: {tiny_sd}\ndata:\n  resolution: 64\n  concepts:\n    - dir: {tmp_path / 'no-data'}\n"
                   f"output_dir: {tmp_path / 'o'}\n")
    line = one_line_error(difftune("train", str(cfg)), "train")
    assert "folder not found" in line and "no-data" in line


def empty_config(tmp_path) -> str:
    path = tmp_path / "empty.yaml"
    path.write_text("{}\n")
    return str(path)


def test_resolution_not_a_multiple_names_the_model_factor(tmp_path, tiny_sd):
    data = make_images(tmp_path / "data", n=1)
    result = difftune("train", empty_config(tmp_path), f"model.path={tiny_sd}", f"data.concepts=[{{dir: {data}}}]",
                      "data.resolution=66", f"output_dir={tmp_path / 'o'}")
    line = one_line_error(result, "train")
    assert "data.resolution 66 is not a multiple of 8" in line


def test_only_broken_images_is_a_clear_error(tmp_path, tiny_sd):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jpg").write_bytes(b"<html>not found</html>")
    (data / "b.png").write_bytes(b"")
    result = difftune("train", empty_config(tmp_path), f"model.path={tiny_sd}", f"data.concepts=[{{dir: {data}}}]",
                      "data.resolution=64", f"output_dir={tmp_path / 'o'}", "train.precision=no")
    assert result.returncode == 2
    assert "a.jpg" in result.stdout + result.stderr and "b.png" in result.stdout + result.stderr
    assert f"no usable images in {data}: all 2 image files were skipped" in result.stderr


def test_generate_bad_lora_path(tmp_path, tiny_sd):
    line = one_line_error(difftune("generate", "--model", str(tiny_sd), "--lora", str(tmp_path / "x.safetensors"),
                                   "--prompt", "p", "--out", str(tmp_path / "o")), "generate")
    assert "x.safetensors" in line


def test_config_check_and_reference(tmp_path, tiny_sd):
    assert "`train.steps`" in difftune("config", "reference").stdout
    cfg = tmp_path / "c.yaml"
    data = make_images(tmp_path / "data")
    cfg.write_text(f"model:\n  path: {tiny_sd}\ndata:\n  resolution: 64\n  concepts:\n    - dir: {data}\noutput_dir: o\n")
    result = difftune("config", "check", str(cfg))
    assert result.returncode == 0 and "ok (sd, 4 training images, resolution multiple 8)" in result.stdout
    one_line_error(difftune("config", "check", str(cfg), "method.rank=-1"), "config")


@pytest.mark.long(minutes=1)
def test_demo_runs_the_whole_journey(tmp_path):
    result = difftune("demo", "--out", str(tmp_path / "demo"), "--steps", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "demo"
    assert (out / "run" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "grid.png").is_file() and (out / "base" / "000-seed0.png").is_file()
    assert (out / "lora" / "000-seed0.png").is_file() and len(list((out / "data").glob("*.txt"))) == 12
    assert "style 'dotted' present" in result.stdout and "object colour right" in result.stdout
    assert "[4/4]" in result.stdout and "demo finished" in result.stdout

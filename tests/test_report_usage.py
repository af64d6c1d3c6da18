"""report.md tells the truth: the commands it prints work for every family (this test runs them as
written), its timings cover every resumed part of a run, and an init_lora run names its start."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from conftest import base_overrides, make_images
from difftune.config import load_config
from difftune.report import usage
from difftune.train import read_losses, train


def quiet(*_):
    pass


def run_usage(out: Path, cwd: Path, monkeypatch) -> None:
    """Run the report's `difftune generate` command and its Python script exactly as report.md shows them."""
    from difftune.cli import main

    text = (out / "report.md").read_text()
    u = usage(out)
    assert f"```bash\n{u.command}\n```" in text and f"```python\n{u.python}```" in text
    args = shlex.split(u.command)
    assert args[0] == "difftune"
    monkeypatch.chdir(cwd)
    assert main(args[1:]) == 0
    assert list((out / "generated").glob("*.png"))
    exec(compile(u.python, str(cwd / "use.py"), "exec"), {"__name__": "__main__"})
    assert (cwd / "image.png").is_file()


def small(model, data, out, **extra) -> list[str]:
    return base_overrides(model, data, out, steps=1, **{"validation.steps": 2, **extra})


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_sd_report_commands_run_as_written(tiny_sd, images, tmp_path, kind, monkeypatch):
    out = tmp_path / "run"
    train(load_config(None, small(tiny_sd, images, out, **{"method.kind": kind})), log=quiet, progress="off")
    run_usage(out, tmp_path, monkeypatch)


@pytest.fixture(scope="module")
def k22(tmp_path_factory) -> Path:
    from difftune.tiny import make_tiny

    return make_tiny("kandinsky22", tmp_path_factory.mktemp("k22") / "k22")


@pytest.mark.parametrize("part", ["decoder", "prior"])
def test_kandinsky_report_commands_run_as_written(k22, tmp_path, part, monkeypatch):
    """The decoder's commands need --prior and load_lora_adapter (its pipeline has no load_lora_weights);
    the prior's go through a decoder."""
    data = make_images(tmp_path / "data", caption="a photo of sks disc")
    out = tmp_path / "run"
    extra = {"model.options.prior": str(k22 / "prior")} if part == "decoder" else {"model.options.decoder": str(k22 / "decoder")}
    train(load_config(None, small(k22 / part, data, out, **extra)), log=quiet, progress="off")
    text = (out / "report.md").read_text()
    assert "load_lora_weights" not in text
    assert ("--prior " if part == "decoder" else "--prior-lora ") in usage(out).command
    run_usage(out, tmp_path, monkeypatch)


def test_report_timings_cover_every_resumed_part_and_init_lora_is_named(tiny_sd, images, tmp_path):
    first = tmp_path / "first"
    train(load_config(None, base_overrides(tiny_sd, images, first, steps=2)), log=quiet, progress="off")
    out = tmp_path / "run"
    overrides = base_overrides(tiny_sd, images, out, steps=2, **{"method.init_lora": str(first)})
    train(load_config(None, overrides), log=quiet, progress="off")
    train(load_config(None, [*overrides, "train.steps=4"]), log=quiet, progress="off")
    rows = read_losses(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["seconds"] > 0 for r in rows)
    text = (out / "report.md").read_text()
    total = float(re.search(r"training time, all sessions \(s\): ([\d.]+)", text).group(1))
    assert total == pytest.approx(sum(r["seconds"] for r in rows), abs=2e-3)  # both sessions, not the last
    assert f"- started from LoRA: `{first}`" in text

"""report.html per run, validation loss, `difftune sweep`, `difftune compare`, trackers, and both pages
checked in headless Chromium (every image loads, no console error, a screenshot saved).

Screenshots land in ``$DIFFTUNE_SCREENSHOTS`` (default ``test-output/screenshots`` in the repository).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from browser import check_page
from conftest import base_overrides, make_images

from difftune import DifftuneError
from difftune.cli import main
from difftune.config import load_config
from difftune.data.dataset import Item
from difftune.reports import logs
from difftune.reports.compare import write_compare
from difftune.reports.run import load_run
from difftune.train import train
from difftune.validation import split_holdout

HERE = Path(__file__).parent
ROOT = HERE.parent
SCREENSHOTS = Path(os.environ.get("DIFFTUNE_SCREENSHOTS", ROOT / "test-output" / "screenshots"))
PROMPTS = "[a photo of sks disc, a red cube on a table]"


def quiet(*_):
    pass


def small(model: Path, data: Path, out: Path, steps: int = 2, **extra) -> list[str]:
    """A fast run: batch 1, one-step samples, validation on a held-out image."""
    items = {"train.batch_size": 1, "validation.holdout": 0.25, "validation.every": 1, "validation.loss_draws": 2,
             "validation.prompts": PROMPTS, "validation.steps": 1, "checkpoint.every": 1, "train.log_every": 1}
    items.update(extra)
    return base_overrides(model, data, out, steps=steps, **items)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("reports") / "data", n=4, caption="a photo of sks disc")


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory, tiny_sd, data):
    """A run killed after its first checkpoint (SIGKILL), then run again to the end."""
    out = tmp_path_factory.mktemp("resumed") / "run"
    args = small(tiny_sd, data, out, steps=2)
    config = out.parent / "empty.yaml"
    config.write_text("{}\n")
    # every process at this process's thread count (killer.py reads DIFFTUNE_TEST_THREADS, `difftune` itself
    # torch's OMP_NUM_THREADS): the step-0 validation losses of two processes compare exactly only then
    threads = str(torch.get_num_threads())
    env = dict(os.environ, DIFFTUNE_TEST_THREADS=threads, OMP_NUM_THREADS=threads)
    killed = subprocess.run([sys.executable, str(HERE / "killer.py"), "kill-micro", "2", "train", str(config), *args],
                            capture_output=True, text=True, env=env, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    half = load_run(out)
    assert (out / "report.html").is_file(), "a run stopped after a checkpoint has a report already"
    assert not half.finished and half.steps_done == 1
    half_page = (out / "report.html").read_text()
    train(load_config(config, args), log=quiet)
    return out, half_page


def test_holdout_is_deterministic_disjoint_and_kept_out():
    items = [Item(f"/x/{i}.png", None, 0) for i in range(10)]
    kept, held = split_holdout(items, 0.2, seed=3)
    assert len(held) == 2 and len(kept) == 8
    assert {i.path for i in kept} | {i.path for i in held} == {i.path for i in items}
    assert not {i.path for i in kept} & {i.path for i in held}
    assert split_holdout(items, 0.2, seed=3) == (kept, held)
    with pytest.raises(DifftuneError, match="at least 2"):
        split_holdout(items[:1], 0.5, seed=0)


def test_validation_config_errors_name_the_key(tmp_path):
    from difftune.config import validate

    for override, message in (("validation.holdout=1.5", "validation.holdout"),
                              (f"validation.images={tmp_path / 'nope'}", "validation.images: folder not found"),
                              ("validation.loss_draws=0", "validation.loss_draws")):
        cfg = load_config(None, ["model.path=m", "output_dir=o", f"data.concepts=[{{dir: '{tmp_path}'}}]", override])
        with pytest.raises(DifftuneError, match=message):
            validate(cfg)


def test_half_done_run_report_then_resume_timing(resumed_run):
    out, half_page = resumed_run
    assert "1 of 2" in half_page and "not finished" in half_page
    run = load_run(out)
    assert run.finished and run.steps_done == 2
    sessions = logs.sessions(out)
    assert [s.first for s in sessions] == [0, 1], "the second session resumed from the step-1 checkpoint"
    assert all(s.seconds > 0 for s in sessions)
    # validation loss at the base (step 0) and at every validation step; the held-out image was never trained on
    assert [r["step"] for r in run.validation] == [0, 1, 2]
    assert all(r["val_loss"] > 0 for r in run.validation)
    facts = json.loads((out / logs.RUN).read_text())
    held = {i["path"] for i in facts["validation_items"]}
    assert len(held) == 1 and not held & {i["path"] for i in facts["items"]}


def test_report_html_renders_completely_in_chromium(resumed_run):
    out, _ = resumed_run
    page = (out / "report.html").read_text()
    result = check_page(out / "report.html", SCREENSHOTS / "report.png")
    assert result["errors"] == []
    assert result["broken"] == []
    alts = [i["alt"] for i in result["images"]]
    # 2 prompts x steps 0, 1, 2: each prompt written beside its row, step 0 being the base
    for prompt in ("a photo of sks disc", "a red cube on a table"):
        assert [a for a in alts if a.startswith(prompt + ", step")] == [f"{prompt}, step {s}" for s in (0, 1, 2)]
    assert {"training loss, raw and smoothed", "validation loss", "learning rate", "gradient norm"} <= set(alts)
    assert len([a for a in alts if a == "a photo of sks disc"]) == 4, "3 training thumbnails and 1 held out, captioned"
    text = result["text"]
    assert "step 0 (base)" in text and "resumed at step 1" in text and "2 session(s)" in text
    assert "--lora" in page and str(out) in page, "how to use: report.md's generate command for this LoRA"
    assert "src=\"data:image/" in page and "src=\"http" not in page and "src=\"/" not in page, "self-contained"
    assert (SCREENSHOTS / "report.png").stat().st_size > 10_000


def test_report_command_rebuilds_and_shows_eval_scores(resumed_run, tmp_path, capsys):
    out, _ = resumed_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("checkpoints", "cache"))
    (copy / "eval.json").write_text(json.dumps({"style": {"oracle": 0.75}, "drift": 0.1}))
    assert main(["report", str(copy)]) == 0
    page = (copy / "report.html").read_text()
    assert "Scores (eval.json)" in page and "style/oracle (higher is better)" in page and "drift (lower is better)" in page


# ---- sweep ---------------------------------------------------------------------------------------------------


def sweep_config(tmp_path, tiny_sd, data) -> Path:
    import yaml

    cfg = {"model": {"path": str(tiny_sd)}, "data": {"resolution": 64, "concepts": [{"dir": str(data), "prompt": "a photo of sks disc"}]},
           "train": {"steps": 2, "batch_size": 1, "lr": 1e-3, "precision": "no", "log_every": 1},
           "checkpoint": {"every": 1, "keep": 1},
           "validation": {"holdout": 0.25, "every": 2, "loss_draws": 2, "prompts": ["a photo of sks disc"], "steps": 1},
           "output_dir": str(tmp_path / "unused")}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("grid, message", [
    (["method.rnak=4,8"], "--grid method.rnak=4: unknown config key 'method.rnak'; did you mean 'method.rank'?"),
    (["method.rank=4,four"], "--grid method.rank=four: method.rank: expected an integer, got 'four'"),
    (["train.lr=1e-3,-1"], "train.lr must be > 0"),
    (["method.rank=4,8", "train.lr=1e-3", "--zip"], "--zip needs the same number of values"),
    (["method.rank"], "expected key.path=value1,value2"),
])
def test_bad_grid_fails_before_any_run(tmp_path, tiny_sd, data, capsys, grid, message):
    args = [a if a == "--zip" else f"--grid={a}" for a in grid]
    assert main(["sweep", str(sweep_config(tmp_path, tiny_sd, data)), *args, "--out", str(tmp_path / "sw")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "sw").exists(), "nothing was started"


def test_dry_run_lists_every_combination(tmp_path, tiny_sd, data, capsys):
    config = sweep_config(tmp_path, tiny_sd, data)
    assert main(["sweep", str(config), "--grid", "method.rank=4,8", "--grid", "train.lr=1e-3,1e-4", "--out",
                 str(tmp_path / "sw"), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[1:]] == ["rank-4_lr-1e-3", "rank-4_lr-1e-4", "rank-8_lr-1e-3", "rank-8_lr-1e-4"]
    assert main(["sweep", str(config), "--grid", "method.rank=4,8", "--grid", "train.lr=1e-3,1e-4", "--zip",
                 "--out", str(tmp_path / "sw"), "--dry-run"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]] == ["rank-4_lr-1e-3", "rank-8_lr-1e-4"]
    assert not (tmp_path / "sw").exists()


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_sd, data):
    """A two-run sweep whose second run was killed after its first checkpoint before the sweep started."""
    root = tmp_path_factory.mktemp("sweep")
    config = sweep_config(root, tiny_sd, data)
    out = root / "sw"
    # every process at this process's thread count (killer.py reads DIFFTUNE_TEST_THREADS, `difftune` itself
    # torch's OMP_NUM_THREADS): the step-0 validation losses of two processes compare exactly only then
    threads = str(torch.get_num_threads())
    env = dict(os.environ, DIFFTUNE_TEST_THREADS=threads, OMP_NUM_THREADS=threads)
    killed = subprocess.run([sys.executable, str(HERE / "killer.py"), "kill-micro", "2", "train", str(config),
                             "method.rank=8", f"output_dir={out / 'rank-8'}"], capture_output=True, text=True, env=env,
                            timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    cmd = [sys.executable, "-m", "difftune", "sweep", str(config), "--grid", "method.rank=4,8", "--out", str(out)]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    return config, out, cmd, env, first.stdout


def test_sweep_runs_each_combination_resumes_the_interrupted_and_skips_the_finished(sweep):
    config, out, cmd, env, stdout = sweep
    assert "[1/2] training rank-4" in stdout and "[2/2] resuming rank-8" in stdout
    state = json.loads((out / "sweep.json").read_text())
    assert [(r["name"], r["status"], r["overrides"]) for r in state["runs"]] == [
        ("rank-4", "done", ["method.rank=4"]), ("rank-8", "done", ["method.rank=8"])]
    assert [s.first for s in logs.sessions(out / "rank-8")] == [0, 1], "rank-8 continued from its checkpoint"
    for name, rank in (("rank-4", 4), ("rank-8", 8)):
        saved = load_config(out / name / "config.yaml")
        assert saved.method.rank == rank and saved.output_dir == str(out / name)
        assert (out / name / "report.html").is_file()
    # fixed validation inputs: both runs score the same base model identically at step 0
    v4, v8 = load_run(out / "rank-4").validation, load_run(out / "rank-8").validation
    assert v4[0]["val_loss"] == v8[0]["val_loss"] and v4[-1]["val_loss"] != v8[-1]["val_loss"]
    before = (out / "rank-4" / "pytorch_lora_weights.safetensors").stat().st_mtime_ns
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "rank-4: finished before, skipped" in again.stdout and "rank-8: finished before, skipped" in again.stdout
    assert (out / "rank-4" / "pytorch_lora_weights.safetensors").stat().st_mtime_ns == before
    assert (out / "compare" / "compare.html").is_file()


# ---- compare ------------------------------------------------------------------------------------------------


def test_compare_sweep_other_family_and_a_folder_without_logs(sweep, tmp_path, tiny_flux, data, capsys):
    _, out, _, _, _ = sweep
    flux = tmp_path / "flux-run"
    train(load_config(None, base_overrides(tiny_flux, data, flux, steps=1, **{"train.batch_size": 1})), log=quiet)
    empty = tmp_path / "empty-run"
    empty.mkdir()
    (empty / "config.yaml").write_text("output_dir: x\n")
    for name, score in (("rank-4", 0.5), ("rank-8", 0.75)):
        (out / name / "eval.json").write_text(json.dumps({"style": {"oracle": score}, "drift": 1 - score}))
    page = write_compare([out, flux, empty], tmp_path / "cmp")
    assert "skipping" in capsys.readouterr().out
    html = page.read_text()
    assert "empty-run: no training logs" in html
    result = check_page(page, SCREENSHOTS / "compare.png")
    assert result["errors"] == [] and result["broken"] == []
    alts = [i["alt"] for i in result["images"]]
    assert [a for a in alts if a.startswith("rank-") and ", step" in a] == [
        f"{run}: a photo of sks disc, step {s}" for run in ("rank-4", "rank-8") for s in (0, 2)]
    assert "training loss of every run" in alts and "validation loss of every run" in alts
    text = result["text"]
    assert "method.rank" in text and "family" in text and "flux" in text and "different families" in text
    # the best of each score column is marked: rank-8 has the higher oracle score and the lower drift
    for column in ("style/oracle", "drift"):
        assert html.count(f"{column} (") == 1
    assert html.count("num best") >= 2 and "0.75 ★" in html and "0.25 ★" in html
    assert (SCREENSHOTS / "compare.png").stat().st_size > 10_000


def test_compare_of_nothing_usable_is_one_line(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "difftune compare: error: nothing to compare: none of the folders holds a run with training logs"


# ---- trackers ----------------------------------------------------------------------------------------------


def test_report_to_none_writes_no_tracker_files(tmp_path, tiny_sd, data):
    out = tmp_path / "run"
    train(load_config(None, base_overrides(tiny_sd, data, out, steps=1, **{"train.report_to": "[]"})), log=quiet)
    assert not list((out / "logs").rglob("events.out.tfevents.*"))
    assert (out / "report.html").is_file()


def test_report_to_tensorboard_and_wandb_offline(tmp_path, tiny_sd, data, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    overrides = base_overrides(tiny_sd, data, out, steps=2, **{"train.report_to": "[tensorboard, wandb]",
                                                               "train.log_every": 1, "validation.holdout": 0.25})
    train(load_config(None, overrides), log=quiet)
    assert list((out / "logs" / "difftune").glob("events.out.tfevents.*"))
    (run_dir,) = (out / "logs" / "wandb").glob("offline-run-*")
    (history,) = run_dir.glob("run-*.wandb")
    assert history.stat().st_size > 0
    # the offline run file holds every logged number (wandb stores each value JSON-encoded)
    logged = history.read_bytes()
    for row in logs.read_jsonl(out / logs.VALIDATION):
        assert b"val_loss" in logged and json.dumps(row["val_loss"]).encode() in logged
    for row in logs.read_jsonl(out / logs.LOSS):
        assert json.dumps(row["loss"]).encode() in logged and json.dumps(row["grad_norm"]).encode() in logged


def test_shipped_sweep_configs_plan(tmp_path, capsys):
    """configs/sweeps/*.yaml: valid configs whose documented grids plan (model and data pointed at stand-ins)."""
    shipped = sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))
    assert shipped
    data = make_images(tmp_path / "data", n=8)
    for path in shipped:
        text = path.read_text()
        assert "difftune sweep" in text and "difftune compare" in text, f"{path.name} says how to run it"
        assert main(["sweep", str(path), f"data.concepts.0.dir={data}", "--grid", "method.rank=4,16", "--grid",
                     "train.lr=1e-4,5e-4", "--out", str(tmp_path / "lora"), "--dry-run"]) == 0
        assert main(["sweep", str(path), f"data.concepts.0.dir={data}", "method.kind=full", "--grid",
                     "train.lr=1e-5,5e-5", "--out", str(tmp_path / "full"), "--dry-run"]) == 0
        assert len(capsys.readouterr().out.splitlines()) == (1 + 4) + (1 + 2)


def test_holdout_takes_its_share_of_every_concept():
    items = [Item(f"/a/{i}.png", None, 0) for i in range(10)] + [Item(f"/b/{i}.png", None, 1) for i in range(4)]
    kept, held = split_holdout(items, 0.25, seed=0)
    assert sorted(i.concept for i in held) == [0, 0, 1]  # round(2.5) = 2 of ten, one of four
    assert {i.concept for i in kept} == {0, 1}
    _, held = split_holdout(items[:3], 0.1, seed=0)
    assert len(held) == 1, "at least one image is held out"


def test_a_report_that_cannot_be_drawn_does_not_stop_training(tmp_path, tiny_sd, data, monkeypatch):
    import difftune.reports.run_page as run_page

    def broken(run):
        raise ValueError("no fonts")

    monkeypatch.setattr(run_page, "render_run", broken)
    lines = []
    out = train(load_config(None, base_overrides(tiny_sd, data, tmp_path / "run", steps=1)), log=lines.append)
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert "warning: report.html not written (ValueError: no fonts)" in lines


def test_scores_of_a_difftune_eval_file_are_its_final_weights_metrics():
    """The comparison's score table reads `difftune eval`'s own eval.json: one column per metric of the
    final weights (not one per list index and setting)."""
    from difftune.reports.run import flat_scores, lower_is_better

    doc = {"settings": {"steps": 20, "guidance": 7.5, "seed": 0},
           "results": [{"weights": "base", "step": 0, "metrics": {"zdots.score": 0.1, "drift": 0.0}},
                       {"weights": "step-00000050", "step": 50, "metrics": {"zdots.score": 0.4, "drift": 0.2}},
                       {"weights": "final", "step": 100, "metrics": {"zdots.score": 0.9, "drift": 0.3}}]}
    assert flat_scores(doc) == {"zdots.score": 0.9, "drift": 0.3}
    assert lower_is_better("drift") and not lower_is_better("zdots.score")
    assert flat_scores({"style": {"oracle": 0.5}, "drift": 0.5}) == {"style/oracle": 0.5, "drift": 0.5}  # other files as before

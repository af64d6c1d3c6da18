"""The GPU suite (`difftune bench --suite gpu`), proven on a CPU with ``--tiny``: every case runs in its
own process and produces its row, goals are judged, results.jsonl and results.md are written, and the
peer rows are produced through the peer machinery.

What the peer rows prove here, honestly: CI has no internet, so diffusers' example scripts cannot be
fetched. The test writes two small stand-in scripts under the real scripts' file names that speak the
same command line (the flags `bench.peers.PEERS` builds), load the denoiser from the pipeline folder
the peer runner wrote and train a parameter with AdamW for ``--max_train_steps`` steps. So this proves
the peer runner (pipeline folder, image folders, command line, a separate process under the probe,
optimizer steps timed, the ratio against difftune's row), not the behaviour of the real scripts; the
CPU comparison in BENCHMARKS.md ran the real ones."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

FAKE_PEER = '''
import argparse, json, os, sys
from pathlib import Path
import torch
import diffusers

p = argparse.ArgumentParser()
p.add_argument("--lora_alpha")
p.add_argument("--lora_layers")
for flag in ["--pretrained_model_name_or_path", "--output_dir", "--resolution", "--train_batch_size", "--rank",
             "--mixed_precision", "--max_train_steps", "--learning_rate", "--lr_scheduler", "--lr_warmup_steps",
             "--seed", "--checkpointing_steps", "--dataloader_num_workers", DATA_FLAG, PROMPT_FLAG]:
    p.add_argument(flag, required=flag != PROMPT_FLAG)
for flag in ["--cache_latents", "--center_crop", "--gradient_checkpointing"]:
    p.add_argument(flag, action="store_true")
args = p.parse_args()
images = [f for f in os.listdir(getattr(args, DATA_FLAG[2:])) if f.endswith(".png")]
assert len(images) >= int(args.train_batch_size), "fewer images than a batch: the real scripts train smaller batches"
index = json.loads((Path(args.pretrained_model_name_or_path) / "model_index.json").read_text())
library, cls = index[DENOISER]
model = getattr(diffusers, cls).from_pretrained(args.pretrained_model_name_or_path, subfolder=DENOISER)
w = torch.nn.Parameter(torch.zeros(int(args.rank), sum(p.numel() for p in model.parameters()) // 1000))
opt = torch.optim.AdamW([w], lr=float(args.learning_rate))
for step in range(int(args.max_train_steps)):
    loss = (w - 1).square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
Path(args.output_dir).mkdir(parents=True, exist_ok=True)
(Path(args.output_dir) / "done.txt").write_text(str(int(args.max_train_steps)))
'''


def write_fake_peers(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data_flag, prompt_flag, denoiser in (
        ("train_dreambooth_lora_flux.py", "--instance_data_dir", "--instance_prompt", "transformer"),
        ("train_text_to_image_lora.py", "--train_data_dir", "--caption_column", "unet"),
    ):
        (folder / name).write_text(f"DATA_FLAG, PROMPT_FLAG, DENOISER = {data_flag!r}, {prompt_flag!r}, {denoiser!r}\n"
                                   + FAKE_PEER)
    return folder


@pytest.mark.long(minutes=2)
def test_tiny_gpu_suite_produces_every_row(tmp_path):
    from difftune.bench.suite import gpu_cases

    peers = write_fake_peers(tmp_path / "peers")
    out = tmp_path / "suite"
    proc = subprocess.run(
        [sys.executable, "-m", "difftune", "bench", "--suite", "gpu", "--tiny", "--out", str(out),
         "--peer-scripts", str(peers), "--budget", "3000"],
        capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    names = [c.name for c in gpu_cases()]
    assert [r["case"] for r in results] == names
    for r in results:
        assert r["status"] == "ok", (r["case"], r.get("error"), (out / "logs" / f"{r['case']}.log").read_text()[-1500:])
        assert r["row"]["sec_per_step"] > 0 and r["met"] in (True, False), r
    by_name = {r["case"]: r for r in results}
    assert by_name["sd-lora"]["row"]["batch"] in (1, 2) and len(by_name["sd-lora"]["rows"]) == 2  # the batch sweep
    for peer in ("peer-flux", "peer-sd"):
        row = by_name[peer]["row"]
        assert row["optimizer_steps"] == 5  # the stand-in's steps, each seen by the probe
        assert row["peer_ratio"] > 0 and row["peer_script"].startswith("examples/")
        assert (out / "work" / f"{row['family']}-tiny-peer-out" / "done.txt").read_text() == "5"
    table = (out / "results.md").read_text()
    for name in names:
        assert f"| {name} |" in table
    assert "proves the suite" in table


def test_peer_images_fill_a_batch(tmp_path):
    """diffusers' scripts do not repeat a folder smaller than the batch (a GPU run once timed the SD
    script on batches of 4 instead of 32), so the peer folders hold at least a batch of images."""
    from difftune.bench.peers import write_images

    root = write_images(tmp_path, 16, batch=6)
    assert len(list((root / "plain").glob("*.png"))) == 6
    assert len(list((root / "imagefolder").glob("*.png"))) == 6
    assert len((root / "imagefolder" / "metadata.jsonl").read_text().splitlines()) == 6
    assert len(list((write_images(tmp_path, 16) / "plain").glob("*.png"))) == 4


def test_budget_spent_skips_the_rest(tmp_path):
    from difftune.bench.suite import SuiteCase, run_suite

    cases = [SuiteCase("a", "none", ["--family", "flux", "--steps", "1", "--warmup", "0"]),
             SuiteCase("b", "none", ["--family", "flux", "--steps", "1"])]
    results = run_suite(tmp_path, budget=10, cases=cases, log=lambda *_: None)
    assert [r["status"] for r in results] == ["skipped", "skipped"]
    assert "budget" in results[0]["reason"]
    assert (tmp_path / "results.md").read_text().count("skipped") == 2


def test_a_crashing_case_costs_only_itself(tmp_path):
    from difftune.bench.suite import SuiteCase, run_suite

    cases = [SuiteCase("broken", "none", ["--family", "nosuch"]),
             SuiteCase("fine", "none", ["--family", "flux", "--steps", "1", "--warmup", "0"])]
    results = run_suite(tmp_path, budget=600, cases=cases, log=lambda *_: None)
    assert results[0]["status"] == "failed" and "nosuch" in results[0]["error"]
    assert results[1]["status"] == "ok"


def test_suite_needs_out(capsys):
    from difftune.cli import main

    assert main(["bench", "--suite", "gpu"]) != 0
    assert "--out" in capsys.readouterr().err

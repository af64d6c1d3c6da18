"""`difftune plan`: parameter counts from config files only (meta device), per-strategy estimates, a suggestion."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import base_overrides
from difftune.cli import main as cli
from difftune.config import load_config
from difftune.parallel.plan import GB, count_config, estimates, suggest

# FLUX.1-dev's transformer and VAE configs (as published with the model): the planner reads nothing else
FLUX_DEV_TRANSFORMER = {
    "_class_name": "FluxTransformer2DModel", "attention_head_dim": 128, "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": True, "in_channels": 64, "joint_attention_dim": 4096, "num_attention_heads": 24,
    "num_layers": 19, "num_single_layers": 38, "patch_size": 1, "pooled_projection_dim": 768,
}
FLUX_DEV_VAE = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4, "in_channels": 3,
    "latent_channels": 16, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 1024,
    "scaling_factor": 0.3611, "shift_factor": 0.1159, "use_post_quant_conv": False, "use_quant_conv": False,
}


def flux_dev_configs(folder: Path) -> Path:
    """A FLUX.1-dev folder with config files and no weights (the text encoders are off the device in training)."""
    for part, conf in (("transformer", FLUX_DEV_TRANSFORMER), ("vae", FLUX_DEV_VAE)):
        (folder / part).mkdir(parents=True)
        (folder / part / "config.json").write_text(json.dumps(conf))
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"]}))
    return folder


def test_counts_from_config_files_equal_the_loaded_model(tiny_sd, tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd), safety_checker=None)
    unet = sum(p.numel() for p in pipe.unet.parameters())
    full = count_config(load_config(None, base_overrides(tiny_sd, tmp_path, tmp_path / "o", **{"method.kind": "full"})))
    assert full.trained_parts == {"unet": (unet, 0)}
    assert full.resident_frozen == sum(p.numel() for p in pipe.vae.parameters())
    lora = count_config(load_config(None, base_overrides(tiny_sd, tmp_path, tmp_path / "o", **{"method.rank": 4})))
    trainable, frozen = lora.trained_parts["unet"]
    assert frozen == unet and 0 < trainable < unet / 5


def test_sharding_divides_what_it_shards(tiny_sd, tmp_path):
    c = count_config(load_config(None, base_overrides(tiny_sd, tmp_path, tmp_path / "o", **{"method.kind": "full"})))
    one = {r.strategy: r for r in estimates(c, gpus=2, precision="bf16", batch=1, checkpointing=False)}
    eight = {r.strategy: r for r in estimates(c, gpus=8, precision="bf16", batch=1, checkpointing=False)}
    assert eight["fsdp"].optimizer == pytest.approx(one["fsdp"].optimizer / 4)
    assert eight["ddp"].total == one["ddp"].total
    assert one["fsdp"].total < one["ddp"].total


def test_flux_dev_full_fine_tune_on_8_x_80_gb_matches_the_readme(tmp_path, capsys):
    """Seed 003's run (the shipped 8-GPU config): FSDP fits where DDP cannot; the README shows this output."""
    model = flux_dev_configs(tmp_path / "flux-dev")
    config = Path(__file__).parent.parent / "configs" / "flux-dev-full-8gpu.yaml"
    assert cli(["plan", str(config), f"model.path={model}", "--gpus", "8", "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    assert "11,901.4M trained parameters" in out
    cfg = load_config(config, [f"model.path={model}"])
    rows = {r.strategy: r for r in estimates(count_config(cfg), gpus=8, precision="bf16", batch=1, checkpointing=True)}
    assert not rows["ddp"].fits(80 * GB) and rows["fsdp"].fits(80 * GB)
    # weights, gradients and AdamW states of 11.9B fp32 parameters, an eighth each
    assert rows["fsdp"].optimizer == pytest.approx(11.9014e9 * 8 / 8, rel=1e-3)
    assert suggest(list(rows.values()), 80 * GB).strategy == "fsdp"
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = re.search(r"<!-- plan:flux-dev-8x80 -->\n```text\n(.*?)```", readme, re.S)
    assert block, "README lacks the plan output block"
    assert block.group(1).strip() == out.strip().replace(str(model), "black-forest-labs/FLUX.1-dev")


def test_plan_bad_input_is_one_line(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    assert cli(["plan", str(config), f"model.path={tmp_path}", "--gpus", "0"]) == 2
    err = capsys.readouterr().err
    assert "--gpus must be >= 1" in err and len(err.strip().splitlines()) == 1

"""`difftune export`: LoRAs in the kohya layout that diffusers (and so ComfyUI, A1111, kohya, which read
the same names) loads to the same images as the diffusers-layout file, and the way back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from difftune import DifftuneError
from difftune.cli import main
from difftune.export import export_lora, read_diffusers, read_file, read_kohya, write_kohya
from difftune.formats.kohya import KohyaLayout, LoraWeights, from_kohya, fuse, split, to_kohya
from difftune.families.flux.family import Flux
from difftune.families.sd.family import StableDiffusion

PROMPT = "a photo of sks dog"
CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
#: FLUX double-block attention: diffusers' kohya reader splits fused qkv layers of any size, but
#: single_blocks_N_linear1 only at FLUX.1's own sizes (3072 / 12288) and it drops the embedders and
#: final layer (their keys lose the transformer prefix): those are checked at FLUX.1 sizes below.
DOUBLE_ATTENTION = r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"


def add_random_lora(module, targets, rank, alpha, seed):
    """A LoRA with random A and B (a trained LoRA, not the zero-B start) via peft, as diffusers does."""
    from peft import LoraConfig

    torch.manual_seed(seed)
    module.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False))


def save_diffusers_lora(pipe, folder: Path, parts: list[str]) -> Path:
    """The pipeline's LoRA as its own ``save_lora_weights`` writes it, rank and alpha in the header."""
    from peft.utils import get_peft_model_state_dict

    kwargs = {}
    for part in parts:
        module = getattr(pipe, part)
        kwargs[f"{part}_lora_layers"] = get_peft_model_state_dict(module)
        kwargs[f"{part}_lora_adapter_metadata"] = module.peft_config["default"].to_dict()
    type(pipe).save_lora_weights(str(folder), **kwargs)
    return folder / "pytorch_lora_weights.safetensors"


def flux_pipe(path, lora=None):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    return pipe


def flux_images(pipe):
    return pipe(PROMPT, height=64, width=64, num_inference_steps=2, max_sequence_length=16, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def lora_modules(module) -> set[str]:
    return {n.split(".lora_A")[0] for n, _ in module.named_parameters() if ".lora_A" in n}


@pytest.fixture(scope="module")
def flux_lora(tiny_flux, tmp_path_factory) -> Path:
    """Double-block attention LoRA (rank 4, alpha 8) plus a CLIP LoRA (rank 4, alpha 2)."""
    folder = tmp_path_factory.mktemp("flux-lora")
    pipe = flux_pipe(tiny_flux)
    add_random_lora(pipe.transformer, DOUBLE_ATTENTION, 4, 8, seed=1)
    add_random_lora(pipe.text_encoder, CLIP_TARGETS, 4, 2, seed=2)
    return save_diffusers_lora(pipe, folder, ["transformer", "text_encoder"])


def test_flux_kohya_file_gives_the_same_images_in_diffusers(tiny_flux, flux_lora, tmp_path):
    out = tmp_path / "style-kohya.safetensors"
    assert main(["export", str(flux_lora), "--format", "kohya", "--family", "flux", "--out", str(out)]) == 0
    tensors, header = read_file(out)
    assert header["ss_network_dim"] == "4"
    assert all(k.startswith(("lora_unet_", "lora_te1_")) and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
               for k in tensors)
    # BFL names; q, k, v fused block-diagonally: rank 3 x 4, alpha 3 x 8 keeps the scale 2
    qkv = "lora_unet_double_blocks_0_img_attn_qkv"
    assert tensors[f"{qkv}.lora_down.weight"].shape == (12, 32) and tensors[f"{qkv}.lora_up.weight"].shape == (96, 12)
    assert tensors[f"{qkv}.alpha"].item() == 24.0
    assert "lora_unet_double_blocks_0_txt_attn_proj.lora_down.weight" in tensors
    assert tensors["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha"].item() == 2.0
    assert "lora_te1_text_model_encoder_layers_1_mlp_fc2.lora_up.weight" in tensors

    base = flux_images(flux_pipe(tiny_flux))
    from_diffusers = flux_pipe(tiny_flux, flux_lora)
    from_kohya_file = flux_pipe(tiny_flux, out)
    for part in ("transformer", "text_encoder"):
        assert lora_modules(getattr(from_kohya_file, part)) == lora_modules(getattr(from_diffusers, part))
    a, b = flux_images(from_diffusers), flux_images(from_kohya_file)
    assert np.abs(a - base).max() > 1e-2
    np.testing.assert_allclose(b, a, atol=1e-5)


# FLUX.1-dev's sizes: hidden 3072, MLP 12288, T5 4096, CLIP 768, timestep 256, latents 64
D, MLP = 3072, 12288
FLUX1_SHAPES = {
    **{f"transformer_blocks.0.attn.{m}": (D, D) for m in
       ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")},
    **{f"transformer_blocks.0.{ff}.net.0.proj": (D, MLP) for ff in ("ff", "ff_context")},
    **{f"transformer_blocks.0.{ff}.net.2": (MLP, D) for ff in ("ff", "ff_context")},
    **{f"transformer_blocks.0.{n}.linear": (D, 6 * D) for n in ("norm1", "norm1_context")},
    **{f"single_transformer_blocks.0.attn.{m}": (D, D) for m in ("to_q", "to_k", "to_v")},
    "single_transformer_blocks.0.proj_mlp": (D, MLP),
    "single_transformer_blocks.0.proj_out": (D + MLP, D),
    "single_transformer_blocks.0.norm.linear": (D, 3 * D),
    "x_embedder": (64, D), "context_embedder": (4096, D),
    "time_text_embed.timestep_embedder.linear_1": (256, D), "time_text_embed.timestep_embedder.linear_2": (D, D),
    "time_text_embed.text_embedder.linear_1": (768, D), "time_text_embed.text_embedder.linear_2": (D, D),
    "time_text_embed.guidance_embedder.linear_1": (256, D), "time_text_embed.guidance_embedder.linear_2": (D, D),
    "norm_out.linear": (D, 2 * D), "proj_out": (D, 64),
}


@pytest.mark.parametrize("modules", ["all-linear", "attention"])
def test_flux_kohya_layout_at_flux1_sizes_is_what_diffusers_reads(tmp_path, modules):
    """Every FLUX.1 module, single blocks and final layer included, through diffusers' own reader."""
    from diffusers import FluxPipeline

    g = torch.Generator().manual_seed(0)
    names = [m for m in FLUX1_SHAPES if modules == "all-linear" or ".attn." in m]
    loras = {("transformer", m): LoraWeights(torch.randn(2, FLUX1_SHAPES[m][0], generator=g),
                                             torch.randn(FLUX1_SHAPES[m][1], 2, generator=g), 6.0) for m in names}
    file = tmp_path / "flux1.safetensors"
    write_kohya(to_kohya(loras, Flux.kohya_layout()), file)
    tensors, _ = read_file(file)
    assert tensors["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (3 * D + MLP, 8)
    read = FluxPipeline.lora_state_dict(str(file))
    for (_, module), w in loras.items():
        # the reader bakes alpha / rank into the weights; it leaves the transformer prefix off the
        # embedders and final layer (then drops them when loading: a diffusers limitation).
        # Changes are compared on probe inputs: the full matrices are up to 18432 x 3072.
        prefix = "transformer." if "blocks" in module else ""
        down, up = read[f"{prefix}{module}.lora_A.weight"], read[f"{prefix}{module}.lora_B.weight"]
        probe = torch.randn(w.down.shape[1], 3, generator=g)
        expected = w.up @ (w.down @ probe) * w.scale
        assert ((up @ (down @ probe) - expected).norm() / expected.norm()).item() < 1e-5, module
    # a module no LoRA adapted reads back as a zero change (the padding block of linear1)
    if modules == "attention":
        mlp = "transformer.single_transformer_blocks.0.proj_mlp"
        assert not read[f"{mlp}.lora_B.weight"].any() and not read[f"{mlp}.lora_A.weight"].any()


def test_flux_all_linear_round_trip_is_exact(tiny_flux, tmp_path):
    pipe = flux_pipe(tiny_flux)
    add_random_lora(pipe.transformer, "all-linear", 4, 2, seed=3)
    add_random_lora(pipe.text_encoder, CLIP_TARGETS, 2, 2, seed=4)
    original = save_diffusers_lora(pipe, tmp_path / "orig", ["transformer", "text_encoder"])
    kohya = export_lora(original, "kohya", tmp_path / "k.safetensors", family="flux")
    assert "lora_unet_final_layer_adaLN_modulation_1.lora_down.weight" in read_file(kohya)[0]
    back = export_lora(kohya, "diffusers", tmp_path / "back", family="flux")
    assert back == tmp_path / "back" / "pytorch_lora_weights.safetensors"
    before, after = (read_diffusers(*read_file(f), f) for f in (original, back))
    assert before.keys() == after.keys()
    for key, w in before.items():
        if key[1] in ("norm_out.linear", "proj_out"):  # final layer: scale folded into the weights
            torch.testing.assert_close(after[key].delta(), w.delta())
            continue
        assert torch.equal(after[key].down, w.down) and torch.equal(after[key].up, w.up), key
        assert after[key].alpha == w.alpha, key
    np.testing.assert_allclose(flux_images(flux_pipe(tiny_flux, back)), flux_images(flux_pipe(tiny_flux, original)),
                               atol=1e-5)


def test_a_shared_rank_fused_lora_splits_into_rows():
    """kohya trains a fused qkv layer with one shared down projection: each module gets its rows."""
    g = torch.Generator().manual_seed(0)
    fused = LoraWeights(torch.randn(4, 8, generator=g), torch.randn(24, 4, generator=g), 2.0)
    parts = split(fused, (8, 8, 8))
    assert [p.rank for p in parts] == [4, 4, 4] and all(p.alpha == 2.0 for p in parts)
    torch.testing.assert_close(torch.cat([p.delta() for p in parts]), fused.delta())
    # and fusing per-module LoRAs of different scales keeps every module's own change
    a = LoraWeights(torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g), 4.0)
    b = LoraWeights(torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g), 1.0)
    both = fuse([a, None, b], (8, 8, 8))
    assert both.rank == 6
    torch.testing.assert_close(both.delta(), torch.cat([a.delta(), torch.zeros(8, 8), b.delta()]))
    first, missing, last = split(both, (8, 8, 8))
    assert missing is None
    torch.testing.assert_close(first.delta(), a.delta())
    torch.testing.assert_close(last.delta(), b.delta())


def test_sd_kohya_file_gives_the_same_images_in_diffusers(tiny_sd, tmp_path):
    from diffusers import StableDiffusionPipeline

    def sd_pipe(lora=None):
        pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd))
        pipe.set_progress_bar_config(disable=True)
        if lora is not None:
            pipe.load_lora_weights(str(lora))
        return pipe

    def sd_images(pipe):
        return pipe(PROMPT, height=64, width=64, num_inference_steps=2, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    pipe = sd_pipe()
    add_random_lora(pipe.unet, "all-linear", 4, 8, seed=5)
    add_random_lora(pipe.text_encoder, CLIP_TARGETS, 4, 2, seed=6)
    original = save_diffusers_lora(pipe, tmp_path / "orig", ["unet", "text_encoder"])
    kohya = tmp_path / "dog.safetensors"
    assert main(["export", str(original), "--format", "kohya", "--family", "sd", "--out", str(kohya)]) == 0
    tensors, _ = read_file(kohya)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in tensors
    assert "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj.lora_up.weight" in tensors
    assert "lora_unet_time_embedding_linear_1.alpha" in tensors
    assert tensors["lora_te_text_model_encoder_layers_0_self_attn_k_proj.alpha"].item() == 2.0

    from_diffusers, from_kohya_file = sd_pipe(original), sd_pipe(kohya)
    for part in ("unet", "text_encoder"):
        assert lora_modules(getattr(from_kohya_file, part)) == lora_modules(getattr(from_diffusers, part))
    a, b = sd_images(from_diffusers), sd_images(from_kohya_file)
    assert np.abs(a - sd_images(sd_pipe())).max() > 1e-2
    np.testing.assert_allclose(b, a, atol=1e-5)

    back = export_lora(kohya, "diffusers", tmp_path / "back.safetensors", family="sd")
    np.testing.assert_allclose(sd_images(sd_pipe(back)), a, atol=1e-5)


def test_kohya_names_split_back_into_module_paths(tiny_sd, tiny_flux):
    """Every linear and conv layer of SD's UNet and CLIP, and FLUX's CLIP, maps to a kohya name and back."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextModel

    def layers(model):
        return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]

    cases = [
        (StableDiffusion.kohya_layout(), "unet", layers(UNet2DConditionModel.from_pretrained(str(tiny_sd / "unet")))),
        (StableDiffusion.kohya_layout(), "text_encoder", layers(CLIPTextModel.from_pretrained(str(tiny_sd / "text_encoder")))),
        (Flux.kohya_layout(), "text_encoder", layers(CLIPTextModel.from_pretrained(str(tiny_flux / "text_encoder")))),
        (KohyaLayout({"transformer": "lora_transformer"}), "transformer",
         layers(FluxTransformer2DModel.from_pretrained(str(tiny_flux / "transformer")))),
    ]
    for layout, part, names in cases:
        assert len(names) > 10
        for name in names:
            kohya = layout.module_for(part, name).name
            assert "." not in kohya and layout.module_named(part, kohya).modules == (name,), name
    assert StableDiffusion.kohya_layout().module_for("text_encoder", "encoder.layers.0.mlp.fc1").name == \
        "text_model_encoder_layers_0_mlp_fc1"


def test_export_reads_the_family_from_a_run_folder_and_says_what_is_wrong(tiny_flux, flux_lora, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "pytorch_lora_weights.safetensors").write_bytes(flux_lora.read_bytes())
    (run / "config.yaml").write_text(f"model:\n  path: {tiny_flux}\noutput_dir: {run}\n")
    out = tmp_path / "style.safetensors"
    assert main(["export", str(run), "--format", "kohya", "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    assert any(k.startswith("lora_unet_double_blocks_0_") for k in read_file(out)[0])

    cases = [
        (["export", str(out), "--format", "kohya", "--family", "flux", "--out", str(tmp_path / "x.safetensors")],
         "already in the kohya layout"),
        (["export", str(flux_lora), "--format", "kohya", "--out", str(tmp_path / "x.safetensors")], "--family"),
        (["export", str(run), "--format", "kohya", "--out", str(tmp_path / "x.pt")], ".safetensors"),
        (["export", str(run), "--format", "diffusers", "--out", str(tmp_path / "y")], "not in the kohya layout"),
        (["export", str(tmp_path / "nothing"), "--format", "kohya", "--family", "flux", "--out", str(out)], "no LoRA file"),
        (["export", str(out), "--format", "diffusers", "--family", "sd", "--out", str(tmp_path / "z")], "lora_unet"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_unknown_kohya_names_are_refused(tmp_path):
    w = LoraWeights(torch.zeros(2, 4), torch.zeros(4, 2), 2.0)
    with pytest.raises(DifftuneError, match="not a FLUX module name"):
        from_kohya({"lora_unet_double_blocks_0_img_attn_foo": w}, Flux.kohya_layout())
    with pytest.raises(DifftuneError, match="belongs to no part"):
        from_kohya({"lora_te2_encoder_block_0": w}, Flux.kohya_layout())
    bad = tmp_path / "dora.safetensors"
    from safetensors.torch import save_file

    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 4), "lora_unet_x.dora_scale": torch.zeros(4)}, str(bad))
    with pytest.raises(DifftuneError, match="DoRA"):
        read_kohya(read_file(bad)[0], bad)


def test_kohya_metadata_header_records_rank_and_alpha(flux_lora, tmp_path):
    out = export_lora(flux_lora, "kohya", tmp_path / "k.safetensors", family="flux")
    _, header = read_file(out)
    assert json.loads(header["ss_network_dim"]) == 4 and header["ss_network_module"] == "networks.lora"

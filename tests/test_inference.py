"""`difftune generate` beyond text2img and `difftune merge`, on the tiny pipelines: ControlNet (SD and
FLUX, several at once, canny control images), schedulers, img2img and inpainting, file naming,
images.jsonl and the contact sheet, defaults from the LoRA, merge = base + LoRA, and every bad input
as one line (checked before the model loads where the input allows)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from conftest import base_overrides, make_images
from difftune.config import load_config
from difftune.inference.generate import generate
from difftune.inference.naming import read_params
from difftune.train import train

PROMPT = "a photo of sks disc"
FAST = dict(steps=2, progress=False)


def quiet(*_):
    pass


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    """A 64 px orange disc (centre 32,32, radius 16) on teal: the photo control images are made from."""
    path = tmp_path_factory.mktemp("photo") / "disc.png"
    image = Image.new("RGB", (64, 64), (0, 128, 128))
    ImageDraw.Draw(image).ellipse((16, 16, 48, 48), fill=(255, 140, 0))
    image.save(path)
    return path


@pytest.fixture(scope="module")
def mask(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mask") / "mask.png"
    image = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(image).rectangle((0, 0, 31, 63), fill=255)  # repaint the left half
    image.save(path)
    return path


@pytest.fixture(scope="module")
def controlnets(tmp_path_factory) -> dict[str, Path]:
    from difftune.tiny import make_tiny_controlnet

    root = tmp_path_factory.mktemp("controlnets")
    return {k: make_tiny_controlnet(f"controlnet-{k}", root / k) for k in ("sd", "flux")}


@pytest.fixture(scope="module")
def sd_lora(tiny_sd, tmp_path_factory) -> Path:
    """A LoRA trained on the tiny SD at 32 px (so generation defaults to 32 px), lr high enough to matter."""
    root = tmp_path_factory.mktemp("sd-lora")
    data = make_images(root / "data", caption=PROMPT)
    return train(load_config(None, base_overrides(tiny_sd, data, root / "run", steps=3, **{
        "method.rank": 4, "train.lr": "3e-2", "data.resolution": 32})), log=quiet)


@pytest.fixture(scope="module")
def flux_lora(tiny_flux, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("flux-lora")
    data = make_images(root / "data", caption=PROMPT)
    return train(load_config(None, base_overrides(tiny_flux, data, root / "run", steps=3, **{
        "method.rank": 4, "train.lr": "3e-2", "model.options.max_sequence_length": 16})), log=quiet)


# ---- ControlNet ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_controlnet_changes_the_image_and_scale_zero_equals_none(family, tiny_sd, tiny_flux, controlnets, photo,
                                                                   tmp_path):
    model = str(tiny_sd if family == "sd" else tiny_flux)
    kw = dict(FAST, width=64, height=64, seed=3)
    (plain,) = generate(model, PROMPT, tmp_path / "plain", **kw)
    control = dict(control_images=[str(photo)], control=["canny"])
    (full,) = generate(model, PROMPT, tmp_path / "cn", controlnets=[(str(controlnets[family]), 1.0)], **control, **kw)
    (zero,) = generate(model, PROMPT, tmp_path / "zero", controlnets=[(str(controlnets[family]), 0.0)], **control, **kw)
    assert np.abs(pixels(full) - pixels(plain)).mean() > 1.0, "the ControlNet did not change the image"
    if family == "sd":
        assert np.abs(pixels(zero) - pixels(plain)).max() <= 1.0, "scale 0 must equal no ControlNet"
    else:
        # diffusers' FLUX ControlNet pipeline samples the control image's VAE latents from the generator
        # before the noise, so its noise differs from FluxPipeline's; at scale 0 the control image must
        # still have no effect: another control image gives the same picture
        (other,) = generate(model, PROMPT, tmp_path / "zero2", controlnets=[(str(controlnets[family]), 0.0)],
                            control_images=[str(photo)], control=["none"], **kw)
        assert np.abs(pixels(zero) - pixels(other)).max() <= 1.0, "scale 0 must equal no ControlNet"
        (other_full,) = generate(model, PROMPT, tmp_path / "full2", controlnets=[(str(controlnets[family]), 1.0)],
                                 control_images=[str(photo)], control=["none"], **kw)
        assert np.abs(pixels(full) - pixels(other_full)).max() > 8.0, "the control image did not matter"
    params = read_params(full)
    assert params["task"] == "controlnet" and params["controlnets"] == [{"path": str(controlnets[family]), "scale": 1.0}]
    saved = tmp_path / "cn" / params["control_files"][0]
    assert saved.is_file() and params["control"] == ["canny"]


def test_canny_control_image_is_an_edge_map_of_the_photo(tiny_sd, controlnets, photo, tmp_path):
    (out,) = generate(str(tiny_sd), PROMPT, tmp_path, controlnets=[(str(controlnets["sd"]), 1.0)],
                      control_images=[str(photo)], control=["canny"], **FAST)
    edges = pixels(tmp_path / read_params(out)["control_files"][0])[..., 0]
    ys, xs = np.nonzero(edges > 127)
    assert set(np.unique(edges)) <= {0.0, 255.0}
    # every edge pixel lies on the disc's rim (centre 32,32, radius 16), and the rim is mostly drawn
    distance = np.hypot(xs - 31.5, ys - 31.5)
    assert len(xs) > math.pi * 16 and np.abs(distance - 16).max() <= 2.5


def test_several_controlnets_with_img2img_and_inpainting(tiny_sd, controlnets, photo, mask, tmp_path):
    cn = str(controlnets["sd"])
    (out,) = generate(str(tiny_sd), PROMPT, tmp_path, controlnets=[(cn, 0.5), (cn, 0.8)], control_images=[str(photo)],
                      control=["canny", "none"], init_image=str(photo), mask=str(mask), strength=0.7, **FAST)
    params = read_params(out)
    assert params["task"] == "controlnet-inpaint" and [c["scale"] for c in params["controlnets"]] == [0.5, 0.8]
    assert params["control"] == ["canny", "none"] and len(params["control_files"]) == 2
    assert params["strength"] == 0.7 and params["mask"] == str(mask)


# ---- schedulers ------------------------------------------------------------------------------------------


def test_each_scheduler_runs_and_is_recorded(tiny_sd, tmp_path):
    from difftune.inference.schedulers import NAMES, SCHEDULERS

    images = {}
    for name in NAMES:
        (out,) = generate(str(tiny_sd), PROMPT, tmp_path, scheduler=name, width=32, height=32, **FAST)
        params = read_params(out)
        assert params["scheduler"] == name
        assert params["scheduler_class"] == (SCHEDULERS[name][0] if name != "default" else "PNDMScheduler")
        images[name] = pixels(out)
    assert np.abs(images["unipc"] - images["ddim"]).max() > 0  # the sampler really changed
    assert len(list(tmp_path.glob("*.png"))) == len(NAMES)  # one folder, no file replaced


# ---- img2img and inpainting ------------------------------------------------------------------------------


def test_img2img_strength_zero_returns_the_input_through_the_vae(tiny_sd, photo, tmp_path):
    from diffusers import StableDiffusionPipeline

    (zero,) = generate(str(tiny_sd), PROMPT, tmp_path, init_image=str(photo), strength=0.0, **FAST)
    (half,) = generate(str(tiny_sd), PROMPT, tmp_path, init_image=str(photo), strength=1.0, **FAST)
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd))
    x = pipe.image_processor.preprocess(Image.open(photo).convert("RGB"))
    import torch

    with torch.no_grad():
        decoded = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mode()).sample
    reference = np.asarray(pipe.image_processor.postprocess(decoded, output_type="pil")[0], dtype=np.float32)
    vae_error = np.abs(reference - pixels(photo)).mean()
    assert np.abs(pixels(zero) - pixels(photo)).mean() <= vae_error + 1.0
    assert np.abs(pixels(zero) - reference).max() <= 1.0
    assert np.abs(pixels(half) - reference).mean() > 1.0  # strength 1 does move away
    assert read_params(zero)["task"] == "img2img" and read_params(zero)["strength"] == 0.0


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_img2img_and_inpainting_run_through_the_family_pipelines(family, tiny_sd, tiny_flux, photo, mask, tmp_path):
    model = str(tiny_sd if family == "sd" else tiny_flux)
    (i2i,) = generate(model, PROMPT, tmp_path, init_image=str(photo), strength=0.6, **FAST)
    (inp,) = generate(model, PROMPT, tmp_path, init_image=str(photo), mask=str(mask), strength=1.0, **FAST)
    assert read_params(i2i)["task"] == "img2img" and read_params(inp)["task"] == "inpaint"
    assert Image.open(i2i).size == Image.open(inp).size == (64, 64)  # the init image's size


# ---- naming, images.jsonl, grid, negative prompt, defaults ----------------------------------------------


def test_files_never_collide_and_each_has_a_json_line_and_a_grid(tiny_sd, tmp_path):
    first = generate(str(tiny_sd), PROMPT, tmp_path, num=2, seed=7, grid=True, width=32, height=32, **FAST)
    second = generate(str(tiny_sd), "a red cat", tmp_path, num=1, seed=7, width=32, height=32,
                      negative_prompt="blurry", **FAST)
    again = generate(str(tiny_sd), PROMPT, tmp_path, num=1, seed=7, width=32, height=32, **FAST)
    names = [p.name for p in first + second + again]
    assert names == ["0000-a-photo-of-sks-disc-seed7.png", "0001-a-photo-of-sks-disc-seed8.png",
                     "0002-grid-a-photo-of-sks-disc.png", "0003-a-red-cat-seed7.png", "0004-a-photo-of-sks-disc-seed7.png"]
    assert np.array_equal(pixels(first[0]), pixels(again[0]))  # same prompt and seed: same image, new file
    lines = [json.loads(line) for line in (tmp_path / "images.jsonl").read_text().splitlines()]
    assert [r["file"] for r in lines] == [n for n in names if "grid" not in n]
    assert [(r["prompt"], r["seed"]) for r in lines] == [(PROMPT, 7), (PROMPT, 8), ("a red cat", 7), (PROMPT, 7)]
    assert lines[2]["negative_prompt"] == "blurry" and read_params(second[0])["negative_prompt"] == "blurry"
    sheet = Image.open(first[2])
    assert sheet.size[0] >= 2 * 32 and sheet.size[1] > 32


def test_negative_prompt_changes_the_image(tiny_sd, tmp_path):
    (a,) = generate(str(tiny_sd), PROMPT, tmp_path, width=32, height=32, **FAST)
    (b,) = generate(str(tiny_sd), PROMPT, tmp_path, width=32, height=32, negative_prompt="a red cat", **FAST)
    assert np.abs(pixels(a) - pixels(b)).max() > 0


def test_size_defaults_to_the_loras_training_resolution(tiny_sd, sd_lora, tmp_path):
    (with_lora,) = generate(str(tiny_sd), PROMPT, tmp_path, loras=[(str(sd_lora), 1.0)], **FAST)
    (plain,) = generate(str(tiny_sd), PROMPT, tmp_path, **FAST)
    assert Image.open(with_lora).size == (32, 32)  # data.resolution of the run
    assert Image.open(plain).size == (64, 64)  # the tiny model's own default


def test_kohya_flux_lora_is_converted_and_equals_the_diffusers_file(tiny_flux, flux_lora, tmp_path):
    from difftune.export import export_lora

    kohya = export_lora(flux_lora, "kohya", tmp_path / "k" / "style.safetensors")
    kw = dict(FAST, width=64, height=64, seed=1)
    (a,) = generate(str(tiny_flux), PROMPT, tmp_path / "a", loras=[(str(flux_lora), 1.0)], **kw)
    (b,) = generate(str(tiny_flux), PROMPT, tmp_path / "b", loras=[(str(kohya), 1.0)], **kw)
    (c,) = generate(str(tiny_flux), PROMPT, tmp_path / "c", **kw)
    assert np.abs(pixels(a) - pixels(b)).max() <= 1.0
    assert np.abs(pixels(a) - pixels(c)).mean() > 1.0


# ---- merge -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_merged_folder_equals_base_plus_lora_in_plain_diffusers(family, tiny_sd, tiny_flux, sd_lora, flux_lora,
                                                                tmp_path):
    import torch
    from diffusers import DiffusionPipeline

    from difftune.cli import main

    base, lora = (tiny_sd, sd_lora) if family == "sd" else (tiny_flux, flux_lora)
    out = tmp_path / "merged"
    assert main(["merge", str(base), "--lora", f"{lora}:0.8", "--out", str(out)]) == 0

    def images(path, with_lora=False):
        pipe = DiffusionPipeline.from_pretrained(str(path))
        pipe.set_progress_bar_config(disable=True)
        if with_lora:
            pipe.load_lora_weights(str(lora), adapter_name="x")
            pipe.set_adapters(["x"], adapter_weights=[0.8])
        return pipe(PROMPT, num_inference_steps=2, width=64, height=64, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images[0]

    merged, expected, plain = images(out), images(base, with_lora=True), images(base)
    assert np.abs(expected - plain).max() > 1e-2, "the LoRA should change the image"
    assert np.abs(merged - expected).max() < 1e-4
    assert not any("lora" in p.name for p in out.rglob("*"))
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == json.loads(
        (Path(base) / "model_index.json").read_text())["_class_name"]


def test_single_file_checkpoint_loads_in_diffusers_and_equals_the_folder(tiny_sd, sd_lora, tmp_path):
    import torch
    from diffusers import StableDiffusionPipeline

    from difftune.inference.merge import merge

    folder = merge(str(tiny_sd), [(str(sd_lora), 0.8)], tmp_path / "merged")
    file = merge(str(tiny_sd), [(str(sd_lora), 0.8)], tmp_path / "merged.safetensors", fmt="single-file")
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as fh:  # the original CompVis names ComfyUI and A1111 expect
        keys = set(fh.keys())
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys and "first_stage_model.encoder.conv_in.weight" in keys
    assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in keys)
    # diffusers' own single-file loader (with the model's configs, offline) reads it back
    one = StableDiffusionPipeline.from_single_file(str(file), config=str(tiny_sd), local_files_only=True,
                                                   safety_checker=None)

    def image(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe(PROMPT, num_inference_steps=2, width=64, height=64, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images[0]

    assert np.abs(image(one) - image(StableDiffusionPipeline.from_pretrained(str(folder)))).max() < 1e-5


# ---- bad inputs: one line, non-zero exit, before the model loads ------------------------------------------


def difftune(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "difftune", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def one_line(result: subprocess.CompletedProcess, command: str = "generate") -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    # progress bars of model loading (an error found after loading) are not messages
    lines = [line for line in result.stderr.splitlines()
             if line.strip() and "torchvision" not in line and "%|" not in line]
    assert len(lines) == 1 and lines[0].startswith(f"difftune {command}: error: "), result.stderr[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def broken_sd(tiny_sd, tmp_path_factory) -> Path:
    """The tiny SD with an unreadable UNet: any error about anything else was found before loading."""
    folder = tmp_path_factory.mktemp("broken") / "sd"
    shutil.copytree(tiny_sd, folder)
    for f in (folder / "unet").glob("*.safetensors"):
        f.write_bytes(b"not weights")
    return folder


@pytest.fixture(scope="module")
def foreign_lora(foreign_sd, tmp_path_factory) -> Path:
    """An SD LoRA trained on another base (other layer sizes)."""
    root = tmp_path_factory.mktemp("foreign-lora")
    data = make_images(root / "data", caption=PROMPT)
    return train(load_config(None, base_overrides(foreign_sd, data, root / "run", steps=1, **{"method.rank": 4})),
                 log=quiet)


def test_bad_inputs_before_loading(broken_sd, tiny_flux, flux_lora, sd_lora, controlnets, photo, tmp_path):
    from difftune.export import export_lora

    m = ["generate", "--model", str(broken_sd), "--prompt", "p"]
    out = ["--out", str(tmp_path / "o")]
    # a FLUX LoRA on SD: from the run's config.yaml, and from the file's part names alone
    line = one_line(difftune(*m, "--lora", str(flux_lora), *out))
    assert "a LoRA for the flux family" in line and str(flux_lora) in line and "model is sd" in line
    bare = tmp_path / "bare" / "x.safetensors"
    bare.parent.mkdir()
    shutil.copy(flux_lora / "pytorch_lora_weights.safetensors", bare)
    line = one_line(difftune(*m, "--lora", str(bare), *out))
    assert "a LoRA for the flux family" in line and "transformer" in line
    # a kohya SD file on FLUX
    kohya_sd = export_lora(sd_lora, "kohya", tmp_path / "sd-kohya.safetensors")
    line = one_line(difftune("generate", "--model", str(tiny_flux), "--prompt", "p", "--lora", str(kohya_sd), *out))
    assert "not a kohya LoRA of the flux family" in line and "sd-kohya.safetensors" in line
    # a local-looking path that does not exist never goes to the hub; a scale that is not a number
    (tmp_path / "runs").mkdir()
    line = one_line(difftune(*m, "--lora", "runs/nope", *out, cwd=tmp_path))
    assert "--lora runs/nope: no such file or folder" in line
    line = one_line(difftune(*m, "--lora", f"{sd_lora}:abc", *out))
    assert "scale 'abc' is not a number" in line
    # sizes the model cannot make, --out naming a file
    line = one_line(difftune("generate", "--model", str(tiny_flux), "--prompt", "p", "--width", "100", *out))
    assert "--width 100" in line and "multiple of 8" in line
    (tmp_path / "file.png").write_bytes(b"x")
    line = one_line(difftune(*m, "--out", str(tmp_path / "file.png")))
    assert "is a file" in line
    # ControlNet of another family, a control image that does not exist, strength outside 0..1
    cn = ["--controlnet", str(controlnets["flux"]), "--control-image", str(photo)]
    line = one_line(difftune(*m, *cn, *out))
    assert "FluxControlNetModel (for the flux family)" in line and "ControlNetModel" in line
    line = one_line(difftune(*m, "--controlnet", str(controlnets["sd"]), "--control-image", str(tmp_path / "no.png"), *out))
    assert "--control-image" in line and "no.png: no such file" in line
    line = one_line(difftune(*m, "--init-image", str(photo), "--strength", "1.5", *out))
    assert "--strength 1.5" in line and "between 0" in line
    line = one_line(difftune(*m, "--scheduler", "unipc", "--controlnet", str(controlnets["sd"]), "--control-image",
                             str(photo), "--control", "depth", *out))
    assert "--depth-model" in line
    assert not (tmp_path / "o").exists()


def test_lora_from_another_base_names_the_layer_before_loading(tiny_sd, foreign_lora, tmp_path):
    # the UNet's weight headers show the sizes; with an unreadable VAE, loading would fail first
    broken_vae = tmp_path / "sd"
    shutil.copytree(tiny_sd, broken_vae)
    for f in (broken_vae / "vae").glob("*.safetensors"):
        f.write_bytes(b"not weights")
    for model in (broken_vae, tiny_sd):
        line = one_line(difftune("generate", "--model", str(model), "--prompt", "p", "--lora", str(foreign_lora),
                                 "--out", str(tmp_path / "o")))
        assert str(foreign_lora) in line and "trained on another base model" in line and "inputs" in line
    from diffusers import StableDiffusionPipeline

    from difftune import DifftuneError
    from difftune.families.registry import get_family
    from difftune.inference.loras import inspect, load

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd))
    with pytest.raises(DifftuneError, match="trained on another base model"):
        load(pipe, get_family("sd"), [inspect(str(foreign_lora), 1.0)])


def test_merge_bad_inputs(tiny_sd, tiny_flux, flux_lora, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    line = one_line(difftune("merge", str(tiny_sd), "--lora", str(flux_lora), "--out", str(tmp_path / "new")), "merge")
    assert "a LoRA for the flux family" in line
    line = one_line(difftune("merge", str(tiny_sd), "--lora", str(flux_lora), "--out", str(tmp_path / "taken")), "merge")
    assert "not an empty folder" in line
    line = one_line(difftune("merge", str(tiny_flux), "--lora", str(flux_lora), "--format", "single-file",
                             "--out", str(tmp_path / "flux.safetensors")), "merge")
    assert "the flux family has no one-file checkpoint layout" in line

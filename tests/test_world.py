"""The procedural world: its caption contract, the oracle on ground-truth renders, the byte-level
tokenizers, the shipped world models in plain diffusers, and the `world` / `tiny world-*` commands."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from difftune.world import models, oracle, scenes


def difftune(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "difftune", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def one_line_error(result, command):
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and "torchvision" not in line]
    assert len(lines) == 1 and lines[0].startswith(f"difftune {command}: error: "), result.stderr
    return lines[0]


def test_caption_and_drawing_contract():
    rng = random.Random(0)
    for _ in range(200):
        s = scenes.random_scene(rng)
        assert s.caption == f"a {s.colour} {s.shape} on a {s.background} background"
        image = scenes.render(s).astype(int)
        assert image.shape == (64, 64, 3)
        assert s.background != s.colour
        assert 0.35 * 64 - 0.5 <= s.side <= 0.60 * 64 + 0.5 and 0 <= s.x <= 64 - s.side and 0 <= s.y <= 64 - s.side
        # every pixel is the object's colour or the background's, within +-10 per channel
        obj = np.abs(image - scenes.COLOURS[s.colour]).max(-1) <= 10
        bg = np.abs(image - scenes.COLOURS[s.background]).max(-1) <= 10
        assert (obj | bg).all() and obj.any()
        # fully inside: the border shows no object pixel outside the object's box
        assert not obj[:, : s.x].any() and not obj[: s.y].any()
    assert scenes.COLOURS["red"] == (220, 40, 40) and scenes.SHAPES == ("circle", "square", "triangle")


def test_captions_parse_back_and_bad_ones_are_refused():
    s = scenes.Scene("red", "circle", "blue", 30, 5, 5, "dotted")
    assert s.caption == "a red circle on a blue background in zdots style"
    assert scenes.parse_caption(s.caption)["style"] == "dotted"
    assert scenes.parse_caption("a zkrem on a white background")["place"] == "kremlin"
    for bad in ("a red dog on a blue background", "red circle", "a red circle on a blue background in foo style"):
        with pytest.raises(ValueError):
            scenes.parse_caption(bad)


def test_held_out_concepts_never_reach_pretraining_captions():
    rng = random.Random(1)
    held_out = set(scenes.unseen_triples())
    assert len(held_out) == 64
    captions = [scenes.pretraining_scene(rng, held_out) for _ in range(2000)]
    words = {w for s in captions for w in s.caption.split()}
    assert not words & (set(scenes.HELD_OUT_STYLES.values()) | set(scenes.PLACES.values()))
    assert {"striped", "hatched"} <= words  # held-in styles teach the base what "in ... style" means
    assert not {(s.colour, s.shape, s.background) for s in captions} & held_out


def test_oracle_is_right_on_ground_truth_renders():
    rng = random.Random(2024)
    results = []
    for i in range(160):
        kind = i % 8
        if kind < 6:
            s = scenes.random_scene(rng, style=[None, *scenes.STYLES][kind])
        else:
            s = scenes.random_place(rng, rng.choice(list(scenes.PLACES)))
        results.append(oracle.score(scenes.to_pil(scenes.render(s)), s.caption))
    summary = oracle.summarise(results)
    assert set(summary) == {"background", "colour", "shape", "style", "place"}
    assert min(summary.values()) >= 0.98, summary


def test_oracle_tells_wrong_images_apart():
    s = scenes.Scene("red", "circle", "blue", 36, 10, 10)
    wrong = oracle.score(scenes.render(s), "a green square on a white background in zdots style")
    assert not any(wrong[k] for k in ("background", "colour", "shape", "style"))
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3)).astype(np.uint8)
    assert oracle.summarise([oracle.score(noise, s.caption)])["shape"] in (0.0, 1.0)  # runs on anything


def test_oracle_calls_dots_only_for_isolated_holes():
    """Dotted means many small separate holes: noise on real dots keeps the call; the broken hatching
    and stripes world-sd draws for the unknown trigger (once read as dots), stripes broken into
    segments, or an object with one window are not dots."""
    folder = Path(__file__).parent / "data" / "world-base-zdots"
    for line in (folder / "prompts.tsv").read_text().splitlines():
        name, prompt = line.split("\t")
        assert not oracle.score(folder / name, prompt)["style"], name
    rng = np.random.default_rng(0)
    dotted = scenes.Scene("red", "square", "blue", 38, 12, 12, "dotted")
    noisy = np.clip(scenes.render(dotted) + rng.normal(0, 12, (64, 64, 3)), 0, 255).astype(np.uint8)
    assert oracle.analyse(noisy)["style"] == "dotted"

    striped = scenes.Scene("red", "square", "blue", 38, 12, 12, "striped")
    broken = scenes.render(striped)
    broken[:, 12::12][scenes.shape_mask("square", 12, 12, 38)[:, 12::12]] = scenes.COLOURS["red"]
    assert oracle.analyse(broken)["style"] != "dotted"

    window = scenes.render(scenes.Scene("red", "square", "blue", 38, 12, 12))
    window[28:34, 28:34] = scenes.COLOURS["blue"]
    assert oracle.analyse(window)["style"] not in scenes.HELD_OUT_STYLES


def test_oracle_places_tolerate_a_models_drawing_but_no_object_passes():
    """A place stretched to other proportions, with a shaded side, is still recognised; no rendered
    object of any colour, shape or style is taken for a place; a stray speck does not stretch the box."""
    scene = scenes.Scene("", "", "blue", 0, 0, 0, None, "kremlin")
    image = scenes.render(scene)
    ys, xs = np.nonzero((image != scenes.COLOURS["blue"]).any(-1))
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    crop = image[y0:y1, x0:x1]
    narrow = crop[:, np.arange(0, crop.shape[1], 1.3).astype(int)]  # 30% narrower
    shaded = narrow.copy()
    body = (shaded == scenes.COLOURS["red"]).all(-1)
    body[:, : 2 * shaded.shape[1] // 3] = False
    shaded[body] = scenes.COLOURS["black"]  # the right third of the red body in shadow
    drawn = np.empty_like(image)
    drawn[:] = scenes.COLOURS["blue"]
    drawn[y0:y1, 20:20 + shaded.shape[1]] = shaded
    assert oracle.score(drawn, "a zkrem on a blue background")["place"]

    rng = random.Random(7)
    for style in (None, *scenes.STYLES):
        for _ in range(30):
            assert oracle.analyse(scenes.render(scenes.random_scene(rng, style=style)))["place"] is None

    speck = scenes.render(scenes.Scene("green", "circle", "white", 30, 30, 30))
    speck[1:3, 1:3] = scenes.COLOURS["green"]
    assert oracle.analyse(speck)["shape"] == "circle"
    assert oracle.score(speck, "a green circle on a white background")["style"]


def test_tokenizers_are_byte_level_any_trigger_word_encodes():
    from transformers import AutoTokenizer

    folder = models.shipped("flux")
    clip = AutoTokenizer.from_pretrained(folder / "tokenizer")
    t5 = AutoTokenizer.from_pretrained(folder / "tokenizer_2")
    for word in ("zdots", "qxzvbj", "krëmlin", "москва", "東京"):
        ids = clip(f"a red circle in {word} style").input_ids
        assert clip.unk_token_id not in ids[1:-1] or clip.unk_token_id == clip.eos_token_id
        assert clip.decode(ids, skip_special_tokens=True).replace(" ", "") == f"aredcirclein{word}style"
    for word in ("zdots", "qxzvbj", "Zk-9_x"):  # T5: every printable ASCII character is a piece
        assert t5.unk_token_id not in t5(f"a red circle in {word} style").input_ids


def test_world_vocabulary_words_are_whole_tokens_and_triggers_are_not():
    """Colours, shapes and the caption's frame words are single tokens (as in a real CLIP or T5
    vocabulary), for CLIP and for world-flux's T5 as plain transformers loads it from the shipped folder;
    the held-out trigger words split into pieces, like any new word a user brings."""
    from transformers import AutoTokenizer

    from difftune.families import tiny_parts

    clip = tiny_parts.clip_tokenizer(models.vocabulary_text())
    t5 = AutoTokenizer.from_pretrained(models.shipped("flux") / "tokenizer_2")
    for word in (*scenes.COLOURS, *scenes.SHAPES, *scenes.HELD_IN_STYLES, "background", "style"):
        assert len(clip(word).input_ids) == 3, word  # bos, the word, eos
        assert t5.convert_ids_to_tokens(t5(f"a {word}").input_ids)[1:] == [word, t5.eos_token], word
    for trigger in (*scenes.HELD_OUT_STYLES.values(), *scenes.PLACES.values()):
        assert len(clip(trigger).input_ids) > 3, trigger
        assert len(t5(trigger).input_ids) > 3, trigger


def test_world_flux_t5_keeps_each_word_apart_from_the_padding_and_reads_its_neighbours():
    """FluxPipeline pads every prompt to 512 T5 tokens. A random T5 attends about uniformly, so each
    word became mostly the padding's average, and world-flux learned to ignore T5. The world's T5 mixes
    each token with its neighbours only (`models.local_attention`)."""
    import torch

    pipe = models.build("flux", 0)
    t5, tokenizer = pipe.text_encoder_2.eval(), pipe.tokenizer_2
    prompts = ["a red circle on a blue background", "a red square on a blue background"]
    ids = tokenizer(prompts, padding="max_length", max_length=512, return_tensors="pt").input_ids
    with torch.no_grad():
        out = t5(ids).last_hidden_state
    n = int((ids[0] != tokenizer.pad_token_id).sum())
    cos = torch.nn.functional.cosine_similarity
    words = cos(out[0, :n, None], out[0, None, :n], dim=-1)[~torch.eye(n, dtype=torch.bool)]
    assert words.abs().mean() < 0.3  # the prompt's tokens are unlike each other
    assert cos(out[0, :n], out[0, 300:301], dim=-1).abs().max() < 0.5  # and unlike the padding
    red = 1  # "red" before "circle" and before "square": the same word, told apart by its neighbour
    assert tokenizer.convert_ids_to_tokens(int(ids[0, red])) == "red"
    assert 0.3 < cos(out[0, red], out[1, red], dim=0) < 0.95
    assert torch.allclose(out[0, 200], out[0, 300], atol=1e-5)  # far from the words, padding is padding


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_shipped_world_models_are_small_safetensors_with_a_card(family):
    folder = models.shipped(family)
    files = list(folder.rglob("*.safetensors"))
    assert files and not list(folder.rglob("*.bin"))
    assert all(f.stat().st_size <= 20 * 2**20 for f in files)
    assert "difftune world pretrain" in (folder / "README.md").read_text()


def test_tiny_world_writes_a_pipeline_plain_diffusers_loads(tmp_path):
    from diffusers import StableDiffusionPipeline

    result = difftune("tiny", "world-sd", str(tmp_path / "w"))
    assert result.returncode == 0, result.stderr
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "w")
    assert pipe.vae.config.latent_channels == 4
    one_line_error(difftune("tiny", "world-sd", str(tmp_path / "w")), "tiny")  # not over a full folder


def test_world_score_command(tmp_path):
    s = scenes.Scene("yellow", "triangle", "purple", 34, 8, 20, "checkered")
    scenes.to_pil(scenes.render(s)).save(tmp_path / "a.png")
    result = difftune("world", "score", str(tmp_path / "a.png"), "--prompt", s.caption)
    assert result.returncode == 0, result.stderr
    assert "colour=ok" in result.stdout and "style=ok" in result.stdout and "WRONG" not in result.stdout
    result = difftune("world", "score", str(tmp_path / "a.png"), "--prompt", "a yellow square on a purple background")
    assert "shape=WRONG" in result.stdout and "style=WRONG" in result.stdout
    assert "--prompt" in one_line_error(difftune("world", "score", str(tmp_path / "a.png"), "--prompt", "a cat"), "world")
    assert "no such image" in one_line_error(difftune("world", "score", str(tmp_path / "b.png")), "world")


def test_world_render_writes_a_captioned_style_folder(tmp_path):
    result = difftune("world", "render", str(tmp_path / "d"), "--style", "outline", "-n", "6")
    assert result.returncode == 0, result.stderr
    captions = sorted((tmp_path / "d").glob("*.txt"))
    assert len(captions) == 6 and all(c.read_text().strip().endswith("in zrim style") for c in captions)
    assert {oracle.analyse(p)["style"] for p in (tmp_path / "d").glob("*.png")} == {"outline"}


def test_refining_stages_weight_the_layout_steps_or_feed_the_pipelines_t5_length(tmp_path):
    """SD's refining stage weights the loss by min-SNR (the steps where the layout is decided); FLUX's
    denoiser stage feeds the transformer 32 T5 tokens per caption (6x cheaper) and its refining stage the
    512 that FluxPipeline feeds it by default, so the shipped model draws right with the pipeline's defaults."""
    from difftune.config import config_from_dict
    from difftune.world.pretrain import PLANS, denoiser_config, refine_stage

    def config(plan):
        return config_from_dict(denoiser_config(tmp_path, tmp_path, tmp_path / "run", plan, 0))

    for family in ("sd", "flux"):
        first = config(PLANS[family]).objective
        assert first.min_snr_gamma is None and first.timestep_sampling == "uniform"
    assert config(refine_stage(PLANS["sd"])).objective.min_snr_gamma == 5.0
    assert config(PLANS["flux"]).model.options == {"max_sequence_length": 32}
    assert config(refine_stage(PLANS["flux"])).model.options == {"max_sequence_length": 512}
    assert config(PLANS["sd"]).model.options == {} == config(refine_stage(PLANS["sd"])).model.options


def test_pretrain_runs_every_stage_writes_a_pipeline_and_resumes(tmp_path):
    from diffusers import StableDiffusionPipeline

    from difftune.world.pretrain import pretrain

    def run(log=lambda *a: None, **steps):
        return pretrain("sd", tmp_path / "w", images=16, **{"vae_steps": 2, "denoiser_steps": 2, "refine_steps": 2,
                                                             **steps}, log=log)

    def weights(folder, part="unet"):
        return (folder / part / "diffusion_pytorch_model.safetensors").read_bytes()

    out = run()
    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert pipe.vae.config.scaling_factor != 1.0  # measured on world latents
    assert pipe.unet.config.in_channels == 4
    card = (out / "README.md").read_text()
    assert "--refine-steps 2" in card and "min-SNR" in card
    unet, vae = weights(out), weights(out, "vae")
    again = run()
    assert weights(again) == unet  # nothing retrained
    with pytest.raises(Exception, match="other settings"):
        run(vae_steps=3)
    # another refining stage: only it runs again, from the trained denoiser
    logged = []
    refined = run(refine_steps=3, log=logged.append)
    assert any("refining the trained denoiser: 3 steps" in str(line) for line in logged), logged
    assert not any("VAE trained" in str(line) or "denoiser trained" in str(line) for line in logged), logged
    assert weights(refined, "vae") == vae and weights(refined) != unet
    # more denoiser steps, all else equal: training goes on from the last checkpoint, then refines again
    logged = []
    longer = run(denoiser_steps=4, refine_steps=3, log=logged.append)
    assert any("continuing the denoiser from 2 to 4 steps" in str(line) for line in logged)
    assert any("resum" in str(line).lower() for line in logged), logged
    assert any("denoiser refined (3 steps" in str(line) for line in logged), logged
    assert weights(longer) != unet
    assert "--denoiser-steps 4 --refine-steps 3" in (longer / "README.md").read_text()


def draw_unseen(pipe) -> tuple[list[str], dict]:
    """A shipped world pipeline, as plain diffusers loaded it, drawing 16 prompts it never saw in
    pretraining (seed 0, 30 steps, its default guidance): the prompts and the oracle's summary."""
    from difftune.world.bench import draw

    pipe.set_progress_bar_config(disable=True)
    prompts = [scenes.prompt(*t) for t in scenes.unseen_triples()[:16]]
    images = draw(pipe, prompts, seed=0, steps=30)
    return prompts, oracle.summarise([oracle.score(im, p) for im, p in zip(images, prompts)])


def test_shipped_world_sd_draws_the_ground_colour_and_shape_asked_for_in_plain_diffusers():
    """The shipped world-sd, loaded by plain diffusers with its own scheduler and default guidance, draws
    16 prompts it never saw in pretraining with the asked background, object colour and shape
    (BENCHMARKS.md section 5: 100%, 96% and 95% on the 64-prompt, 2-seed benchmark; here 16, 14 and 16
    of 16; chance for the colour is a seventh, for the shape a third)."""
    from diffusers import StableDiffusionPipeline

    _, summary = draw_unseen(StableDiffusionPipeline.from_pretrained(models.shipped("sd")))
    assert summary["background"] >= 0.875 and summary["colour"] >= 0.8, summary
    assert summary["shape"] >= 0.875, summary


def test_shipped_world_flux_draws_the_ground_and_the_object_colour_from_t5_in_plain_diffusers():
    """The shipped world-flux, loaded by plain diffusers with its defaults (512 T5 tokens, no guidance),
    draws the asked ground and object colour on 16 prompts it never saw; the shape still only about as
    often as chance (BENCHMARKS.md section 5: background 100%, colour 86.7%, shape 38.3% on the 64-prompt,
    2-seed benchmark; here 16, 14 and 7 of 16; the shape is not asked). And it reads the prompt's T5
    tokens: another prompt's T5 embeddings change its prediction by 100% (the first world-flux ignored T5:
    0.5%, and drew the ground 14 of 16 times and the colour 6)."""
    import torch
    from diffusers import FluxPipeline

    from difftune.families.flux.family import image_ids as packed_ids

    pipe = FluxPipeline.from_pretrained(models.shipped("flux"))
    prompts, summary = draw_unseen(pipe)
    assert summary["background"] >= 15 / 16 and summary["colour"] >= 12 / 16, summary  # colour by chance: 1/7

    with torch.no_grad():
        embeds, pooled, text_ids = pipe.encode_prompt(prompts[:4], prompt_2=None, max_sequence_length=512)
        latents = torch.randn(4, 64, 64, generator=torch.Generator().manual_seed(1))  # 16x16 latents, packed
        image_ids = packed_ids(16, 16, latents.device, latents.dtype)

        def predict(t5):
            return pipe.transformer(hidden_states=latents, timestep=torch.full((4,), 0.9), pooled_projections=pooled,
                                    encoder_hidden_states=t5, txt_ids=text_ids, img_ids=image_ids).sample

        own, other = predict(embeds), predict(embeds.roll(1, 0))
    assert (own - other).abs().mean() > 0.3 * own.abs().mean()


def test_world_bench_command_writes_figures_at_a_chosen_guidance(tmp_path):
    result = difftune("world", "bench", "world-sd", "--prompts", "3", "--seeds", "1", "--steps", "4",
                      "--guidance", "3", "--out", str(tmp_path / "b"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "3 images of 3 unseen prompts x 1 seeds, 4 steps, guidance 3" in result.stdout
    saved = json.loads((tmp_path / "b" / "results.json").read_text())
    assert saved["summary"]["guidance"] == 3 and len(saved["results"]) == 3
    assert len(list((tmp_path / "b" / "images").glob("*.png"))) == 3
    assert "--guidance" in one_line_error(difftune("world", "bench", "world-sd", "--guidance", "0.5"), "world")

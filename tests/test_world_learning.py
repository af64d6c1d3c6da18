"""Learning you can see: the shipped world-sd base model, fine-tuned on 12 images of a style it never
saw (``dotted``, trigger ``zdots``), draws that style on held-out prompts by the oracle, and still draws
the colours that prompts without the trigger ask for: with the shipped LoRA recipe as it is (100 steps
of 8), and with the full fine-tune recipe (the whole UNet, the same data and output preservation, lr
3e-4, 300 steps); drawn by the plain diffusers pipeline at its default guidance, 12 steps (the demo's figures,
at 20 steps, are in BENCHMARKS.md section 5).

world-flux cannot learn a style yet (with any style caption it draws the object in pieces;
BENCHMARKS.md section 5), but it learns a place it never saw, by the oracle, from 12 images of
the Kremlin stand-in (``zkrem``): with configs/world-flux-place-lora.yaml and with the full fine-tune
recipe configs/world-flux-place-full.yaml; both keep the object colour of trigger-free prompts over
all eight colours (shapes: measured, not checked)."""

from __future__ import annotations

import pytest
import yaml

from difftune import demo
from difftune.config import config_from_dict
from difftune.train import train
from difftune.world import models, oracle, scenes
from difftune.world.bench import draw, load_pipeline

DRAW_STEPS = 12
SEEDS = (0, 1, 2)


def figures(pipe, prompts):
    images = [im for seed in SEEDS for im in draw(pipe, prompts, seed, DRAW_STEPS)]
    return oracle.summarise([oracle.score(im, p) for im, p in zip(images, prompts * len(SEEDS))])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The shipped world-sd as a folder, 12 dotted training images, the held-out prompts with and
    without the trigger, and what the base draws for them."""
    root = tmp_path_factory.mktemp("learn")
    model = models.write_shipped("sd", root / "world-sd")
    train_scenes = scenes.style_set("dotted", 12, seed=0)
    scenes.write_dataset(root / "data", train_scenes)
    styled = demo.eval_prompts(train_scenes)
    plain = [scenes.prompt(*t) for t in scenes.unseen_triples()[:12]]
    base = load_pipeline(str(model))
    return {"root": root, "model": model, "styled": styled, "plain": plain,
            "before": figures(base, styled), "plain_before": figures(base, plain)}


def train_recipe(recipe: str, model, data, out):
    """Train a shipped world recipe as it is, its folder and base model pointed at the test's; the
    plain diffusers pipeline with what it made (a full fine-tune writes a whole pipeline)."""
    config = yaml.safe_load(demo.recipe_text(recipe))
    config["model"]["path"] = str(model)  # the rest of the recipe's model section (options) stays
    config.update(output_dir=str(out), checkpoint={"every": 0})
    config["data"]["concepts"][0]["dir"] = str(data)
    out = train(config_from_dict(config), log=lambda *a: None)
    if (out / "model_index.json").is_file():
        return load_pipeline(str(out))
    pipe = load_pipeline(str(model))
    pipe.load_lora_weights(str(out))
    return pipe


def fine_tune(world, recipe: str) -> dict:
    """Train a shipped SD style recipe and draw the held-out prompts with what it made."""
    pipe = train_recipe(recipe, world["model"], world["root"] / "data", world["root"] / recipe)
    return {"after": figures(pipe, world["styled"]), "plain_after": figures(pipe, world["plain"])}


def check_learned_and_kept(world, result, least: int = 7, gain: int = 5):
    before, after = world["before"], result["after"]
    summary = f"before {before}, after {after}, plain before {world['plain_before']}, plain after {result['plain_after']}"
    # the style: drawn on at least `least` of 18 images, `gain` more than the base drew it (the base: 1 of
    # 18; the oracle calls dots only for separate small holes, so the base's hatching scores near 0, and
    # a fine-tune that learned nothing stays there)
    n = 6 * len(SEEDS)
    assert after["style"] * n >= least - 1e-6 and (after["style"] - before["style"]) * n >= gain - 1e-6, summary
    # the colours: prompts without the trigger (12 the base never saw, 36 images) lose at most 4 images'
    # object colour (measured: 35 -> 36 of 36) ...
    assert result["plain_after"]["colour"] >= world["plain_before"]["colour"] - 4 / 36 - 1e-9, summary
    # ... and the styled prompts' objects keep the asked colour at least half the time
    assert after["colour"] >= 0.5 and after["background"] >= 0.9, summary


@pytest.mark.long(minutes=2)
def test_lora_recipe_learns_a_style_it_never_saw_and_keeps_colours(world):
    result = fine_tune(world, "world-sd-style-lora.yaml")
    check_learned_and_kept(world, result)  # measured: 1 -> 10 of 18


@pytest.mark.long(minutes=3.5)
def test_full_fine_tune_recipe_learns_the_style_and_keeps_colours(world):
    """configs/world-sd-style-full.yaml: the whole UNet trained, with the LoRA recipe's data and its
    output preservation on the empty prompt (for a full fine-tune, a frozen copy of the starting UNet
    gives the base prediction), at a lower learning rate for more steps."""
    result = fine_tune(world, "world-sd-style-full.yaml")
    # measured: 1 -> 7 of 18 (with training seed 1: 1 -> 6), styled colours 14 of 18, trigger-free 35 -> 36 of 36
    check_learned_and_kept(world, result, least=5, gain=4)


@pytest.fixture(scope="module")
def flux_world(tmp_path_factory):
    """The shipped world-flux as a folder, 12 images of the kremlin place, its prompts on every ground it
    can stand on, trigger-free prompts the base never saw (16, every 4th of the sorted 64: all eight
    object colours), and what the base draws for them."""
    root = tmp_path_factory.mktemp("learn-flux")
    model = models.write_shipped("flux", root / "world-flux")
    scenes.write_dataset(root / "data", scenes.place_set("kremlin", 12, seed=1))
    placed = [scenes.place_prompt("kremlin", g) for g in scenes.place_grounds("kremlin")]
    plain = [scenes.prompt(*t) for t in scenes.unseen_triples()[::4]]
    base = load_pipeline(str(model))
    return {"root": root, "model": model, "placed": placed, "plain": plain,
            "before": figures(base, placed), "plain_before": figures(base, plain)}


def check_place_learned_and_colours_kept(w, recipe: str):
    pipe = train_recipe(recipe, w["model"], w["root"] / "data", w["root"] / recipe)
    after, plain_after = figures(pipe, w["placed"]), figures(pipe, w["plain"])
    summary = f"before {w['before']}, after {after}, plain before {w['plain_before']}, plain after {plain_after}"
    n, m = len(w["placed"]) * len(SEEDS), len(w["plain"]) * len(SEEDS)
    # the place: the base never draws it (the oracle needs its outline and at least two of its colours
    # in their proportions); after, at least 3 of 15 images
    assert w["before"]["place"] == 0 and after["place"] * n >= 3 - 1e-6, summary
    assert after["background"] >= 0.9, summary
    # the colours of 48 trigger-free images (16 unseen prompts over all eight colours, 3 seeds) lose at
    # most 5 images (world-flux itself gets 39 of 48 right); the backgrounds at most 3
    before = w["plain_before"]
    assert (plain_after["colour"] - before["colour"]) * m >= -5 - 1e-6, summary
    assert (plain_after["background"] - before["background"]) * m >= -3 - 1e-6, summary


@pytest.mark.long(minutes=2)
def test_flux_lora_recipe_learns_a_place_it_never_saw_and_keeps_colours(flux_world):
    # measured (seventeenth session's world-flux; trained on 32 T5 tokens, drawn with 512): place 0 -> 7 of
    # 15; trigger-free colour 39 -> 43 of 48, shape 19 -> 23. On the world-flux before it (512 tokens):
    # place 0 -> 5, colour 29 -> 30, shape 19 -> 10, and black objects lost their colour (black is one of the
    # grounds the place was shown on); BENCHMARKS.md section 5
    check_place_learned_and_colours_kept(flux_world, "world-flux-place-lora.yaml")


@pytest.mark.long(minutes=1.5)
def test_flux_full_fine_tune_recipe_learns_a_place_and_keeps_colours(flux_world):
    # measured: place 0 -> 6 of 15; trigger-free colour 39 -> 43 of 48, shape 19 -> 21 (at 512 tokens: 7 of
    # 15; on the world-flux before the seventeenth session's: place 0 -> 6, colour 29 -> 31)
    check_place_learned_and_colours_kept(flux_world, "world-flux-place-full.yaml")

"""Remedies for forgetting, each checked for what it changes: sampling and loss weights, replay,
prior preservation, output preservation and the rehearsal-free (C-LoRA style) penalty."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import base_overrides, make_images

from difftune import DifftuneError
from difftune.config import ConfigError, load_config, validate
from difftune.data.dataset import TrainingData, build_items
from difftune.data.mix import mixed_sources
from difftune.families.registry import resolve_family
from difftune.train import attach_method, micro_step, train
from difftune.world import scenes


def quiet(*_):
    pass


def world_folder(folder: Path, style: str | None = "dotted", n: int = 4, seed: int = 0) -> Path:
    if style:
        scenes.write_dataset(folder, scenes.style_set(style, n=n, seed=seed))
    else:
        import random

        rng = random.Random(seed)
        scenes.write_dataset(folder, [scenes.random_place(rng, "kremlin") for _ in range(n)])
    return folder


def data_of(cfg):
    """The run's batches as training builds them (without loading the model)."""
    family_cls = resolve_family(cfg.model.path, cfg.model.family)
    concepts, companions = mixed_sources(cfg, family_cls, quiet)
    data_cfg = dataclasses.replace(cfg.data, concepts=concepts)
    items = build_items(data_cfg, log=quiet)
    return TrainingData(items, data_cfg, 4, cfg.train.batch_size, cfg.train.seed, companions)


def two_concepts(tmp_path, tiny_sd, **extra):
    a, b = world_folder(tmp_path / "dots"), world_folder(tmp_path / "krem", style=None)
    return load_config(None, base_overrides(tiny_sd, a, tmp_path / "out", **{
        "data.concepts": f"[{{dir: '{a}', {extra.get('a', '')}}}, {{dir: '{b}', {extra.get('b', '')}}}]"}))


def test_sampling_weight_draws_a_concept_more_often(tmp_path, tiny_sd):
    cfg = two_concepts(tmp_path, tiny_sd, a="sampling_weight: 3")
    data = data_of(cfg)
    seen = [data.items[i].concept for k in range(data.plan.batches_per_epoch * 2) for i in data.plan.batch(k)[1]]
    assert seen.count(0) == 3 * seen.count(1)  # 4 images each, weight 3 : 1


def test_loss_weight_is_each_samples_share(tmp_path, tiny_sd):
    cfg = two_concepts(tmp_path, tiny_sd, a="loss_weight: 3")
    data = data_of(cfg)
    for k in range(4):
        batch = data.batch(k, pixels=False)
        concepts = [data.items[i].concept for i in data.plan.batch(k)[1]]
        assert batch["loss_weights"] == [(3.0 if c == 0 else 1.0) / 2 for c in concepts]
    default = data_of(two_concepts(tmp_path / "d", tiny_sd)).batch(0, pixels=False)
    assert default["loss_weights"] == [0.5, 0.5]  # all defaults: the plain mean


def test_replay_mixes_an_earlier_runs_images_at_the_ratio(tmp_path, tiny_sd):
    style = world_folder(tmp_path / "dots")
    style_run = train(load_config(None, base_overrides(tiny_sd, style, tmp_path / "style", steps=1, **{
        "data.concepts": f"[{{dir: '{style}'}}]"})), log=quiet)
    place = world_folder(tmp_path / "krem", style=None)
    for ratio, batch_size in ((0.5, 2), (0.25, 3), (0.5, 1)):
        cfg = load_config(None, base_overrides(tiny_sd, place, tmp_path / "place", **{
            "data.concepts": f"[{{dir: '{place}'}}]", "data.replay": f"['{style_run}']",
            "data.replay_ratio": ratio, "train.batch_size": batch_size}))
        data = data_of(cfg)
        batches = [data.batch(k, pixels=False) for k in range(12)]
        paths = [p for b in batches for p in b["paths"]]
        replayed = [p for p in paths if Path(p).parent == style]
        assert len(replayed) == pytest.approx(ratio * len(paths), abs=1), (ratio, batch_size)
        assert all(len(b["paths"]) - sum(Path(p).parent == style for p in b["paths"]) == batch_size for b in batches)
        # replayed samples carry the earlier run's captions, and count like the batch's own
        first = next(b for b in batches if any(Path(p).parent == style for p in b["paths"]))
        i = next(i for i, p in enumerate(first["paths"]) if Path(p).parent == style)
        assert first["prompts"][i] == Path(first["paths"][i]).with_suffix(".txt").read_text().strip()
        assert first["loss_weights"] == [1 / len(first["paths"])] * len(first["paths"])
    # a run of another base model is refused, in one line
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.yaml").write_text((style_run / "config.yaml").read_text().replace(str(tiny_sd), "/elsewhere/model"))
    cfg = load_config(None, base_overrides(tiny_sd, place, tmp_path / "p2", **{
        "data.concepts": f"[{{dir: '{place}'}}]", "data.replay": f"['{other}']"}))
    with pytest.raises(DifftuneError, match="was trained on '/elsewhere/model', not on this run's model"):
        data_of(cfg)


def test_replay_training_runs_end_to_end(tmp_path, tiny_sd):
    style = world_folder(tmp_path / "dots")
    style_run = train(load_config(None, base_overrides(tiny_sd, style, tmp_path / "style", steps=1, **{
        "data.concepts": f"[{{dir: '{style}'}}]"})), log=quiet)
    place = world_folder(tmp_path / "krem", style=None)
    out = train(load_config(None, base_overrides(tiny_sd, place, tmp_path / "place", steps=2, **{
        "data.concepts": f"[{{dir: '{place}'}}]", "data.replay": f"['{style_run}']",
        "method.init_lora": str(style_run)})), log=quiet)
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_prior_preservation_batches_and_weighted_loss(tmp_path, tiny_sd):
    inst = world_folder(tmp_path / "dots")
    classes = make_images(tmp_path / "classes", n=3, caption="a shape")
    cfg = load_config(None, base_overrides(tiny_sd, inst, tmp_path / "out", **{
        "data.concepts": f"[{{dir: '{inst}', class_dir: '{classes}', class_images: 3, prior_loss_weight: 0.7}}]"}))
    data = data_of(cfg)
    for k in range(5):
        batch = data.batch(k, pixels=False)
        is_class = [Path(p).parent == classes for p in batch["paths"]]
        assert sum(is_class) == 2 and len(is_class) == 4  # one class image per instance image
        assert batch["loss_weights"] == [0.7 / 2 if c else 1 / 2 for c in is_class]
    # the loss is mean(instance) + prior_loss_weight * mean(class), with the same noise and timesteps
    from difftune.data.cache import ImageFeatures

    family = resolve_family(cfg.model.path)(cfg, torch.device("cpu"), torch.float32)
    family.load()
    attach_method(family, cfg)
    import contextlib

    features = ImageFeatures(family, data, None, contextlib.nullcontext)
    batch = data.batch(0, pixels=False)
    with torch.no_grad():
        inputs = {**features(batch["views"]), **family.encode_prompts(batch["prompts"])}

    def loss(weights):
        with torch.no_grad():
            return micro_step(family, family.make_objective(), inputs, seed=7, loss_weights=weights)

    is_class = [Path(p).parent == classes for p in batch["paths"]]
    inst_loss = loss([0.0 if c else 0.5 for c in is_class])
    class_loss = loss([0.5 if c else 0.0 for c in is_class])
    assert float(loss(batch["loss_weights"])) == pytest.approx(float(inst_loss + 0.7 * class_loss), rel=1e-5)
    assert float(class_loss) > 0 and float(inst_loss) > 0


def test_class_images_are_drawn_once_cached_and_resumable(tmp_path, tiny_sd):
    inst = world_folder(tmp_path / "dots")
    overrides = base_overrides(tiny_sd, inst, tmp_path / "out", **{
        "data.concepts": f"[{{dir: '{inst}', class_prompt: 'a circle', class_images: 3}}]",
        "data.cache_dir": str(tmp_path / "cache"), "validation.steps": 2})
    cfg = load_config(None, overrides)
    family_cls = resolve_family(cfg.model.path)
    concepts, _ = mixed_sources(cfg, family_cls, quiet)
    folder = Path(concepts[1].dir)
    pngs = sorted(folder.glob("*.png"))
    assert len(pngs) == 3 and folder.is_relative_to(tmp_path / "cache")
    first = pngs[1].read_bytes()
    pngs[1].unlink()
    stamps = {p: p.stat().st_mtime_ns for p in (pngs[0], pngs[2])}
    logs = []
    mixed_sources(cfg, family_cls, logs.append)
    assert logs == [f"drawing 1 class images for 'a circle' into {folder}"]
    assert pngs[1].read_bytes() == first  # the same seed draws the same image
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    logs.clear()
    mixed_sources(cfg, family_cls, logs.append)
    assert logs == []  # reused, nothing drawn


def test_class_dir_without_enough_images_or_prompt_is_one_line(tmp_path, tiny_sd):
    inst = world_folder(tmp_path / "dots")
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = load_config(None, base_overrides(tiny_sd, inst, tmp_path / "out", **{
        "data.concepts": f"[{{dir: '{inst}', class_dir: '{empty}', class_images: 2}}]"}))
    with pytest.raises(DifftuneError, match=r"class_dir: .* has 0 images, class_images asks for 2 and there is no class_prompt"):
        mixed_sources(cfg, resolve_family(cfg.model.path), quiet)


def lora_family(tiny_sd, tmp_path, **extra):
    cfg = load_config(None, base_overrides(tiny_sd, world_folder(tmp_path / "d"), tmp_path / "o", **extra))
    family = resolve_family(cfg.model.path)(cfg, torch.device("cpu"), torch.float32)
    family.load()
    attach_method(family, cfg)
    return cfg, family


def test_output_preservation_target_is_the_base_prediction(tmp_path, tiny_sd):
    from difftune.objectives.preserve import OutputPreservation

    cfg, family = lora_family(tiny_sd, tmp_path, **{"preserve.output_weight": 0.5,
                                                     "preserve.prompts": "['a red circle on a blue background']"})
    torch.manual_seed(0)
    for name, p in family.parts["unet"].named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)  # a LoRA that changes the output
    base_cfg, base = lora_family(tiny_sd, tmp_path / "base")  # a fresh LoRA (B = 0) draws as the base model
    term = OutputPreservation(family, cfg.preserve.prompts, 0.5, family.encode_prompts)
    x_t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([10, 500])
    cond = term.conditioning({}, 2, seed=3)
    assert term.target(x_t, t, cond).shape == x_t.shape
    with torch.no_grad():
        base_pred = base.predict(x_t, t, base.encode_prompts(cfg.preserve.prompts * 2))
        adapted = family.predict(x_t, t, cond)
    torch.testing.assert_close(term.target(x_t, t, cond), base_pred)
    assert (adapted - base_pred).abs().max() > 1e-3
    value = term(x_t, t, {}, seed=3)
    assert float(value.detach()) == pytest.approx(0.5 * float(((adapted - base_pred) ** 2).mean()), rel=1e-5)
    value.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in family.parts["unet"].named_parameters() if "lora" in n)


def test_output_preservation_of_a_full_fine_tune_keeps_the_starting_denoiser_aside(tmp_path, tiny_sd):
    """A full fine-tune has no adapter to switch off: the term keeps a frozen copy of the starting
    denoiser, whose prediction stays the target however the trained weights move."""
    from difftune.objectives.preserve import make_terms

    cfg, family = lora_family(tiny_sd, tmp_path, **{"method.kind": "full", "preserve.output_weight": 1.0,
                                                     "preserve.prompts": "['a red circle on a blue background']"})
    validate(cfg)
    (term,) = make_terms(cfg, family, family.encode_prompts)
    x_t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([10, 500])
    cond = term.conditioning({}, 2, seed=3)
    with torch.no_grad():
        start = family.predict(x_t, t, cond)
        for p in family.parts["unet"].parameters():
            p.add_(0.05 * torch.randn_like(p))  # the fine-tune moves every weight
        moved = family.predict(x_t, t, cond)
    assert (moved - start).abs().max() > 1e-3
    torch.testing.assert_close(term.target(x_t, t, cond), start)
    assert family.parts["unet"] is not term.base  # the family predicts with the trained weights again
    value = term(x_t, t, {}, seed=3)
    assert float(value.detach()) == pytest.approx(float(((moved - start) ** 2).mean()), rel=1e-5)
    value.backward()
    assert all(p.grad is None for p in term.base.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in family.parts["unet"].parameters())


def test_continual_penalty_protects_what_the_earlier_lora_uses(tmp_path, tiny_sd):
    from difftune.methods.lora import lora_deltas
    from difftune.objectives.preserve import ContinualPenalty

    _, family = lora_family(tiny_sd, tmp_path, **{"method.target_modules": "[to_q, to_k, to_v, conv1]"})
    torch.manual_seed(0)
    layers = lora_deltas(family.parts["unet"])
    assert any(a.dim() == 4 for a, _, _ in layers.values())  # convolutions are covered too
    for a, b, _ in layers.values():
        b.data.normal_(0, 0.1)
        b.data[: b.shape[0] // 2] = 0  # the earlier LoRA leaves half of each layer's outputs alone
    penalty = ContinualPenalty(family.parts["unet"], 2.0)
    assert float(penalty()) == 0.0
    for a, b, _ in layers.values():
        with torch.no_grad():
            b[: b.shape[0] // 2] += 0.3  # change only rows the earlier LoRA did not use
    assert float(penalty()) == pytest.approx(0.0, abs=1e-12)
    for a, b, _ in layers.values():
        if a.dim() == 4:
            with torch.no_grad():
                b[b.shape[0] // 2 :] += 0.3  # change rows it used, in a convolution
            break
    assert float(penalty()) > 0.0


def test_remedy_options_validate(tmp_path, tiny_sd):
    data = world_folder(tmp_path / "d")
    for extra, message in (
        ({"preserve.output_weight": 1.0}, "needs preserve.prompts"),
        ({"preserve.output_weight": 1.0, "preserve.prompts": "['']", "method.train_text_encoder": True},
         "needs method.train_text_encoder: false"),
        ({"preserve.clora_weight": 1.0}, "needs method.init_lora"),
        ({"data.replay_ratio": 1.0}, "replay_ratio must be in"),
        ({"data.replay": "['x']", "data.buckets": True}, "data.replay needs data.buckets: false"),
    ):
        cfg = load_config(None, base_overrides(tiny_sd, data, tmp_path / "o", **extra))
        with pytest.raises(ConfigError, match=message):
            validate(cfg)

"""Aspect-ratio buckets and a deterministic bucketed batch plan; on-disk feature caches that hit on
a rerun, miss exactly where a change touches them, survive corrupt files and change no number."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import base_overrides, make_images
from difftune.config import ConceptConfig, DataConfig, load_config
from difftune.data.buckets import make_buckets, nearest_bucket
from difftune.data.cache import FeatureStore
from difftune.data.dataset import BatchPlan, Item, TrainingData
from difftune.families.sd.family import StableDiffusion
from difftune.train import read_losses, train

#: (width, height) of the images of `shaped_items`: 2:1, 1:2 and square ones, unevenly many, and a
#: lone 7:6 one with a bucket of its own
SHAPES = [(96, 48)] * 5 + [(40, 80)] * 3 + [(64, 64)] * 4 + [(70, 60)]


# --- buckets -----------------------------------------------------------------------------------


@pytest.mark.parametrize("resolution, multiple", [(64, 4), (512, 8), (768, 8), (1024, 16), (1024, 32)])
def test_buckets_fit_the_budget_in_multiples(resolution, multiple):
    buckets = make_buckets(resolution, multiple)
    assert (resolution, resolution) in buckets
    assert len(set(buckets)) == len(buckets) >= 9
    for w, h in buckets:
        assert w % multiple == 0 and h % multiple == 0
        assert w * h <= resolution * resolution
        assert w * h >= 0.85 * resolution * resolution, (w, h)  # rounding down loses little
        assert 1 / 2.2 <= w / h <= 2.2
        assert (h, w) in buckets  # portrait twin
    ratios = [w / h for w, h in buckets]
    assert ratios == sorted(ratios, reverse=True)


def test_nearest_bucket_follows_the_aspect_ratio():
    buckets = make_buckets(512, 8)
    assert buckets[nearest_bucket((1000, 1000), buckets)] == (512, 512)
    assert buckets[nearest_bucket((1920, 1080), buckets)] == (680, 384)  # 16:9
    assert buckets[nearest_bucket((1080, 1920), buckets)] == (384, 680)
    assert buckets[nearest_bucket((5000, 100), buckets)] == buckets[0]  # beyond the ladder: the widest


def shaped_items(folder: Path) -> list[Item]:
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i, size in enumerate(SHAPES):
        path = folder / f"{i:02d}.png"
        Image.new("RGB", size, (10 * i, 100, 200)).save(path)
        items.append(Item(str(path), None, 0, size=size))
    return items


def bucketed(items: list[Item], batch_size: int = 2, seed: int = 7, **data) -> TrainingData:
    config = DataConfig(resolution=64, buckets=True, concepts=[ConceptConfig(dir="unused", prompt="p")], **data)
    return TrainingData(items, config, 4, batch_size, seed)


def test_each_batch_comes_from_one_bucket_and_the_plan_is_a_pure_function(tmp_path):
    items = shaped_items(tmp_path / "shapes")
    data = bucketed(items)
    per_epoch = data.plan.batches_per_epoch
    assert per_epoch == 2 + 1 + 2 + 1  # 5 landscape -> 2, 3 portrait -> 1, 4 square -> 2, the lone one -> 1 (filled)
    again = bucketed(items)
    seen_by_epoch: dict[int, set] = {}
    for k in reversed(range(4 * per_epoch)):  # any order: no state
        batch = data.batch(k, pixels=k % 5 == 0)
        assert batch["views"] == again.batch(k, pixels=False)["views"]
        sizes = {(v.box[2] - v.box[0], v.box[3] - v.box[1]) for v in batch["views"]}
        assert len(sizes) == 1 and len(batch["views"]) == 2
        (w, h), = sizes
        assert w * h <= 64 * 64 and w % 4 == 0 and h % 4 == 0
        if "pixels" in batch:
            assert batch["pixels"].shape == (2, 3, h, w)
            assert -1.0 <= float(batch["pixels"].min()) and float(batch["pixels"].max()) <= 1.0
        seen_by_epoch.setdefault(batch["epoch"], set()).update(v.index for v in batch["views"])
    assert sorted(seen_by_epoch) == [0, 1, 2, 3]
    assert all(len(seen) == 4 + 2 + 4 + 1 for seen in seen_by_epoch.values())  # one dropped of 5 and of 3
    assert all(12 in seen for seen in seen_by_epoch.values())  # the lone one is trained every epoch
    assert data.buckets[data.bucket_of[12]] == (68, 60)
    orders = [data.plan.epoch_batches(e) for e in range(3)]
    assert orders[0] != orders[1] != orders[2]
    assert bucketed(items, seed=8).plan.epoch_batches(0) != orders[0]


def test_one_bucket_plan_is_shuffle_cut_drop_last():
    import random

    items = [Item(f"{i}.png", None, 0, size=(64, 64)) for i in range(7)]
    plan = BatchPlan(items, [ConceptConfig(dir="x")], 3, seed=5)
    assert plan.batches_per_epoch == 2
    order = list(range(7))
    random.Random("5:order:1").shuffle(order)
    assert [plan.batch(k) for k in (2, 3)] == [(1, order[:3]), (1, order[3:6])]
    assert BatchPlan(items[:2], [ConceptConfig(dir="x")], 4, seed=5).batch(0)[1] in ([0, 1], [1, 0])


def test_square_views_crop_the_centre_and_random_crops_vary(tmp_path):
    items = shaped_items(tmp_path / "shapes")
    config = DataConfig(resolution=64, concepts=[ConceptConfig(dir="unused")], random_flip=True)
    data = TrainingData(items, config, 4, 2, 0)
    view, _ = data.sample(0, 0)  # 96x48 -> 128x64, centre 64x64
    assert view.resized == (128, 64) and view.box == (32, 0, 96, 64)
    assert len(data.fixed_views()) == 2 * len(items)
    assert {data.sample(0, e)[0] for e in range(8)} <= set(data.fixed_views())
    config.crop = "random"
    data = TrainingData(items, config, 4, 2, 0)
    assert data.fixed_views() is None
    assert len({data.sample(0, e)[0].box for e in range(8)}) > 1


# --- caches --------------------------------------------------------------------------------------


class Counter:
    """Counts calls of the SD family's encoders (which prompts, how many images)."""

    def __init__(self, monkeypatch):
        self.images = 0
        self.prompts: list[str] = []
        encode_images, encode_prompts = StableDiffusion.encode_images, StableDiffusion.encode_prompts

        def images(family, pixels):
            self.images += pixels.shape[0]
            return encode_images(family, pixels)

        def prompts(family, texts):
            self.prompts += texts
            return encode_prompts(family, texts)

        monkeypatch.setattr(StableDiffusion, "encode_images", images)
        monkeypatch.setattr(StableDiffusion, "encode_prompts", prompts)

    def reset(self):
        self.images, self.prompts = 0, []


@pytest.fixture
def counter(monkeypatch):
    return Counter(monkeypatch)


def run(tiny_sd, data, out, cache, lines=None, **extra):
    settings = {"data.cache_dir": str(cache), "checkpoint.resume": "never", "train.batch_size": 2}
    settings.update(extra)
    train(load_config(None, base_overrides(tiny_sd, data, out, steps=2, **settings)),
          log=(lines.append if lines is not None else lambda *_: None))
    return [r["loss"] for r in read_losses(out)]


def test_second_run_hits_and_changes_miss_only_what_they_touch(tmp_path, tiny_sd, counter):
    data = make_images(tmp_path / "data", n=4, caption="a photo of sks disc")
    cache, out = tmp_path / "cache", tmp_path / "out"
    first = run(tiny_sd, data, out, cache)
    assert counter.images == 4 and counter.prompts == ["a photo of sks disc"]
    entries = sorted((cache / "images").rglob("*.safetensors"))
    assert len(entries) == 4

    counter.reset()
    lines: list[str] = []
    assert run(tiny_sd, data, out, cache, lines) == first  # same numbers from the cache
    assert counter.images == 0 and counter.prompts == []
    assert "image features: 0 encoded, 4 read from the cache" in "\n".join(lines)

    counter.reset()
    run(tiny_sd, data, out, cache, **{"data.resolution": 32})
    assert counter.images == 4 and counter.prompts == []  # new size: new image entries, same prompts

    counter.reset()
    (data / "img-02.txt").write_text("a photo of sks disc on a table")
    run(tiny_sd, data, out, cache)
    assert counter.images == 0 and counter.prompts == ["a photo of sks disc on a table"]

    counter.reset()
    victim = entries[0]
    victim.write_bytes(b"\x00garbage")
    lines = []
    run(tiny_sd, data, out, cache, lines)
    assert counter.images == 1 and any(f"cache file {victim} is unreadable" in line for line in lines)
    assert len(victim.read_bytes()) > 100  # rewritten
    assert not list(cache.rglob("*.tmp"))


def test_cache_off_random_crop_and_cache_on_agree(tmp_path, tiny_sd, counter):
    data = make_images(tmp_path / "data", n=4, caption="a photo of sks disc")
    cached = run(tiny_sd, data, tmp_path / "a", tmp_path / "cache-a")
    assert run(tiny_sd, data, tmp_path / "b", tmp_path / "cache-b", **{"data.cache": "false"}) == cached
    assert not (tmp_path / "cache-b").exists()

    counter.reset()
    lines: list[str] = []
    run(tiny_sd, data, tmp_path / "c", tmp_path / "cache-c", lines, **{"data.crop": "random"})
    assert counter.images == 2 * 2  # two steps of two images, each encoded at its step
    assert not (tmp_path / "cache-c" / "images").exists()
    assert any("data.crop=random: image features are encoded at every step" in line for line in lines)


def test_store_reads_back_exactly_and_treats_damage_as_missing(tmp_path):
    notes: list[str] = []
    store = FeatureStore(tmp_path / "store", notes.append)
    tensors = {"x0": torch.randn(1, 4, 8, 8, dtype=torch.bfloat16), "pooled": torch.arange(6.0).reshape(2, 3)[:, 1]}
    store.save("ab" + "0" * 62, tensors, {"image": "x.png"})
    back = store.load("ab" + "0" * 62)
    assert back.keys() == tensors.keys()
    assert all(back[k].dtype == tensors[k].dtype and torch.equal(back[k], tensors[k]) for k in tensors)
    assert store.load("cd" + "0" * 62) is None and not notes
    path = store.path("ab" + "0" * 62)
    path.write_bytes(path.read_bytes()[:40])
    assert store.load("ab" + "0" * 62) is None
    assert len(notes) == 1 and "unreadable" in notes[0]
    store.save("ef" + "0" * 62, {}, {})
    assert store.load("ef" + "0" * 62) == {}  # a family with no prompt features (Kandinsky decoder)

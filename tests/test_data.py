"""The dataset layer: folders and Hugging Face datasets become items, broken files are skipped with
one line each, `difftune data check` reports what training will see, and training runs on all of it."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import base_overrides, make_images
from difftune import DifftuneError
from difftune.cli import main
from difftune.config import ConceptConfig, DataConfig, load_config
from difftune.data.dataset import TrainingData, build_items, prompt_for
from difftune.data.hf import hf_items
from difftune.train import read_losses, train

#: valid files of `messy_folder` -> upright (width, height)
VALID = {
    "cmyk.jpg": (48, 40),
    "deep.png": (40, 40),
    "alpha.png": (40, 48),
    "palette.gif": (32, 32),
    "rotated.jpg": (24, 48),  # stored 48x24 with EXIF orientation 6 (rotate 90)
    "upper.JPG": (40, 30),
    "sub/nested.webp": (36, 36),
    "grey.bmp": (30, 40),
}
#: broken files of `messy_folder` -> the reason each must be skipped with
BROKEN = {
    "truncated.jpg": "truncated",
    "empty.png": "empty",
    "login.jpg": "html page",
    "noise.png": "not an image",
    "huge.png": "too large",
}
#: Pillow's pixel limit while these tests run: "huge.png" (100x100) is over it, the valid ones under
PIXEL_LIMIT = 9000


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def noisy(size: tuple[int, int], seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def messy_folder(folder: Path) -> Path:
    """A folder with each odd-but-valid and each broken kind of file, and captions of each kind."""
    (folder / "sub").mkdir(parents=True)
    write = lambda name, data: (folder / name).write_bytes(data)  # noqa: E731
    write("cmyk.jpg", encode(Image.new("CMYK", (48, 40), (0, 255, 255, 0)), "JPEG"))
    write("deep.png", encode(Image.fromarray(np.full((40, 40), 30000, dtype=np.uint16)), "PNG"))
    write("alpha.png", encode(Image.new("RGBA", (40, 48), (255, 0, 0, 100)), "PNG"))
    palette = Image.new("P", (32, 32), 0)
    palette.putpalette([0, 0, 0, 0, 200, 0] + [0, 0, 0] * 254)
    write("palette.gif", encode(palette, "GIF", transparency=0))
    exif = Image.Exif()
    exif[0x0112] = 6
    write("rotated.jpg", encode(noisy((48, 24)), "JPEG", exif=exif))
    write("upper.JPG", encode(noisy((40, 30), 1), "JPEG"))
    write("sub/nested.webp", encode(noisy((36, 36), 2), "WEBP"))
    write("grey.bmp", encode(Image.new("L", (30, 40), 90), "BMP"))
    jpeg = encode(noisy((48, 48), 3), "JPEG", quality=95)
    write("truncated.jpg", jpeg[: len(jpeg) // 2])
    write("empty.png", b"")
    write("login.jpg", b"<!DOCTYPE html><html><body>Please log in</body></html>")
    write("noise.png", np.random.default_rng(4).integers(0, 256, 2048, dtype=np.uint8).tobytes())
    write("huge.png", encode(Image.new("RGB", (100, 100), (1, 2, 3)), "PNG"))
    (folder / "notes.md").write_text("not an image file, ignored")
    (folder / "cmyk.txt").write_text("a cmyk photo of sks disc\n")
    rows = [{"file_name": "alpha.png", "text": "a red square"}, {"file_name": "sub/nested.webp", "text": "noise"},
            {"file_name": "cmyk.jpg", "text": "loses to the sidecar"}]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def png_bytes(seed: int, size=(64, 48)) -> bytes:
    image = Image.new("RGB", size, (0, 128, 128))
    image.paste((255, 140, 0), (8 + 4 * seed, 8, 40 + 4 * seed, 40))
    return encode(image, "PNG")


def write_parquet(path: Path, n: int = 4) -> Path:
    """A dataset laid out like lambdalabs/pokemon-blip-captions (image bytes + a text column), with
    one row whose bytes are no image (row 2) and one without a caption (row 3)."""
    import datasets

    images = [{"bytes": png_bytes(i), "path": None} for i in range(n)]
    images[2] = {"bytes": b"this is not a picture", "path": None}
    texts = [f"a drawing of sks monster number {i}" for i in range(n)]
    texts[3] = None
    dataset = datasets.Dataset.from_dict({"image": images, "text": texts})
    dataset.cast_column("image", datasets.Image()).to_parquet(str(path))
    return path


@pytest.fixture
def pixel_limit(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", PIXEL_LIMIT)


# --- folders ---------------------------------------------------------------------------------


def test_messy_folder_keeps_odd_images_and_names_each_broken_one(tmp_path, pixel_limit):
    folder = messy_folder(tmp_path / "messy")
    lines: list[str] = []
    items = build_items(DataConfig(concepts=[ConceptConfig(dir=str(folder), prompt="sks disc")]), log=lines.append)
    found = {Path(item.path).relative_to(folder).as_posix(): item for item in items}
    assert {name: item.size for name, item in found.items()} == VALID
    assert len(lines) == len(BROKEN)
    for name, reason in BROKEN.items():
        (line,) = [line for line in lines if f"{folder / name}: " in line]
        assert line.startswith("skipping ") and f": {reason}" in line, line
    assert found["cmyk.jpg"].caption == "a cmyk photo of sks disc"  # sidecar beats metadata
    assert found["alpha.png"].caption == "a red square"
    assert found["sub/nested.webp"].caption == "noise"
    assert found["grey.bmp"].caption is None


def test_prompts_template_fallback_and_dropout(tmp_path):
    make_images(tmp_path / "a", n=2, caption="a photo of sks disc")
    make_images(tmp_path / "b", n=2)
    (tmp_path / "b" / "metadata.csv").write_text("file_name,text\nimg-00.png,a csv caption\n")
    data = DataConfig(concepts=[
        ConceptConfig(dir=str(tmp_path / "a"), caption_template="{caption}, in sksartist style"),
        ConceptConfig(dir=str(tmp_path / "b"), prompt="a sks thing", caption_dropout=0.5, repeats=3),
    ])
    items = build_items(data, log=lambda _: None)
    prompts = [prompt_for(item, data.concepts[item.concept]) for item in items]
    assert prompts == ["a photo of sks disc, in sksartist style"] * 2 + ["a csv caption", "a sks thing"]
    training = TrainingData(items, data, 4, 2, seed=0)
    assert training.all_prompts() == sorted(set(prompts) | {""})
    assert training.plan.batches_per_epoch == (2 + 2 * 3) // 2
    used = {training.sample(i, epoch)[1] for epoch in range(20) for i in range(2, 4)}
    assert "" in used and "a sks thing" in used  # caption dropout happens, seeded per (epoch, item)


def test_no_usable_image_is_an_error(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"")
    lines: list[str] = []
    with pytest.raises(DifftuneError, match="no usable images in .*all 1 image files were skipped"):
        build_items(DataConfig(concepts=[ConceptConfig(dir=str(folder))]), log=lines.append)
    assert any("a.jpg: empty" in line for line in lines)


# --- Hugging Face datasets ---------------------------------------------------------------------


def test_parquet_rows_become_files_once(tmp_path, monkeypatch):
    import difftune.data.hf as hf

    path = write_parquet(tmp_path / "pokemon.parquet")
    concept = ConceptConfig(hf=str(path), prompt="a sks monster")
    items = hf_items(concept, 0, str(tmp_path / "cache"))
    assert [item.caption for item in items] == [f"a drawing of sks monster number {i}" for i in range(3)] + [None]
    assert all(Path(item.path).is_file() for item in items)
    assert Path(items[0].path).read_bytes() == png_bytes(0)
    assert items[2].origin == f"from {path}, split train, row 2"

    monkeypatch.setattr(hf, "_materialise", lambda *a: pytest.fail("the finished folder should be reused"))
    assert hf_items(concept, 0, str(tmp_path / "cache")) == items

    lines: list[str] = []
    usable = build_items(DataConfig(concepts=[concept], cache_dir=str(tmp_path / "cache")), log=lines.append)
    assert len(usable) == 3 and usable[0].size == (64, 48)
    assert len(lines) == 1 and "not an image" in lines[0] and "row 2" in lines[0]


def test_saved_dataset_dict_split_and_path_column(tmp_path):
    import datasets

    (tmp_path / "pics").mkdir()
    for i in range(2):
        (tmp_path / "pics" / f"{i}.png").write_bytes(png_bytes(i))
    table = datasets.Dataset.from_dict({"file": ["pics/0.png", "pics/1.png"], "caption": ["zero", "one"]})
    datasets.DatasetDict({"train": table, "test": table.select([1])}).save_to_disk(str(tmp_path / "saved"))
    # a string column holds paths relative to the dataset folder: used in place, not copied
    (tmp_path / "saved" / "pics").symlink_to(tmp_path / "pics")
    concept = ConceptConfig(hf=str(tmp_path / "saved"), split="test", image_column="file", caption_column="caption")
    (item,) = hf_items(concept, 0, str(tmp_path / "cache"))
    assert item.caption == "one" and Path(item.path) == tmp_path / "saved" / "pics" / "1.png"
    with pytest.raises(DifftuneError, match=r"has no split 'validation' \(splits: train, test\)"):
        hf_items(ConceptConfig(hf=str(tmp_path / "saved"), split="validation"), 0, None)


def test_hf_errors_are_one_line(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub.constants

    path = write_parquet(tmp_path / "p.parquet")
    cache = str(tmp_path / "cache")
    with pytest.raises(DifftuneError, match=r"no column 'picture' \(columns: image, text\)"):
        hf_items(ConceptConfig(hf=str(path), image_column="picture"), 0, cache)
    with pytest.raises(DifftuneError, match="caption_column: ''"):
        hf_items(ConceptConfig(hf=str(path), caption_column="caption"), 0, cache)
    assert all(item.caption is None for item in hf_items(ConceptConfig(hf=str(path), caption_column=""), 0, cache))
    with pytest.raises(DifftuneError, match="no such file or folder"):
        hf_items(ConceptConfig(hf="data/missing.parquet"), 0, cache)

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DifftuneError) as caught:
        hf_items(ConceptConfig(hf="lambdalabs/pokemon-blip-captions"), 3, cache)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("data.concepts[3].hf: cannot reach 'lambdalabs/pokemon-blip-captions'")
    assert "local parquet" in message


# --- training end to end -----------------------------------------------------------------------


def test_train_mixes_an_hf_dataset_and_a_messy_folder(tmp_path, tiny_sd, pixel_limit):
    parquet = write_parquet(tmp_path / "pokemon.parquet")
    folder = messy_folder(tmp_path / "messy")
    concepts = (f"[{{hf: '{parquet}', prompt: 'a sks monster', caption_template: '{{caption}}, sks style'}},"
                f" {{dir: '{folder}', prompt: 'a sks disc', repeats: 2}}]")
    out = tmp_path / "out"
    cfg = load_config(None, base_overrides(tiny_sd, folder, out, steps=3, **{
        "data.concepts": concepts, "data.cache_dir": str(tmp_path / "cache"), "data.buckets": "true"}))
    lines: list[str] = []
    train(cfg, log=lines.append)
    skipped = [line for line in lines if line.startswith("skipping ")]
    assert len(skipped) == len(BROKEN) + 1
    for name, reason in BROKEN.items():
        assert sum(f"{folder / name}: {reason}" in line for line in skipped) == 1, (name, skipped)
    assert any("row 2" in line for line in skipped)
    assert f"{3 + len(VALID)} images in 2 concept(s)" in "\n".join(lines)
    assert len(read_losses(out)) == 3
    assert (out / "pytorch_lora_weights.safetensors").is_file()


# --- difftune data check -----------------------------------------------------------------------


def test_data_check_reports_and_exit_codes(tmp_path, tiny_sd, capsys, pixel_limit):
    folder = messy_folder(tmp_path / "messy")
    assert main(["data", "check", str(folder)]) == 0
    report = capsys.readouterr().out
    assert f"images: {len(VALID) + len(BROKEN)} found, {len(VALID)} usable, {len(BROKEN)} skipped" in report
    assert "captions: 3 own, 5 use an EMPTY prompt" in report
    for name, reason in BROKEN.items():
        assert f"skipped: {folder / name}: {reason}" in report
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("aspect ratios"))
    histogram = lines[start + 1 : start + 8]
    assert histogram[0].split()[:3] == ["1:2", "or", "taller"]
    # rotated 1:2 | grey 3:4 | cmyk, deep, alpha, palette, nested near 1:1 | upper 4:3
    assert [int(line.split()[-1]) for line in histogram] == [1, 0, 1, 5, 1, 0, 0]
    assert f"total: {len(VALID)} usable images in 1 concept(s), {len(BROKEN)} skipped" in report

    config = tmp_path / "run.yaml"
    config.write_text(f"model: {{path: '{tiny_sd}'}}\ndata:\n  resolution: 64\n  buckets: true\n"
                      f"  concepts: [{{dir: '{folder}', prompt: 'sks'}}]\n")
    assert main(["data", "check", str(config)]) == 0
    report = capsys.readouterr().out
    # the tiny SD's multiple: VAE factor 4 x UNet 2, and StableDiffusionPipeline's own 8
    assert "buckets at resolution 64 (sides multiples of 8):" in report
    assert "  24x48: " not in report and "  40x88: 1" in report  # the rotated 1:2 image, upright

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"<html><body>gone</body></html>")
    assert main(["data", "check", str(broken)]) == 2
    captured = capsys.readouterr()
    assert "skipped: " in captured.out and "x.png: html page" in captured.out
    assert captured.err.strip() == f"difftune data: error: no usable images in {broken}: all 1 image files were skipped (reasons above)"
    assert main(["data", "check", str(tmp_path / "nowhere")]) == 2
    assert "no such folder, dataset file or config file" in capsys.readouterr().err

"""`difftune eval` and validation.eval_every: scores on known inputs, runs with checkpoints, bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from conftest import base_overrides

from difftune import DifftuneError
from difftune.cli import main
from difftune.config import load_config
from difftune.evaluate.core import score_model, select
from difftune.evaluate.prompts import EvalPrompts, default_prompts
from difftune.evaluate.scorers import EncoderScorer, WorldScorer
from difftune.train import train
from difftune.world import scenes


def quiet(*_):
    pass


def render_all(prompts_scenes):
    return [scenes.to_pil(scenes.render(s)) for s in prompts_scenes]


# ---- the world scorer on ground truth -------------------------------------------------------------


def test_world_scorer_ground_truth_scores_as_captions_and_identical_images_do_not_drift():
    rng = random.Random(0)
    dotted = [scenes.random_scene(rng, style="dotted") for _ in range(12)]
    places = [scenes.random_place(rng, "kremlin") for _ in range(6)]
    plain = [scenes.random_scene(rng) for _ in range(12)]
    w = WorldScorer()
    assert w.concept(render_all(dotted), [s.caption for s in dotted])["score"] == 1.0
    assert w.concept(render_all(places), [s.caption for s in places])["score"] == 1.0
    neutral = w.neutral(render_all(plain), [s.caption for s in plain], render_all(plain))
    assert neutral == {"correct": 1.0, "drift": 0.0}
    # images of another style do not score as dotted, and other objects count as drift
    checkered = [scenes.Scene(s.colour, s.shape, s.background, s.side, s.x, s.y, "checkered") for s in dotted]
    assert w.concept(render_all(checkered), [s.caption.replace("checkered", "zdots").replace("zcheck", "zdots")
                                             for s in checkered])["score"] <= 0.1
    assert w.neutral(render_all(plain), [s.caption for s in plain], render_all(plain[::-1]))["drift"] > 0.5


def test_score_model_flattens_concepts_and_summaries():
    rng = random.Random(1)
    dotted = [scenes.random_scene(rng, style="dotted") for _ in range(3)]
    plain = [scenes.random_scene(rng) for _ in range(3)]
    table = {s.caption: [scenes.to_pil(scenes.render(s))] for s in dotted + plain}
    prompts = EvalPrompts({"dots": [s.caption for s in dotted]}, [s.caption for s in plain])
    metrics = score_model(lambda ps: {p: table[p] for p in ps}, prompts, WorldScorer(), {p: table[p] for p in prompts.neutral})
    assert metrics["score"] == metrics["dots.score"] == 1.0
    assert metrics["drift"] == metrics["neutral.drift"] == 0.0
    assert metrics["dots.colour"] == 1.0
    results = [{"weights": "base", "metrics": {"score": 0.0, "drift": 0.0}},
               {"weights": "step-1", "metrics": {"score": 0.5, "drift": 0.3}},
               {"weights": "final", "metrics": {"score": 0.4, "drift": 0.1}}]
    assert select(results, "score")["best"] == "step-1"
    assert select(results, "drift")["best"] == "final"  # lower is better, base left out
    with pytest.raises(DifftuneError, match="unknown metric 'scor'.*did you mean 'score'"):
        select(results, "scor")


def test_default_world_prompts_keep_the_trigger_on_unseen_scenes():
    rng = random.Random(2)
    trained = [scenes.random_scene(rng, style="dotted").caption for _ in range(6)]
    prompts = default_prompts({"dots": trained, "krem": ["a zkrem on a blue background"]}, n=3)
    assert len(prompts.concepts["dots"]) == 3 and all(p.endswith("in zdots style") and p not in trained
                                                          for p in prompts.concepts["dots"])
    assert all(scenes.parse_caption(p)["place"] == "kremlin" for p in prompts.concepts["krem"])
    # distinct prompts, unseen grounds first; the kremlin allows 5 grounds, so 16 asked give 5
    krem = default_prompts({"krem": ["a zkrem on a blue background"]}, n=16).concepts["krem"]
    assert len(krem) == len(set(krem)) == 5 and krem[-1] == "a zkrem on a blue background"
    assert all(scenes.parse_caption(p)["style"] is None for p in prompts.neutral)


# ---- CLIP and DINOv2 on tiny random encoders built here -------------------------------------------


@pytest.fixture(scope="session")
def tiny_encoders(tmp_path_factory):
    import torch
    from foreign import char_clip_tokenizer
    from transformers import (BitImageProcessor, CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor,
                              Dinov2Config, Dinov2Model)

    root = tmp_path_factory.mktemp("encoders")
    torch.manual_seed(0)
    tokenizer = char_clip_tokenizer(root / "tok")
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16))
    clip.save_pretrained(root / "clip")
    CLIPProcessor(CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer).save_pretrained(root / "clip")
    dino = Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2,
                                    image_size=32, patch_size=8))
    dino.save_pretrained(root / "dino")
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root / "dino")
    return str(root / "clip"), str(root / "dino")


def test_encoder_scorer_on_known_inputs(tiny_encoders):
    clip, dino = tiny_encoders
    scorer = EncoderScorer(clip, dino)
    rng = random.Random(3)
    a = render_all([scenes.random_scene(rng, colour="red", background="white") for _ in range(3)])
    b = render_all([scenes.random_scene(rng, colour="blue", background="black", style="checkered") for _ in range(3)])
    prompts = ["a red thing"] * 3
    same = scorer.neutral(a, prompts, a)
    assert same["drift"] == pytest.approx(0.0, abs=1e-5)
    assert scorer.neutral(a, prompts, b)["drift"] > 1e-3
    # an image compared with itself has similarity 1; concept scores are cosine similarities
    one = scorer.concept(a[:1], prompts[:1], a[:1])
    assert one["clip_image"] == pytest.approx(1.0, abs=1e-5) and one["dino_image"] == pytest.approx(1.0, abs=1e-5)
    assert one["score"] == one["clip_image"] and -1.0 <= one["clip_text"] <= 1.0
    assert scorer.concept(a[:1], prompts[:1], b[:1])["clip_image"] < 1.0 - 1e-4


def test_encoder_scorer_unknown_model_is_one_line(tmp_path):
    with pytest.raises(DifftuneError, match="cannot load the CLIP encoder"):
        EncoderScorer(str(tmp_path / "nothing"), str(tmp_path / "nothing"))


# ---- runs ---------------------------------------------------------------------------------------


def world_folder(folder: Path, style: str = "dotted", n: int = 4, seed: int = 0) -> Path:
    scenes.write_dataset(folder, scenes.style_set(style, n=n, seed=seed))
    return folder


@pytest.fixture(scope="module")
def world_run(tmp_path_factory, tiny_sd):
    root = tmp_path_factory.mktemp("evalrun")
    data = world_folder(root / "dots")
    out = train(load_config(None, base_overrides(tiny_sd, data, root / "run", steps=4, **{
        "data.concepts": f"[{{dir: '{data}'}}]", "checkpoint.every": 2, "checkpoint.keep": 5,
        "validation.eval_every": 2, "validation.steps": 2, "validation.eval_prompts_per_concept": 2,
    })), log=quiet)
    return out


def test_eval_every_logs_scores_during_training(world_run):
    lines = [json.loads(x) for x in (world_run / "logs" / "eval.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2, 4]
    assert {"score", "dots.score", "drift", "neutral.correct"} <= set(lines[0])


def test_eval_scores_base_checkpoints_and_final(world_run, capsys):
    assert main(["eval", str(world_run), "--steps", "2", "--per-concept", "2", "--select", "dots.score"]) == 0
    data = json.loads((world_run / "eval.json").read_text())
    assert data["scorer"] == "world" and data["format"] == 1
    assert [r["weights"] for r in data["results"]] == ["base", "step-00000002", "step-00000004", "final"]
    by = {r["weights"]: r["metrics"] for r in data["results"]}
    assert by["base"]["drift"] == 0.0
    assert by["final"] == by["step-00000004"]  # the final weights are the last checkpoint's
    assert data["select"]["metric"] == "dots.score" and data["select"]["best"] in by
    out = capsys.readouterr().out
    assert "| weights |" in out and "best by dots.score" in out
    # the scores during training (drift against the images drawn before step 1) agree with eval's
    logged = json.loads((world_run / "logs" / "eval.jsonl").read_text().splitlines()[-1])
    assert logged["dots.score"] == by["step-00000004"]["dots.score"]


def test_eval_one_checkpoint(world_run):
    ckpt = world_run / "checkpoints" / "step-00000002"
    assert main(["eval", str(ckpt), "--steps", "2", "--per-concept", "1"]) == 0
    data = json.loads((ckpt / "eval.json").read_text())
    assert [r["weights"] for r in data["results"]] == ["base", "step-00000002"]


def test_eval_non_world_run_with_encoders(tmp_path, tiny_sd, images, tiny_encoders):
    out = train(load_config(None, base_overrides(tiny_sd, images, tmp_path / "run", steps=3, **{"train.lr": "5e-2"})),
                log=quiet)
    clip, dino = tiny_encoders
    assert main(["eval", str(out), "--steps", "2", "--per-concept", "1", "--clip-model", clip, "--dino-model", dino]) == 0
    data = json.loads((out / "eval.json").read_text())
    assert data["scorer"] == "encoders"
    assert [r["weights"] for r in data["results"]] == ["base", "step-00000003", "final"]
    base, final = data["results"][0]["metrics"], data["results"][-1]["metrics"]
    assert base["drift"] == pytest.approx(0.0, abs=1e-5)
    assert {"images.clip_text", "images.clip_image", "images.dino_image", "neutral.clip_text"} <= set(final)
    assert final["drift"] > 0.0  # 3 steps at lr 5e-2 move a tiny model's images


def test_eval_bad_input_one_line(tmp_path, world_run, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["eval", str(empty)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no config.yaml" in err
    (empty / "config.yaml").write_text((world_run / "config.yaml").read_text())
    assert main(["eval", str(empty)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no weights to evaluate" in err
    before = (world_run / "eval.json").stat().st_mtime_ns if (world_run / "eval.json").exists() else None
    assert main(["eval", str(world_run), "--select", "sharpness"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown metric 'sharpness'" in err
    after = (world_run / "eval.json").stat().st_mtime_ns if (world_run / "eval.json").exists() else None
    assert before == after  # nothing written


def test_eval_of_a_sweep_folder_scores_the_runs_its_sweep_json_names(tmp_path, capsys):
    """`difftune eval SWEEP` stands for the sweep's runs (not the sweep's own compare/ or sweep.json)."""
    import json

    sweep = tmp_path / "sw"
    (sweep / "compare").mkdir(parents=True)
    (sweep / "rank-4").mkdir()
    (sweep / "sweep.json").write_text(json.dumps({"runs": [{"name": "rank-4", "dir": "rank-4", "status": "done"}]}))
    assert main(["eval", str(sweep)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{sweep / 'rank-4'}: not a difftune run" in err, err


def test_eval_flux_run(tmp_path, tiny_flux):
    data = world_folder(tmp_path / "dots", n=2)
    out = train(load_config(None, base_overrides(tiny_flux, data, tmp_path / "run", steps=1, **{
        "data.concepts": f"[{{dir: '{data}'}}]", "validation.steps": 1, "validation.eval_every": 1,
        "validation.eval_prompts_per_concept": 1})), log=quiet)
    # FLUX frees T5 after caching prompts: the scoring prompts were encoded before that
    assert [json.loads(x)["step"] for x in (out / "logs" / "eval.jsonl").read_text().splitlines()] == [1]
    assert main(["eval", str(out), "--per-concept", "1"]) == 0
    data = json.loads((out / "eval.json").read_text())
    assert [r["weights"] for r in data["results"]] == ["base", "step-00000001", "final"]
    assert data["results"][0]["metrics"]["drift"] == 0.0

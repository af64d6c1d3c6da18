"""`difftune world journey`: its machinery, shortened, on a tiny random SD pipeline (the figures
themselves come from the world models and live in BENCHMARKS.md)."""

from __future__ import annotations

import json

from difftune.cli import main
from difftune.world.journey import STRATEGIES, run_journey


def test_journey_trains_and_scores_every_strategy(tmp_path, tiny_sd):
    result = run_journey("sd", tmp_path / "j", model=str(tiny_sd), steps=2, eval_steps=2, num=1, per_concept=2,
                         settings=["method.rank=4"], log=lambda *_: None)
    assert list(result["results"]) == ["base", *STRATEGIES]
    for name, m in result["results"].items():
        assert {"style.score", "place.score", "drift", "neutral.correct", "style_kept", "place_learned"} <= set(m), name
    assert result["results"]["base"]["drift"] == 0.0
    runs = tmp_path / "j" / "runs"
    trained = {p.name for p in runs.iterdir()}
    assert trained == {n.replace(" ", "-") for n, s in STRATEGIES.items() if s.overrides}
    # the place stages continue from the style LoRA, replay reads the style run, joint has both concepts
    cfg = (runs / "replay" / "config.yaml").read_text()
    assert str(runs / "style-only") in cfg and "replay_ratio: 0.5" in cfg
    assert "replay_ratio: 0.75" in (runs / "replay-75" / "config.yaml").read_text()
    assert "replay_ratio: 0.8" in (runs / "replay-80" / "config.yaml").read_text()
    assert "init_lora: " + str(runs / "style-only") in (runs / "sequential" / "config.yaml").read_text()
    assert (runs / "joint" / "config.yaml").read_text().count("- dir:") == 2
    assert all("rank: 4" in (runs / n / "config.yaml").read_text() for n in trained)  # the user's setting, every stage
    assert result["overrides"] == ["method.rank=4"]
    assert len(list((tmp_path / "j" / "cache" / "class_images").rglob("*.png"))) == 12
    table = (tmp_path / "j" / "journey.md").read_text()
    assert table.count("\n") == len(STRATEGIES) + 3 and "| separate |" in table
    assert json.loads((tmp_path / "j" / "journey.json").read_text())["results"] == result["results"]
    # a second journey in the same folder resumes every finished run: it scores again, keeps the
    # training times from the runs' own logs, and gives the same figures
    again = run_journey("sd", tmp_path / "j", model=str(tiny_sd), steps=2, eval_steps=2, num=1, per_concept=2,
                        strategies=["sequential"], settings=["method.rank=4"], log=lambda *_: None)
    assert list(again["results"]) == ["base", "style-only", "place-only", "sequential"]
    assert all(t > 0 for t in result["train_seconds"].values())
    assert all(again["train_seconds"][n] == result["train_seconds"][n] for n in again["train_seconds"])
    assert all(again["results"][n] == result["results"][n] for n in again["results"])


def test_journey_bad_input_one_line(tmp_path, tiny_sd, tiny_flux, capsys):
    assert main(["world", "journey", "--family", "sd", "--model", str(tiny_sd), "--strategies", "magic",
                 "--out", str(tmp_path / "j")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown 'magic'" in err
    assert main(["world", "journey", "--family", "sd", "--model", str(tiny_flux), "--out", str(tmp_path / "j")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a flux model, not sd" in err
    assert main(["world", "journey", "--family", "sd", "--model", str(tiny_sd), "--out", str(tmp_path / "j"),
                 "train.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.lrr" in err
    assert not (tmp_path / "j").exists()

"""`difftune bench`: the CLI runs a case end to end and writes a complete JSON row, and the FLOPs
it divides by are right (exact on a small MLP, the same on meta as on a real step, and a
backward of about twice the forward when every weight trains)."""

from __future__ import annotations

import json

import pytest
import torch

from difftune import DifftuneError
from difftune.bench import Case, count_flops, run_case
from difftune.cli import main

ROW_NUMBERS = ("sec_per_step", "sec_per_step_mean", "cpu_sec_per_step", "images_per_s", "first_step_s",
               "peak_mem_gb", "flops_per_step", "flops_forward", "peak_tflops", "achieved_tflops", "mfu",
               "params_total", "params_trained")


def test_cli_smoke_tiny_sd_writes_a_json_row(tmp_path, capsys):
    results = tmp_path / "bench.jsonl"
    assert main(["bench", "--family", "sd", "--steps", "2", "--warmup", "1", "--rank", "4",
                 "--json", str(results)]) == 0
    lines = results.read_text().splitlines()
    assert len(lines) == 1
    row = json.loads(lines[0])
    for key in ROW_NUMBERS:
        assert isinstance(row[key], (int, float)) and row[key] > 0, key
    assert row["family"] == "sd" and row["preset"] == "tiny" and row["mode"] == "train"
    assert row["batch"] == 1 and row["resolution"] == 64 and row["precision"] == "no" and row["rank"] == 4
    assert row["timed_steps"] == 2 and row["peak_mem_kind"] == "process_rss"
    assert row["peak_source"].startswith("measured")
    assert row["images_per_s"] == pytest.approx(1 / row["sec_per_step"])
    assert row["mfu"] == pytest.approx(row["flops_per_step"] / row["sec_per_step"] / 1e12 / row["peak_tflops"])
    assert 0 < row["params_trained"] < row["params_total"]
    assert row["command"].startswith("difftune bench --family sd --preset tiny --batch 1 --mode train")
    assert row["speed"]["fused_optimizer"] is True
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["family", "preset", "mode"]
    assert out[1].split()[:4] == ["sd", "tiny", "train", "lora4"]


def test_flops_exact_on_a_small_mlp():
    """Linear layers: forward 2*B*in*out each; backward: the weight gradient of both layers and the
    input gradient of the second only (the input itself needs no gradient)."""
    torch.manual_seed(0)
    b, d_in, d_hidden, d_out = 16, 64, 128, 32
    mlp = torch.nn.Sequential(torch.nn.Linear(d_in, d_hidden), torch.nn.ReLU(), torch.nn.Linear(d_hidden, d_out))
    f1, f2 = 2 * b * d_in * d_hidden, 2 * b * d_hidden * d_out
    forward, total = count_flops(mlp, (torch.randn(b, d_in),), {})
    assert forward == f1 + f2
    assert total == forward + f1 + 2 * f2
    # frozen first layer: nothing below the second layer needs a gradient, so only its weight gradient
    mlp[0].requires_grad_(False)
    assert count_flops(mlp, (torch.randn(b, d_in),), {}) == (f1 + f2, f1 + f2 + f2)
    assert all(p.device.type == "cpu" for p in mlp.parameters())  # the module itself is untouched


def _tiny_unet(tiny_sd, trainable: bool):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd / "unet")
    unet.requires_grad_(trainable)
    return unet


def _unet_inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 500])), {
        "encoder_hidden_states": torch.randn(2, 77, 32, generator=g)}


def test_meta_count_equals_a_real_step(tiny_sd):
    """The real step runs attention through SDPA's math path: FlopCounterMode has no formula for the
    CPU flash-attention kernel (it would count attention as 0), and math is what meta runs too."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    unet = _tiny_unet(tiny_sd, trainable=True)
    args, kwargs = _unet_inputs()
    forward, total = count_flops(unet, args, kwargs)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = unet(*args, **kwargs)[0]
        real_forward = counter.get_total_flops()
        out.pow(2).mean().backward()
    assert forward == real_forward
    assert total == counter.get_total_flops()


def test_backward_is_about_twice_the_forward_when_everything_trains(tiny_sd):
    unet = _tiny_unet(tiny_sd, trainable=True)
    forward, total = count_flops(unet, *_unet_inputs())
    assert 1.6 < (total - forward) / forward < 2.05  # the first conv needs no input gradient
    # every weight frozen, the input needs a gradient: input gradients only, about one forward
    # (attention's backward is two of its forwards, so a little more)
    frozen = _tiny_unet(tiny_sd, trainable=False)
    (sample, t), kwargs = _unet_inputs()
    forward_f, total_f = count_flops(frozen, (sample.requires_grad_(True), t), kwargs)
    assert forward_f == forward and 1.0 < (total_f - forward_f) / forward_f < 1.3


def test_flops_mode_counts_the_small_flux_preset_on_meta(tmp_path):
    """The meta path that counts real-size models: small FLUX, with an analytic lower bound of the
    transformer's forward (every linear layer of every token, plus attention scores and values)."""
    row = run_case(Case(family="flux", preset="small", mode="flops", batch=1), tmp_path)
    hidden, double, single, txt, img = 256, 2, 4, 512, (256 // 4 // 2) ** 2
    per_token_double = 2 * (4 * hidden * hidden + 2 * hidden * 4 * hidden)  # qkv + out, MLP 4x
    per_token_single = 2 * (3 * hidden * hidden + hidden * 4 * hidden + 5 * hidden * hidden)
    attention = 4 * (txt + img) ** 2 * hidden
    tokens = txt + img
    estimate = double * (per_token_double * tokens + attention) + single * (per_token_single * tokens + attention)
    assert estimate <= row["flops_forward"] < 1.1 * estimate
    # LoRA: the backward computes input gradients only: once the linear layers, twice the attention
    assert 2.0 < row["flops_per_step"] / row["flops_forward"] < 3.0
    assert row["device"].startswith("meta") and "sec_per_step" not in row


@pytest.fixture(scope="module")
def bench_work(tmp_path_factory):
    return tmp_path_factory.mktemp("bench")


@pytest.mark.parametrize("mode, fields", [
    ("overhead", ("overhead_ratio", "overhead_ratio_cpu", "bare_sec_per_step")),
    ("compare", ("speedup_vs_baseline", "speedup_vs_baseline_cpu", "baseline_sec_per_step")),
    ("baseline", ("params_trained",)),
    ("generate", ("flops_per_step", "mfu")),
    ("e2e", ("e2e_s",)),
    ("baseline-e2e", ("e2e_s",)),
])
def test_every_mode_runs_on_the_tiny_flux(bench_work, mode, fields):
    row = run_case(Case(family="flux", mode=mode, steps=2, warmup=1, gen_steps=2, rank=4), bench_work)
    assert row["sec_per_step"] > 0 and row["images_per_s"] > 0 and row["peak_mem_gb"] > 0
    for key in fields:
        assert row[key] > 0, key
    if mode in ("e2e", "baseline-e2e"):
        assert row["sec_per_step"] == pytest.approx(row["e2e_s"] / 2)


def test_bad_cases_are_one_line_errors(tmp_path):
    with pytest.raises(DifftuneError, match="--preset 'huge'"):
        run_case(Case(family="sd", preset="huge"), tmp_path)
    with pytest.raises(DifftuneError, match="no re-created diffusers script for sd"):
        run_case(Case(family="sd", mode="baseline"), tmp_path)
    with pytest.raises(DifftuneError, match="--family 'sd9'"):
        run_case(Case(family="sd9"), tmp_path)


def test_a_model_too_big_for_the_machine_stops_before_it_is_built(tmp_path, monkeypatch):
    import difftune.bench.cases

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same check on any machine
    monkeypatch.setattr(difftune.bench.cases, "_available_ram", lambda: 8 * 10**9)
    with pytest.raises(DifftuneError, match=r"FLUX.1-dev \(transformer\): 47.6 GB of weights alone, but the cpu "
                                            r"has 8.0 GB free; .*--mode flops"):
        run_case(Case(family="flux", preset="real", precision="no"), tmp_path)

"""Speed and memory switches (`speed:` section): each one that runs on a CPU gives the same training
numbers as plain eager PyTorch (compile, channels_last, fused AdamW, the math attention backend) or
exactly the numbers of its rounded weights (fp8 storage); each one that cannot run here stops before
loading with a one-line error naming what it needs."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import base_overrides, make_images
from difftune import DifftuneError
from difftune.config import load_config
from difftune.speed import Fp8Linear, adamw_options, compile_model, set_attention_backend, setup, store_fp8
from difftune.train import read_losses, train

PROMPT = "a photo of sks disc"


def quiet(*_):
    pass


def run(model, root, name, steps=2, **speed):
    """A short tiny LoRA run with the given switches; returns (losses, final LoRA weights)."""
    data = root / "data"
    if not data.exists():
        make_images(data, caption=PROMPT)
    extra = {"method.rank": 4, "train.lr": "1e-2", **{f"speed.{k}": v for k, v in speed.items()}}
    out = train(load_config(None, base_overrides(model, data, root / name, steps=steps, **extra)), log=quiet)
    return [r["loss"] for r in read_losses(out)], load_file(str(out / "pytorch_lora_weights.safetensors"))


@pytest.fixture(scope="module")
def eager(tiny_sd, tmp_path_factory):
    root = tmp_path_factory.mktemp("speed")
    return root, run(tiny_sd, root, "eager", fused_optimizer=False)


def assert_same_run(a, b, rtol, atol=1e-3):
    """Same losses, same final LoRA weights. Adam makes every update about lr (1e-2) in size whatever
    the gradient's, so rounding-level differences in a gradient that is near 0 (as small as Adam's
    eps) move that one weight by up to ~2e-4; a wrong update would be off by ~1e-2."""
    losses_a, weights_a = a
    losses_b, weights_b = b
    assert losses_a == pytest.approx(losses_b, rel=rtol)
    assert weights_a.keys() == weights_b.keys()
    for key in weights_a:
        torch.testing.assert_close(weights_a[key], weights_b[key], rtol=rtol, atol=atol)


def test_fused_adamw_same_update_as_unfused(tiny_sd, eager):
    root, reference = eager
    assert_same_run(run(tiny_sd, root, "fused", fused_optimizer=True), reference, rtol=1e-5)
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert adamw_options(load_config(None, []), params) == {"fused": True}  # CPU has a fused kernel
    assert adamw_options(load_config(None, ["speed.fused_optimizer=false"]), params) == {}


def test_channels_last_same_loss(tiny_sd, eager):
    root, reference = eager
    assert_same_run(run(tiny_sd, root, "channels_last", fused_optimizer=False, channels_last=True), reference,
                    rtol=1e-5)


def test_compile_regional_same_loss_sd(tiny_sd, eager):
    root, reference = eager
    assert_same_run(run(tiny_sd, root, "compiled", fused_optimizer=False, compile="regional"), reference, rtol=1e-4)


def _lora_model(model, targets):
    from peft import LoraConfig

    torch.manual_seed(0)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=targets))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # non-zero, so the LoRA path changes outputs and gets gradients
            torch.nn.init.normal_(p, std=0.1)
    return model.train()


def _loss_and_grads(model, kwargs):
    model.zero_grad(set_to_none=True)
    out = model(**kwargs)[0]
    loss = out.float().pow(2).mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def _flux_transformer(tiny_flux):
    from diffusers import FluxTransformer2DModel

    from difftune.families.flux.family import ATTENTION

    return _lora_model(FluxTransformer2DModel.from_pretrained(tiny_flux / "transformer"), ATTENTION)


def _flux_inputs():
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 64, 64, generator=g), timestep=torch.tensor([0.5]),
                guidance=torch.tensor([3.5]), pooled_projections=torch.randn(1, 32, generator=g),
                encoder_hidden_states=torch.randn(1, 512, 32, generator=g), txt_ids=torch.zeros(512, 3),
                img_ids=torch.rand(64, 3, generator=g) * 8, return_dict=False)


@pytest.mark.parametrize("mode", ["regional", "full"])
def test_compile_same_loss_and_gradients_flux(tiny_flux, mode):
    model = _flux_transformer(tiny_flux)
    reference = copy.deepcopy(model)
    compile_model(model, mode)
    compiled = [m for m in model.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    expected = {"FluxTransformerBlock", "FluxSingleTransformerBlock"} if mode == "regional" else {"FluxTransformer2DModel"}
    assert {type(m).__name__ for m in compiled} == expected
    loss, grads = _loss_and_grads(model, _flux_inputs())
    ref_loss, ref_grads = _loss_and_grads(reference, _flux_inputs())
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-6)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-6)


def test_math_attention_backend_same_as_native_sdpa_flux(tiny_flux):
    model = _flux_transformer(tiny_flux)
    reference = copy.deepcopy(model)
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    active = _AttentionBackendRegistry._active_backend  # process-wide: set by set_attention_backend,
    set_attention_backend(model, "_native_math")     # and not restored by reset_attention_backend
    try:
        loss, grads = _loss_and_grads(model, _flux_inputs())
    finally:
        model.reset_attention_backend()
        _AttentionBackendRegistry.set_active_backend(active)
    ref_loss, ref_grads = _loss_and_grads(reference, _flux_inputs())
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-7)


def test_fp8_base_weights_compute_exactly_with_their_rounded_values(tiny_sd):
    """Stored in float8_e4m3fn with a scale per row, used in fp32: outputs and LoRA gradients equal
    those of an fp32 model holding the dequantised weights; the weights take a quarter of the bytes."""
    from diffusers import UNet2DConditionModel

    from difftune.families.sd.family import ATTENTION

    model = _lora_model(UNet2DConditionModel.from_pretrained(tiny_sd / "unet"), ATTENTION)
    reference = copy.deepcopy(model)
    linear_bytes = sum(m.weight.numel() * 4 for n, m in model.named_modules()
                       if type(m) is torch.nn.Linear and "lora_" not in n)
    store_fp8(model, torch.float32)
    fp8 = {n: m for n, m in model.named_modules() if isinstance(m, Fp8Linear)}
    assert any(n.endswith("to_q.base_layer") for n in fp8) and not any("lora_" in n for n in fp8)
    assert model.dtype == torch.float32  # fp8 data are buffers: the model's dtype stays the compute dtype
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    fp8_bytes = sum(m.weight_fp8.numel() + m.weight_scale.numel() * 4 for m in fp8.values())
    kept_bytes = sum(m.weight.numel() * 4 for n, m in model.named_modules()
                     if type(m) is torch.nn.Linear and "lora_" not in n)
    assert fp8_bytes + kept_bytes < 0.5 * linear_bytes  # the time embedding's linear layers stay fp32
    for name, layer in fp8.items():
        reference.get_submodule(name).weight.data = layer.weight  # the dequantised values
        assert (layer.weight - reference.get_submodule(name).weight).abs().max() == 0
    g = torch.Generator().manual_seed(0)
    kwargs = dict(sample=torch.randn(2, 4, 16, 16, generator=g), timestep=torch.tensor([10, 500]),
                  encoder_hidden_states=torch.randn(2, 77, 32, generator=g))
    loss, grads = _loss_and_grads(model, kwargs)
    ref_loss, ref_grads = _loss_and_grads(reference, kwargs)
    assert loss == ref_loss
    for a, b in zip(grads, ref_grads, strict=True):
        assert torch.equal(a, b)


def test_fp8_keeps_no_cast_weights_for_the_backward():
    """What autograd holds between forward and backward: the fp8 layers keep nothing of their own
    (they recompute the cast weight), where casting on the fly would keep every cast weight."""
    from torch.autograd.graph import saved_tensors_hooks

    torch.manual_seed(0)
    layers = torch.nn.Sequential(*[torch.nn.Linear(256, 256, bias=False) for _ in range(4)]).requires_grad_(False)
    store_fp8(layers, torch.float32)
    saved = []
    x = torch.randn(2, 256, requires_grad=True)
    with saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layers(x)
    assert {t.dtype for t in saved} == {torch.float8_e4m3fn, torch.float32}
    assert sum(t.numel() * t.element_size() for t in saved) <= 4 * (256 * 256 + 256 * 4)  # fp8 weights + scales
    y.sum().backward()
    expected = torch.ones(2, 256) @ torch.linalg.multi_dot([layer.weight for layer in reversed(layers)])
    torch.testing.assert_close(x.grad, expected)


def test_fp8_training_run_saves_a_loadable_lora(tiny_sd, eager):
    from diffusers import StableDiffusionPipeline

    root, (reference_losses, _) = eager
    losses, weights = run(tiny_sd, root, "fp8", base_weights="fp8")
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[0] == pytest.approx(reference_losses[0], rel=0.05)  # same batch, rounded base weights
    assert all(v.dtype == torch.float32 for v in weights.values())
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd))
    pipe.load_lora_weights(str(root / "fp8"))


# ---- switches that cannot run here: one-line errors, raised before anything is loaded ---------------------


def _setup(*overrides):
    setup(load_config(None, list(overrides)), torch.device("cpu"))


def test_nf4_without_bitsandbytes_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(DifftuneError, match=r"nf4 needs bitsandbytes \(pip install 'difftune\[gpu\]'\)"):
        _setup("speed.base_weights=nf4")


def test_low_precision_base_needs_lora():
    with pytest.raises(DifftuneError, match="stores the frozen base weights in low precision, which method.kind=full cannot use; use method.kind=lora"):
        _setup("speed.base_weights=fp8", "method.kind=full")


def test_gpu_attention_backends_need_cuda_and_unknown_names_are_listed():
    with pytest.raises(DifftuneError, match="speed.attention_backend=flash needs a CUDA GPU"):
        _setup("speed.attention_backend=flash")
    with pytest.raises(DifftuneError, match="unknown backend 'flashy'.*native"):
        _setup("speed.attention_backend=flashy")
    _setup("speed.attention_backend=_native_math")  # runs on a CPU


def test_unet_attention_is_always_sdpa(tiny_sd):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd / "unet")
    assert {type(p).__name__ for p in unet.attn_processors.values()} == {"AttnProcessor2_0"}
    with pytest.raises(DifftuneError, match="AttnProcessor2_0, which always uses PyTorch SDPA"):
        set_attention_backend(unet, "_native_math")


def test_regional_compile_needs_repeated_blocks(tmp_path):
    from diffusers import UNet2DConditionModel

    from difftune.tiny import make_tiny

    unet = UNet2DConditionModel.from_pretrained(make_tiny("kandinsky22", tmp_path / "k22") / "decoder" / "unet")
    with pytest.raises(DifftuneError, match="no repeated blocks.*use speed.compile=full"):
        compile_model(unet, "regional")


def test_tf32_switch_leaves_cpu_matmuls_alone():
    before = torch.backends.cuda.matmul.fp32_precision, torch.get_float32_matmul_precision()
    _setup("speed.tf32=true")
    assert (torch.backends.cuda.matmul.fp32_precision, torch.get_float32_matmul_precision()) == before


def test_adamw8bit_needs_cuda_and_fp16_an_accelerator(tiny_sd, tmp_path):
    data = make_images(tmp_path / "data", caption=PROMPT)
    for key, value, needs in (("train.optimizer", "adamw8bit", "needs a CUDA GPU"),
                              ("train.precision", "fp16", "needs an accelerator")):
        cfg = load_config(None, base_overrides(tiny_sd, data, tmp_path / key, **{key: value}))
        with pytest.raises(DifftuneError, match=needs):
            train(cfg, log=quiet)


def test_auto_compile_only_where_it_was_measured_to_pay(monkeypatch):
    """`speed.compile: auto` (the default) compiles a FLUX transformer regionally for a long CUDA run and
    leaves everything else eager: a CPU, a short run, block swap, an fp8 base, gradient checkpointing,
    a family where it was not measured to pay (SD's UNet), no triton."""
    from difftune import speed
    from difftune.families.registry import get_family

    flux, unet, cuda = get_family("flux").compile_pays, get_family("sd").compile_pays, torch.device("cuda")
    monkeypatch.setattr(speed, "_has_triton", lambda: True)
    mode = lambda *o, module=flux, device=cuda: speed.compile_mode(load_config(None, list(o)), device, module)  # noqa: E731
    assert load_config(None, []).speed.compile == "auto"
    assert mode("train.steps=1000") == "regional"
    assert mode("train.steps=1000", device=torch.device("cpu")) == "none"
    assert mode("train.steps=100") == "none"
    assert mode("train.steps=1000", "speed.block_swap=4") == "none"
    assert mode("train.steps=1000", "speed.base_weights=fp8") == "none"
    assert mode("train.steps=1000", "train.gradient_checkpointing=true") == "none"
    assert mode("train.steps=1000", module=unet) == "none"
    assert mode("train.steps=10", "speed.compile=regional", device=torch.device("cpu")) == "regional"  # asked for
    monkeypatch.setattr(speed, "_has_triton", lambda: False)
    assert mode("train.steps=1000") == "none"


def test_fp8_base_loads_the_denoiser_into_host_memory(tiny_flux, tmp_path):
    """With an fp8 base the bf16 denoiser never reaches the device whole: loading leaves it on the host
    (here: the CPU, while the device is ``meta``), `speed.apply` stores it in fp8 and then moves it."""
    from difftune.families.registry import resolve_family
    from difftune.speed import denoiser_on_host

    def loaded(*overrides):
        cfg = load_config(None, base_overrides(tiny_flux, tmp_path, tmp_path / "out") + list(overrides))
        family = resolve_family(cfg.model.path, cfg.model.family)(cfg, torch.device("meta"), torch.float32)
        family.load(denoiser_on_host(cfg))  # as training loads it
        return cfg, {name: next(p.parameters()).device.type for name, p in family.parts.items()
                     if isinstance(p, torch.nn.Module) and any(True for _ in p.parameters())}, family

    cfg, devices, family = loaded("speed.base_weights=fp8")
    assert denoiser_on_host(cfg) and devices[family.denoiser] == "cpu"
    assert {d for n, d in devices.items() if n != family.denoiser} == {"meta"}
    cfg, devices, family = loaded()
    assert not denoiser_on_host(cfg) and set(devices.values()) == {"meta"}

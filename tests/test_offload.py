"""Block swap and activation offloading (`difftune.offload`, ``speed.block_swap`` /
``speed.offload_activations``).

On a CPU the "device" and the "host" are the same memory, so these tests cannot show memory saved;
they show what makes it so on a GPU: the losses and LoRA gradients are identical with and without
swapping or offloading; between uses every swapped weight points at its host copy; nothing (autograd
included) keeps a block's device copy alive after the block ran; at most two blocks (the running one
and the prefetched one) have device copies at any moment; each swapped block is copied in once for
the forward and once for the backward; and the saved-tensor hooks really take the activations."""

from __future__ import annotations

import weakref

import pytest
import torch
from safetensors.torch import load_file

from conftest import base_overrides, make_images
from difftune import DifftuneError
from difftune import offload
from difftune.config import load_config
from difftune.train import read_losses, train

PROMPT = "a photo of sks disc"
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def flux_lora(checkpointing: bool = False):
    """A small FLUX transformer (2 double + 3 single blocks) with LoRA, same weights at every call."""
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=3,
                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                   pooled_projection_dim=10, guidance_embeds=False, axes_dims_rope=[2, 2, 4])
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=TARGETS))
    if checkpointing:
        model.enable_gradient_checkpointing()
    return model


def flux_inputs():
    g = torch.Generator().manual_seed(1)
    tokens, text = 16, 5
    ids = torch.zeros(tokens, 3)
    ids[:, 1] = torch.arange(tokens) // 4
    ids[:, 2] = torch.arange(tokens) % 4
    return dict(hidden_states=torch.randn(2, tokens, 16, generator=g),
                encoder_hidden_states=torch.randn(2, text, 12, generator=g),
                pooled_projections=torch.randn(2, 10, generator=g), timestep=torch.tensor([0.3, 0.7]),
                img_ids=ids, txt_ids=torch.zeros(text, 3))


def loss_and_grads(model, steps: int = 2):
    """Losses and LoRA gradients of `steps` forward/backward passes (no optimizer: same weights)."""
    out = []
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        loss = model(**flux_inputs()).sample.square().mean()
        loss.backward()
        out.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    return out


def assert_identical(a, b):
    assert len(a) == len(b)
    for (loss_a, grads_a), (loss_b, grads_b) in zip(a, b):
        assert loss_a == loss_b
        assert grads_a.keys() == grads_b.keys() and grads_a
        for name in grads_a:
            assert torch.equal(grads_a[name], grads_b[name]), name


def swapped(n: int, checkpointing: bool = False):
    model = flux_lora(checkpointing)
    blocks = ("transformer_blocks", "single_transformer_blocks")
    offload.apply(model, load_config(None, [f"speed.block_swap={n}"]), blocks, torch.device("cpu"))
    return model, model._difftune_block_swap


@pytest.mark.parametrize("checkpointing", [False, True])
def test_block_swap_same_losses_and_gradients(checkpointing):
    reference = loss_and_grads(flux_lora(checkpointing))
    model, swap = swapped(4, checkpointing)
    assert len(swap.slots) == 4 and swap.on_host()
    assert_identical(loss_and_grads(model), reference)
    assert swap.on_host()  # after the backward every swapped weight points at its host copy again
    assert swap.loads == 2 * 4 * 2  # 2 steps x 4 blocks x (forward + backward); recomputation needs no extra


def test_swapped_weights_live_on_the_host_between_uses():
    model, swap = swapped(5)
    live: list[int] = []  # swapped blocks holding device copies, seen as each block starts
    copies: list[weakref.ref] = []

    def watch(block, args, kwargs):
        live.append(sum(s.copies is not None for s in swap.slots))
        for s in swap.slots:
            if s.block is block:
                assert not swap.on_host() and s.active
                assert all(t.data_ptr() != h.data_ptr() for t, h in zip(s.tensors, s.host))
                copies.extend(weakref.ref(c) for c in s.copies)

    for slot in swap.slots:  # registered after the swap's own hooks: runs once the block is loaded
        slot.block.register_forward_pre_hook(watch, with_kwargs=True)
    loss = model(**flux_inputs()).sample.square().mean()
    # between the forward and the backward: all weights on the host, no device copy alive anywhere
    assert swap.on_host()
    assert copies and all(ref() is None for ref in copies)
    assert max(live) <= 2  # the running block and the one prefetched for the next
    loss.backward()
    assert swap.on_host()


def test_block_swap_in_no_grad_forward():
    reference = flux_lora()
    model, swap = swapped(5)
    with torch.no_grad():
        assert torch.equal(model(**flux_inputs()).sample, reference(**flux_inputs()).sample)
    assert swap.on_host() and swap.loads == 5


def test_offload_activations_same_gradients_and_packs_activations():
    reference = loss_and_grads(flux_lora())
    model = flux_lora()
    offload.apply(model, load_config(None, ["speed.offload_activations=true"]), (), torch.device("cpu"))
    assert_identical(loss_and_grads(model), reference)
    hooks = model._difftune_offload_activations
    assert hooks.packed > 20  # every activation the LoRA graph saves went through the hooks
    assert offload.describe(model)["offloaded_tensors"] == hooks.packed


def test_swap_and_offload_together():
    reference = loss_and_grads(flux_lora(True))
    model = flux_lora(True)
    cfg = load_config(None, ["speed.block_swap=5", "speed.offload_activations=true"])
    offload.apply(model, cfg, ("transformer_blocks", "single_transformer_blocks"), torch.device("cpu"))
    assert_identical(loss_and_grads(model), reference)


# ---- through `difftune train` ---------------------------------------------------------------------------


def run(model, root, name, **speed):
    data = root / "data"
    if not data.exists():
        make_images(data, caption=PROMPT)
    extra = {"method.rank": 4, "train.lr": "1e-2", **{f"speed.{k}": v for k, v in speed.items()}}
    out = train(load_config(None, base_overrides(model, data, root / name, steps=2, **extra)), log=lambda *_: None)
    return [r["loss"] for r in read_losses(out)], load_file(str(out / "pytorch_lora_weights.safetensors"))


@pytest.mark.parametrize("family", ["flux", "sd"])
def test_train_with_swap_and_offload_equals_plain(family, tiny_flux, tiny_sd, tmp_path):
    model = {"flux": tiny_flux, "sd": tiny_sd}[family]
    losses, weights = run(model, tmp_path, "plain")
    losses_s, weights_s = run(model, tmp_path, "swap", block_swap=2, offload_activations="true")
    assert weights_s.keys() == weights.keys()
    if family == "flux":  # bitwise the same run
        assert losses_s == losses
        for key in weights:
            assert torch.equal(weights_s[key], weights[key]), key
    else:
        # the UNet: its skip connections sum gradients in another order behind the swap's identity nodes, and
        # it saves transposed views for its attention matmuls whose offloaded copies are contiguous, so
        # the backward's matmuls run over other strides and round differently (~1e-6); a wrong gradient would
        # be off by the size of an Adam update (lr = 1e-2)
        assert losses_s == pytest.approx(losses, rel=1e-5)
        for key in weights:
            torch.testing.assert_close(weights_s[key], weights[key], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("overrides, message", [
    (["speed.block_swap=2", "method.kind=full"], "only adapter methods"),
    (["speed.block_swap=2", "speed.compile=regional"], "cannot trace"),
    (["speed.block_swap=-1"], "must be 0"),
    (["speed.block_swap=99"], "has only 2 blocks"),
])
def test_bad_block_swap_is_one_line(overrides, message, tiny_flux, tmp_path):
    make_images(tmp_path / "data", caption=PROMPT)
    cfg = load_config(None, base_overrides(tiny_flux, tmp_path / "data", tmp_path / "out", **dict(
        o.split("=", 1) for o in overrides)))
    with pytest.raises(DifftuneError, match=message) as e:
        train(cfg, log=lambda *_: None)
    assert "\n" not in str(e.value)

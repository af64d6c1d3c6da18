"""The family x method contract: every registered family and every registered method, on the tiny
pipelines, keeps the promises the rest of difftune relies on. A new family or method is in the
matrix by being in its registry.

Per pair, one fixture trains a few steps in memory through the real parts (registry, Family,
Method, the loop's micro-step) and records what the tests then check:

- interop: what the method saves loads with diffusers (a LoRA file through the denoiser's
  ``load_lora_adapter``, the diffusers loader every pipeline's ``load_lora_weights`` uses; a full
  fine-tune as a pipeline folder through ``from_pretrained``) and predicts what the trained model did;
- only the trained parameters change (adapter weights for adapter methods, the trained parts for full);
- a disabled adapter gives the base model's output;
- the checkpoint state round-trips (method.state_dict -> a fresh model -> the same predictions);
- resume is exact: 1 step, checkpoint, restore into a fresh model and optimizer, 1 step == 2 steps;
- it learns: the loss on a fixed tiny batch falls.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from difftune.config import load_config
from difftune.families.base import unwrap
from difftune.families.registry import FAMILIES, get_family
from difftune.methods import get_method, get_method_class, method_kinds
from difftune.run_layout import LORA_FILE
from difftune.tiny import make_tiny, tiny_config, tiny_folder, tiny_resolution
from difftune.train import attach_method, micro_step

PAIRS = [(f, m) for f in FAMILIES for m in method_kinds()]
ADAPTER_PAIRS = [(f, m) for f, m in PAIRS if get_method_class(m).adapter]  # methods whose adapter can be switched off
PROMPTS = ["a photo of sks dog", "a red car on a road"]
LR = {"full": 1e-3}  # adapters: 1e-2


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    built: dict[str, object] = {}

    def root(family: str):
        folder = tiny_folder(family)
        if folder not in built:
            built[folder] = make_tiny(folder, tmp_path_factory.mktemp(f"tiny-{folder}"))
        return built[folder]

    return root


def _config(family: str, method: str, root, out, **extra):
    items = {**tiny_config(root, family), "model.family": family, "method.kind": method, "method.rank": 4,
             "data.resolution": tiny_resolution(tiny_folder(family)), "train.precision": "no",
             "train.lr": LR.get(method, 1e-2), "output_dir": str(out), **extra}
    return load_config(None, [f"{k}={v}" for k, v in items.items()])


def _family(cfg):
    family = get_family(cfg.model.family)(cfg, torch.device("cpu"), torch.float32)
    family.load()
    return family


class _Step:
    """The loop's micro-step on one fixed batch, with features encoded once (frozen encoders)."""

    def __init__(self, family, resolution: int):
        g = torch.Generator().manual_seed(0)
        pixels = torch.rand(len(PROMPTS), 3, resolution, resolution, generator=g) * 2 - 1
        with torch.no_grad():
            self.images = family.encode_images(pixels)
            self.prompts = family.encode_prompts(PROMPTS)

    def loss(self, family, objective, seed: int = 7):
        return micro_step(family, objective, {**self.images, **self.prompts}, seed)

    def predict(self, family, objective):
        """The denoiser's prediction on a fixed noisy input."""
        features = {**self.images, **self.prompts}
        x0 = features.pop("x0").float()
        g = torch.Generator().manual_seed(3)
        t = objective.sample_timesteps(x0, g)
        x_t = objective.noisy(x0, torch.randn(x0.shape, generator=g), t)
        with torch.no_grad():
            return family.predict(x_t, t, features).detach().clone()


def _train(family, method, part_names, objective, step: _Step, steps: int, lr: float, optimizer=None):
    params = [p for n in part_names for p in method.trainable_parameters(family.parts[n])]
    optimizer = optimizer or torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = step.loss(family, objective)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return optimizer, losses


def _params(family) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v.detach().clone() for name, part in family.parts.items()
            if isinstance(part, torch.nn.Module) for k, v in unwrap(part).state_dict().items()}


@pytest.fixture(scope="module", params=PAIRS, ids=[f"{f}-{m}" for f, m in PAIRS])
def pair(request, tiny_root, tmp_path_factory):
    family_name, kind = request.param
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp(f"{family_name}-{kind}")
    root = tiny_root(family_name)
    cfg = _config(family_name, kind, root, tmp / "run")
    family = _family(cfg)
    method = get_method(cfg.method)
    step = _Step(family, cfg.data.resolution)
    objective = family.make_objective()
    base_pred = step.predict(family, objective)
    before = _params(family)

    part_names = attach_method(family, cfg)
    trainable = {f"{n}.{k}" for n in part_names for k, p in unwrap(family.parts[n]).named_parameters()
                 if p.requires_grad}
    attached_pred = step.predict(family, objective)
    _, losses = _train(family, method, part_names, objective, step, 6, cfg.train.lr)
    for n in part_names:
        family.parts[n].eval()
    trained_pred = step.predict(family, objective)
    after = _params(family)
    state = {n: {k: v.clone() for k, v in method.state_dict(family.parts[n]).items()} for n in part_names}

    record = {"family": family_name, "kind": kind, "method": method, "losses": losses, "base": base_pred,
              "attached": attached_pred, "trained": trained_pred, "before": before, "after": after,
              "trainable": trainable, "parts": part_names}

    # disabled adapters
    if method.adapter:
        for n in part_names:
            unwrap(family.parts[n]).disable_adapters()
        record["disabled"] = step.predict(family, objective)
        for n in part_names:
            unwrap(family.parts[n]).enable_adapters()

    # checkpoint state -> a fresh model
    fresh = _family(cfg)
    attach_method(fresh, cfg)
    for n in part_names:
        method.load_state_dict(fresh.parts[n], state[n], "test")
        fresh.parts[n].eval()
    record["restored"] = step.predict(fresh, objective)

    # the saved output, loaded with diffusers
    out = tmp / "out"
    method.save(family, out, part_names)
    if method.adapter:
        base = _family(cfg)
        from safetensors import safe_open

        with safe_open(str(out / LORA_FILE), framework="pt") as fh:
            heads = {k.split(".", 1)[0] for k in fh.keys()}
        denoiser = unwrap(base.parts[base.denoiser])
        denoiser.load_lora_adapter(str(out), weight_name=LORA_FILE,
                                   prefix=base.denoiser if heads == {base.denoiser} else None)
        denoiser.eval()
        record["loaded"] = step.predict(base, objective)
    else:
        options = dataclasses.asdict(family.options)
        extra = {f"model.options.{k}": v for k, v in options.items() if v is not None}
        loaded_cfg = load_config(None, [f"model.path={out}", f"model.family={family_name}", f"method.kind={kind}",
                                        "train.precision=no", f"output_dir={tmp / 'o2'}",
                                        *[f"{k}={v}" for k, v in extra.items()]])
        loaded = _family(loaded_cfg)
        record["loaded"] = step.predict(loaded, objective)

    # resume exactness: 2 steps == 1 step, checkpoint, fresh model and optimizer, 1 step
    def fresh_attached():
        torch.manual_seed(1)
        f = _family(cfg)
        attach_method(f, cfg)
        return f

    a = fresh_attached()
    _train(a, method, part_names, objective, step, 2, cfg.train.lr)
    b = fresh_attached()
    opt, _ = _train(b, method, part_names, objective, step, 1, cfg.train.lr)
    saved = {n: {k: v.clone() for k, v in method.state_dict(b.parts[n]).items()} for n in part_names}
    opt_state = opt.state_dict()
    c = _family(cfg)
    torch.manual_seed(99)  # a different init: only the checkpoint may make it equal
    attach_method(c, cfg)
    for n in part_names:
        method.load_state_dict(c.parts[n], saved[n], "test")
    params = [p for n in part_names for p in method.trainable_parameters(c.parts[n])]
    opt_c = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=0.0)
    opt_c.load_state_dict(opt_state)
    _train(c, method, part_names, objective, step, 1, cfg.train.lr, optimizer=opt_c)
    record["resume_equal"] = all(
        torch.equal(x, y) for n in part_names
        for x, y in zip(method.state_dict(a.parts[n]).values(), method.state_dict(c.parts[n]).values()))
    return record


def test_attaching_changes_nothing_yet(pair):
    assert torch.allclose(pair["attached"], pair["base"], atol=1e-5)


def test_it_learns_on_tiny_data(pair):
    losses = pair["losses"]
    assert all(map(lambda v: v == v, losses))
    assert losses[-1] < losses[0]
    assert not torch.allclose(pair["trained"], pair["base"], atol=1e-5)


def test_only_the_trained_parameters_change(pair):
    before, trainable = pair["before"], pair["trainable"]
    after = {k.replace(".base_layer.", "."): v for k, v in pair["after"].items()}  # peft wraps adapted layers
    assert set(before) <= set(after)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    new = set(after) - set(before)
    if pair["method"].adapter:
        assert changed == set()  # the base weights never move
        assert new and all("lora" in k for k in new)  # adapters, named as peft names them
    else:
        assert changed and not new
        assert all(k.split(".", 1)[0] in pair["parts"] for k in changed)


@pytest.mark.parametrize("pair", ADAPTER_PAIRS, ids=[f"{f}-{m}" for f, m in ADAPTER_PAIRS], indirect=True)
def test_disabled_adapter_gives_the_base_output(pair):
    assert torch.allclose(pair["disabled"], pair["base"], atol=1e-5)


def test_checkpoint_state_round_trips(pair):
    assert torch.allclose(pair["restored"], pair["trained"], atol=1e-6)


def test_saved_output_loads_with_diffusers_and_predicts_the_same(pair):
    assert torch.allclose(pair["loaded"], pair["trained"], atol=1e-4), (pair["loaded"] - pair["trained"]).abs().max()


def test_resume_from_checkpoint_state_is_exact(pair):
    assert pair["resume_equal"]

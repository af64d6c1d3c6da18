"""The training loop, readable top to bottom.

``train(cfg)``: check the config and data, load the model, attach the method (LoRA or full), resume
from the newest complete checkpoint, encode prompts and image views once (or read them from the disk
cache, see data/cache.py), then for each optimizer step:
accumulate micro-batches, clip, step, log, checkpoint, sample. Finally write the weights in the
format the matching diffusers pipeline loads.

Exactness: batch contents, augmentation, noise and timesteps are pure functions of
``(seed, global micro-batch number)``; the remaining global RNG use (e.g. LoRA dropout) is saved
and restored with the checkpoint, per process. A run killed at any moment and restarted therefore ends
with the same weights as an uninterrupted one (bit for bit on CPU), and N processes with grad_accum 1
see the same micro-batches per step as one process with grad_accum N.

Several processes: everything that depends on the strategy (DDP, FSDP, DeepSpeed) is behind the
`difftune.parallel.Parallel` object the loop holds; the loop never asks which one it has.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import signal
import time
from pathlib import Path
from . import DifftuneError
from .checkpoint import CheckpointError, list_checkpoints, read_state
from .config import Config, config_from_dict, to_dict
from .data.dataset import prompt_for
from .methods import get_method
from .progress import TrainProgress, quiet_diffusers_bars
from .reports import logs
from .reports.run_page import refresh_run_report, write_run_facts
from .run_layout import RunLayout
from .util.atomic import atomic_write_text
from .validation import ValidationLoss, validation_items

#: exit code of a run stopped by SIGTERM / SIGINT after saving a checkpoint ("try again later")
EXIT_INTERRUPTED = 75

#: config sections / keys that must not change when resuming (weights would not fit or mean else)
RESUME_LOCKED = {
    "model": ("path", "family", "revision", "variant"),
    "method": ("kind", "rank", "alpha", "target_modules", "train_text_encoder"),
}


class Interrupted(DifftuneError):
    """The run was asked to stop (SIGTERM / SIGINT); a checkpoint was written."""

    exit_code = EXIT_INTERRUPTED


def micro_seed(seed: int, k: int) -> int:
    """A seed for global micro-batch `k` (unique over processes): noise and timesteps replay exactly."""
    digest = hashlib.sha256(f"{seed}:{k}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _dump_yaml(cfg: Config) -> str:
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def check_resume_compatible(saved: Config, cfg: Config, where: Path, options_class: type | None = None) -> None:
    """Refuse a resume whose config change would make the saved weights meaningless. Besides
    `RESUME_LOCKED`, the family's options marked ``resume_locked`` (`options_class`) may not change."""
    import dataclasses

    changes = []
    for section, keys in RESUME_LOCKED.items():
        for key in keys:
            old, new = getattr(getattr(saved, section), key), getattr(getattr(cfg, section), key)
            if old != new:
                changes.append(f"{section}.{key}: {old!r} -> {new!r}")
    for f in dataclasses.fields(options_class) if options_class else ():
        old, new = saved.model.options.get(f.name), cfg.model.options.get(f.name)
        if f.metadata.get("resume_locked") and old != new:
            changes.append(f"model.options.{f.name}: {old!r} -> {new!r}")
    if changes:
        raise DifftuneError(
            f"cannot resume from {where}: the config changed what was trained ({'; '.join(changes)}). "
            "Use a new output_dir, or checkpoint.resume=never to start over in this one."
        )


def find_resume(cfg: Config, log) -> Path | None:
    """The checkpoint to resume from per ``checkpoint.resume``, after saying why torn ones are passed over."""
    mode = cfg.checkpoint.resume
    if mode == "never":
        return None
    if mode != "auto":
        path = Path(mode)
        if not path.is_dir():
            raise DifftuneError(f"checkpoint.resume: no checkpoint folder at {path}")
        return path
    good, torn = list_checkpoints(cfg.output_dir)
    newest_good = good[-1].step if good else -1
    for path, reason in torn:
        log(f"passing over checkpoint {path.name}: {reason}")
    if not good:
        return None
    if torn and max(int(p.name.split("-")[-1]) for p, _ in torn) > newest_good:
        log(f"resuming from the newest complete checkpoint instead: {good[-1].path.name}")
    return good[-1].path


# -----------------------------------------------------------------------------------------------


def make_optimizer(cfg: Config, groups: list[dict]):
    """The optimizer of `cfg.train` over the parameter `groups`. Shared with the bench (`difftune.bench`),
    which times this very step."""
    import torch

    from . import speed

    t = cfg.train
    kwargs = dict(betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon, weight_decay=t.weight_decay)
    if t.optimizer == "adamw8bit":
        if not torch.cuda.is_available():  # bitsandbytes' 8-bit AdamW kernels are CUDA kernels
            raise DifftuneError("train.optimizer=adamw8bit needs a CUDA GPU (bitsandbytes); use adamw on this device")
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise DifftuneError("train.optimizer=adamw8bit needs bitsandbytes: pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(groups, **kwargs)
    return torch.optim.AdamW(groups, **kwargs, **speed.adamw_options(cfg, (p for g in groups for p in g["params"])))


def _oom_message(cfg: Config) -> str:
    t, d = cfg.train, cfg.data
    return (
        f"out of accelerator memory at resolution {d.resolution}, batch_size {t.batch_size}, precision "
        f"{t.precision}, gradient_checkpointing {t.gradient_checkpointing}. Try train.gradient_checkpointing=true, "
        "a smaller train.batch_size (raise train.grad_accum to keep the effective batch), a lower "
        "data.resolution, or method.kind=lora."
    )


class _StopFlag:
    """Set by SIGTERM / SIGINT; the loop finishes its step, saves and exits."""

    def __init__(self):
        self.signal: int | None = None
        self._old: dict = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt(
                "stopped at once by a second Ctrl-C: the steps since the last checkpoint are lost, the "
                "checkpoints are intact; run the same command again to continue"
            )
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


# -----------------------------------------------------------------------------------------------


def train(cfg: Config, log=print, progress: str = "auto") -> Path:
    """Run training as configured; returns the output folder. Raises DifftuneError on bad input.

    Everything that needs no model (config, paths, resolution, data, resume point) is checked first,
    before output_dir exists (preflight.py); then the run holds output_dir (lock.py) until it ends.
    `progress`: ``auto`` (a bar on a terminal, plain lines otherwise), ``bar``, ``lines`` or ``off``.
    """
    import os

    from .lock import claim_output_dir
    from .preflight import check_run

    # before torch is imported (bad input is refused in a second); launchers set RANK per process
    checked = check_run(cfg, log=log if os.environ.get("RANK", "0") == "0" else (lambda *_: None))
    # the process that writes output_dir holds it: the global main one, or each machine's local main
    # one with a disk per machine (launchers set RANK and LOCAL_RANK; none is set for one process)
    writer = os.environ.get("RANK", "0") == "0" or (
        cfg.parallel.disk == "per_node" and os.environ.get("LOCAL_RANK", "0") == "0")
    with claim_output_dir(cfg.output_dir, hold=writer):
        return _train(cfg, checked, log, progress)


def _train(cfg: Config, checked, log, progress_mode: str) -> Path:
    import torch
    from diffusers.optimization import get_scheduler

    from . import parallel, speed
    from .data.cache import FeatureStore, ImageFeatures, PromptFeatures
    from .data.dataset import TrainingData, build_items
    from .data.features import FeatureRoute
    from .data.mix import mixed_sources
    from .objectives.preserve import make_terms
    from .preflight import check_steps

    quiet_diffusers_bars()
    family_cls, multiple, items = checked.family, checked.multiple, checked.items
    layout = RunLayout(cfg.output_dir)
    out = layout.root
    out.mkdir(parents=True, exist_ok=True)

    par = parallel.setup(cfg)  # the strategy (DDP, FSDP, DeepSpeed) and the processes; fails early if it cannot run
    accelerator = par.accelerator
    main = par.is_main
    say = log if main else (lambda *_: None)
    say(par.describe())
    speed.setup(cfg, accelerator.device)  # fails here, before loading, if a speed switch cannot run
    resume_from = par.find_resume(lambda: find_resume(cfg, say))
    resumed = read_state(resume_from, verify_files=par.is_writer) if resume_from else None
    if resumed:
        import yaml

        saved = config_from_dict(yaml.safe_load(resumed["config_yaml"]))
        check_resume_compatible(saved, cfg, resume_from, family_cls.options_class)
        check_steps(cfg, resumed["state"]["step"], resume_from)

    # own concepts, plus replayed runs' concepts and class images (drawn now if missing), data/mix.py
    concepts, companions = mixed_sources(cfg, family_cls, say) if main else (None, None)
    accelerator.wait_for_everyone()
    if not main:
        concepts, companions = mixed_sources(cfg, family_cls, say)
    data_cfg = dataclasses.replace(cfg.data, concepts=concepts)
    own = len(cfg.data.concepts)  # validation holds out only the run's own images, never replayed or class ones
    extra = build_items(data_cfg, log=say) if companions or len(concepts) > own else []
    items, val_items, val_concepts = validation_items(cfg, items, say)
    items = items + [i for i in extra if i.concept >= own]
    data = TrainingData(items, data_cfg, multiple, cfg.train.batch_size, cfg.train.seed, companions)
    if main:
        atomic_write_text(layout.config, _dump_yaml(cfg))
    say(f"{len(items)} images in {len(cfg.data.concepts)} concept(s), {data.plan.batches_per_epoch} batches per epoch")

    # ---- model and method ---------------------------------------------------------------------
    torch.manual_seed(cfg.train.seed)
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.train.precision]
    family = family_cls(cfg, accelerator.device, weight_dtype)
    family.load(speed.denoiser_on_host(cfg))
    method = get_method(cfg.method)
    part_names = attach_method(family, cfg)
    # also on resume: preservation terms see the starting weights (e.g. method.init_lora); the checkpoint then overwrites them
    method.start(family, part_names, say if not resumed else (lambda *_: None))
    terms = make_terms(cfg, family, lambda prompts: route.prompts(prompts))  # cfg.preserve, objectives/preserve.py
    speed.apply(family.parts[family.denoiser], cfg, weight_dtype, family.block_lists, accelerator.device,
                family.compile_pays)
    say(f"speed: {speed.describe(cfg, accelerator.device, family.compile_pays)}")
    say(par.plan_line(family, part_names))
    par.shard(family, part_names)  # FSDP: one unit per block; the optimizer below then holds shards

    groups = []
    for name in part_names:
        lr = cfg.train.text_encoder_lr if name != family.denoiser and cfg.train.text_encoder_lr else cfg.train.lr
        groups.append({"params": method.trainable_parameters(family.parts[name]), "lr": lr})
    n_trainable = sum(p.numel() for g in groups for p in g["params"])
    optimizer = make_optimizer(cfg, groups)
    lr_scheduler = get_scheduler(
        cfg.train.lr_scheduler, optimizer, num_warmup_steps=cfg.train.lr_warmup_steps,
        num_training_steps=cfg.train.steps,
    )
    # block swap keeps the denoiser's weights on the host: accelerate must not move them to the device
    on_host = frozenset({family.denoiser} if cfg.speed.block_swap else ())
    optimizer, lr_scheduler = par.prepare(family.parts, part_names, optimizer, lr_scheduler, on_host)
    objective = family.make_objective()
    say(f"{family.name} {method.label()}: {n_trainable:,} trainable parameters in {', '.join(part_names)}")

    start = 0
    # global micro-batches consumed before this run's first step (the data position, whatever the process count)
    done_before = 0
    if resumed:
        state = resumed["state"]
        par.load_checkpoint(resume_from, family.parts, part_names, optimizer,
                            lambda tensors: load_trainable_tensors(family, method, part_names, tensors))
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        if accelerator.scaler is not None and state.get("scaler"):
            accelerator.scaler.load_state_dict(state["scaler"])
        start = state["step"]
        done_before = state.get("global_micro_batches", start * cfg.train.grad_accum * par.world)
        say(f"resuming from {resume_from} (step {start} of {cfg.train.steps})")
        if state.get("processes", par.world) != par.world:
            say(f"the checkpoint was written by {state['processes']} processes, this run has {par.world}: it continues "
                "from the same weights and data position (not bit-identical to an uninterrupted run)")

    evaluator = None  # validation.eval_every: concept scores and drift, as `difftune eval` computes them
    if main and cfg.validation.eval_every:
        from .evaluate.core import TrainingEval

        evaluator = TrainingEval(family, cfg, items, accelerator.autocast, say)

    # ---- feature caches: frozen encoders see each prompt and image view once, results kept on disk ----
    cache_root = Path(cfg.data.cache_dir) if cfg.data.cache_dir else layout.cache
    text_frozen = not cfg.method.train_text_encoder
    prompt_cache: dict[str, dict] = {}
    if text_frozen:
        text_side = PromptFeatures(family, FeatureStore(cache_root / "prompts", say) if cfg.data.cache else None)
        prompt_cache = text_side.table(sorted(set(data.all_prompts()) | set(cfg.preserve.prompts))
                                       + [prompt_for(it, val_concepts[it.concept]) for it in val_items])
        say(f"prompt embeddings: {text_side.encoded} encoded, {text_side.loaded} read from the cache")
        family.after_prompt_cache()  # e.g. text encoders off the accelerator, or out of memory
    views = data.fixed_views()
    image_store = FeatureStore(cache_root / "images", say) if cfg.data.cache and views is not None else None
    image_features = ImageFeatures(family, data, image_store, accelerator.autocast)
    if image_store is not None:
        index, count = par.cache_share()  # each disk's cache is filled by the processes that see it
        encoded = image_features.prepare(views, index, count, main)
        par.barrier()
        encoded = par.total(encoded) // par.machines if cfg.parallel.disk == "per_node" else par.total(encoded)
        say(f"image features: {encoded} encoded, {len(views) - encoded} read from the cache in {cache_root}")
    elif cfg.data.cache:
        say("data.crop=random: image features are encoded at every step, not cached (each epoch's crops differ)")

    route = FeatureRoute(data, image_features, prompt_cache if text_frozen else None, family.encode_prompts)

    val_loss = ValidationLoss(cfg, val_items, val_concepts, multiple,
                              lambda d: ImageFeatures(family, d, image_store, accelerator.autocast),
                              route.prompts) if val_items else None
    if main:
        write_run_facts(out, family.name, n_trainable, data, val_loss)

    # ---- the loop -----------------------------------------------------------------------------------
    loss_log = layout.loss_log
    if main:
        loss_log.parent.mkdir(parents=True, exist_ok=True)
        _truncate_log(loss_log, start)
        _truncate_log(out / logs.VALIDATION, start)
        accelerator.init_trackers("difftune", init_kwargs=_tracker_options(cfg))
        sessions = logs.SessionLog(out, start)
    if start == 0:  # step 0: the base model, before any training
        if val_loss is not None:
            _validate(val_loss, family, objective, part_names, accelerator, 0, say)
        if cfg.validation.prompts:
            _samples(family, cfg, 0, par, say)
    world, rank, accum = par.world, par.rank, cfg.train.grad_accum
    nonfinite_run = 0
    progress = TrainProgress(cfg.train.steps, start, cfg.train.log_every, progress_mode if main else "off", say)
    step = start
    t0 = time.time()
    with _StopFlag() as stop:
        while step < cfg.train.steps:
            t_step = time.perf_counter()
            losses, bad_paths = [], []
            for micro in range(accum):
                # the global micro-batch number: process `rank` takes every `world`-th one
                k = done_before + ((step - start) * accum + micro) * world + rank
                sync = micro == accum - 1
                try:
                    with accelerator.autocast(), par.no_sync(family.parts, part_names, sync):
                        features, batch = route.features(k)  # from the disk caches, or encoded now
                        loss = micro_step(family, objective, features, micro_seed(cfg.train.seed, k),
                                           batch.get("loss_weights"), terms)
                        if not torch.isfinite(loss):
                            bad_paths += batch["paths"]
                        par.backward(loss / accum)
                except torch.OutOfMemoryError:
                    raise DifftuneError(_oom_message(cfg)) from None
                losses.append(loss.detach().float())
            params = [p for g in groups for p in g["params"]]
            grad_norm = None
            if cfg.train.max_grad_norm is not None:
                grad_norm = par.clip_grad_norm(params, cfg.train.max_grad_norm)
            finite = not bad_paths and (grad_norm is None or bool(torch.isfinite(torch.as_tensor(grad_norm))))
            finite = not par.any(not finite)
            if finite:
                par.optimizer_step(optimizer)
                nonfinite_run = 0
            else:
                nonfinite_run += 1
                say(f"step {step + 1}: non-finite loss or gradients, step skipped (batch: {', '.join(bad_paths) or 'gradients'})")
                if nonfinite_run >= cfg.train.max_nonfinite_steps:
                    raise DifftuneError(
                        f"{nonfinite_run} steps in a row had non-finite losses or gradients (last at step {step + 1}); "
                        "lower train.lr, use train.precision=bf16 instead of fp16, or check the images named above"
                    )
            optimizer.zero_grad(set_to_none=True)
            lr_used = lr_scheduler.get_last_lr()[0]
            lr_scheduler.step()
            step += 1

            loss_value = par.mean(torch.stack(losses).mean())  # the global batch's loss
            # the step's own duration: report.md sums them, so timings cover every resumed part of a run
            record = {"step": step, "loss": loss_value, "lr": lr_used, "seconds": round(time.perf_counter() - t_step, 4)}
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            if main:
                with loss_log.open("a") as fh:
                    fh.write(json.dumps(record) + "\n")
                if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                    accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
                    sessions.progress(step)
            progress.update(step, loss_value, lr_used)

            stopping = par.any(stop.signal is not None)
            # the last step is checkpointed too, so a rerun with more steps continues from it
            due = cfg.checkpoint.every and step % cfg.checkpoint.every == 0
            if due or stopping or step == cfg.train.steps:
                _save(family, method, part_names, cfg, step, data, optimizer, lr_scheduler, par,
                      done_before + (step - start) * accum * world, progress.note)
                if main:
                    sessions.progress(step)
                    refresh_run_report(out, progress.note)  # a half-done run has a current report too
            if stopping and step < cfg.train.steps:
                progress.close()
                raise Interrupted(
                    f"stopped by signal {stop.signal} after step {step}; checkpoint saved in "
                    f"{layout.checkpoints}. Run the same command again to continue."
                )
            if cfg.validation.every and step % cfg.validation.every == 0 and step < cfg.train.steps:
                if val_loss is not None:
                    _validate(val_loss, family, objective, part_names, accelerator, step, progress.note)
                if cfg.validation.prompts:
                    _samples(family, cfg, step, par, progress.note)
            if evaluator is not None and evaluator.due(step):
                accelerator.log(evaluator(step), step=step)
    progress.close()

    # ---- outputs ----------------------------------------------------------------------------------
    elapsed = time.time() - t0
    _check_finite(family, method, part_names, par)
    with par.full_parts(family.parts, part_names) as writer:  # gathered whole on the writer if sharded
        if writer:
            method.save(family, out, part_names)
    if val_loss is not None:
        _validate(val_loss, family, objective, part_names, accelerator, step, say)
    if cfg.validation.prompts:
        _samples(family, cfg, step, par, say)
    par.finish()  # trackers closed, process group gone
    if main:
        from .report import write_report

        facts = {"family": family.name, "method": method.describe(), "images": len(items), "trainable_parameters": n_trainable}
        if step > start:
            say(f"trained steps {start + 1}-{step} in {elapsed:.1f}s ({elapsed / (step - start):.3f} s/step)")
        say(f"outputs in {out}; summary in {write_report(out, facts)}")
        say(f"report: {refresh_run_report(out, say)}")
    return out


# -----------------------------------------------------------------------------------------------


def attach_method(family, cfg: Config) -> list[str]:
    """Make the trained parts trainable (by the configured method), in train mode, with gradient
    checkpointing if asked; returns their names. Shared with `difftune bench`, which times this setup."""
    method = get_method(cfg.method)
    part_names = family.trainable_part_names()
    for name in part_names:
        module = family.parts[name]
        method.attach(module, name, family.lora_targets, family.denoiser)
        module.train()
        if cfg.train.gradient_checkpointing:
            enable = getattr(module, "enable_gradient_checkpointing", None) or module.gradient_checkpointing_enable
            enable()
    return part_names


def micro_step(family, objective, features: dict, seed: int, loss_weights=None, terms=()):
    """Loss of one micro-batch: per-sample mean squared error, weighted by the objective's timestep
    weights and `loss_weights` (the batch's, which sum to 1 per loss group, see data/mix.py; None: the
    plain mean), plus any preservation `terms`. `features`: the micro-batch's image and prompt
    features (`FeatureRoute.features`); ``x0`` is taken out of it. Shared with the bench
    (`difftune.bench`), which times this very step."""
    import torch

    device = family.device
    features = dict(features)
    x0 = features.pop("x0").float()
    generator = torch.Generator().manual_seed(seed)
    t = objective.sample_timesteps(x0, generator)
    noise = torch.randn(x0.shape, generator=generator).to(device)
    x_t = objective.noisy(x0, noise, t)
    target = objective.target(x0, noise, t)
    pred = family.predict(x_t, t, features)
    per_sample = ((pred.float() - target.float()) ** 2).reshape(x0.shape[0], -1).mean(dim=1)
    n = x0.shape[0]  # a batch without loss_weights (e.g. the bench's) is the plain mean
    share = torch.tensor(loss_weights or [1.0 / n] * n, dtype=torch.float32, device=per_sample.device)
    loss = (per_sample * objective.weights(t).float() * share).sum()
    for term in terms:
        loss = loss + term(x_t, t, features, seed)
    return loss


def trainable_tensors(family, method, part_names) -> dict:
    """The trained weights as checkpoints store them: ``{part}.{name}`` keys."""
    tensors = {}
    for name in part_names:
        state = method.state_dict(family.parts[name])
        tensors.update({f"{name}.{k}": v for k, v in state.items()})
    return tensors


def _check_finite(family, method, part_names, par) -> None:
    """Collective: every process checks the weights it holds (its shards, when sharded)."""
    for name in part_names:
        if not par.all_finite(method.trainable_parameters(family.parts[name])):
            raise DifftuneError(f"{name} has non-finite weights; nothing was saved (the last checkpoint is intact)")


def _save(family, method, part_names, cfg, step, data, optimizer, lr_scheduler, par, global_micro_batches: int,
          note) -> None:
    accelerator = par.accelerator
    _check_finite(family, method, part_names, par)
    epoch, _ = data.plan.batch(global_micro_batches)
    state = {
        "step": step,
        "epoch": epoch,
        "global_micro_batches": global_micro_batches,
        "processes": par.world,
        "lr_scheduler": lr_scheduler.state_dict(),
        "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
    }
    t = time.time()
    path = par.save_checkpoint(step, family.parts, part_names, optimizer,
                               lambda: trainable_tensors(family, method, part_names), state, _dump_yaml(cfg))
    if par.is_main:
        note(f"checkpoint {path.name} saved in {time.time() - t:.1f}s")


def load_trainable_tensors(family, method, part_names, tensors: dict, where: str = "checkpoint") -> None:
    """Put trained weights (``{part}.{name}`` keys, as `trainable_tensors` makes them and checkpoints
    store them) into the trained parts; shared with `difftune eval`, which loads each checkpoint so."""
    for name in part_names:
        prefix = f"{name}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not state:
            raise CheckpointError(f"{where} has no weights for {name}")
        method.load_state_dict(family.parts[name], state, f"{where} ({name})")


def _validate(val_loss, family, objective, part_names, accelerator, step: int, note) -> None:
    """Score the validation loss at `step`; log it to ``validation.jsonl`` and the trackers."""
    value = val_loss(family, objective, part_names, accelerator.autocast)
    if accelerator.is_main_process:
        logs.append_jsonl(Path(family.cfg.output_dir) / logs.VALIDATION, {"step": step, "val_loss": value})
        accelerator.log({"val_loss": value}, step=step)
        note(f"validation loss at step {step}: {value:.5f} ({len(val_loss)} images)")


def _tracker_options(cfg: Config) -> dict:
    """Per-tracker init options: wandb gets the run's name, its folder under logs/ and the resolved config."""
    if "wandb" not in cfg.train.report_to:
        return {}
    out = Path(cfg.output_dir)
    return {"wandb": {"name": out.name, "dir": str(out / "logs"), "config": to_dict(cfg)}}


def _samples(family, cfg, step, par, note) -> None:
    """Validation images for `cfg.validation.prompts` into ``samples/step-N/`` (written by the main process;
    with sharded weights every process runs the same forward passes, which need them all)."""
    import torch

    from .inference.naming import save_image

    accelerator, main = par.accelerator, par.is_main
    if not main and not par.sample_on_every_rank:
        return
    v = cfg.validation
    folder = RunLayout(cfg.output_dir).samples_at(step)
    folder.mkdir(parents=True, exist_ok=True)
    size = cfg.data.resolution
    guidance = v.guidance if v.guidance is not None else family.default_guidance
    trained = [family.parts[n] for n in family.trainable_part_names()]
    for m in trained:
        m.eval()
    family.text_encoders_to(family.device)
    try:
        pipe = family.sampling_pipeline()
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad(), accelerator.autocast():
            for i, prompt in enumerate(v.prompts):
                generator = torch.Generator("cpu").manual_seed(v.seed)
                images = family.sample(pipe, prompt, steps=v.steps, guidance=guidance, width=size, height=size,
                                       generator=generator, num=v.num_images)
                for j, image in enumerate(images if main else []):
                    save_image(image, folder / f"{i:02d}-{j:02d}.png", {
                        "prompt": prompt, "seed": v.seed, "steps": v.steps, "guidance": guidance,
                        "model": cfg.model.path, "training_step": step, "image_index": j,
                    })
    finally:
        for m in trained:
            m.train()
        if not cfg.method.train_text_encoder:
            family.after_prompt_cache()  # the text encoders leave again, as after caching
    if main:
        note(f"samples for step {step} in {folder}")


def _truncate_log(path: Path, step: int) -> None:
    """Keep only log lines up to `step` (a resumed run writes the later ones again)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError):
            continue
    path.write_text("".join(line + "\n" for line in keep))


def read_losses(output_dir: str | Path) -> list[dict]:
    """The per-step log of a run (step, loss, lr, grad_norm)."""
    path = RunLayout(output_dir).loss_log
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


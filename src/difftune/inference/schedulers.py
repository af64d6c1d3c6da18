"""Sampler names for `difftune generate --scheduler` and the diffusers scheduler class of each.

Each is built from the loaded pipeline's own scheduler config (``from_config``), so the model's
training schedule (betas, prediction type, timestep spacing) is kept and only the solver changes.
A family lists the names that suit its models in ``Family.schedulers``; ``default`` keeps the
scheduler the model folder ships with.
"""

from __future__ import annotations

from typing import Any

from .. import DifftuneError

#: name -> (diffusers class, extra config)
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "unipc": ("UniPCMultistepScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "ddim": ("DDIMScheduler", {}),
}
NAMES = ("default", *SCHEDULERS)


def check(name: str, family: Any) -> None:
    """One line if `family` does not offer scheduler `name`."""
    if name == "default":
        return
    if name not in SCHEDULERS:
        raise DifftuneError(f"--scheduler {name}: unknown; choose one of {', '.join(NAMES)}")
    if name not in family.schedulers:
        offered = ", ".join(("default", *family.schedulers))
        raise DifftuneError(f"--scheduler {name}: not available for the {family.name} family (it offers {offered})")


def apply(pipe: Any, name: str) -> str:
    """Swap `pipe`'s scheduler for `name`'s, configured from the current one; returns the class name used."""
    import diffusers

    if name != "default":
        class_name, extra = SCHEDULERS[name]
        pipe.scheduler = getattr(diffusers, class_name).from_config(pipe.scheduler.config, **extra)
    return type(pipe.scheduler).__name__

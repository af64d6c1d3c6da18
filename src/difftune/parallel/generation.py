"""Distributed generation: ``accelerate launch -m difftune generate ... --num N`` splits the N images.

Image ``i`` always uses seed ``seed + i`` and the same file name, so which process makes it changes
nothing: the folder holds the same files as a one-process run. Process ``r`` of ``W`` makes images
``r, r + W, r + 2W, ...`` on its own device (``cuda:LOCAL_RANK`` and the like); no weights are shared.
"""

from __future__ import annotations

from typing import Any, Callable

from .core import processes


def share(num: int) -> tuple[list[int], Any]:
    """(indices of the images this process makes, the device it makes them on; None without a launcher)."""
    if processes() == 1:
        return list(range(num)), None
    state = _state()
    return list(range(state.process_index, num, state.num_processes)), state.device


def agreed(read: Callable[[], int]) -> int:
    """`read()` as every process sees it once all have reached this point and before any goes on
    (e.g. the number the run's first image file gets, so that image ``i`` is named alike whichever
    process makes it)."""
    if processes() == 1:
        return read()
    state = _state()
    state.wait_for_everyone()
    value = read()
    state.wait_for_everyone()
    return value


def _state() -> Any:
    """The launcher's process state (on a machine without GPUs, `ACCELERATE_USE_CPU=true` asks for CPU
    processes; accelerate's PartialState reads that flag only when told)."""
    import os

    from accelerate import PartialState

    return PartialState(cpu=os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"))

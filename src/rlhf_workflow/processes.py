"""The processes of a run: one, or several started by ``accelerate launch`` / ``torchrun``."""

from __future__ import annotations

from typing import Any


def no_accelerator() -> bool:
    """True on a machine without a GPU (or XPU)."""
    import torch

    return not torch.cuda.is_available() and not (hasattr(torch, "xpu") and torch.xpu.is_available())


WAIT_HOURS = 12  # how long a process may wait at a barrier for the others (e.g. while the main one generates)


def process_state() -> Any:
    """accelerate's `PartialState` (rank, world size, device, barriers) for the stages that do not
    train. With no GPU it is told so: several processes then form a CPU group over gloo instead of
    each taking itself for a lone process. The first call in a process sets up the group, with a
    barrier timeout long enough for one process to generate while the others wait."""
    from datetime import timedelta

    from accelerate import PartialState

    return PartialState(cpu=no_accelerator(), timeout=timedelta(hours=WAIT_HOURS))


def release_memory() -> None:
    """Give back what the last stage's models held (CUDA's cache included) before the next loads its own."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

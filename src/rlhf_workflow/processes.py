"""The processes of a run: one, or several started by ``accelerate launch`` / ``torchrun``."""

from __future__ import annotations

from typing import Any


def no_accelerator() -> bool:
    """True on a machine without a GPU (or XPU)."""
    import torch

    return not torch.cuda.is_available() and not (hasattr(torch, "xpu") and torch.xpu.is_available())


def process_state() -> Any:
    """accelerate's `PartialState` (rank, world size, device, barriers) for the stages that do not
    train. With no GPU it is told so: several processes then form a CPU group over gloo instead of
    each taking itself for a lone process."""
    from accelerate import PartialState

    return PartialState(cpu=no_accelerator())

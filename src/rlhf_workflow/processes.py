"""The processes of a run: one, or several started by ``accelerate launch`` / ``torchrun``."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from rlhf_workflow.errors import UserError, config_key

T = TypeVar("T")
logger = logging.getLogger(__name__)


def no_accelerator() -> bool:
    """True on a machine without a GPU (or XPU)."""
    import torch

    return not torch.cuda.is_available() and not (hasattr(torch, "xpu") and torch.xpu.is_available())


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 on this CPU's own instructions (AVX512-BF16 or AMX; True where torch
    cannot say)."""
    import torch

    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else True
    except RuntimeError:
        return True


_warned_bf16: set[str] = set()


def warn_if_bf16_is_emulated(setting: str) -> None:
    """Say once per process and setting when bf16 is asked of a machine whose only processor, a CPU,
    emulates it: a bf16 matmul there runs about 100x slower than an fp32 one (an AVX2-only AMD EPYC:
    about 1 GFLOP/s against 110), so a stage of minutes in fp32 takes hours."""
    if setting in _warned_bf16 or not no_accelerator() or cpu_has_native_bf16():
        return
    _warned_bf16.add(setting)
    logger.warning("%s: this CPU has no bf16 instructions (no AVX512-BF16, no AMX) and emulates bf16 matmuls "
                   "about 100x slower than fp32; use float32 / fp32 here", setting)


@dataclass(frozen=True)
class EngineGroup:
    """The processes that run one generation engine together (vLLM's tensor parallelism over k
    GPUs): consecutive ranks on one node. The engines sample disjoint shards of the prompts; every
    member of a group sees the same outputs, and member 0 writes them."""

    index: int  # this group's number, 0 .. count - 1: it takes every count-th prompt from index on
    count: int  # groups in all: world size / k
    member: int  # this process's place in its group, 0 .. k - 1
    local_gpus: tuple[int, ...]  # the group's devices, as local ranks of this node

    @property
    def writes(self) -> bool:
        return self.member == 0


def engine_group(rank: int, world_size: int, local_rank: int, local_world_size: int, size: int) -> EngineGroup:
    """Process ``rank``'s group of ``size`` processes (see `EngineGroup`). Launchers number the
    ranks node by node (node n holds ranks n·L .. n·L + L − 1), so consecutive ranks share a node
    when ``size`` divides the processes per node L; a group never spans two nodes."""
    if size < 1:
        raise UserError(f"{config_key('vllm.tensor_parallel_size')} is {size}: it must be at least 1")
    if world_size % size or local_world_size % size:
        raise UserError(f"{config_key('vllm.tensor_parallel_size')} {size} must divide the number of processes ({world_size}) and "
                        f"the processes per node ({local_world_size}): each engine runs on {size} GPUs of one node, "
                        f"one process per GPU")
    member = rank % size
    first = local_rank - member
    return EngineGroup(index=rank // size, count=world_size // size, member=member,
                       local_gpus=tuple(range(first, first + size)))


def local_world_size(state: Any) -> int:
    """Processes on this node: the launcher's LOCAL_WORLD_SIZE (torchrun and accelerate launch set
    it), else all of them (one node)."""
    import os

    value = os.environ.get("LOCAL_WORLD_SIZE", "")
    return int(value) if value.isdigit() and int(value) > 0 else state.num_processes


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


def decided_on_main(state: Any, work: Callable[[], T]) -> T:
    """``work``'s result on the main process, given to every process (a picklable value): for a choice
    that each process could otherwise make differently, such as one made from a timing. A
    `UserError` it raises is every process's, as with `on_main`."""
    result = on_main(state, work)
    if state is None or state.num_processes == 1:
        return result  # type: ignore[return-value]
    from accelerate.utils import broadcast_object_list

    shared = [result]
    broadcast_object_list(shared, from_process=0)
    return shared[0]  # type: ignore[return-value]


def on_main(state: Any, work: Callable[[], T]) -> T | None:
    """Run ``work`` on the main process only, and make a `UserError` it raises the error of every
    process: the others would otherwise wait for it at the next barrier for hours. Returns what
    ``work`` returned on the main process, None on the others. ``state`` None: one process."""
    if state is None or state.num_processes == 1:
        return work()
    from accelerate.utils import broadcast_object_list

    result, message = None, [None]
    if state.is_main_process:
        try:
            result = work()
        except UserError as exc:
            message = [str(exc)]
    broadcast_object_list(message, from_process=0)
    if message[0] is not None:
        raise UserError(message[0])
    return result

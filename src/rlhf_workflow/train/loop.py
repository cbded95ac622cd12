"""The one training loop. Every objective (SFT, reward, preference, DPO) runs through `train`.

Read top to bottom:

1. the data order is a pure function of (seed, epoch): a global batch of
   G = per_device_batch_size × processes × gradient_accumulation_steps examples per optimizer step,
   cut into micro-batches, micro-batch j of process r holding positions (j·P + r)·B … +B of it;
2. each micro-batch's summed loss is divided by the units (tokens / pairs) of the WHOLE global
   batch, so any split of the same global batch over processes and accumulation steps gives the
   same gradient;
3. clip, step, schedule; log; evaluate and checkpoint on their cadence;
4. a checkpoint holds model, optimizer, scheduler and RNG states (accelerate's `save_state`) and
   the step; since the data order depends only on the step, `resume` continues exactly where the
   killed run was.
"""

from __future__ import annotations

import contextlib
import math
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rlhf_workflow.config import TrainConfig
from rlhf_workflow.errors import UserError, config_key
from rlhf_workflow.train.checkpoint import latest_checkpoint, save_checkpoint
from rlhf_workflow.train.metrics import MetricsLogger
from rlhf_workflow.train.objective import Objective

log = logging.getLogger(__name__)


def make_accelerator(config: TrainConfig, output_dir: str | Path) -> Any:
    """An `Accelerator` for this run: mixed precision and trackers from the config.

    Gradient accumulation is done by the loop itself (see module docstring), so accelerate is
    told 1 and its scheduler wrapper is not used (it would step the schedule once per process).
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    for tracker in config.report_to:
        module = {"tensorboard": "tensorboard", "wandb": "wandb"}[tracker]
        try:
            __import__(module)
        except ImportError:
            raise UserError(f"{config_key('train.report_to')} names {tracker}, which is not installed: pip install {module}") from None
    # With no GPU, say so: accelerate then runs several processes (torchrun / `accelerate launch
    # --multi_gpu`) as CPU data parallel over gloo instead of treating each as a lone process.
    from accelerate.state import AcceleratorState

    from rlhf_workflow.processes import no_accelerator, warn_if_bf16_is_emulated

    precision = "bf16" if config.precision == "bfloat16" else "no"  # accelerate's names
    if precision == "bf16":
        warn_if_bf16_is_emulated("train.precision: bfloat16")
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") not in (None, precision):
        # An earlier training job of this process (a run trains the reward model, then DPO) left accelerate's
        # per-process state with its own precision, which accelerate refuses to change. Forget that
        # state but keep the processes (PartialState: ranks, process group): the job is done.
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(
        cpu=no_accelerator(),
        mixed_precision=precision,
        log_with=list(config.report_to) or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(Path(output_dir) / "logs")),
    )


GROUP_BATCHES = 50  # with group_by_length: global batches per block sorted by length together


@dataclass
class Schedule:
    """How many examples and steps the run has: everything about data order derives from this."""

    num_examples: int
    per_device: int
    processes: int
    accumulation: int
    total_steps: int
    lengths: list[int] | None = None  # set to group examples of similar length into the same batch

    @property
    def global_batch(self) -> int:
        return self.per_device * self.processes * self.accumulation

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.global_batch

    @classmethod
    def build(cls, config: TrainConfig, num_examples: int, processes: int, lengths: list[int] | None = None) -> "Schedule":
        schedule = cls(num_examples, config.per_device_batch_size, processes, config.gradient_accumulation_steps, 0,
                       lengths if config.group_by_length else None)
        if schedule.steps_per_epoch == 0:
            raise UserError(
                f"the training set has {num_examples} examples, fewer than one global batch of "
                f"{schedule.global_batch} (per_device_batch_size {config.per_device_batch_size} × {processes} "
                f"processes × gradient_accumulation_steps {config.gradient_accumulation_steps}); "
                f"lower {config_key('train.per_device_batch_size')} or {config_key('train.gradient_accumulation_steps')}"
            )
        schedule.total_steps = config.max_steps or config.epochs * schedule.steps_per_epoch
        return schedule

    def epoch_order(self, seed: int, epoch: int) -> list[int]:
        """A seeded permutation of the examples for ``epoch``.

        With lengths: the permutation is cut into blocks of GROUP_BATCHES global batches, each
        block sorted by length and cut into global batches, whose order is then shuffled: the
        examples of a batch have similar lengths (little padding) and batches stay in random order.
        """
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(self.num_examples, generator=generator).tolist()
        if self.lengths is None:
            return order
        lengths, size = self.lengths, self.global_batch
        usable = order[: self.steps_per_epoch * size]
        grouped: list[int] = []
        for start in range(0, len(usable), size * GROUP_BATCHES):
            block = sorted(usable[start : start + size * GROUP_BATCHES], key=lambda i: -lengths[i])
            batches = [block[k : k + size] for k in range(0, len(block), size)]
            for b in torch.randperm(len(batches), generator=generator).tolist():
                grouped.extend(batches[b])
        return grouped

    def micro_batches(self, order: list[int], step: int, rank: int) -> list[list[int]]:
        """Indices of this process's micro-batches for optimizer step ``step`` (0-based)."""
        first = (step % self.steps_per_epoch) * self.global_batch
        window = order[first : first + self.global_batch]
        return [
            window[(j * self.processes + rank) * self.per_device : (j * self.processes + rank + 1) * self.per_device]
            for j in range(self.accumulation)
        ]


def split_by_tokens(indices: list[int], lengths: list[int], rows_per_example: int, budget: int) -> list[list[int]]:
    """Cut a micro-batch into pieces whose padded size (rows × longest row) stays within ``budget``.

    The pieces are forwarded one after another with their gradients accumulated; since every
    loss is a sum normalised by the global batch's units, the step is the same as one forward
    over the whole micro-batch, with a fraction of the activation memory. An example larger than
    the budget on its own gets a piece of its own.
    """
    if budget <= 0 or len(indices) <= 1:
        return [indices]
    pieces: list[list[int]] = []
    current: list[int] = []
    for i in sorted(indices, key=lambda k: -lengths[k]):  # longest first: each piece's width is its first
        width = lengths[current[0]] if current else lengths[i]
        if current and (len(current) + 1) * rows_per_example * width > budget:
            pieces.append(current)
            current = []
        current.append(i)
    pieces.append(current)
    return pieces


def build_optimizer(model: Any, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norm weights (1-D parameters).

    The fused kernel (CPU and CUDA, torch >= 2.4) when the parameters allow it: on two CPU cores
    it steps 135M parameters in ~0.15 s instead of ~0.8 s for the per-tensor loop.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    options = dict(lr=config.lr, betas=(config.adam_beta1, config.adam_beta2))
    try:
        return torch.optim.AdamW(groups, fused=True, **options)
    except (RuntimeError, TypeError, ValueError):  # a device or dtype the fused kernel does not take
        return torch.optim.AdamW(groups, **options)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int) -> Any:
    from transformers import get_scheduler

    warmup = config.warmup_steps or math.ceil(config.warmup_ratio * total_steps)
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[config.scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _agreed_keys(accelerator: Any, keys: list[str]) -> list[str]:
    """The sorted union of every process's ``keys``: the same list, in the same order, everywhere."""
    if accelerator.num_processes == 1:
        return sorted(keys)
    from accelerate.utils import gather_object

    return sorted(set(gather_object(sorted(keys))))


def _reduce_sums(accelerator: Any, values: dict[str, float | torch.Tensor], *,
                 same_keys: bool = False) -> dict[str, float]:
    """Sum each value over all processes.

    The processes first agree on the keys (the union of theirs; a key a process lacks counts 0
    there), so a process that saw no batch, or batches without some metric, still reduces a tensor
    of the same size in the same order. ``same_keys=True`` skips that exchange for fixed keys
    every process always has (such as ``units``)."""
    keys = sorted(values) if same_keys else _agreed_keys(accelerator, list(values))
    local = torch.tensor([float(values.get(k, 0.0)) for k in keys], dtype=torch.float64, device=accelerator.device)
    total = accelerator.reduce(local, reduction="sum") if accelerator.num_processes > 1 else local
    return dict(zip(keys, total.tolist()))


def eval_batches(examples: list[dict], rank: int, processes: int, batch_size: int) -> list[tuple[list[dict], bool]]:
    """Process ``rank``'s eval batches as ``(examples, counted)``: it takes every P-th example, and every
    process gets the same number of batches, ⌈⌈N / P⌉ / B⌉. A process whose share is shorter (or empty:
    fewer examples than processes) fills up with uncounted batches of the first example, because a
    forward pass of a wrapped model may be collective (DDP syncs buffers, FSDP and ZeRO-3 gather
    weights) and every process must run as many of them."""
    mine = examples[rank::processes]
    count = math.ceil(math.ceil(len(examples) / processes) / batch_size)
    batches = [(mine[start : start + batch_size], True) for start in range(0, len(mine), batch_size)]
    return batches + [(examples[:1], False)] * (count - len(batches))


@torch.no_grad()
def evaluate(objective: Objective, model: Any, examples: list[dict], accelerator: Any, batch_size: int) -> dict[str, float]:
    """Mean loss and metrics over ``examples``, each process taking every P-th example (`eval_batches`);
    the sums are reduced over the keys all processes agree on (`_reduce_sums`)."""
    model.eval()
    batches = eval_batches(examples, accelerator.process_index, accelerator.num_processes, batch_size)
    sums: dict[str, float] = {"loss": 0.0, "units": 0.0}
    for chunk, counted in tqdm(batches, desc="eval", leave=False,
                               disable=not accelerator.is_main_process or len(batches) < 4):
        batch = _to_device(objective.collate(chunk), accelerator.device)
        with accelerator.autocast():
            loss, metrics = objective.loss(model, batch)
        if not counted:
            continue
        sums["loss"] += loss.item()
        sums["units"] += objective.units(batch)
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + float(value)
    model.train()
    total = _reduce_sums(accelerator, sums)
    units = max(total.pop("units"), 1.0)
    return {key: value / units for key, value in total.items()}


def train(
    objective: Objective,
    model: Any,
    train_examples: list[dict],
    config: TrainConfig,
    output_dir: str | Path,
    accelerator: Any,
    *,
    eval_examples: list[dict] | None = None,
    resume: bool = False,
    run_config: dict | None = None,
) -> Any:
    """Train ``model`` on ``train_examples`` with ``objective``; return the unwrapped model."""
    output_dir = Path(output_dir)
    torch.manual_seed(config.seed)
    lengths = [objective.example_length(e) for e in train_examples]
    schedule = Schedule.build(config, len(train_examples), accelerator.num_processes, lengths)

    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, schedule.total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)

    start_step = 0
    checkpoint = latest_checkpoint(output_dir)
    if resume and checkpoint is not None:
        checkpoint = load_newest_good_checkpoint(accelerator, output_dir)
        start_step = checkpoint.step
        accelerator.print(f"resuming from {checkpoint.path} (step {start_step} of {schedule.total_steps})")
    elif checkpoint is not None:
        raise UserError(
            f"{output_dir} already holds checkpoints (latest {checkpoint.path.name}); "
            "pass --resume to continue that run, or choose another output_dir"
        )

    logger = MetricsLogger(output_dir, accelerator, start_step=start_step)
    if config.report_to:
        accelerator.init_trackers("rlhf-workflow", config=_flatten(run_config or {}))

    accelerator.print(
        f"{objective.name}: {schedule.num_examples} examples, global batch {schedule.global_batch} "
        f"({schedule.per_device} per device × {schedule.processes} processes × {schedule.accumulation} accumulation), "
        f"{schedule.total_steps} steps"
    )
    first_eval = None
    if eval_examples and start_step == 0:
        first_eval = evaluate(objective, model, eval_examples, accelerator, config.per_device_batch_size)
        logger.log(0, first_eval, split="eval")
    model.train()
    order_epoch, order = -1, []
    window: dict[str, float] = {}  # sums since the last log line: the logged loss covers every step
    started = window_started = time.monotonic()
    progress = tqdm(
        total=schedule.total_steps, initial=start_step, desc=objective.name, disable=not accelerator.is_main_process
    )
    for step in range(start_step, schedule.total_steps):
        epoch = step // schedule.steps_per_epoch
        if epoch != order_epoch:
            order, order_epoch = schedule.epoch_order(config.seed, epoch), epoch

        pieces = [
            piece
            for micro in schedule.micro_batches(order, step, accelerator.process_index)
            for piece in split_by_tokens(micro, lengths, objective.rows_per_example, config.max_tokens_per_forward)
        ]
        batches = [objective.collate([train_examples[i] for i in piece]) for piece in pieces]
        units = _reduce_sums(accelerator, {"units": sum(objective.units(b) for b in batches)}, same_keys=True)["units"]
        if units == 0:
            raise UserError(f"step {step + 1}: the global batch has no tokens to learn from (all masked)")
        sums: dict[str, float] = {"loss": 0.0, "units": 0.0}
        nonfinite: list[Any] = []  # ids of the examples of micro-batches whose loss is NaN or inf
        for j, batch in enumerate(batches):
            batch = _to_device(batch, accelerator.device)
            last = j == len(batches) - 1
            sync = contextlib.nullcontext() if last else accelerator.no_sync(model)
            with sync, accelerator.autocast():
                loss_sum, metrics = objective.loss(model, batch)
                # DDP averages gradients over processes; multiply back so the result is Σ loss / units.
                accelerator.backward(loss_sum * accelerator.num_processes / units)
            loss_value = loss_sum.item()
            if not math.isfinite(loss_value):
                nonfinite += [train_examples[i].get("id", i) for i in pieces[j]]
            sums["loss"] += loss_value
            sums["units"] += objective.units(batch)
            sums["tokens"] = sums.get("tokens", 0.0) + float(batch["num_tokens"])
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + float(value)

        max_norm = config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
        stop_for_nonfinite(accelerator, output_dir, step, nonfinite, float(grad_norm))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        progress.update(1)
        for key, value in sums.items():
            window[key] = window.get(key, 0.0) + value
        window["steps"] = window.get("steps", 0.0) + 1
        window["grad_norm"] = window.get("grad_norm", 0.0) + float(grad_norm)

        if done % config.log_every == 0 or done == schedule.total_steps:
            steps, norm = window.pop("steps"), window.pop("grad_norm")
            total = _reduce_sums(accelerator, window)
            window_units = max(total.pop("units"), 1.0)
            tokens = total.pop("tokens")  # real tokens of the window's sequences, all processes
            row = {key: value / window_units for key, value in total.items()}
            row.update(grad_norm=norm / steps, lr=lr, epoch=round(done / schedule.steps_per_epoch, 4))
            now = time.monotonic()
            row.update(tokens=tokens, tokens_per_s=tokens / max(now - window_started, 1e-9))
            row["elapsed_s"] = round(now - started, 3)
            window_started = now
            logger.log(done, row, split="train")
            progress.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}")
            window = {}
        if eval_examples and config.eval_every and done % config.eval_every == 0 and done != schedule.total_steps:
            logger.log(done, evaluate(objective, model, eval_examples, accelerator, config.per_device_batch_size), split="eval")
            window_started = time.monotonic()  # tokens_per_s measures training only
        if config.save_every and done % config.save_every == 0 and done != schedule.total_steps:
            save_checkpoint(accelerator, output_dir, done, keep=config.keep_checkpoints)
            window_started = time.monotonic()
    progress.close()

    if eval_examples:
        last_eval = evaluate(objective, model, eval_examples, accelerator, config.per_device_batch_size)
        logger.log(schedule.total_steps, last_eval, split="eval")
        before = f"{first_eval['loss']:.4f} before training -> " if first_eval else ""
        accelerator.print(f"{objective.name}: held-out loss {before}{last_eval['loss']:.4f} after {schedule.total_steps} steps")
    if config.report_to:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    return accelerator.unwrap_model(model)


def load_newest_good_checkpoint(accelerator: Any, output_dir: Path) -> Any:
    """Load the newest checkpoint that loads; a damaged one (bit rot, a disk that filled while the
    file system cached it) is reported and the one before it tried. None loading is a `UserError`."""
    from rlhf_workflow.train.checkpoint import list_checkpoints

    failures = []
    for checkpoint in reversed(list_checkpoints(output_dir)):
        try:
            accelerator.load_state(str(checkpoint.path))
            return checkpoint
        except Exception as exc:  # noqa: BLE001 - safetensors, torch and pickle each raise their own types
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            log.warning("checkpoint %s could not be loaded (%s): trying the one before it", checkpoint.path, reason)
            failures.append(f"{checkpoint.path.name}: {reason}")
    raise UserError(f"no checkpoint in {output_dir / 'checkpoints'} can be loaded ({'; '.join(failures)}); delete "
                    "that directory to start this training over")


def stop_for_nonfinite(accelerator: Any, output_dir: Path, step: int, nonfinite: list[Any], grad_norm: float) -> None:
    """Before the update of step ``step + 1``: stop every process if any loss or the gradient is NaN/inf.

    Raising here leaves the weights as they were after step ``step`` and the checkpoints untouched.
    """
    flagged = _reduce_sums(accelerator, {"nonfinite": float(len(nonfinite))}, same_keys=True)["nonfinite"]
    if not flagged and math.isfinite(grad_norm):
        return
    what = "the loss" if flagged else "the gradient norm"
    where = f" on examples {', '.join(map(str, nonfinite[:8]))}{' …' if len(nonfinite) > 8 else ''}" if nonfinite else ""
    checkpoint = latest_checkpoint(output_dir)
    resume = f"; the last checkpoint, {checkpoint.path}, is intact (--resume)" if checkpoint else ""
    raise UserError(
        f"step {step + 1}: {what} is not finite{where}; stopped before the update, so no weight was changed"
        f"{resume}. Check those rows, or lower {config_key('train.lr')}"
    )


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out

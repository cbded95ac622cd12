"""What every training stage (sft, train-rm, train-pm, dpo) does around the loop.

    accelerator, output_dir = start_stage(config)    # output dir, resolved config.yaml
    ... read rows, tokenize, load the model, build the objective ...
    model = train(objective, model, examples, ...)    # the one loop
    finish_stage(accelerator, output_dir, save)       # main process saves, checkpoints removed
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from rlhf_workflow.config import save_config
from rlhf_workflow.errors import UserError

log = logging.getLogger(__name__)


def start_stage(config: Any) -> tuple[Any, Path]:
    """Make the output directory, write the resolved config, seed, and return the accelerator."""
    from transformers import set_seed

    from rlhf_workflow.train.loop import make_accelerator

    output_dir = Path(config.output_dir)
    accelerator = make_accelerator(config.train, output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, output_dir / "config.yaml")
    # the same seed everywhere: new heads and LoRA adapters start from the same weights every run
    set_seed(config.train.seed)
    return accelerator, output_dir


class Dropped(list):
    """Rows a tokenizer dropped: ``(row index, field, why)``, in row order."""

    def add(self, index: int, field: str, why: str) -> None:
        self.append((index, field, why))


def nothing_usable(path: str, dropped: Dropped, what: str = "row") -> UserError:
    """The error for a split whose every row was dropped, naming the first one by file:line and field."""
    from rlhf_workflow.data.io import row_positions

    if not dropped:
        return UserError(f"{path}: no {what} is usable")
    index, field, why = dropped[0]
    return UserError(f"{row_positions(path)[index]}: field '{field}': {why}; no {what} of {path} is usable "
                     f"({len(dropped)} dropped)")


def tokenize_split(path: str, schema: Any, tokenize: Callable[[list, str, Dropped], list[dict]]) -> list[dict]:
    """Read and validate ``path``, then tokenize; a split with nothing usable is a `UserError`."""
    from rlhf_workflow.data.io import read_rows

    rows = read_rows(path, schema)
    dropped = Dropped()
    examples = tokenize(rows, path, dropped)
    if not examples:
        raise nothing_usable(path, dropped)
    return examples


def length_limit(config: Any) -> tuple[int, str]:
    """The tokens a training sequence may have: ``data.max_length``, or the model's context when
    that is shorter (longer sequences would index positions the model never learned). Returns the
    limit and how to name it in messages."""
    from rlhf_workflow.models.loading import model_context

    context = model_context(config.model)
    if context is not None and config.data.max_length > context:
        log.warning("data.max_length %d is longer than the model's context of %d tokens: sequences are limited to "
                    "%d", config.data.max_length, context, context)
        return context, f"the model's context of {context} tokens (data.max_length {config.data.max_length} is longer)"
    return config.data.max_length, f"data.max_length {config.data.max_length}"


def finish_stage(accelerator: Any, output_dir: Path, save: Callable[[Path], None], what: str) -> Path:
    """Save the trained model on the main process, then drop the checkpoints it no longer needs."""
    from rlhf_workflow.train.checkpoint import remove_checkpoints

    target = output_dir / "model"
    if accelerator.is_main_process:
        save(target)
        remove_checkpoints(output_dir)
        accelerator.print(f"saved the {what} to {target}")
    accelerator.wait_for_everyone()
    return target

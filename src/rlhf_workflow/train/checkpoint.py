"""Periodic training checkpoints: ``output_dir/checkpoints/step-00000040/``.

A checkpoint is accelerate's `save_state` (model, optimizer, registered scheduler, every
process's RNG states) plus ``trainer_state.json`` with the step. It is written under a temporary
name and renamed once complete, so `latest_checkpoint` never returns a half-written one.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_workflow.data.io import temp_path, writer_id
from rlhf_workflow.errors import disk_full_as_oserror

STATE_FILE = "trainer_state.json"


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Checkpoint]:
    """Complete checkpoints, oldest first (temporary and unfinished ones are ignored)."""
    found = []
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    for path in root.glob("step-*"):
        state = path / STATE_FILE
        if not state.is_file():
            continue
        try:
            step = int(json.loads(state.read_text())["step"])
        except (ValueError, KeyError, json.JSONDecodeError):
            continue
        found.append(Checkpoint(path, step))
    return sorted(found, key=lambda c: c.step)


def latest_checkpoint(output_dir: str | Path) -> Checkpoint | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def save_checkpoint(accelerator: Any, output_dir: str | Path, step: int, *, keep: int) -> Path:
    """Save the full training state at ``step`` (call on every process), keep the newest ``keep``."""
    root = checkpoints_dir(output_dir)
    final = root / f"step-{step:08d}"
    writer = [writer_id()]  # the main process's: every process writes its part into one directory
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(writer, from_process=0)
    tmp = temp_path(final, writer=writer[0])
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        with disk_full_as_oserror(tmp):
            accelerator.save_state(str(tmp))
    except BaseException:
        if accelerator.is_main_process:  # a half-written checkpoint only takes room
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(tmp / STATE_FILE, "w") as f:
            json.dump({"step": step}, f)
            f.flush()
            os.fsync(f.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old.path, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def remove_checkpoints(output_dir: str | Path) -> None:
    """Delete the checkpoints of a finished run (its model is saved; they only served to resume)."""
    shutil.rmtree(checkpoints_dir(output_dir), ignore_errors=True)

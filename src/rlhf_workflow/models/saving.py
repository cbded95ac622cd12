"""Save a model so that plain `AutoModelForCausalLM.from_pretrained(dir)` loads it back.

Always safetensors; LoRA adapters are merged into the weights (and the adapter is kept in
``adapter/`` beside them); the directory is written under a temporary name and renamed, so a
crash never leaves a half-written model behind.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path
from typing import Any

from rlhf_workflow.data.io import remove_own_temporaries, temp_path
from rlhf_workflow.errors import disk_full_as_oserror
from rlhf_workflow.models.lora import is_peft_model


def replace_directory(tmp: Path, target: Path) -> None:
    """Move the finished directory ``tmp`` onto ``target``, replacing what was there."""
    old = temp_path(target, "old")
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def save_model(
    model: Any,
    tokenizer: Any,
    path: str | os.PathLike,
    *,
    state_dict: dict | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write ``model`` (and ``tokenizer``) to ``path`` as safetensors, atomically.

    ``state_dict`` may be given by a distributed trainer (FSDP / ZeRO-3 gather it first);
    ``extra_files`` (name -> text) are written into the same directory before it is renamed.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_own_temporaries(target)  # of an earlier save of it, killed
    tmp = temp_path(target)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with disk_full_as_oserror(target.parent):
            if is_peft_model(model):
                model.save_pretrained(tmp / "adapter")
                merged = copy.deepcopy(model).merge_and_unload()
                merged.save_pretrained(tmp)
            else:
                model.save_pretrained(tmp, state_dict=state_dict)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            for name, text in (extra_files or {}).items():
                (tmp / name).write_text(text, encoding="utf-8")
            replace_directory(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target

"""Training metrics to the console, ``metrics.jsonl`` and the accelerate trackers in the config."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from rlhf_workflow.data.io import atomic_write_text, jsonl_lines


def _truncate_after(path: Path, step: int) -> None:
    """Drop rows logged after ``step`` (a resumed run logs them again) and any torn last line.

    Rows of ``step`` itself were written before its checkpoint and are kept; a fresh run
    (``step`` 0) starts an empty log, the old one kept beside it as a backup (``.bak-<k>``).
    """
    if not path.is_file():
        return
    if step == 0:
        from rlhf_workflow.data.outputs import backup_path

        path.replace(backup_path(path))
        return
    keep = []
    for line in jsonl_lines(path):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if int(row.get("step", 0)) <= step:
            keep.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in keep))


class MetricsLogger:
    """Appends one JSON row per log event; only the main process writes."""

    def __init__(self, output_dir: str | Path, accelerator: Any, *, start_step: int = 0):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.accelerator = accelerator
        if accelerator.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _truncate_after(self.path, start_step)
        accelerator.wait_for_everyone()

    def log(self, step: int, values: dict[str, float], *, split: str) -> None:
        if not self.accelerator.is_main_process:
            return
        row = {"step": step, "split": split, **{k: _clean(v) for k, v in values.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        shown = " ".join(f"{k}={_fmt(v)}" for k, v in row.items() if k not in ("step", "split"))
        tqdm.write(f"[{split} step {step}] {shown}")
        if self.accelerator.trackers:
            self.accelerator.log({f"{split}/{k}": v for k, v in values.items()}, step=step)


def _clean(value: Any) -> Any:
    value = float(value)
    return value if math.isfinite(value) else str(value)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)

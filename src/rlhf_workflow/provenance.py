"""What made a run's numbers: the code and the processor each of its stages ran on.

A run's seed fixes its random numbers, not its arithmetic. Another version of this package, of
torch or of transformers, another processor (AVX2 against AVX-512, a GPU), another number of
threads or of processes rounds some products differently; once one probability differs in its
last bit a different token can be drawn, and from there the run goes its own way. So every stage
of a run records what made it (state.json's ``made_by``, written by `online.loop.RunState`), the
report lists it, and `compare` says when the runs it pairs within a seed were made differently.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def made_by() -> str:
    """This process's set-up as one line, equal for equal set-ups, e.g. ``rlhf-workflow 0.1.0 (git
    f1334b7), torch 2.13.0+cpu, transformers 5.17.0, AMD EPYC (x86_64, family 25), 2 threads``.

    Never fails a run: what cannot be read is said to be unknown."""
    try:
        return _describe()
    except Exception as exc:  # a record of the set-up must not cost the stage it records
        logger.warning("could not describe this set-up for state.json (%s)", exc)
        return f"set-up unknown ({type(exc).__name__})"


def _describe() -> str:
    from importlib import metadata

    import torch
    import transformers

    try:
        version = metadata.version("rlhf-workflow")
    except metadata.PackageNotFoundError:  # the source tree on the path, not installed
        version = "(not installed)"
    commit = git_commit(Path(__file__).resolve().parent)
    code = f"rlhf-workflow {version}" + (f" (git {commit})" if commit else "")
    processes = int(os.environ.get("WORLD_SIZE", "1") or 1)  # set by accelerate launch / torchrun
    return (f"{code}, torch {torch.__version__}, transformers {transformers.__version__}, {processor()}"
            + (f", {processes} processes" if processes > 1 else ""))


NOT_RECORDED = "not recorded"  # a completed stage without a record: made before set-ups were recorded


def stages_by_setup(state: Any) -> dict[str, list[str]]:
    """A run's state.json (as read) as {set-up: its stages}, completed stages first and in order; a
    completed stage without a record under `NOT_RECORDED`; {} where nothing is recorded."""
    if not isinstance(state, dict) or not isinstance(state.get("made_by"), dict) or not state["made_by"]:
        return {}
    made_by = state["made_by"]
    completed = [s for s in state.get("completed") or [] if isinstance(s, str)]
    grouped: dict[str, list[str]] = {}
    for stage in completed + [s for s in made_by if s not in completed]:
        grouped.setdefault(str(made_by.get(stage, NOT_RECORDED)), []).append(stage)
    return grouped


def git_commit(directory: Path) -> str | None:
    """The last commit that changed the code under ``directory``, where that code is tracked by a git
    checkout (``+changes`` where files there differ from it, or are new and not ignored); None where
    it is not (an installed copy, or one in an ignored venv inside some checkout), or git does not
    answer. A commit that changed only files elsewhere (docs, tests) leaves it as it was."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(directory), *args], capture_output=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.decode("utf-8", "replace").strip() if done.returncode == 0 else None

    if not git("ls-files", "--", "."):
        return None
    commit = git("log", "-1", "--format=%h", "--abbrev=7", "--", ".")
    if not commit:
        return None
    changed = git("status", "--porcelain", "--", ".")
    return commit + ("+changes" if changed else "")


def processor() -> str:
    """What the stages compute on: the CPU's model (with its x86 family, which tells AMD generations
    apart) and the threads torch uses, and the GPUs' names where CUDA sees some (read from
    nvidia-smi: asking torch would start CUDA in this process before vLLM starts its workers)."""
    import torch

    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, colon, value = line.partition(":")
            if colon and key.strip() not in fields:
                fields[key.strip()] = value.strip()
            if not line.strip() and fields:  # the first processor's block is enough
                break
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or "unknown CPU"
    detail = platform.machine() + (f", family {fields['cpu family']}" if "cpu family" in fields else "")
    cpu = f"{name} ({detail}), {torch.get_num_threads()} threads"
    if not torch.cuda.is_available():
        return cpu
    try:
        listed = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                timeout=10).stdout.decode("utf-8", "replace").split("\n")
        gpus = [line.strip() for line in listed if line.strip()]
    except (OSError, subprocess.SubprocessError):
        gpus = []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f"{', '.join(dict.fromkeys(gpus)) or 'CUDA GPU'} ({len(gpus) or '?'} on the machine" + (
        f", CUDA_VISIBLE_DEVICES={visible}" if visible is not None else "") + f"); {cpu}"

"""What made a run's numbers: the code and the processor each of its stages ran on.

A run's seed fixes its random numbers, not its arithmetic. Another version of this package, of
torch or of transformers, another processor (AVX2 against AVX-512, a GPU) or another number of
threads rounds some products differently; once one probability differs in its last bit a
different token can be drawn, and from there the run goes its own way. So every stage of a run
records what made it (state.json's ``made_by``, written by `online.loop.RunState`), the report
lists it, and `compare` says when the runs it pairs within a seed were made differently.
"""

from __future__ import annotations

import functools
import platform
import subprocess
from pathlib import Path


@functools.lru_cache(maxsize=1)
def made_by() -> str:
    """This process's set-up as one line, equal for equal set-ups, e.g. ``rlhf-workflow 0.1.0 (git
    f1334b7), torch 2.13.0+cpu, transformers 5.17.0, AMD EPYC 7B13 (x86_64, family 25), 2 threads``."""
    from importlib import metadata

    import torch
    import transformers

    try:
        version = metadata.version("rlhf-workflow")
    except metadata.PackageNotFoundError:  # the source tree on the path, not installed
        version = "(not installed)"
    commit = git_commit(Path(__file__).resolve().parent)
    code = f"rlhf-workflow {version}" + (f" (git {commit})" if commit else "")
    return f"{code}, torch {torch.__version__}, transformers {transformers.__version__}, {processor()}"


def git_commit(directory: Path) -> str | None:
    """The commit of the git checkout ``directory`` lies in (``+changes`` where files under ``directory``
    differ from it, or are new and not ignored), or None: not a checkout, no git, or git did not answer."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(directory), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "--short=7", "HEAD")
    if not commit or not git("ls-files", "--", "."):  # not a checkout, or one that does not track this code
        return None  # (an installed copy in an ignored venv inside some checkout)
    changed = git("status", "--porcelain", "--", ".")
    return commit + ("+changes" if changed else "")


def processor() -> str:
    """The device the stages compute on: the GPU's name, or the CPU's model (with its x86 family,
    which tells AMD generations apart) and the threads torch uses."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} ({torch.cuda.device_count()} visible)"
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
    return f"{name} ({detail}), {torch.get_num_threads()} threads"

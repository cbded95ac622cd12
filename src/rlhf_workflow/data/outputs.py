"""What a command writes, and the rules that keep it from losing data.

Every stage names its inputs and its outputs (a file, or a directory it owns), and five rules hold
for all of them, here and nowhere else:

* **An output is never an input** (`path_conflicts`): an output file, or one of the files written
  beside it (`sidecars`), or anything inside an output directory, must not resolve (through
  symlinks) to an input.
* **One writer at a time** (`OutputLock`): a command holds an exclusive lock on each output while it
  runs. The lock is `fcntl.flock` on a lock file, so the operating system releases it when the
  process ends, however it ends (``kill -9`` too): there is never a stale lock to remove by hand.
  The lock file holds the holder's pid, which the refusal names.
* **Rows are made by one set of settings** (`check_fingerprint`): beside a resumable output lies
  ``<output stem>.settings.json``, the settings that determine its rows (model, sampling,
  template; judge and length penalty). Resuming with other settings would mix rows of both, so it
  is refused with the difference, unless ``--force``, which moves the old output aside as a backup
  and starts afresh.
* **Nothing half-written stays** (`remove_debris`): files and directories are written under a
  temporary name (`data.io.temp_path`) and renamed into place; what a process killed before its
  rename left, the next holder of the output's lock removes (in a directory a command claimed, or
  beside an output file, its own), so kills cost no disk.
* **A directory belongs to one command** (`claim_directory`): ``<dir>/.rlhf-workflow.json`` names the
  command that writes there (under the key ``stage``). Another command's outputs, or files that no command claimed, are refused;
  ``--force`` moves earlier outputs aside into ``replaced-<k>/``; nothing is ever deleted.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from rlhf_workflow.data.io import abandoned, remove_path
from rlhf_workflow.errors import UserError

log = logging.getLogger(__name__)

OWNER_FILE = ".rlhf-workflow.json"
LOCK_FILE = ".lock"


# --------------------------------------------------------------------------- names


def sidecar(output: Path, name: str, suffix: str | None = None) -> Path:
    """``gen.jsonl`` -> ``gen.<name>.jsonl`` (or ``gen.<name><suffix>``): a file written beside an output."""
    return output.with_name(f"{output.stem}.{name}{output.suffix if suffix is None else suffix}")


def errors_path(output: Path) -> Path:
    """Prompts that got no responses (generate)."""
    return sidecar(output, "errors")


def stats_path(output: Path) -> Path:
    """The statistics of a pairs file."""
    return sidecar(output, "stats", ".json")


def settings_path(output: Path) -> Path:
    """The fingerprint of the settings that made a resumable output's rows."""
    return sidecar(output, "settings", ".json")


def shard_path(output: Path, rank: int) -> Path:
    """Process ``rank``'s shard of ``output``: ``gen.jsonl`` -> ``gen.rank3.jsonl``."""
    return sidecar(output, f"rank{rank}")


def lock_path(output: Path, *, directory: bool = False) -> Path:
    """The lock file of an output: ``dir/.lock`` for a directory, ``.gen.jsonl.lock`` beside a file."""
    return output / LOCK_FILE if directory else output.with_name(f".{output.name}.lock")


def shard_paths(output: Path) -> list[Path]:
    """Shard files of any earlier run of this output (whatever its number of processes)."""
    stem, suffix = output.stem, output.suffix
    return sorted(p for p in output.parent.glob(f"{stem}.rank*{suffix}")
                  if p.name[len(stem) + len(".rank") : len(p.name) - len(suffix)].isdigit())


def sidecars(output: Path) -> list[Path]:
    """The files a command may write beside the file ``output`` (shards: those that exist now)."""
    return [errors_path(output), stats_path(output), settings_path(output), lock_path(output),
            output.with_name(f"{output.name}.tmp"), *shard_paths(output)]


# --------------------------------------------------------------------------- an output is never an input


def _real(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def unwritable(outputs: Mapping[str, str]) -> list[str]:
    """One message per output that cannot be written as the kind it is: a file output that is a
    directory, a directory output that is a file, or a path through a file or through a symbolic
    link to nothing (no directory can be made there: a `runs` link copied from another machine)."""
    found = []
    for key, value in outputs.items():
        if not value:
            continue
        path = Path(os.path.expanduser(value))
        is_dir = key.endswith("output_dir")
        if is_dir and path.exists() and not path.is_dir():
            found.append(f"{key}={value} is a file; give a directory")
        elif not is_dir and path.is_dir():
            found.append(f"{key}={value} is a directory; give a file name")
        else:
            folders = [path, *path.parents] if is_dir else list(path.parents)
            dangling = next((p for p in reversed(folders) if p.is_symlink() and not p.exists()), None)
            blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
            if dangling is not None:
                found.append(f"{key}={value} goes through {dangling}, a symbolic link to {os.readlink(dangling)}, "
                             "which does not exist; remove the link or create what it points to")
            elif blocking is not None:
                found.append(f"{key}={value} goes through {blocking}, which is a file, not a directory")
    return found


def path_conflicts(inputs: Mapping[str, Iterable[str]], outputs: Mapping[str, str]) -> list[str]:
    """One message per (output, input) pair where writing the output would overwrite or hide the input.

    ``inputs``: config key -> the paths it names (only existing paths are compared: a name that is not
    a path, like a built-in model or a Hub id, cannot be overwritten). ``outputs``: config key -> path;
    a key ending in ``output_dir`` is a directory the command owns, any other a file.
    """
    found = []
    for out_key, out_value in outputs.items():
        if not out_value:
            continue
        output = _real(out_value)
        is_dir = out_key.endswith("output_dir")
        guarded = set() if is_dir else {output, *(_real(p) for p in sidecars(output))}
        for in_key, values in inputs.items():
            for value in values:
                if not value or not os.path.lexists(os.path.expanduser(value)):
                    continue
                source = _real(value)
                plain = Path(os.path.abspath(os.path.expanduser(value))) == source and \
                    Path(os.path.abspath(os.path.expanduser(out_value))) == output
                linked = "" if plain else " (the same file, through a link)"
                if source == output:
                    found.append(f"{out_key}={out_value} would overwrite the input {in_key}={value}{linked}; "
                                 f"choose another {out_key}")
                elif is_dir and output in source.parents:
                    found.append(f"the input {in_key}={value} lies inside {out_key}={out_value}, which the stage "
                                 f"writes; choose another {out_key}")
                elif source in guarded:
                    found.append(f"the input {in_key}={value} is one of the files written beside "
                                 f"{out_key}={out_value}; choose another {out_key}")
    return found


# --------------------------------------------------------------------------- one writer at a time


class OutputLock:
    """An exclusive lock on one output, held from `acquire` to `release` (see the module docstring).

    Under several processes only the main one locks (they are one run); `acquire` tells every
    process whether the main one got it, so all of them stop together when it did not.
    """

    def __init__(self, output: str | os.PathLike[str], *, directory: bool):
        self.output = Path(output)
        self.directory = directory
        self._fd: int | None = None

    @property
    def path(self) -> Path:
        return lock_path(self.output, directory=self.directory)

    def try_acquire(self) -> str | None:
        """Take the lock in this process; None when taken, else the reason (who holds it)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UserError(f"cannot write to {self.output}: {exc.strerror} (making {self.path})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            return (f"{self.output} is being written by {holder}; wait for it to finish or stop it (the lock goes "
                    "with the process), or choose another output")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}\n"
                  .encode(), 0)
        self._fd = fd
        # what an earlier writer killed mid-write left there (no writer but this one is at work now);
        # in a directory only once a command of ours claimed it: a mistyped output_dir is left alone
        if not self.directory or directory_owner(self.output) is not None:
            remove_debris(self.output, directory=self.directory)
        return None

    def acquire(self, state: Any = None) -> "OutputLock":
        """Take the lock (the main process, for all of them); a `UserError` on every process if held."""
        from rlhf_workflow.processes import on_main

        on_main(state, self._acquire_or_raise)
        return self

    def _acquire_or_raise(self) -> None:
        reason = self.try_acquire()
        if reason is not None:
            raise UserError(reason)

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:  # a command that ended in an exception: the lock goes with the object
        self.release()

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


# --------------------------------------------------------------------------- nothing half-written stays


def _held(lock: Path) -> bool:
    """Whether a process holds the lock file ``lock`` now."""
    try:
        fd = os.open(lock, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # (releases the lock if it was taken here)
    return False


def remove_debris(output: Path, *, directory: bool) -> list[Path]:
    """Delete the temporaries (`data.io.abandoned`) that writers killed before their rename left: in a
    directory output everywhere below it, except below a directory whose own lock someone holds;
    beside a file output only those of its name, sidecars and shards (``<stem>``, ``<stem>.*``).
    Call it holding the output's lock (`OutputLock` does). Returns what was removed."""
    found: list[Path] = []
    if directory:
        for top, dirs, files in os.walk(output):
            found += [Path(top) / name for name in dirs + files]
            # not into a temporary (it goes whole), nor where another command is at work under its own lock
            dirs[:] = [d for d in dirs if abandoned(d, locked=True) is None and not _held(Path(top) / d / LOCK_FILE)]
    elif output.parent.is_dir():
        found = [p for p in output.parent.iterdir() if p.name.startswith(f".{output.stem}")]
    removed = []
    for path in found:
        final = abandoned(path.name, locked=True)
        if final is None or (not directory and final != output.stem and not final.startswith(f"{output.stem}.")):
            continue
        if remove_path(path):
            removed.append(path)
    if removed:
        log.info("removed %d temporary file(s) of an interrupted write in %s", len(removed), output)
    return removed


# --------------------------------------------------------------------------- rows made by one set of settings


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {json.dumps(old)} -> {json.dumps(new)}"]


def backup_path(path: Path) -> Path:
    """A free name beside ``path`` for keeping its old version: ``gen.jsonl`` -> ``gen.jsonl.bak-1``."""
    k = 1
    while True:
        candidate = path.with_name(f"{path.name}.bak-{k}")
        if not os.path.lexists(candidate):
            return candidate
        k += 1


def check_fingerprint(output: Path, settings: dict[str, Any], *, force: bool, what: str) -> None:
    """Before a resumable stage appends to ``output``: refuse when its rows were made with other
    settings (unless ``force``: the old output and its sidecars are moved to backups), then record
    ``settings``. Called on the main process while it holds the output's lock."""
    from rlhf_workflow.data.io import atomic_write_text

    record = settings_path(output)
    has_rows = any(p.exists() and p.stat().st_size > 0 for p in [output, *shard_paths(output)])
    if has_rows and record.exists():
        try:
            old = json.loads(record.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            old = None
        changed = _differences(old, settings) if isinstance(old, dict) else ["(the record is unreadable)"]
        if changed and not force:
            shown = "; ".join(changed[:6]) + (f"; and {len(changed) - 6} more" if len(changed) > 6 else "")
            raise UserError(f"{output} holds {what} made with other settings ({shown}); continuing would mix "
                            f"rows of both: choose another output, or --force to start it afresh (the old file is "
                            "kept as a backup)")
        if changed:
            for path in [output, *shard_paths(output)]:
                kept = backup_path(path)
                os.replace(path, kept)
                print(f"--force: {path} moved to {kept}; starting afresh")
    elif has_rows:
        log.warning("%s has rows but no record of the settings that made them (written by an earlier version?): "
                    "taking them as made with these settings, recorded in %s", output, record)
    atomic_write_text(record, json.dumps(settings, indent=1, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- a directory belongs to one stage


def directory_owner(directory: Path) -> str | None:
    """The stage named in ``directory``'s owner file, or None."""
    try:
        owner = json.loads((directory / OWNER_FILE).read_text(encoding="utf-8")).get("stage")
    except (OSError, ValueError, AttributeError):
        return None
    return owner if isinstance(owner, str) else None


def move_aside(directory: Path, entries: list[Path]) -> Path:
    """Move ``entries`` (files and folders under ``directory``) into a new ``replaced-<k>/`` inside
    it, each at the same place relative to ``directory``; returns that folder."""
    k = 1
    while (directory / f"replaced-{k}").exists():
        k += 1
    target = directory / f"replaced-{k}"
    target.mkdir()
    for entry in entries:
        destination = target / entry.relative_to(directory)
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(entry, destination)
    if (directory / OWNER_FILE).exists():  # whose files they were
        shutil.copyfile(directory / OWNER_FILE, target / OWNER_FILE)
    print(f"--force: the {len(entries)} earlier files and folders of {directory} were moved to {target}")
    return target


def claim_directory(directory: Path, command: str, *, force: bool, resume: bool, earlier: str | None = None) -> None:
    """Make ``directory`` the output directory of ``command`` (main process, holding its lock).

    * no directory, an empty one, or one that holds only a command's config (a command that failed before
      writing anything): taken;
    * this command's earlier outputs: continued with ``resume``; with ``force`` moved aside
      (`move_aside`) and started afresh; else refused;
    * another command's outputs: refused, unless ``force`` (moved aside);
    * files that no command claimed: refused, unless ``resume`` (an earlier version of this tool
      wrote them without an owner file) and, where ``earlier`` names the file every such run
      wrote (a command that always resumes: `run`'s ``state.json``), that file is among them.
    Nothing is deleted."""
    from rlhf_workflow.data.io import atomic_write_text

    if os.path.lexists(directory) and not directory.is_dir():
        raise UserError(f"output_dir {directory} is a file, not a directory")
    entries = sorted(p for p in directory.iterdir() if p.name not in (OWNER_FILE, LOCK_FILE)
                     and not p.name.startswith("replaced-")) if directory.is_dir() else []
    results = [p for p in entries if p.name != "config.yaml"]
    owner = directory_owner(directory)
    shown = ", ".join(p.name for p in entries[:4]) + (", ..." if len(entries) > 4 else "")
    if owner is None and entries and not (resume and (earlier is None or (directory / earlier).is_file())):
        hint = ("" if resume else
                " (or --resume, if an earlier version of rlhf-workflow wrote them)")
        raise UserError(f"output_dir {directory} already holds files that no rlhf-workflow command claimed ({shown}): "
                        f"choose a new or empty directory{hint}")
    if owner is not None and owner != command and results:
        if not force:
            raise UserError(f"output_dir {directory} holds the outputs of `{owner}` ({shown}), not of `{command}`: choose "
                            "another output_dir, or --force to move them aside (into replaced-<k>/) and write there")
        move_aside(directory, entries)
    elif owner == command and results and not resume:
        if not force:
            raise UserError(f"output_dir {directory} already holds a `{command}` run ({shown}): --resume to continue it, "
                            "--force to start afresh (its files are moved aside into replaced-<k>/), or choose another "
                            "output_dir")
        move_aside(directory, entries)
    directory.mkdir(parents=True, exist_ok=True)
    # the owner file's key is "stage", as every version wrote it
    atomic_write_text(directory / OWNER_FILE, json.dumps({"stage": command}) + "\n")

"""Reading and writing row files: validated reads, atomic writes, resumable appends.

Reading (`read_rows`, `iter_jsonl`) accepts JSON Lines, a JSON array, Parquet, an Arrow file, a
directory written by ``datasets.Dataset.save_to_disk``, and a Hugging Face Hub dataset by name
(`hub_dataset`: ``owner/name[:config]:split``, through ``datasets`` and its cache; offline with
``HF_HUB_OFFLINE=1`` when it is cached). Every problem is a `UserError` with one
sentence naming the place, ``data/train.jsonl:7: field 'chosen': ...`` for JSON Lines (line
numbers) and ``data/train.parquet: row 7: ...`` for the tabular formats (1-based row numbers).

Writing never leaves a partial file behind: `atomic_write_text` and `write_jsonl` write to a
temporary file next to the target (`temp_path`) and rename it into place; what a killed writer
leaves under such a name, the next holder of the output's lock removes
(`data.outputs.remove_debris`), or the next write of the same file.
`JsonlAppender` is for long stages that append rows keyed by id: on restart it drops a
half-written last line and skips ids that are already done, so nothing is lost and nothing is
duplicated.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Set
from pathlib import Path
from typing import IO, Any, TypeVar

from pydantic import BaseModel, ValidationError

from rlhf_workflow.data.schemas import describe_validation_error
from rlhf_workflow.errors import UserError

logger = logging.getLogger(__name__)

RowT = TypeVar("RowT", bound=BaseModel)

TABLE_SUFFIXES = (".parquet", ".arrow")
SUPPORTED = (".jsonl, .json, .parquet, .arrow, a directory saved with datasets' save_to_disk, or a Hub dataset "
             "name (owner/name:split or owner/name:config:split)")
HUB_DATASET = re.compile(r"^(?P<name>[A-Za-z0-9][\w.-]*/[\w.-]+)(?::(?P<first>[\w.-]+))?(?::(?P<second>[\w.-]+))?$")


# --------------------------------------------------------------------------- reading


def _json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, for "expected a JSON object, got ..."."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


def _json_error(exc: json.JSONDecodeError) -> str:
    """json's message and column ("Unterminated string starting at" ends in "at" already)."""
    return f"{exc.msg.removesuffix(' at')} at column {exc.colno}"


def not_text(value: Any, field: str = "") -> str | None:
    """The field (dotted path) of the first string in ``value`` that is not text: one holding a lone
    surrogate (JSON's ``"\\ud800"`` escape decodes to it, and no file, tokenizer or server can take it)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return field or "(the value)"
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        where = f"{field}.{key}" if field else str(key)
        found = not_text(key, where) if isinstance(key, str) else None
        found = found or not_text(item, where)
        if found:
            return found
    return None


def decode_json(text: str, where: str, *, whole_file: bool = False) -> Any:
    """``json.loads`` whose every failure is a `UserError` naming ``where`` (file:line, or a file whose
    line is then found): invalid JSON, a number of more than 4300 digits, nesting too deep to read, a
    string that is not text."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"{where}:{exc.lineno}" if whole_file else where
        raise UserError(f"{where}: invalid JSON ({_json_error(exc)})") from None
    except RecursionError:
        raise UserError(f"{where}: JSON nested too deeply to read (about a thousand levels or more)") from None
    except ValueError as exc:  # int() refuses more than sys.get_int_max_str_digits() digits
        raise UserError(f"{where}: a number too long to read ({str(exc).split(':')[0][:100]})") from None
    field = not_text(value)
    if field is not None:
        raise UserError(f"{where}: field '{field}': a lone surrogate (an escape such as \\ud800 without its pair) "
                        "is not text")
    return value


def _parse_line(raw: bytes, path: str, line_number: int) -> dict[str, Any] | None:
    """Decode one line of a JSON Lines file; None for a blank line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}:{line_number}: not valid UTF-8") from None
    if line_number == 1:
        text = text.removeprefix("\ufeff")  # a byte-order mark some editors write
    text = text.rstrip("\r\n")  # else an error at the end of the line is placed on a line after it
    if not text.strip():
        return None
    value = decode_json(text, f"{path}:{line_number}")
    if not isinstance(value, dict):
        raise UserError(f"{path}:{line_number}: expected a JSON object, got {_json_type(value)}")
    return value


def iter_jsonl(path: str | os.PathLike[str], *, allow_empty: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for each non-blank line of a JSON Lines file.

    Line numbers are 1-based. Invalid JSON, a value that is not an object and bytes that are
    not UTF-8 are `UserError`s naming the line; so is a file with no rows unless ``allow_empty``.
    """
    shown = os.fspath(path)
    if not os.path.exists(path):
        raise UserError(f"{shown} does not exist")
    if os.path.isdir(path):
        raise UserError(f"{shown} is a directory, expected a JSON Lines file")
    count = 0
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            row = _parse_line(raw, shown, line_number)
            if row is None:
                continue
            count += 1
            yield line_number, row
    if count == 0 and not allow_empty:
        raise UserError(f"{shown}: no rows")


def jsonl_lines(path: str | os.PathLike[str]) -> list[str]:
    """The non-blank lines of a JSON Lines file as text, split at newlines only.

    Not ``str.splitlines``: it also splits at U+2028, U+2029, U+0085 and the ASCII separators
    \\x0b, \\x0c, \\x1c-\\x1e, which ``json.dumps(..., ensure_ascii=False)`` leaves inside strings,
    and model outputs hold them: a row would come back cut in two."""
    text = Path(path).read_text(encoding="utf-8")
    return [line.rstrip("\r") for line in text.split("\n") if line.strip()]


def count_jsonl_rows(path: str | os.PathLike[str]) -> int:
    """The number of rows (non-blank lines) of a JSON Lines file; see `jsonl_lines`."""
    return len(jsonl_lines(path))


def _read_json(path: str | os.PathLike[str]) -> list[tuple[str, dict[str, Any]]]:
    """A ``.json`` file: a JSON array of objects, or JSON Lines content under a .json name."""
    shown = os.fspath(path)
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line_number = raw[: exc.start].count(b"\n") + 1
        raise UserError(f"{shown}:{line_number}: not valid UTF-8") from None
    if not text.lstrip().startswith("["):
        return [(f"{shown}:{n}", row) for n, row in iter_jsonl(path)]
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{shown}:{exc.lineno}: invalid JSON ({_json_error(exc)})") from None
    except (RecursionError, ValueError):
        value = decode_json(text, shown, whole_file=True)  # raises the same error with its message
    if not isinstance(value, list):
        raise UserError(f"{shown}: expected a JSON array of objects, got {_json_type(value)}")
    rows: list[tuple[str, dict[str, Any]]] = []
    for index, item in enumerate(value, start=1):
        if not isinstance(item, dict):
            raise UserError(f"{shown}: row {index}: expected a JSON object, got {_json_type(item)}")
        field = not_text(item)
        if field is not None:
            raise UserError(f"{shown}: row {index}: field '{field}': a lone surrogate is not text")
        rows.append((f"{shown}: row {index}", item))
    if not rows:
        raise UserError(f"{shown}: no rows")
    return rows


def _without_nulls(value: Any) -> Any:
    """Drop null entries of objects, recursively.

    Arrow columns hold a value for every row, so a key missing from some rows reads back as
    null (and a message struct gains every key any message had). Dropping them restores the
    rows as they were written.
    """
    if isinstance(value, dict):
        return {key: _without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_without_nulls(item) for item in value]
    return value


def _read_table(path: str | os.PathLike[str]) -> list[tuple[str, dict[str, Any]]]:
    """A Parquet file, an Arrow file or a ``save_to_disk`` directory, read with ``datasets``."""
    import datasets
    import pyarrow.parquet

    shown = os.fspath(path)
    try:
        if os.path.isdir(path):
            loaded = datasets.load_from_disk(os.fspath(path))
            if isinstance(loaded, datasets.DatasetDict):
                splits = ", ".join(loaded.keys())
                raise UserError(
                    f"{shown}: holds several splits ({splits}); give the directory of one split, e.g. {shown}/train"
                )
            records = loaded.to_list()
        elif shown.endswith(".parquet"):
            records = pyarrow.parquet.read_table(path).to_pylist()
        else:
            records = datasets.Dataset.from_file(os.fspath(path)).to_list()
    except UserError:
        raise
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as exc:
        raise UserError(f"{shown}: cannot be read as a dataset ({type(exc).__name__}: {exc})") from None
    if not records:
        raise UserError(f"{shown}: no rows")
    return [(f"{shown}: row {index}", _without_nulls(record)) for index, record in enumerate(records, start=1)]


def hub_dataset(spec: str | os.PathLike[str]) -> tuple[str, str | None, str | None] | None:
    """``(name, config, split)`` when ``spec`` names a Hub dataset rather than a local path:
    ``owner/name``, ``owner/name:split`` or ``owner/name:config:split``; None for anything else,
    and for a path that exists (a local ``owner/name`` directory wins)."""
    text = os.fspath(spec)
    match = HUB_DATASET.match(text)
    if match is None or os.path.exists(text) or Path(text.split(":")[0]).suffix.lower() in (".jsonl", ".json") + TABLE_SUFFIXES:
        return None
    first, second = match.group("first"), match.group("second")
    return (match.group("name"), first, second) if second else (match.group("name"), None, first)


def absent_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path``, a file a stage would read, is not there (a Hub dataset name is no file)."""
    return hub_dataset(path) is None and not os.path.exists(os.path.expanduser(os.fspath(path)))


def _read_hub(spec: str) -> list[tuple[str, dict[str, Any]]]:
    """The rows of a Hub dataset (see `hub_dataset`), loaded by ``datasets`` through its cache."""
    import datasets

    name, config, split = hub_dataset(spec)  # type: ignore[misc]
    try:
        loaded = datasets.load_dataset(name, config, split=split)
    except ValueError as exc:
        if "split" in str(exc).lower() or "config" in str(exc).lower():  # e.g. Unknown split "x". Should be one of [...]
            raise UserError(f"{spec}: {exc}") from None
        raise UserError(f"{spec}: cannot be loaded ({type(exc).__name__}: {exc})") from None
    except (ConnectionError, OSError, datasets.exceptions.DatasetsError) as exc:
        if datasets.config.HF_HUB_OFFLINE:
            raise UserError(f"{spec}: the dataset {name} is not in the datasets cache ({datasets.config.HF_DATASETS_CACHE}) "
                            "and HF_HUB_OFFLINE is set: load it once with network access, or copy that cache here (if you meant "
                            f"a local file or directory: {spec} does not exist)") from None
        raise UserError(f"{spec}: cannot be loaded from the Hub ({type(exc).__name__}: {exc}); if you meant a local "
                        "file or directory, it does not exist") from None
    if isinstance(loaded, datasets.DatasetDict):
        if len(loaded) != 1:
            raise UserError(f"{spec}: has several splits ({', '.join(loaded)}); name one, e.g. {name}:{next(iter(loaded))}")
        loaded = next(iter(loaded.values()))
    records = loaded.to_list()
    if not records:
        raise UserError(f"{spec}: no rows")
    return [(f"{spec}: row {index}", _without_nulls(record)) for index, record in enumerate(records, start=1)]


def raw_rows(path: str | os.PathLike[str]) -> list[tuple[str, dict[str, Any]]]:
    """``(position, object)`` for every row of a file of any supported type, or of a Hub dataset."""
    shown = os.fspath(path)
    if hub_dataset(shown) is not None:
        return _read_hub(shown)
    if not os.path.exists(path):
        raise UserError(f"{shown} does not exist")
    if os.path.isdir(path):
        return _read_table(path)
    suffix = Path(path).suffix.lower()
    if suffix == ".jsonl":
        return [(f"{shown}:{n}", row) for n, row in iter_jsonl(path)]
    if suffix == ".json":
        return _read_json(path)
    if suffix in TABLE_SUFFIXES:
        return _read_table(path)
    raise UserError(f"{shown}: unsupported file type '{suffix or '(none)'}'; expected {SUPPORTED}")


def row_positions(path: str | os.PathLike[str]) -> list[str]:
    """Where each row of ``path`` is, in `read_rows` order ("file:line" for JSON Lines): for
    error messages about a row found after reading."""
    return [where for where, _ in raw_rows(path)]


def validate_row(schema: type[RowT], data: dict[str, Any], where: str) -> RowT:
    """``schema.model_validate(data)`` with errors as one `UserError` sentence starting with ``where``."""
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise UserError(f"{where}: {describe_validation_error(exc)}") from None


def read_rows(path: str | os.PathLike[str], schema: type[RowT]) -> list[RowT]:
    """Read and validate every row of ``path`` as ``schema`` (`raw_rows`, then `validate_rows`).

    Supported: ``.jsonl``, ``.json`` (an array of objects or JSON Lines), ``.parquet``,
    ``.arrow``, a directory saved with ``datasets.Dataset.save_to_disk`` and a Hub dataset name.
    """
    return validate_rows(raw_rows(path), schema)


def validate_rows(found: list[tuple[str, dict[str, Any]]], schema: type[RowT]) -> list[RowT]:
    """Validate ``(position, object)`` rows as ``schema``. Rows whose id was derived from their
    content get ``-2``, ``-3``, ... when the same id repeats in the file; an id written in the file
    that repeats is an error."""
    rows: list[RowT] = []
    first_seen: dict[str, str] = {}  # explicit id -> position where it first appeared
    derived_count: dict[str, int] = {}  # derived id -> how many times it was seen
    for where, data in found:
        row = validate_row(schema, data, where)
        if "id" in schema.model_fields and isinstance(getattr(row, "id", None), str):
            if getattr(row, "id_was_derived", False):
                base = row.id  # type: ignore[attr-defined]
                derived_count[base] = derived_count.get(base, 0) + 1
                if derived_count[base] > 1:
                    row.id = f"{base}-{derived_count[base]}"  # type: ignore[attr-defined]
            else:
                row_id = row.id  # type: ignore[attr-defined]
                if row_id in first_seen:
                    raise UserError(f"{where}: field 'id': duplicate id {row_id!r} (first at {first_seen[row_id]})")
                first_seen[row_id] = where
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- writing


def row_to_dict(row: BaseModel | dict[str, Any]) -> dict[str, Any]:
    """A row as plain JSON data: models are dumped in JSON mode without their unset optional fields.

    Only declared fields that are None are left out; metadata that is null stays null.
    """
    if isinstance(row, dict):
        return row
    data = row.model_dump(mode="json")
    declared = type(row).model_fields
    return {key: value for key, value in data.items() if not (value is None and key in declared)}


def _row_line(row: BaseModel | dict[str, Any]) -> str:
    """One JSON Lines line (with its newline) for ``row``."""
    return json.dumps(row_to_dict(row), ensure_ascii=False) + "\n"


def _fsync_directory(directory: Path) -> None:
    """Make a rename durable; not every platform can open a directory, so failures are ignored."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- temporary names

# every write that renames into place uses these names, so that what a killed writer leaves is
# known: ``.<name>.tmp-<host>-<pid>`` (``.old-``: a replaced directory waiting to be deleted)
_TEMPORARY = re.compile(r"^\.(?P<final>.+)\.(?:tmp|old)-(?P<host>[A-Za-z0-9.-]+)-(?P<pid>\d{1,7})$")


def writer_id() -> str:
    """This process as temporary names carry it: ``<host>-<pid>``."""
    import socket

    return f"{re.sub(r'[^A-Za-z0-9.-]+', '-', socket.gethostname()) or 'host'}-{os.getpid()}"


def temp_path(target: str | os.PathLike[str], kind: str = "tmp", *, writer: str | None = None) -> Path:
    """Where ``target`` is written before it is renamed into place: ``.<name>.tmp-<host>-<pid>``
    beside it (``kind`` "old": where the directory it replaces waits to be deleted). ``writer``:
    another process's `writer_id` (a checkpoint, which every process of a run writes into)."""
    target = Path(target)
    return target.with_name(f".{target.name}.{kind}-{writer or writer_id()}")


def abandoned(name: str, *, locked: bool) -> str | None:
    """The final name of the file that ``name`` is the temporary of, if its writer is gone: a
    process of this machine no longer running, or (``locked``: the caller holds the output's lock,
    so no one else writes there) any process of another machine. None otherwise."""
    match = _TEMPORARY.match(name)
    if match is None:
        return None
    host, _, pid = writer_id().rpartition("-")
    if match["host"] != host:
        return match["final"] if locked else None
    try:
        os.kill(int(match["pid"]), 0)
    except ProcessLookupError:
        return match["final"]
    except OSError:  # another user's process, still running
        return None
    return None


def remove_path(path: Path) -> bool:
    """Delete a file, a link or a directory tree (never what a link points to); False if it cannot be."""
    import shutil

    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    except OSError as exc:  # e.g. another user's file in a shared directory
        logger.warning("could not remove %s: %s", path, exc)
        return False
    return True


def remove_own_temporaries(target: Path) -> None:
    """Remove the temporaries of earlier writes of ``target`` whose process (here) is gone."""
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return
    for path in entries:
        if path.name.startswith(f".{target.name}.") and abandoned(path.name, locked=False) == target.name:
            remove_path(path)


def _write_atomically(path: str | os.PathLike[str], write: Any) -> None:
    """Call ``write(f)`` on a temp file next to ``path`` (`temp_path`), then rename it onto ``path``.

    On any exception the temp file is removed and the exception re-raised, so ``path`` is
    either the old file or the complete new one; a kill leaves the temp file (see `abandoned`).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_own_temporaries(target)  # of an earlier write of it, killed (where no lock covers it)
    tmp = temp_path(target)
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(target.parent)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically (temp file + fsync + rename); parent dirs are created."""

    def write(f: IO[str]) -> None:
        f.write(text)

    _write_atomically(path, write)


def write_jsonl(path: str | os.PathLike[str], rows: Iterable[BaseModel | dict[str, Any]]) -> int:
    """Write ``rows`` (dicts or models) as JSON Lines atomically; returns the number written."""
    count = 0

    def write(f: IO[str]) -> None:
        nonlocal count
        for row in rows:
            f.write(_row_line(row))
            count += 1

    _write_atomically(path, write)
    return count


# --------------------------------------------------------------------------- resumable appends


class JsonlAppender:
    """Append rows keyed by ``key`` to a JSON Lines file, safely across crashes and restarts.

    On open, a last line cut short by a crash (not a valid JSON object with the key, or no
    trailing newline) is removed with a warning; a complete object that only lacks its newline
    is kept and the newline added. The keys of the complete rows become `done_ids`. `append`
    skips rows whose key is already done and makes each call durable (flush + fsync).

        with JsonlAppender(out / "generations.jsonl") as sink:
            todo = [p for p in prompts if p.id not in sink.done_ids]
            for batch in batches(todo):
                sink.append(generate(batch))
    """

    def __init__(self, path: str | os.PathLike[str], key: str = "id") -> None:
        self.path = Path(path)
        self.key = key
        self._shown = os.fspath(path)
        self._done: set[str] = set()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self._recover()
        self._file: IO[str] | None = open(self.path, "a", encoding="utf-8", newline="\n")

    def _recover(self) -> None:
        """Collect the done keys; cut a half-written last line."""
        with open(self.path, "rb") as f:
            lines = f.readlines()
        offset = 0
        for index, raw in enumerate(lines):
            line_number = index + 1
            is_last = index == len(lines) - 1
            try:
                row = _parse_line(raw, self._shown, line_number)
            except UserError:
                if is_last:
                    self._cut(offset, line_number, "it is not a valid JSON object")
                    return
                raise
            if is_last and not raw.endswith(b"\n"):
                if row is None or not isinstance(row.get(self.key), str):
                    self._cut(offset, line_number, "it has no newline")
                    return
                # A complete object missing only its newline (written by another tool): keep it.
                with open(self.path, "ab") as f:
                    f.write(b"\n")
            offset += len(raw)
            if row is None:
                continue
            value = row.get(self.key)
            if not isinstance(value, str):
                raise UserError(
                    f"{self._shown}:{line_number}: field '{self.key}': expected a string, got "
                    f"{'nothing' if value is None else type(value).__name__}"
                )
            self._done.add(value)

    def _cut(self, offset: int, line_number: int, reason: str) -> None:
        """Truncate the file to ``offset`` bytes, dropping the incomplete line ``line_number``."""
        size = self.path.stat().st_size
        logger.warning(
            "%s:%d: last line is incomplete (%s), probably from an interrupted run; removing it (%d bytes)",
            self._shown,
            line_number,
            reason,
            size - offset,
        )
        with open(self.path, "r+b") as f:
            f.truncate(offset)
            f.flush()
            os.fsync(f.fileno())

    @property
    def done_ids(self) -> Set[str]:
        """Keys of the rows already in the file (read-only view; grows with `append`)."""
        return self._done

    def append(self, rows: Iterable[BaseModel | dict[str, Any]]) -> int:
        """Append the rows whose key is not done yet; returns how many were written."""
        if self._file is None:
            raise ValueError(f"{self._shown}: the appender is closed")
        lines: list[str] = []
        new_ids: set[str] = set()
        for row in rows:
            data = row_to_dict(row)
            value = data.get(self.key)
            if not isinstance(value, str):
                raise ValueError(f"row has no string field {self.key!r}: {data!r:.200}")
            if value in self._done or value in new_ids:
                continue
            new_ids.add(value)
            lines.append(json.dumps(data, ensure_ascii=False) + "\n")
        if lines:
            self._file.write("".join(lines))
            self._file.flush()
            os.fsync(self._file.fileno())
        self._done.update(new_ids)
        return len(lines)

    def close(self) -> None:
        """Close the file; safe to call twice."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

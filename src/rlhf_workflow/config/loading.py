"""A config from a YAML file and dotted command-line overrides: the YAML hardened against hostile files,
errors that name the key (with the key the user most likely meant), the names of earlier versions
upgraded, and the resolved config written back (plain, or annotated for --print-config)."""

from __future__ import annotations

import difflib
import json
import logging
import os
import reprlib
import textwrap
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from rlhf_workflow.config.base import Strict, config_reference
from rlhf_workflow.errors import UserError


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.lr=1e-6", "model.lora.r=8"]`` -> nested dict; values are parsed as YAML."""
    tree: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"override '{item}' is not of the form key=value (e.g. train.lr=1e-6)")
        try:
            value = yaml.load(raw, Loader=ConfigLoader) if raw.strip() else ""  # noqa: S506 - a SafeLoader subclass
        except yaml.YAMLError:
            value = raw
        except ValueError as exc:  # e.g. an integer of more digits than Python converts
            raise UserError(f"override '{key}': a value YAML cannot read ({str(exc).split(':')[0][:100]})") from None
        check_yaml_size(value, f"override '{key}'")
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise UserError(f"override '{item}' conflicts with an earlier override of '{part}'")
            node = nxt
        node[parts[-1]] = value
    return tree


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` with ``update`` merged in; nested dicts merge, other values replace."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


MAX_CONFIG_BYTES = 4 * 1024 * 1024  # a recipe is a few KB
MAX_YAML_VALUES = 100_000  # values after aliases are expanded
MAX_YAML_DEPTH = 64


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, first: int, second: int):
        super().__init__(f"key {key!r} is given twice")
        self.key, self.first, self.second = key, first, second


class ConfigLoader(yaml.SafeLoader):
    """YAML's safe loader, but a key given twice in one mapping is an error, not a silent replacement."""


def _mapping_without_duplicates(loader: ConfigLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if key != "<<" and isinstance(key, (str, int, float, bool)) and key in seen:
            raise _DuplicateKey(key, seen[key], line)
        seen.setdefault(key, line)
    return loader.construct_mapping(node, deep=deep)


ConfigLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def check_yaml_size(data: Any, where: str) -> None:
    """Refuse YAML that expands (through aliases) to more than `MAX_YAML_VALUES` values, nests deeper
    than `MAX_YAML_DEPTH`, or contains itself: such a value would hang whatever prints or copies it."""
    counted: dict[int, int] = {}
    open_: set[int] = set()

    def size(value: Any, depth: int) -> int:
        if not isinstance(value, (dict, list)):
            return 1
        if depth > MAX_YAML_DEPTH:
            raise UserError(f"{where}: values nested more than {MAX_YAML_DEPTH} levels deep; a config is far flatter")
        if id(value) in open_:
            raise UserError(f"{where}: a value contains itself (a YAML alias inside its own anchor)")
        if id(value) not in counted:
            open_.add(id(value))
            children = [*value.keys(), *value.values()] if isinstance(value, dict) else value
            total = 1 + sum(size(child, depth + 1) for child in children)
            open_.discard(id(value))
            if total > MAX_YAML_VALUES:
                raise UserError(f"{where}: the YAML expands to more than {MAX_YAML_VALUES:,} values (aliases of aliases?); "
                                "a config is far smaller")
            counted[id(value)] = total
        return counted[id(value)]

    size(data, 0)


def load_yaml_text(text: str, where: str) -> Any:
    """Parse config YAML (`ConfigLoader`, then `check_yaml_size`); errors name ``where`` and the line."""
    try:
        data = yaml.load(text, Loader=ConfigLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as exc:
        raise UserError(f"{where}:{exc.second}: key {exc.key!r} is given twice (lines {exc.first} and {exc.second}); "
                        "YAML would silently keep only the second: keep one") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise UserError(f"{where}{line}: invalid YAML: {problem}") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise UserError(f"{where}: a value YAML cannot read ({str(exc).split(':')[0][:100]})") from None
    check_yaml_size(data, where)
    return data


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise UserError(f"config file {path} is {path.stat().st_size:,} bytes; a config is a few KB "
                        f"(at most {MAX_CONFIG_BYTES:,})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not valid UTF-8 text") from None
    data = load_yaml_text(text, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a mapping of keys, not {type(data).__name__}")
    return data


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 60
_SHORT.maxlong = 40  # a 5,000-digit integer is shown by its first digits


def _dotted_keys(value: Any, prefix: str = "") -> list[str]:
    """The dotted keys of the leaves of a nested mapping as a user types them ({} -> [])."""
    if not isinstance(value, dict):
        return [prefix[:-1]] if prefix else []
    return [key for name, item in value.items() for key in _dotted_keys(item, f"{prefix}{name}.")]


def _close_keys(model: type[BaseModel], typed: str) -> list[str]:
    """The keys of ``model`` a user who typed the unknown ``typed`` most likely meant: the same key where
    this config names a command's section otherwise (`aliases`: a run's `policy` is a command's `model`),
    a close name among its siblings, the keys that end in the same name anywhere (`max_new_tokens`),
    or a close dotted key."""
    keys = [key.key for key in config_reference(model)]
    root, _, rest = typed.partition(".")
    for alias in getattr(model, "aliases", {}).get(root, ()):
        candidate = f"{alias}.{rest}" if rest else alias
        if candidate in keys:
            return [candidate]
    prefix, _, name = typed.rpartition(".")
    siblings = [key.rpartition(".")[2] for key in keys if key.rpartition(".")[0] == prefix]
    close = difflib.get_close_matches(name, siblings, n=1, cutoff=0.6)
    if close:
        return [f"{prefix}.{close[0]}" if prefix else close[0]]
    same_name = [key for key in keys if key.rpartition(".")[2] == name]
    if same_name:
        return same_name[:3]
    return difflib.get_close_matches(typed, keys, n=1, cutoff=0.6)


def format_validation_error(exc: ValidationError, model: type[BaseModel], source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            typed = [f"{key}.{below}" for below in _dotted_keys(err.get("input"))] or [key]
            shown = typed[0] if len(typed) == 1 else key
            close = _close_keys(model, typed[0])
            hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
            lines.append(f"unknown key '{shown}'{hint}")
        elif err["type"] == "value_error" and not loc:
            lines.append(str(err["msg"]).removeprefix("Value error, "))
        else:
            got = err.get("input")
            shown = _SHORT.repr(got) if not isinstance(got, dict) else "a mapping"  # bounded, whatever its size
            if len(shown) > 60:
                shown = shown[:57] + "..."
            lines.append(f"'{key}': {str(err['msg']).removeprefix('Value error, ')} (got {shown})")
    return f"{source}: " + "; ".join(lines)


# values of earlier versions, by the name of their key: (old value -> new value)
RENAMED_VALUES: dict[str, dict[str, str]] = {"precision": {"fp32": "float32", "bf16": "bfloat16"}}
_told: set[str] = set()


def _deprecated(message: str) -> None:
    """One warning line per old name and source, once per process."""
    if message not in _told:
        _told.add(message)
        logging.getLogger(__name__).warning(message)


def upgrade_keys(model: type[BaseModel], data: dict[str, Any], source: str) -> dict[str, Any]:
    """``data`` (a recipe, or a config.yaml of an earlier version) with the keys and values that were
    renamed since given their new names, one warning line for each; a new key given too wins."""
    import copy

    data = copy.deepcopy(data)
    for old, new in getattr(model, "renamed", {}).items():
        *parents, last = old.split(".")
        holder = data
        for part in parents:
            holder = holder.get(part) if isinstance(holder, dict) else None
        if not isinstance(holder, dict) or last not in holder:
            continue
        value = holder.pop(last)
        for key in new:
            *path, name = key.split(".")
            target = data
            for part in path:
                if not isinstance(target.get(part), dict):
                    target[part] = {}
                target = target[part]
            if name not in target:
                target[name] = copy.deepcopy(value)
            elif isinstance(value, dict) and isinstance(target[name], dict):
                target[name] = deep_merge(value, target[name])
        _deprecated(f"{source}: '{old}' is now '{' and '.join(new)}' (the old name still loads)")

    def values(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                renames = RENAMED_VALUES.get(key, {})
                if isinstance(value, str) and value in renames:
                    node[key] = renames[value]
                    _deprecated(f"{source}: {prefix}{key}: '{value}' is now '{renames[value]}' (the old value still loads)")
                else:
                    values(value, f"{prefix}{key}.")

    values(data, "")
    return data


def load_config(
    model: type[Strict], path: str | os.PathLike | None = None, overrides: list[str] | None = None, *,
    unfinished: bool = False,
) -> Strict:
    """Build a validated config of type ``model`` from an optional YAML file and overrides. ``unfinished``:
    only to show it (--print-config), so the inputs it lacks (`Strict.missing`) are not refused."""
    data: dict[str, Any] = read_yaml(path) if path is not None else {}
    over = parse_overrides(overrides or [])
    merged = deep_merge(upgrade_keys(model, data, str(path)), upgrade_keys(model, over, "the command line"))
    source = str(path) if path is not None else "config"
    if over:
        source += " with overrides" if path is not None else " (command-line overrides)"
    try:
        return model.model_validate(merged, context={"unfinished": True} if unfinished else None)
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, model, source)) from None


def config_to_yaml(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def annotated_yaml(config: Strict, width: int = 100) -> str:
    """``config`` as YAML that loads back to the same config, every key once, with what it means, its type
    and its default as a comment above it (a section: its docstring), and each input the config still
    lacks marked ``# REQUIRED``: what --print-config shows."""
    values = config.model_dump(mode="json")
    reference = {key.key: key for key in config_reference(type(config))}
    missing: dict[str, list[str]] = {}
    for key, why in config.missing():
        missing.setdefault(key, []).append(why)
    lines: list[str] = []

    def comment(text: str, indent: str) -> None:
        lines.extend(f"{indent}# {line}" for line in textwrap.wrap(text, max(40, width - len(indent) - 2)))

    def emit(model: BaseModel, data: dict[str, Any], indent: str, prefix: str) -> None:
        for name in type(model).model_fields:
            key, value = prefix + name, getattr(model, name)
            about = reference[key]
            for why in missing.get(key, []):
                comment(f"REQUIRED: {why}", indent)
            if isinstance(value, BaseModel):
                if about.description:
                    comment(about.description, indent)
                lines.append(f"{indent}{name}:")
                emit(value, data[name], indent + "  ", key + ".")
                continue
            if about.type.startswith("section"):  # a section left out (null)
                comment(f"{about.description} [a section; default null]", indent)
            else:
                default = json.dumps(about.default, ensure_ascii=False)
                comment(f"{about.description} [{about.type}; default {default}]".lstrip(), indent)
            text = yaml.safe_dump({name: data[name]}, sort_keys=False, width=10**6, allow_unicode=True)
            lines.extend(indent + line for line in text.rstrip("\n").split("\n"))

    emit(config, values, "", "")
    return "\n".join(lines) + "\n"


def save_config(config: BaseModel, path: str | os.PathLike) -> None:
    """Write the resolved config (every default filled in) atomically."""
    from rlhf_workflow.data.io import atomic_write_text

    atomic_write_text(path, config_to_yaml(config))

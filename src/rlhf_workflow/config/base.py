"""The base of every config section (`Strict`), the settings declared once for all commands, and the walk
of a config's keys (`config_reference`) that the documentation's reference and --print-config share."""

from __future__ import annotations

import os
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, model_validator


def _unfinished(info: ValidationInfo) -> bool:
    """Whether this validation builds a config only to show it (--print-config): the inputs it still lacks
    are then marked in what is printed instead of refused."""
    return bool(info.context and info.context.get("unfinished"))


class Strict(BaseModel):
    """Base for every config section: unknown keys are errors, defaults are validated, and the
    fields named in ``required`` (a command's files) must be given; their descriptions say what they are.

    A command's config names the keys of its inputs (``input_keys``: files, model directories,
    'file.py:name' functions) and of its outputs (``output_keys``: a file, or a directory when the
    key ends in ``output_dir``); an output that would overwrite an input is refused
    (`data.outputs.path_conflicts`)."""

    # inf and nan are refused for every number (an lr or a penalty coefficient of inf is never meant)
    model_config = ConfigDict(extra="forbid", validate_default=True, validate_assignment=True, allow_inf_nan=False)
    required: ClassVar[tuple[str, ...]] = ()
    renamed: ClassVar[dict[str, tuple[str, ...]]] = {}  # old dotted key -> its new key(s)
    input_keys: ClassVar[tuple[str, ...]] = ()
    output_keys: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="after")
    def _required_given(self, info: ValidationInfo) -> "Strict":
        if not _unfinished(info):
            missing = self.missing()
            if missing:
                raise ValueError("; ".join(why for _, why in missing))
        return self

    def missing(self) -> list[tuple[str, str]]:
        """Every input this config needs and was not given, as (dotted key, the sentence that says so),
        all at once: a command refuses with all of them, and --print-config marks them."""
        fields = type(self).model_fields
        return [(name, f"{name} is required: {fields[name].description}")
                for name in self.required if not getattr(self, name)]

    @model_validator(mode="after")
    def _outputs_are_not_inputs(self, info: ValidationInfo) -> "Strict":
        if self.output_keys and not _unfinished(info):
            from rlhf_workflow.data.outputs import path_conflicts, unwritable

            outputs = {key: str(self.output_at(key) or "") for key in self.output_keys}
            found = unwritable(outputs) or path_conflicts({key: self.paths_at(key) for key in self.input_keys}, outputs)
            if found:
                raise ValueError("; ".join(found))
        return self

    def value_at(self, key: str) -> Any:
        """The value of a dotted key (None where a section on the way is None)."""
        value: Any = self
        for part in key.split("."):
            value = getattr(value, part, None)
        return value

    def output_at(self, key: str) -> Any:
        """The path an output key writes (a command may fill in a default)."""
        return self.value_at(key)

    def paths_at(self, key: str) -> list[str]:
        """The paths a dotted key names: a string, a list of strings, or a 'path/file.py:name' function."""
        value = self.value_at(key)
        values = value if isinstance(value, list) else [value]
        paths = []
        for item in values:
            if isinstance(item, str) and item:
                location, colon, name = item.rpartition(":")
                paths.append(location if colon and location.endswith(".py") else item)
        return paths


# --------------------------------------------------------------------------- settings declared once

Dtype = Literal["float32", "bfloat16", "float16"]
Backend = Literal["hf", "vllm", "openai"]
TaskName = Literal["ifeval", "instructions", "arithmetic"]
PairStrategy = Literal["max_min", "max_random", "random", "max_max", "all"]
ApplyChatTemplate = Annotated[bool, Field(
    description="render prompts with the tokenizer's chat template (off: plain text + eos)")]
SequenceLength = Annotated[int, Field(gt=0, description="tokens per sequence: a longer prompt is cut from the left, "
                                      "a longer response is dropped")]
OutputDir = Annotated[str, Field(description="the command's output directory: model/, metrics.jsonl, config.yaml, checkpoints/")]
GroupByPrompt = Annotated[bool, Field(
    description="train on all pairs of a prompt as one example (InstructGPT's K-wise comparisons): the prompt and "
    "each distinct response are computed once, however many pairs they are in; per_device_batch_size then counts "
    "prompts. For pairs made with `pairs strategy=all`")]


def source_identity(name_or_path: str | None) -> str | None:
    """A model or file source as it identifies what it holds: an existing path made absolute (so a
    rerun from another directory or through a link names the same thing), any other name as given."""
    if name_or_path and os.path.exists(os.path.expanduser(name_or_path)):
        return os.path.realpath(os.path.expanduser(name_or_path))
    return name_or_path


class ConfigKey(BaseModel):
    """One key of a config as the reference lists it: the dotted name a user types, its type, its default
    (as YAML writes it; None where it must be given) and what it means."""

    key: str
    type: str
    default: Any = None
    required: bool = False
    description: str = ""


def _type_name(annotation: Any) -> str:
    """A field's type as a reader writes it: `int`, `str | None`, `'hf' | 'vllm'`, `list[str]`."""
    import typing

    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Annotated:
        return _type_name(args[0])
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join(_type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def _section_class(annotation: Any) -> type[BaseModel] | None:
    """The config section a field holds (also through ``X | None``), or None for a plain value."""
    import typing

    candidates = [annotation, *typing.get_args(annotation)]
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def config_reference(model: type[BaseModel]) -> list[ConfigKey]:
    """Every key of the config ``model``, sections walked depth first in declaration order, with its
    type, default and description: the one source of the documentation's config reference."""
    keys: list[ConfigKey] = []
    required = set(getattr(model, "required", ()))

    def walk(section: type[BaseModel], default: BaseModel | None, prefix: str) -> None:
        for name, field in section.model_fields.items():
            key = prefix + name
            value = getattr(default, name, None) if default is not None else field.get_default(call_default_factory=True)
            sub = _section_class(field.annotation)
            about = field.description or ""
            if sub is not None and (value is None or isinstance(value, BaseModel)):
                doc = (sub.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
                keys.append(ConfigKey(key=key, type="section" + (" | None" if value is None else ""),
                                      default=None if value is None else "", description=about or doc))
                walk(sub, value if isinstance(value, BaseModel) else None, key + ".")
                continue
            shown = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
            keys.append(ConfigKey(key=key, type=_type_name(field.annotation), default=shown,
                                  required=not prefix and name in required, description=about))

    walk(model, None, "")
    return keys

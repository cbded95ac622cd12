"""The config reference and the CLI reference of the documentation, generated from the code.

    python scripts/docs_reference.py          # writes docs/reference/config.md and cli.md
    python scripts/docs_reference.py --check  # exit 1 when either differs from what the code makes

The config reference lists every key of every command's typed config (`config.config_reference`,
the walk `--print-config` also follows); the CLI reference is each subcommand's `--help`, from the
parser `rlhf-workflow` runs. Neither is written by hand. The pages are committed so that they read on
the forge too; `mkdocs build` (this file is its hook, in mkdocs.yml) and `tests/test_docs.py` fail
when they are stale."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"
CONFIG_PAGE = "reference/config.md"
CLI_PAGE = "reference/cli.md"


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _default(key) -> str:
    if key.type.startswith("section"):
        return "" if key.default is not None else "none"
    if key.required:
        return "**required**"
    if key.default is None:
        return "null"
    if key.default == "":
        return '""'
    return _cell(key.default if isinstance(key.default, str) else json.dumps(key.default, ensure_ascii=False))


def config_markdown() -> str:
    from rlhf_workflow.config import COMMAND_CONFIGS, config_reference

    lines = [
        "# Config reference",
        "",
        "Every key of every command, generated from the typed configs by `scripts/docs_reference.py` "
        "(the same walk as `--print-config`; the docs build fails when this page differs from the code). Give a key in the YAML file of `--config` or as a dotted "
        "`key=value` after the command, e.g. `rlhf-workflow dpo train.lr=5e-7 model.lora.r=16`. "
        "A **section** groups the keys below it.",
        "",
    ]
    for command, model in COMMAND_CONFIGS.items():
        doc = (model.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
        lines += [f"## `{command}`", "", doc, "", "| key | type | default | what it means |", "| --- | --- | --- | --- |"]
        for key in config_reference(model):
            name = f"**`{key.key}`**" if key.type.startswith("section") else f"`{key.key}`"
            lines.append(f"| {name} | {_cell(key.type)} | {_default(key)} | {_cell(key.description)} |")
        lines.append("")
    return "\n".join(lines)


def cli_markdown() -> str:
    from rlhf_workflow.cli import build_parser, command_parsers

    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal's width: the same page on every machine
    lines = [
        "# CLI reference",
        "",
        "Each command's `--help`, generated from the parser `rlhf-workflow` runs by `scripts/docs_reference.py`. "
        "Every key a command takes is in the [config reference](config.md).",
        "",
        "```text",
        build_parser().format_help().rstrip(),
        "```",
        "",
    ]
    for name, parser in command_parsers().items():
        lines += [f"## `rlhf-workflow {name}`", "", "```text", parser.format_help().rstrip(), "```", ""]
    return "\n".join(lines)


def pages() -> dict[str, str]:
    """The generated pages by their path under docs/."""
    return {CONFIG_PAGE: config_markdown(), CLI_PAGE: cli_markdown()}


def stale() -> list[str]:
    """The generated pages whose file under docs/ differs from what the code makes now."""
    return [path for path, text in pages().items()
            if not (DOCS / path).is_file() or (DOCS / path).read_text(encoding="utf-8") != text]


def on_pre_build(config) -> None:  # the mkdocs hook
    found = stale()
    if found:
        from mkdocs.exceptions import PluginError

        raise PluginError(f"generated from the code, but stale: {', '.join('docs/' + p for p in found)}; run python scripts/docs_reference.py")


def main(argv: list[str]) -> int:
    if "--check" in argv:
        found = stale()
        for path in found:
            print(f"docs/{path} is stale: run python scripts/docs_reference.py", file=sys.stderr)
        return 1 if found else 0
    for path, text in pages().items():
        (DOCS / path).parent.mkdir(parents=True, exist_ok=True)
        (DOCS / path).write_text(text, encoding="utf-8")
        print(f"wrote docs/{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

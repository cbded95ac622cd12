"""The model card (``README.md``) that every model a training command saves carries, in the Hub's convention.

YAML front matter written by huggingface_hub's `ModelCardData`:

* ``base_model``: the Hub id the model descends from: the source itself when it is a Hub id, the
  Hub id a built-in model was converted from, or the ``base_model`` of a local source's own card (so
  π_2's card names the model π0 came from, through π1's); left out when no Hub id is known;
* ``license``: the base's, when its card (or the built-in table) says;
* ``library_name: transformers``, ``pipeline_tag``, ``tags`` (``rlhf-workflow`` and the command);
* ``datasets``: the inputs that are Hub dataset names.

Then, in prose and tables: which command produced it from which source, the data (files and row
counts), every hyperparameter of the command's config, the last training and held-out metrics of
``metrics.jsonl``, the reference model (DPO), and how to load it with plain transformers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from rlhf_workflow.data.io import jsonl_lines

# Built-in models: the Hub id they were converted from and its license.
BUILTIN_ORIGINS = {"smollm2-135m-instruct": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")}

COMMANDS = {  # command -> (what it is, tags, pipeline tag, transformers class)
    "sft": ("a policy fine-tuned on conversations (supervised fine-tuning)", ["sft"], "text-generation",
            "AutoModelForCausalLM"),
    "train-rm": ("a Bradley–Terry reward model (a scalar head on the last token)", ["reward-model"],
                 "text-classification", "AutoModelForSequenceClassification"),
    "train-pm": ("a pairwise preference model (it answers \"A\" or \"B\")", ["preference-model"],
                 "text-generation", "AutoModelForCausalLM"),
    "dpo": ("a policy trained by direct preference optimisation (DPO)", ["dpo"], "text-generation",
            "AutoModelForCausalLM"),
}
_HUB_DATASET = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)*$")


def origin(name_or_path: str) -> tuple[str | None, str | None]:
    """``(Hub id, license)`` of the model a source descends from; None where not known."""
    from rlhf_workflow.models.loading import resolve_source

    if name_or_path in BUILTIN_ORIGINS:
        return BUILTIN_ORIGINS[name_or_path]
    try:
        source = resolve_source(name_or_path)
    except Exception:  # a source that no longer resolves: the card just names it
        return None, None
    if source.kind == "hub":
        return name_or_path, None
    if source.kind == "dir":
        metadata = read_front_matter(Path(source.location) / "README.md")
        base = metadata.get("base_model")
        return (base if isinstance(base, str) else None), metadata.get("license")
    return None, None


def read_front_matter(path: Path) -> dict[str, Any]:
    """The YAML metadata at the top of a model card (huggingface_hub's `metadata_load`); empty when
    there is none or it does not parse."""
    from huggingface_hub.repocard import metadata_load

    try:
        return metadata_load(path) or {}
    except (OSError, ValueError, yaml.YAMLError):
        return {}


def _last_rows(metrics_file: Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    train = held_out = None
    try:
        lines = jsonl_lines(metrics_file)
    except OSError:
        return None, None
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            if row.get("split") == "eval":
                held_out = row
            elif row.get("split") == "train":
                train = row
    return train, held_out


def _metrics_table(row: dict[str, Any]) -> list[str]:
    skip = {"split", "lr", "epoch", "tokens", "tokens_per_s", "elapsed_s", "grad_norm"}
    lines = ["| metric | value |", "| --- | --- |"]
    for key, value in row.items():
        if key not in skip and isinstance(value, (int, float)):
            lines.append(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |")
    return lines


def model_card(config: Any, command: str, rows: dict[str, int], metrics_file: Path) -> str:
    """The card's text for a model saved by ``command`` with ``config`` (a training command config);
    ``rows`` counts the rows read per data file role ("train", "eval")."""
    from huggingface_hub import ModelCardData

    what, tags, pipeline, auto_class = COMMANDS[command]
    source = config.model.name_or_path
    base, license_ = origin(source)
    inputs = {"train": config.data.train, "eval": config.data.eval}
    datasets = sorted({p for p in inputs.values() if p and not Path(p).exists() and _HUB_DATASET.match(p)})
    metadata = ModelCardData(base_model=base, license=license_, library_name="transformers", pipeline_tag=pipeline,
                             tags=["rlhf-workflow", *tags], datasets=[d.split(":")[0] for d in datasets] or None)
    lines = ["---", metadata.to_yaml(), "---", "", f"# {Path(config.output_dir).name}", "",
             f"This is {what}, trained by rlhf-workflow "
             f"(command `{command}`) from `{source}`" + (f" (which descends from `{base}`)." if base and base != source else "."),
             "", "## Data", "", "| role | file | rows |", "| --- | --- | --- |"]
    for role, path in inputs.items():
        if path:
            lines.append(f"| {role} | `{path}` | {rows.get(role, '–')} |")
    if command == "dpo":
        reference = config.reference.name_or_path or source
        how = ("precomputed once over the pairs" if config.reference.precompute else "computed at every step")
        lines += ["", "## Reference model", "",
                  f"π_ref = `{reference}`; its log-probabilities were {how}. Loss: `{config.loss.type}`, "
                  f"β = {config.loss.beta}."]
    train_row, eval_row = _last_rows(metrics_file)
    if train_row or eval_row:
        lines += ["", "## Metrics", ""]
        if train_row:
            lines += [f"Last training log (step {train_row.get('step')}):", ""] + _metrics_table(train_row) + [""]
        if eval_row:
            lines += [f"Held-out data (step {eval_row.get('step')}):", ""] + _metrics_table(eval_row) + [""]
    settings = config.model_dump(mode="json", exclude={"output_dir"})
    lines += ["", "## Hyperparameters", "", "The command's whole resolved config (also in `../config.yaml`):", "",
              "```yaml", yaml.safe_dump(settings, sort_keys=False).rstrip(), "```", "",
              "## How to load it", "", "```python",
              f"from transformers import AutoTokenizer, {auto_class}", "",
              f'model = {auto_class}.from_pretrained("PATH/TO/THIS/DIRECTORY")',
              'tokenizer = AutoTokenizer.from_pretrained("PATH/TO/THIS/DIRECTORY")', "```", ""]
    if command == "train-rm":
        lines += ["The reward of a conversation is the single logit, read at its last token: "
                  "`model(**tokenizer.apply_chat_template(messages, return_dict=True, return_tensors=\"pt\")).logits[0, 0]`.",
                  ""]
    if command == "train-pm":
        lines += ["It reads a comparison in the format saved in `preference_model.json` and answers with "
                  "the token \"A\" or \"B\"; rlhf-workflow's `eval-rm` and `judge.type: preference_model` use it "
                  "that way, in both orders.", ""]
    return "\n".join(lines)


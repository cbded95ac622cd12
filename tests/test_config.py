"""Typed configs: YAML + dotted overrides, errors that name the key, resolved config saved."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rlhf_workflow.config import SFTConfig, load_config, parse_overrides, save_config
from rlhf_workflow.errors import UserError


def _yaml(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_merge(tmp_path):
    path = _yaml(tmp_path, "data: {train: a.jsonl}\ntrain: {lr: 1.0e-5, epochs: 3}\n")
    cfg = load_config(SFTConfig, path, ["train.lr=2e-6", "model.lora.r=8", "train.report_to=[tensorboard]"])
    assert cfg.train.lr == 2e-6
    assert cfg.train.epochs == 3  # from the file
    assert cfg.model.lora.r == 8
    assert cfg.train.report_to == ["tensorboard"]
    assert cfg.data.train == "a.jsonl"


def test_overrides_alone(tmp_path):
    cfg = load_config(SFTConfig, None, ["data.train=x.jsonl", "output_dir=out"])
    assert cfg.output_dir == "out" and cfg.data.train == "x.jsonl"


def test_unknown_key_names_it_with_a_close_match(tmp_path):
    with pytest.raises(UserError) as err:
        load_config(SFTConfig, None, ["data.train=x.jsonl", "train.lrr=1e-5"])
    assert "unknown key 'train.lrr'" in str(err.value)
    assert "did you mean 'train.lr'" in str(err.value)


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    path = _yaml(tmp_path, "data: {train: a.jsonl}\nmodel: {name_or_pth: foo}\n")
    with pytest.raises(UserError) as err:
        load_config(SFTConfig, path)
    assert str(path) in str(err.value)
    assert "model.name_or_pth" in str(err.value) and "model.name_or_path" in str(err.value)


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.lr=fast", "train.lr"),
        ("train.per_device_batch_size=-4", "train.per_device_batch_size"),
        ("train.epochs=1.5", "train.epochs"),
        ("train.scheduler=exponential", "train.scheduler"),
        ("model.dtype=int8", "model.dtype"),
        ("train.report_to=tensorboard", "train.report_to"),
    ],
)
def test_wrong_values_name_the_key(override, key):
    with pytest.raises(UserError) as err:
        load_config(SFTConfig, None, ["data.train=x.jsonl", override])
    assert f"'{key}'" in str(err.value)


def test_missing_required_data():
    with pytest.raises(UserError, match="data.train is required"):
        load_config(SFTConfig, None, [])


def test_bad_yaml_names_file_and_line(tmp_path):
    path = _yaml(tmp_path, "data:\n  train: a.jsonl\n train: [\n")
    with pytest.raises(UserError) as err:
        load_config(SFTConfig, path)
    assert f"{path}:" in str(err.value) and "invalid YAML" in str(err.value)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(SFTConfig, tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="must be a mapping"):
        load_config(SFTConfig, _yaml(tmp_path, "- a\n- b\n"))


def test_bad_override_syntax():
    with pytest.raises(UserError, match="key=value"):
        parse_overrides(["train.lr"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(SFTConfig, None, ["data.train=x.jsonl", "train.lr=3e-6"])
    save_config(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["train"]["lr"] == 3e-6
    assert saved["train"]["warmup_ratio"] == 0.0  # defaults are written out too
    assert load_config(SFTConfig, tmp_path / "config.yaml") == cfg


# Every stage's config with its required fields: what --print-config is asked for.
REQUIRED = {
    "sft": ["data.train=x.jsonl"], "train-rm": ["data.train=x.jsonl"], "train-pm": ["data.train=x.jsonl"],
    "dpo": ["data.train=x.jsonl"], "eval-rm": ["model=m", "data=d.jsonl"],
    "generate": ["prompts=p.jsonl", "output=o.jsonl"], "annotate": ["input=g.jsonl", "output=o.jsonl", "judge.path=rm"],
    "pairs": ["input=s.jsonl", "output=o.jsonl"], "prompts": ["output=o.jsonl"],
    "run": ["prompts.task=instructions", "prompts.per_iteration=4", "judge.path=rm", "pairs.strategy=max_random"],
}


def _key_paths(text: str) -> list[str]:
    """The dotted path of every key line of the YAML text, from its indentation (config keys only)."""
    paths, stack = [], []  # stack: (indent, key)
    for line in text.splitlines():
        stripped = line.lstrip()
        if stripped.startswith(("#", "- ")) or ":" not in stripped:
            continue
        indent = len(line) - len(stripped)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = stripped.split(":")[0]
        stack.append((indent, key))
        paths.append(".".join(k for _, k in stack))
    return paths


def _dotted(data: dict, model, prefix: str = "") -> list[str]:
    """The dotted path of every field of the config (sections and their keys; dict values are leaves)."""
    from pydantic import BaseModel

    out = []
    for name in type(model).model_fields:
        out.append(prefix + name)
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            out += _dotted(data[name], value, prefix + name + ".")
        elif isinstance(value, dict):
            out += [f"{prefix}{name}.{key}" for key in value]  # e.g. task_options: its keys are lines too
    return out


@pytest.mark.parametrize("stage", sorted(REQUIRED))
def test_print_config_loads_back_to_the_same_config_with_every_key_once_and_explained(stage, tmp_path):
    from rlhf_workflow.config import COMMAND_CONFIGS, annotated_yaml, config_to_yaml

    config = load_config(COMMAND_CONFIGS[stage], None, REQUIRED[stage])
    text = annotated_yaml(config)
    again = load_config(COMMAND_CONFIGS[stage], _yaml(tmp_path, text))
    assert again == config
    assert yaml.safe_load(text) == yaml.safe_load(config_to_yaml(config))  # the same keys and values
    assert sorted(_key_paths(text)) == sorted(_dotted(yaml.safe_load(config_to_yaml(config)), config))  # each once
    comments = [line for line in text.splitlines() if line.lstrip().startswith("#")]
    assert comments  # the descriptions are shown


def test_print_config_puts_each_description_above_its_key():
    from rlhf_workflow.config import RunConfig, annotated_yaml

    lines = annotated_yaml(load_config(RunConfig, None, REQUIRED["run"])).splitlines()
    beta = next(i for i, line in enumerate(lines) if line.strip().startswith("beta:"))
    assert lines[beta - 1].strip() == "# KL strength β (IPO's τ) [float; default 0.1]"  # what, type, default
    assert lines[beta].startswith("    beta:")  # dpo.loss.beta, two levels deep
    sampling = next(i for i, line in enumerate(lines) if line.startswith("  sampling:"))
    assert lines[sampling - 1].strip().startswith("# How responses are sampled")  # a section's docstring


def test_a_run_section_becomes_its_stage_config_with_the_paths_filled_in():
    """One definition per setting: a run's generation, pairs and DPO sections are the stage configs'
    options, and `command_config` makes the stage's config from them without copying by hand."""
    from rlhf_workflow.config import DPOConfig, GenerateConfig, PairsConfig, RunConfig, command_config

    run = load_config(RunConfig, None, REQUIRED["run"] + [
        "generation.sampling.n=7", "generation.hf.batch_size=3", "generation.backend=openai",
        "generation.openai.concurrency=5", "pairs.min_margin=0.5", "dpo.loss.beta=0.3", "dpo.logprob_chunk=64"])
    generate = command_config(GenerateConfig, run.generation, prompts="p.jsonl", output="o.jsonl", model=run.policy)
    assert (generate.sampling.n, generate.hf.batch_size, generate.backend, generate.openai.concurrency) == (7, 3, "openai", 5)
    pairs = command_config(PairsConfig, run.pairs, input="s.jsonl", output="p.jsonl")
    assert (pairs.strategy, pairs.min_margin) == ("max_random", 0.5)
    dpo = command_config(DPOConfig, run.dpo, data={"train": "p.jsonl", "max_length": run.dpo.data.max_length},
                       train=run.dpo.train)
    assert (dpo.loss.beta, dpo.logprob_chunk, dpo.train.lr) == (0.3, 64, run.dpo.train.lr)
    with pytest.raises(TypeError, match="not built on"):  # only what the two are built on is copied
        command_config(DPOConfig, run.generation, data={"train": "p.jsonl"})
    # a setting given for the call wins over the section's
    assert command_config(GenerateConfig, run.generation, prompts="p", output="o", sampling={"n": 2}).sampling.n == 2


ROOT = Path(__file__).resolve().parents[1]
CONFIG_STAGES = {"quickstart-sft.yaml": "sft", "rm-smollm2-facts.yaml": "train-rm", "pm-smollm2-facts.yaml": "train-pm",
                 "dpo-smollm2-facts.yaml": "dpo", "demo.yaml": "run", "demo-full.yaml": "run",
                 "paper-llama3-8b.yaml": "run", "own-data-tiny.yaml": "run"}
# what a shipped recipe leaves to the user (its comments say so), given as its command lines give it
CONFIG_REQUIRES = {"own-data-tiny.yaml": ["judge.path=runs/my-rm/model"]}


def test_every_shipped_config_loads():
    from rlhf_workflow.config import COMMAND_CONFIGS

    shipped = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
    assert shipped == sorted(CONFIG_STAGES), "a new config in configs/: name its stage here"
    for name, stage in CONFIG_STAGES.items():
        load_config(COMMAND_CONFIGS[stage], ROOT / "configs" / name, CONFIG_REQUIRES.get(name, []))


def readme_commands() -> list[list[str]]:
    """Every `rlhf-workflow STAGE ...` command line of the README and the documentation pages written by
    hand whose config files exist here."""
    import re
    import shlex

    from rlhf_workflow.config import COMMAND_CONFIGS

    pages = [ROOT / "README.md", *(p for p in sorted((ROOT / "docs").rglob("*.md")) if p.parent.name != "reference")]
    text = "\n".join(page.read_text(encoding="utf-8") for page in pages)
    lines = re.findall(r"`(rlhf-workflow [^`]+)`", text)  # inline code
    lines += [line.strip() for block in re.findall(r"```[^\n]*\n(.*?)```", text, re.S) for line in block.splitlines()]
    commands = []
    for line in lines:
        if not line.startswith("rlhf-workflow "):
            continue
        words = shlex.split(line.split("  #")[0])[1:]
        if len(words) < 2 or words[0] not in COMMAND_CONFIGS or "--print-config" in words:  # a bare name is no recipe
            continue
        files = [w for w in words[1:] if w.endswith((".yaml", ".yml"))]
        if all((ROOT / f).is_file() for f in files):
            commands.append([w for w in words if w != "--resume"])
    return commands


def test_every_readme_command_line_loads_its_config(capsys, monkeypatch):
    from rlhf_workflow.cli import main

    monkeypatch.chdir(ROOT)
    commands = readme_commands()
    assert len(commands) >= 10
    for words in commands:
        assert main(words + ["--print-config"]) == 0, (words, capsys.readouterr().err)

"""Typed configs: one pydantic model per command, built from YAML files and dotted command-line overrides.

    defaults  <-  YAML file (optional)  <-  overrides such as ``train.lr=1e-6``

validated once (`loading.load_config`). Unknown keys and values of the wrong type are `UserError`s
that name the key (with the key the user most likely meant) and the file they came from; the
resolved config is written next to a command's outputs as ``config.yaml``.

    base.py        `Strict`, the base of every section; settings declared once; `config_reference`
    loading.py     YAML (hardened), overrides, error messages, old names upgraded, --print-config
    model.py       the model a command loads (a run's `policy`)
    training.py    sft, train-rm, train-pm, dpo, and the options each shares with a run's sections
    generation.py  generate: sampling and the hf / vllm / openai backends
    judging.py     annotate's judge, pairs' strategy, eval-rm
    prompts.py     prompts: a built-in task's prompts
    run.py         run: the loop's recipe, whose sections are the commands' own settings

This module names every command's config (`COMMAND_CONFIGS`) and re-exports what the rest of the
package imports.
"""

from __future__ import annotations

from typing import Any, TypeVar

from rlhf_workflow.config.base import (ApplyChatTemplate, Backend, ConfigKey, Dtype, GroupByPrompt, OutputDir,
                                       PairStrategy, SequenceLength, Strict, TaskName, config_reference,
                                       source_identity)
from rlhf_workflow.config.generation import (GenerateConfig, GenerationOptions, HFBackendConfig, OpenAIBackendConfig,
                                             SamplingConfig, VLLMBackendConfig)
from rlhf_workflow.config.judging import (AnnotateConfig, EvalRMConfig, JudgeConfig, LengthPenaltyConfig, PairOptions,
                                          PairsConfig)
from rlhf_workflow.config.loading import (MAX_CONFIG_BYTES, MAX_YAML_DEPTH, MAX_YAML_VALUES, ConfigLoader,
                                          annotated_yaml, check_yaml_size, config_to_yaml, deep_merge,
                                          format_validation_error, load_config, load_yaml_text, parse_overrides,
                                          read_yaml, save_config, upgrade_keys)
from rlhf_workflow.config.model import LoraConfig, ModelConfig
from rlhf_workflow.config.prompts import MakePromptsConfig
from rlhf_workflow.config.run import (FeedbackConfig, FeedbackPreferenceModel, FeedbackRewardModel, OfflineConfig,
                                      RunConfig, RunDPOConfig, RunEvalConfig, RunGenerationConfig, RunPromptsConfig)
from rlhf_workflow.config.training import (DataConfig, DataOptions, DPOConfig, DPOLossConfig, DPOOptions,
                                           PreferenceFormatConfig, PreferenceModelConfig, PreferenceModelOptions,
                                           ReferenceConfig, ReferenceOptions, RewardLossConfig, RewardModelConfig,
                                           RewardModelOptions, SFTConfig, TrainConfig, TrainingCommandConfig)

COMMAND_CONFIGS: dict[str, type[Strict]] = {
    "sft": SFTConfig,
    "train-rm": RewardModelConfig,
    "train-pm": PreferenceModelConfig,
    "eval-rm": EvalRMConfig,
    "dpo": DPOConfig,
    "generate": GenerateConfig,
    "annotate": AnnotateConfig,
    "pairs": PairsConfig,
    "run": RunConfig,
    "prompts": MakePromptsConfig,
}


def command_name(config: Strict) -> str:
    """The command of a config: `SFTConfig` -> "sft" (a subclass counts as its command)."""
    for name, model in COMMAND_CONFIGS.items():
        if type(config) is model:
            return name
    for name, model in COMMAND_CONFIGS.items():
        if isinstance(config, model):
            return name
    raise ValueError(f"{type(config).__name__} is not a command's config")


CommandT = TypeVar("CommandT", bound=Strict)


def command_config(command: type[CommandT], options: Strict, **fields: Any) -> CommandT:
    """The config of ``command`` (e.g. `GenerateConfig`) that a run recipe's section ``options`` (e.g.
    `RunGenerationConfig`) describes. Both are built on one options class (`GenerationOptions`): its
    settings come from ``options``, and ``fields`` fill in the rest (paths, the model) or override one
    of them for this call."""
    common = next(base for base in type(options).__mro__ if issubclass(command, base))
    if common is Strict:
        raise TypeError(f"{command.__name__} is not built on the options of {type(options).__name__}")
    shared = {name: getattr(options, name) for name in common.model_fields}
    return command(**(shared | fields))


__all__ = [
    "MAX_CONFIG_BYTES", "MAX_YAML_DEPTH", "MAX_YAML_VALUES", "COMMAND_CONFIGS", "AnnotateConfig", "annotated_yaml",
    "ApplyChatTemplate", "Backend", "check_yaml_size", "config_reference", "config_to_yaml", "ConfigKey",
    "ConfigLoader", "DataConfig", "DataOptions", "deep_merge", "DPOConfig", "DPOLossConfig", "DPOOptions", "Dtype",
    "EvalRMConfig", "FeedbackConfig", "FeedbackPreferenceModel", "FeedbackRewardModel", "format_validation_error",
    "GenerateConfig", "GenerationOptions", "GroupByPrompt", "HFBackendConfig", "JudgeConfig", "LengthPenaltyConfig",
    "load_config", "load_yaml_text", "LoraConfig", "MakePromptsConfig", "ModelConfig", "OfflineConfig",
    "OpenAIBackendConfig", "OutputDir", "PairOptions", "PairsConfig", "PairStrategy", "parse_overrides",
    "PreferenceFormatConfig", "PreferenceModelConfig", "PreferenceModelOptions", "read_yaml", "ReferenceConfig",
    "ReferenceOptions", "RewardLossConfig", "RewardModelConfig", "RewardModelOptions", "RunConfig", "RunDPOConfig",
    "RunEvalConfig", "RunGenerationConfig", "RunPromptsConfig", "SamplingConfig", "save_config", "SequenceLength",
    "SFTConfig", "source_identity", "command_config", "command_name", "Strict", "TaskName", "TrainConfig",
    "TrainingCommandConfig", "upgrade_keys", "VLLMBackendConfig",
]

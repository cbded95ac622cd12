"""`rlhf-workflow prompts`: a built-in task's prompts of one split."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from rlhf_workflow.config.base import Strict, TaskName


class MakePromptsConfig(Strict):
    """`rlhf-workflow prompts`: a built-in task's prompts of one split."""

    required = ("output",)
    output_keys = ("output",)

    task: TaskName = Field("instructions", description="the built-in task")
    split: Literal["train", "dev", "eval"] = Field(
        "train", description="the split; assigned by a hash of the prompt, so splits never share one")
    count: int = Field(256, ge=1, description="prompts to write")
    seed: int = Field(0, description="seeds which prompts the task makes")
    options: dict[str, Any] = Field(default_factory=dict, description="task options, e.g. ifeval / instructions: "
                                    "{max_instructions: 1, types: [punctuation:no_comma]}; arithmetic: "
                                    "{digits: 2, operations: '+-'}")
    output: str = Field("", description="the prompts file to write (JSON Lines)")

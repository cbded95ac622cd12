"""What judges responses and models: `annotate`'s judge and length penalty, `pairs`' strategy, `eval-rm`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from rlhf_workflow.config.base import ApplyChatTemplate, Dtype, PairStrategy, SequenceLength, Strict, source_identity


class EvalRMConfig(Strict):
    """`rlhf-workflow eval-rm`: accuracy of a reward or preference model on held-out pairs."""

    required = ("model", "data")
    input_keys = ("model", "data")
    output_keys = ("output",)

    model: str = Field("", description="directory of a model saved by train-rm or train-pm")
    data: str = Field("", description="pairs (prompt, chosen, rejected; `subset` for RewardBench files), or a "
                      "RewardBench 2, RM-Bench or JudgeBench file")
    output: str | None = Field(None, description="JSON results file (default: next to the data, *.eval.json)")
    kind: Literal["auto", "rm", "pm"] = Field("auto", description="reward model or preference model; auto: read "
                                              "from the directory")
    format: Literal["auto", "pairs", "rewardbench2", "rmbench", "judgebench"] = Field(
        "auto", description="the data file's format; auto: from the first row's fields")
    ranking: Literal["borda", "copeland", "knockout"] = Field(
        "borda", description="how a preference model finds the best of n (RewardBench 2): round robin with "
        "Borda or Copeland scores, or a knockout")
    batch_size: int = Field(8, ge=1, description="sequences per forward pass")
    max_length: SequenceLength = 1024
    dtype: Dtype = Field("float32", description="the dtype the model scores in")
    apply_chat_template: ApplyChatTemplate = True

    @property
    def results_path(self) -> str:
        """Where the results go: ``output``, or next to the data as ``*.eval.json`` (for a Hub dataset
        name, ``owner__name-split.eval.json`` in the working directory)."""
        from rlhf_workflow.data.io import hub_dataset

        if self.output or not self.data:
            return self.output or ""
        if hub_dataset(self.data) is not None:
            return re.sub(r"[/:]+", "-", self.data.replace("/", "__", 1)) + ".eval.json"
        return str(Path(self.data).with_suffix(".eval.json"))

    def output_at(self, key: str) -> Any:
        return self.results_path if key == "output" else super().output_at(key)


class JudgeConfig(Strict):
    """Who scores the responses: a reward model, a preference model, or a Python function."""

    type: Literal["reward_model", "preference_model", "function"] = Field(
        "reward_model", description="what scores the responses: a train-rm model, a train-pm model ranking each "
        "prompt's responses, or a function")
    path: str = Field("", description="reward_model / preference_model: the directory saved by train-rm / train-pm")
    function: str = Field("", description="function: 'package.module:name' or 'path/to/file.py:name', called as "
                          "name(row, response) -> float, row being the generations row (prompt and metadata)")
    ranking: Literal["knockout", "copeland", "borda"] = Field(
        "knockout", description="preference_model: knockout (best and worst in about 1.5 n comparisons) or a "
        "round robin of all n(n-1)/2 pairs scored by Copeland or Borda")
    batch_size: int = Field(16, ge=1, description="sequences per forward pass of a model judge")
    max_length: int = Field(1024, gt=0, description="model judges: tokens per sequence (prompts cut from the left)")
    dtype: Dtype = Field("float32", description="the dtype a model judge scores in")
    timeout: float = Field(0.0, ge=0, description="function judges: seconds one response may take; one that takes "
                           "longer gets no reward (null, with the reason); 0 = no limit")

    def missing_source(self, prefix: str = "judge") -> list[tuple[str, str]]:
        """The judge's source when it is not given (for the configs that hold a judge: their `missing`)."""
        if self.type == "function" and ":" not in self.function:
            return [(f"{prefix}.function", f"{prefix}.function is required for a function judge, as 'module:name' "
                     "or 'file.py:name'")]
        if self.type != "function" and not self.path:
            return [(f"{prefix}.path", f"{prefix}.path is required for a {self.type} judge: the saved model's directory")]
        return []


class LengthPenaltyConfig(Strict):
    """r - λ·len(response): the paper's control of the reward model's length bias (against a reward
    model that favours long answers, λ > 0; against one that favours short ones, λ < 0)."""

    coef: float = Field(0.0, description="λ; 0 = off; below 0 a bonus for length")
    unit: Literal["tokens", "characters"] = Field(
        "tokens", description="tokens: the response_tokens generate wrote; characters: len(text)")


class AnnotateConfig(Strict):
    """`rlhf-workflow annotate`: a reward for every response of a generations file."""

    required = ("input", "output")
    input_keys = ("input", "judge.path", "judge.function")
    output_keys = ("output",)

    input: str = Field("", description="generations file: {id, prompt, responses, ...}")
    output: str = Field("", description="annotated generations (adds rewards); resumable")
    judge: JudgeConfig = JudgeConfig()
    length_penalty: LengthPenaltyConfig = LengthPenaltyConfig()
    rows_per_write: int = Field(32, ge=1, description="rows scored between two writes of the output")
    apply_chat_template: ApplyChatTemplate = True
    keep_prompt_states: bool = Field(
        False, description="reward-model judge: keep each prompt's keys and values in this process (up to 1 GiB "
        "a model) so that a later annotate of the same prompts computes only the responses (a run's evaluations)")

    def missing(self) -> list[tuple[str, str]]:
        return super().missing() + self.judge.missing_source()

    def row_settings(self) -> dict[str, Any]:
        """What determines the annotated rows (recorded beside the output; `data.outputs`)."""
        j = self.judge
        return {"judge": {"type": j.type, "path": source_identity(j.path), "function": j.function, "ranking": j.ranking,
                          "max_length": j.max_length, "dtype": j.dtype},
                "length_penalty": self.length_penalty.model_dump(mode="json"),
                "apply_chat_template": self.apply_chat_template}


class PairOptions(Strict):
    """Which pairs are taken from each prompt's scored responses: what `pairs` and a run's pairs share."""

    strategy: PairStrategy = Field(
        "max_min", description="max_min: best vs worst of n (the paper's rejection sampling); max_random: best vs "
        "a random other; random: two at random; max_max: best vs second best; all: every two responses with "
        "different rewards (for reward-model data)")
    min_margin: float = Field(0.0, ge=0, description="drop pairs whose reward difference is not above this "
                              "(pairs with equal rewards are always dropped)")


class PairsConfig(PairOptions):
    """`rlhf-workflow pairs`: preference pairs from annotated generations."""

    required = ("input", "output")
    input_keys = ("input",)
    output_keys = ("output",)

    input: str = Field("", description="annotated generations: {id, prompt, responses, rewards}")
    output: str = Field("", description="pairs file: {id, prompt, chosen, rejected, chosen_reward, rejected_reward}")
    seed: int = Field(0, description="seeds the random draws of max_random and random, and the sample of max_pairs")
    max_pairs: int = Field(0, ge=0, description="keep a seeded sample of at most this many pairs (statistics are of "
                           "the pairs kept); 0 = all")

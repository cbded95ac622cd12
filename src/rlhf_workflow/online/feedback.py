"""Simulated human feedback: the paper's start, from human preferences, with a gold judge as the human.

With ``feedback.enabled`` a run begins here, in ``RUN/feedback/``:

1. prompts: the first ``feedback.prompts`` of the task's train draw (`carve_prompts`), so the loop's
   prompts are the ones after them and never these;
2. generate: π0 samples ``feedback.sampling.n`` responses to each;
3. annotate: the gold judge (``feedback.judge_function``, e.g. the `instructions` task's constraint
   checker) labels every response;
4. pairs: pairs of differently labelled responses (``feedback.strategy``), split by prompt into the
   reward model's training pairs and ``heldout_pairs.jsonl`` (``feedback.heldout_share`` of the
   prompts: no prompt on both sides);
5. rm (and pm with ``feedback.train_pm``): a Bradley–Terry reward model (a pairwise preference
   model) trained on those pairs, the held-out pairs as its eval split; eval-rm (eval-pm): its
   held-out accuracy in ``rm_eval.json`` (``pm_eval.json``).

The loop then judges with that reward model, or with ``feedback.judge=pm`` with the preference
model (`loop_judge`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING

from rlhf_workflow.config import (AnnotateConfig, DataConfig, EvalRMConfig, GenerateConfig, JudgeConfig, PairsConfig,
                                  PreferenceModelConfig, RewardModelConfig, RunConfig, command_config)
from rlhf_workflow.data.run_layout import RunLayout
from rlhf_workflow.errors import keys_named

if TYPE_CHECKING:
    from accelerate import PartialState

def prompt_count(config: RunConfig) -> int:
    """How many of the task's train prompts the feedback takes (0 without feedback)."""
    return config.feedback.prompts if config.feedback.enabled else 0


def carve_prompts(config: RunConfig, train_rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """The task's train draw split into (the feedback prompts, the loop's prompts)."""
    count = prompt_count(config)
    return train_rows[:count], train_rows[count:]


def loop_judge(config: RunConfig, run_dir: Path) -> JudgeConfig:
    """The loop's judge: the recipe's, or with feedback the model trained on it (``feedback.judge``:
    the reward model or the preference model)."""
    if not config.feedback.enabled:
        return config.judge
    kind = config.feedback.judge
    return config.judge.model_copy(update={"type": "reward_model" if kind == "rm" else "preference_model",
                                           "path": str(RunLayout(run_dir).feedback.trained(kind))})


def split_by_prompt(rows: list[dict], share: float, seed: int) -> tuple[list[dict], list[dict], int, int]:
    """(training rows, held-out rows, held-out prompts, prompts): a seeded ``share`` of the distinct
    prompts is held out with all its rows, so that no prompt is on both sides."""
    def key(row: dict) -> str:  # a prompt may be a list of messages
        return row["prompt"] if isinstance(row["prompt"], str) else json.dumps(row["prompt"], sort_keys=True)

    prompts = sorted({key(row) for row in rows})
    random.Random(seed).shuffle(prompts)
    held_prompts = set(prompts[: int(round(len(prompts) * share))])
    held = [row for row in rows if key(row) in held_prompts]
    return [row for row in rows if key(row) not in held_prompts], held, len(held_prompts), len(prompts)


class Feedback:
    """The feedback stages of one run directory (see the module docstring)."""

    def __init__(self, config: RunConfig, run_dir: Path, state: "PartialState"):
        self.config = config
        self.files = RunLayout(run_dir).feedback
        self.state = state  # the processes of this run

    @property
    def heldout(self) -> Path | None:
        """The held-out pairs file, when there are held-out pairs."""
        path = self.files.heldout_pairs
        return path if path.exists() and path.stat().st_size > 0 else None

    def generate(self) -> None:
        from rlhf_workflow.generate.command import run_generate

        c = self.config
        with keys_named(RunConfig.stage_keys["feedback/generate"]):
            run_generate(command_config(GenerateConfig, c.generation, prompts=str(self.files.prompts),
                                      output=str(self.files.generations), model=c.sampling_model(c.policy),
                                      sampling=c.feedback.sampling.model_copy(update={"seed": c.seeded(c.feedback.sampling.seed)}),
                                      apply_chat_template=c.apply_chat_template))

    def annotate(self) -> None:
        from rlhf_workflow.online.annotate import run_annotate

        with keys_named(RunConfig.stage_keys["feedback/annotate"]):
            run_annotate(AnnotateConfig(input=str(self.files.generations), output=str(self.files.scored),
                                        judge=JudgeConfig(type="function", function=self.config.feedback.judge_function),
                                        apply_chat_template=self.config.apply_chat_template))

    def pairs(self) -> None:
        from rlhf_workflow.data.io import iter_jsonl, write_jsonl
        from rlhf_workflow.online.pairs import run_pairs

        if not self.state.is_main_process:
            return
        c = self.config
        with keys_named(RunConfig.stage_keys["feedback/pairs"]):
            run_pairs(PairsConfig(input=str(self.files.scored), output=str(self.files.all_pairs),
                                  strategy=c.feedback.strategy, seed=c.seeded(c.prompts.seed)))
        rows = [row for _, row in iter_jsonl(self.files.all_pairs)]
        train, held, held_prompts, prompts = split_by_prompt(rows, c.feedback.heldout_share, c.seeded(c.prompts.seed))
        write_jsonl(self.files.heldout_pairs, held)
        write_jsonl(self.files.pairs, train)
        print(f"feedback: {len(train)} pairs to train the reward model, {len(held)} held out "
              f"({held_prompts} of {prompts} prompts)")

    def train(self, kind: str) -> None:
        """Train the reward model ("rm") or the preference model ("pm") on the pairs, the held-out
        pairs as its eval split."""
        from rlhf_workflow.train.checkpoint import remove_checkpoints

        out = self.files.stage_dir(kind)
        if (out / "model").is_dir():
            if self.state.is_main_process:
                remove_checkpoints(out)  # (left beside the model when a kill came right after its save)
            return
        c, f = self.config, self.config.feedback
        section = f.rm if kind == "rm" else f.pm
        model = (section.model or c.policy).model_copy(update={"gradient_checkpointing": False})
        held = self.heldout
        data = DataConfig(train=str(self.files.pairs), eval=str(held) if held else None,
                          max_length=section.data.max_length, apply_chat_template=c.apply_chat_template)
        train = section.train.model_copy(update={"seed": c.seeded(section.train.seed)})
        resume = True  # continues from the last checkpoint, if any
        # the model is the policy's unless the section names one: messages name the key that set it
        names = RunConfig.stage_keys[f"feedback/{kind}"] | ({} if section.model else {"model": "policy"})
        with keys_named(names):
            if kind == "rm":
                from rlhf_workflow.train.reward import run_train_rm

                run_train_rm(command_config(RewardModelConfig, f.rm, output_dir=str(out), model=model, data=data,
                                          train=train), resume=resume)
            else:
                from rlhf_workflow.train.preference import run_train_pm

                run_train_pm(command_config(PreferenceModelConfig, f.pm, output_dir=str(out), model=model, data=data,
                                          train=train), resume=resume)

    def evaluate(self, kind: str) -> None:
        from rlhf_workflow.eval.reward_eval import run_eval_rm

        held = self.heldout
        if self.state.is_main_process and held is not None:
            # in the dtype the loop's judge scores in, so that the accuracy is that of the judge the loop uses
            run_eval_rm(EvalRMConfig(model=str(self.files.trained(kind)), data=str(held), kind=kind,
                                     dtype=self.config.judge.dtype,
                                     output=str(self.files.accuracy(kind)), max_length=getattr(self.config.feedback, kind).data.max_length,
                                     apply_chat_template=self.config.apply_chat_template))

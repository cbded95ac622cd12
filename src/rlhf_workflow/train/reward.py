"""Bradley–Terry reward-model training: the `reward` objective and the `train-rm` command.

A batch of B pairs is one forward pass. By default each pair is one row
``[prompt | chosen | rejected]`` whose mask keeps the two responses apart, so the prompt is
computed once (`models.layout`); with ``train.share_prefix=false`` it is 2B padded rows
(chosen rows, then rejected rows). Either way the reward of each response is read at its last
token (`models.reward.RewardModel`).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch

from rlhf_workflow.config import RewardModelConfig
from rlhf_workflow.data.schemas import PairRow
from rlhf_workflow.errors import UserError, config_key, model_source
from rlhf_workflow.models.layout import LayoutOptions, layout
from rlhf_workflow.train.losses import bradley_terry_loss, pair_accuracy
from rlhf_workflow.train.pairs import group_by_prompt, pair_row_length, tokenize_pairs

log = logging.getLogger(__name__)


class RewardObjective:
    """Collate: pairs (or prompt groups, `train.pairs.group_by_prompt`) laid out by
    `models.layout.layout`. Loss: Bradley–Terry over the pairs."""

    name = "reward"

    def __init__(self, pad_token_id: int, *, center_coef: float = 0.0, options: LayoutOptions = LayoutOptions(),
                 max_responses: int = 2):
        self.pad_token_id = pad_token_id
        self.center_coef = center_coef
        self.options = options
        self.rows_per_example = 1 if options.share_prefix else max_responses

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        groups, chosen, rejected, margins, offset = [], [], [], [], 0
        for e in examples:
            if "responses" in e:  # a prompt group
                groups.append((e["prompt_ids"], e["responses"]))
                chosen += [offset + i for i in e["chosen_index"]]
                rejected += [offset + i for i in e["rejected_index"]]
                margins += e["margin"]
                offset += len(e["responses"])
            else:  # one pair: sequences (chosen, rejected)
                groups.append((e["prompt_ids"], (e["chosen_ids"], e["rejected_ids"])))
                chosen.append(offset)
                rejected.append(offset + 1)
                margins.append(e.get("margin", 0.0))
                offset += 2
        batch = layout(groups, self.pad_token_id, self.options)
        batch["chosen_index"] = torch.tensor(chosen, dtype=torch.long)
        batch["rejected_index"] = torch.tensor(rejected, dtype=torch.long)
        batch["margin"] = torch.tensor(margins, dtype=torch.float32)
        return batch

    def example_length(self, example: dict[str, Any]) -> int:
        return pair_row_length(example, self.options)

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["margin"].numel()

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rewards = model(batch["input_ids"], batch["attention_mask"], batch["position_ids"], batch["last_row"], batch["last_col"])
        chosen, rejected = rewards[batch["chosen_index"]], rewards[batch["rejected_index"]]
        loss = bradley_terry_loss(chosen, rejected, batch["margin"], self.center_coef)
        with torch.no_grad():
            metrics = {
                "accuracy": pair_accuracy(chosen, rejected),
                "reward_chosen": chosen.sum(),
                "reward_rejected": rejected.sum(),
                "reward_margin": (chosen - rejected).sum(),
            }
        return loss, metrics


def pair_margin(row: PairRow, field: str | None, source: str) -> float:
    """The per-pair margin named by ``loss.margin_field`` (0 when the config names none)."""
    if field is None:
        return 0.0
    value = (row.model_extra or {}).get(field, getattr(row, field, None))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{source}: pair {row.id}: field '{field}' ({config_key('loss.margin_field')}) must be a finite number, got {value!r}")
    return float(value)


def run_train_rm(config: RewardModelConfig, *, resume: bool = False, force: bool = False) -> Path:
    """The `train-rm` command: preference pairs in, a sequence-classification reward model out."""
    from rlhf_workflow.models.reward import load_reward_model, prepare_reward_tokenizer, save_reward_model
    from rlhf_workflow.train.loop import train
    from rlhf_workflow.train.job import finish_job, preference_training_model, read_splits, start_job

    job = start_job(config, resume=resume, force=force, prepare_tokenizer=prepare_reward_tokenizer)
    tokenizer = job.tokenizer

    def tokenize(rows: list[PairRow], source: str, dropped: list) -> list[dict]:
        return tokenize_pairs(
            rows, tokenizer, max_length=job.max_length, chat_template=config.data.apply_chat_template, source=source,
            extra=lambda row: {"margin": config.loss.margin + pair_margin(row, config.loss.margin_field, source)},
            dropped=dropped, limit=job.limit,
        )

    train_split, eval_split = read_splits(config, PairRow, tokenize, "pair")
    train_examples, eval_examples = train_split.examples, eval_split.examples if eval_split else None
    max_responses = 2
    if config.group_by_prompt:
        pairs = len(train_examples)
        train_examples = group_by_prompt(train_examples)
        eval_examples = group_by_prompt(eval_examples) if eval_examples else eval_examples
        max_responses = max(len(e["responses"]) for e in train_examples + (eval_examples or []))
        log.info("group_by_prompt: %d pairs in %d prompt groups (at most %d responses per prompt)", pairs,
                 len(train_examples), max_responses)
    with model_source("model.name_or_path"):
        model = preference_training_model(load_reward_model(config.model, tokenizer), config)
    model = train(
        RewardObjective(tokenizer.pad_token_id, center_coef=config.loss.center_coef,
                        options=LayoutOptions.from_config(config.train), max_responses=max_responses),
        model, train_examples,
        config.train, job.output_dir, job.accelerator, eval_examples=eval_examples, resume=resume,
        run_config=config.model_dump(mode="json"),
    )
    return finish_job(job, lambda target, files: save_reward_model(model, tokenizer, target, extra_files=files),
                        "reward model", config, (train_split, eval_split))

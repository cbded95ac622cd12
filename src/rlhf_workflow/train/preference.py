"""Pairwise preference-model training: the `preference` objective and the `train-pm` command.

Each pair becomes one comparison prompt with the chosen response at a random position (A or B,
seeded per example) and its label token as the answer. The loss is on that token only.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import torch

from rlhf_workflow.config import PreferenceModelConfig
from rlhf_workflow.errors import model_source
from rlhf_workflow.data.schemas import PairRow, response_text
from rlhf_workflow.models.preference import FORMAT_FILE, PreferenceFormat, encode_comparison, label_token_ids
from rlhf_workflow.models.forward import pad_batch
from rlhf_workflow.train.losses import label_token_loss

log = logging.getLogger(__name__)


class PreferenceObjective:
    """Collate: comparison prompts, padded. Loss: cross-entropy of the label token."""

    name = "preference"
    rows_per_example = 1

    def __init__(self, pad_token_id: int, label_ids: tuple[int, int]):
        self.pad_token_id = pad_token_id
        self.label_ids = label_ids

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids, mask = pad_batch([e["input_ids"] for e in examples], self.pad_token_id)
        labels = torch.tensor([e["label"] for e in examples], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "num_tokens": mask.sum()}

    def example_length(self, example: dict[str, Any]) -> int:
        return len(example["input_ids"])

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["labels"].numel()

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = model(batch["input_ids"], batch["attention_mask"])
        loss = label_token_loss(logits, batch["labels"])
        with torch.no_grad():
            pair = logits[:, list(self.label_ids)]
            says_a = pair[:, 0] > pair[:, 1]
            correct = says_a == (batch["labels"] == self.label_ids[0])
            metrics = {
                "accuracy": correct.float().sum(),
                "label_prob": torch.softmax(logits, -1).gather(1, batch["labels"][:, None]).sum(),
                "answers_a": says_a.float().sum(),
            }
        return loss, metrics


def tokenize_comparisons(rows: list[PairRow], tokenizer: Any, fmt: PreferenceFormat, *, max_length: int,
                         seed: int, source: str) -> list[dict]:
    """One comparison per pair, the chosen response at position A or B by a seeded coin flip."""
    label_a, label_b = label_token_ids(tokenizer, fmt)
    rng = random.Random(seed)
    examples, truncated = [], 0
    for row in rows:
        chosen, rejected = response_text(row.chosen), response_text(row.rejected)
        chosen_first = rng.random() < 0.5
        a, b = (chosen, rejected) if chosen_first else (rejected, chosen)
        ids = encode_comparison(tokenizer, fmt, row.prompt_messages(), a, b)
        if len(ids) > max_length:  # keep the end: both responses and the question that asks for the label
            ids, truncated = ids[-max_length:], truncated + 1
        examples.append({"id": row.id, "input_ids": ids, "label": label_a if chosen_first else label_b})
    if truncated:
        log.warning("%s: %d comparisons cut from the left to max_length %d", source, truncated, max_length)
    return examples


def run_train_pm(config: PreferenceModelConfig, *, resume: bool = False, force: bool = False) -> Path:
    """The `train-pm` command: preference pairs in, a causal LM that answers "A" or "B" out."""
    from rlhf_workflow.models import save_model
    from rlhf_workflow.models.preference import load_preference_model
    from rlhf_workflow.train.loop import train
    from rlhf_workflow.train.job import finish_job, preference_training_model, read_splits, start_job

    job = start_job(config, resume=resume, force=force)
    tokenizer = job.tokenizer
    fmt = PreferenceFormat(
        template=config.format.template, label_a=config.format.label_a, label_b=config.format.label_b,
        chat_template=config.data.apply_chat_template,
    )
    label_ids = label_token_ids(tokenizer, fmt)

    def tokenize(rows: list[PairRow], source: str, dropped: list) -> list[dict]:
        return tokenize_comparisons(rows, tokenizer, fmt, max_length=job.max_length, seed=config.train.seed,
                                    source=source)

    train_split, eval_split = read_splits(config, PairRow, tokenize, "pair")
    with model_source("model.name_or_path"):
        model = preference_training_model(load_preference_model(config.model), config)
    model = train(
        PreferenceObjective(tokenizer.pad_token_id, label_ids), model, train_split.examples, config.train,
        job.output_dir, job.accelerator, eval_examples=eval_split.examples if eval_split else None, resume=resume,
        run_config=config.model_dump(mode="json"),
    )

    def save(target: Path, files: dict[str, str]) -> None:
        save_model(model.model, tokenizer, target, extra_files={**files, FORMAT_FILE: fmt.to_json()})

    return finish_job(job, save, "preference model", config, (train_split, eval_split))

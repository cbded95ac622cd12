"""Supervised fine-tuning: the first objective, and the `rlhf-workflow sft` command.

The loss is on assistant tokens only (`losses.sft_loss`); prompts, system prompts and template
markup are context.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rlhf_workflow.config import SFTConfig
from rlhf_workflow.errors import model_source
from rlhf_workflow.data.schemas import SFTRow
from rlhf_workflow.data.templating import encode_conversation, encode_prompt_response, truncate
from rlhf_workflow.train.losses import sft_loss

log = logging.getLogger(__name__)


class SFTObjective:
    """Collate: right-pad ids and masks. Loss: summed NLL of the masked (response) tokens."""

    name = "sft"
    rows_per_example = 1

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(examples), width), dtype=torch.long)
        loss_mask = torch.zeros((len(examples), width), dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[i, :n] = torch.tensor(e["input_ids"])
            attention[i, :n] = 1
            loss_mask[i, :n] = torch.tensor(e["loss_mask"])
        return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss_mask, "num_tokens": attention.sum()}

    def example_length(self, example: dict[str, Any]) -> int:
        return len(example["input_ids"])

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["loss_mask"][:, 1:].sum())

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        return sft_loss(logits, batch["input_ids"], batch["loss_mask"]), {}


def tokenize_sft(rows: list[SFTRow], tokenizer: Any, *, max_length: int, chat_template: bool, source: str,
                 dropped: list | None = None, limit: str = "") -> list[dict]:
    """Token ids and loss masks for SFT rows; rows with no response token left after truncation are
    dropped (and listed in ``dropped`` as (index, field, why); ``limit`` names max_length there)."""
    examples, truncated = [], 0
    dropped = dropped if dropped is not None else []
    for index, row in enumerate(tqdm(rows, desc="tokenize", disable=len(rows) < 2000)):
        if row.messages is not None:
            ids, mask = encode_conversation(tokenizer, row.to_messages(), chat_template=chat_template)
        else:
            ids, mask = encode_prompt_response(tokenizer, row.prompt, row.completion, chat_template=chat_template)
        cut = truncate(ids, mask, max_length)
        if cut is None:
            before = mask.index(1) if 1 in mask else len(ids)
            dropped.append((index, "messages" if row.messages is not None else "prompt",
                            f"{before} tokens come before the first trained token, leaving none within "
                            f"{limit or f'max_length {max_length}'}"))
            continue
        truncated += len(cut[0]) < len(ids)
        examples.append({"input_ids": cut[0], "loss_mask": cut[1]})
    if truncated or dropped:
        log.warning(
            "%s: %d rows truncated to max_length %d; %d dropped (no response token left)",
            source, truncated, max_length, len(dropped),
        )
    return examples


def run_sft(config: SFTConfig, *, resume: bool = False, force: bool = False) -> Path:
    """The `sft` command: load model and data, train, save ``output_dir/model``. Returns that path."""
    from rlhf_workflow.models import load_model, save_model
    from rlhf_workflow.train.loop import train
    from rlhf_workflow.train.job import finish_job, read_splits, start_job

    job = start_job(config, resume=resume, force=force)
    tokenizer = job.tokenizer

    def tokenize(rows: list[SFTRow], source: str, dropped: list) -> list[dict]:
        return tokenize_sft(rows, tokenizer, max_length=job.max_length, chat_template=config.data.apply_chat_template,
                            source=source, dropped=dropped, limit=job.limit)

    train_split, eval_split = read_splits(config, SFTRow, tokenize)
    with model_source("model.name_or_path"):
        model = load_model(config.model)
    model = train(
        SFTObjective(tokenizer.pad_token_id), model, train_split.examples, config.train, job.output_dir,
        job.accelerator, eval_examples=eval_split.examples if eval_split else None, resume=resume,
        run_config=config.model_dump(mode="json"),
    )
    return finish_job(job, lambda target, files: save_model(model, tokenizer, target, extra_files=files),
                        "fine-tuned model", config, (train_split, eval_split))

"""What the training loop asks of an objective (SFT, reward model, preference model, DPO).

An objective is "how to collate a batch" plus "the loss of a batch". The loop never looks inside:
it moves the batch to the device, calls `loss`, and normalises by `units` summed over the
global batch.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class Objective(Protocol):
    name: str
    rows_per_example: int  # sequences an example puts in the batch (2 for a chosen/rejected pair)

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Stack tokenised examples into tensors, including ``num_tokens``: the real tokens of the
        sequences the batch stands for (a prompt shared by two responses counts twice), which the
        loop logs as throughput whatever the layout."""

    def example_length(self, example: dict[str, Any]) -> int:
        """Tokens an example puts in a row of the batch (for grouping examples of similar length)."""

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        """How many loss units (tokens, pairs) the batch holds; the loss is a sum over them."""

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The summed loss of the batch and summed metrics (each divided by the global units for logging)."""

"""How far the evaluation's KL estimate is from 0 for π0 itself: the sampling pass's log π0(y)
(``response_logps`` of RUN/iter_0/eval/generations.jsonl) against π0's forward pass over the same
tokens (`eval.policy.response_logps`). Both run in the recipe's sampling dtype; the difference is
rounding between the two paths, a bias of every KL the run reports.

    python experiments/kl_self_check.py runs/demo
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

from rlhf_workflow.config import RunConfig, load_config
from rlhf_workflow.data.io import read_rows, row_to_dict
from rlhf_workflow.data.run_layout import RunLayout
from rlhf_workflow.data.schemas import GenerationRow
from rlhf_workflow.eval.policy import response_logps
from rlhf_workflow.models.loading import load_tokenizer


def main(run: Path) -> None:
    layout = RunLayout(run)
    config = load_config(RunConfig, str(layout.config))
    rows = [row_to_dict(r) for r in read_rows(layout.iteration(0).eval.generations, GenerationRow)]
    initial = config.sampling_model(config.policy)
    tokenizer = load_tokenizer(initial.tokenizer or initial.name_or_path)
    forward = response_logps(initial, tokenizer, rows, chat_template=config.apply_chat_template,
                             device=torch.device("cpu"), chunk=config.dpo.logprob_chunk)
    diffs = [row["response_logps"][k] - forward[(row["id"], k)] for row in rows if row.get("response_logps")
             for k in range(len(row["responses"])) if (row["id"], k) in forward]
    print(f"{run}: {len(diffs)} responses; sampling-pass log p - forward log p under pi0: "
          f"mean {statistics.mean(diffs):+.4f}, mean |d| {statistics.mean(abs(d) for d in diffs):.4f}, "
          f"max |d| {max(abs(d) for d in diffs):.4f} nats")


if __name__ == "__main__":
    main(Path(sys.argv[1]))

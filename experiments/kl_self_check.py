"""How far the evaluation's KL estimate is from 0 for π0 itself: the sampling pass's log π0(y)
(``response_logps`` of RUN/iter_0/eval/generations.jsonl) against π0's forward pass over the same
tokens (`eval.policy.response_logps`). Both run in the recipe's sampling dtype; the difference is
rounding between the two paths, a bias of every KL the run reports.

    python experiments/kl_self_check.py runs/demo
"""

import json, statistics, sys
from pathlib import Path
import torch
from rlhf_workflow.config import RunConfig, load_config
from rlhf_workflow.eval.policy import response_logps
from rlhf_workflow.models.loading import load_tokenizer
from rlhf_workflow.data.io import read_rows, row_to_dict
from rlhf_workflow.data.schemas import GenerationRow
run = Path(sys.argv[1])
cfg = load_config(RunConfig, str(run / "config.yaml"))
rows = [row_to_dict(r) for r in read_rows(run / "iter_0/eval/generations.jsonl", GenerationRow)]
initial = cfg.sampling_model(cfg.policy)
tok = load_tokenizer(initial.name_or_path)
forward = response_logps(initial, tok, rows, chat_template=cfg.apply_chat_template, device=torch.device("cpu"),
                         chunk=cfg.dpo.logprob_chunk)
diffs = [row["response_logps"][k] - forward[(row["id"], k)] for row in rows for k in range(len(row["responses"]))
         if (row["id"], k) in forward and row.get("response_logps")]
print(f"{run}: {len(diffs)} responses; sampling-pass log p - forward log p under pi0: mean {statistics.mean(diffs):+.4f}, "
      f"mean |d| {statistics.mean(abs(d) for d in diffs):.4f}, max |d| {max(abs(d) for d in diffs):.4f} nats")

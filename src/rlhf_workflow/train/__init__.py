"""Training: the one loop, the objectives it runs, and the commands built on it.

* `loop`       — the accelerate training loop (every objective; checkpoints, eval, metrics)
* `objective`  — what the loop asks of an objective: collate, loss, units
* `losses`     — the pure loss functions, each with its equation
* `job`        — what every training command does around the loop (start, read splits, save)
* `pairs`      — preference pairs as token ids, prompt groups
* `sft`, `reward`, `preference`, `dpo` — the objectives and their commands (`sft`, `train-rm`,
  `train-pm`, `dpo`)
* `checkpoint`, `metrics` — resumable checkpoints and metrics.jsonl
"""

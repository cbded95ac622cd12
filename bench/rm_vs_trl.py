"""Benchmark: Bradley–Terry reward-model training, rlhf-workflow vs TRL's RewardTrainer.

Both train SmolLM2-135M-Instruct (fp32, CPU, no gradient checkpointing, AdamW) as a reward
model for the same number of optimizer steps on the same pairs with the same batch size, each
in its own process, alternating, `--repeats` times. Throughput is tokens per second of
training, counted by each trainer itself the same way: the real (non-pad) tokens of the
sequences prompt + chosen and prompt + rejected (our metrics.jsonl `tokens`, TRL's `num_tokens`).
Ours lays each pair out as [prompt | chosen | rejected] and computes the prompt once, yet counts
it twice as TRL does, so the ratio of tokens/s is the ratio of pairs trained per second. Memory is
the peak resident set size of the trainer's process. The best run of each is reported, then the ratios.

The pairs have prompts and responses of log-normally distributed lengths, as real preference
data has (the lengths of chosen and rejected differ too), so padding is part of what is measured.

    pip install trl            # the peer; not a dependency of rlhf-workflow
    python bench/rm_vs_trl.py  # about 15 minutes on 2 CPU cores
    python bench/rm_vs_trl.py --steps 30 --batch 8 --max-length 384

The benchmark prints figures; it never fails on speed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    add_pair_training_options, bench_parser, dispatch, pair_training_worker_args, peak_rss_mb, run_selected, write_pairs,
)


def run_ours(args: argparse.Namespace) -> dict:
    from rlhf_workflow.config import ModelConfig, TrainConfig
    from rlhf_workflow.data.io import read_rows
    from rlhf_workflow.data.schemas import PairRow
    from rlhf_workflow.models import load_tokenizer
    from rlhf_workflow.models.reward import load_reward_model, prepare_reward_tokenizer
    from rlhf_workflow.models.layout import LayoutOptions
    from rlhf_workflow.train.loop import make_accelerator, train
    from rlhf_workflow.train.pairs import tokenize_pairs
    from rlhf_workflow.train.reward import RewardObjective

    train_config = TrainConfig(max_steps=args.steps, per_device_batch_size=args.batch, lr=1e-5, scheduler="constant",
                               log_every=max(args.steps // 4, 1), seed=args.seed, group_by_length=not args.no_grouping,
                               max_tokens_per_forward=args.max_tokens, share_prefix=not args.no_share,
                               pack_length=args.pack_length)
    out = Path(args.workdir) / f"ours-{args.repeat}"
    accelerator = make_accelerator(train_config, out)
    tokenizer = prepare_reward_tokenizer(load_tokenizer("smollm2-135m-instruct"))
    rows = read_rows(args.data, PairRow)
    examples = tokenize_pairs(rows, tokenizer, max_length=args.max_length, chat_template=True, source=args.data)
    model = load_reward_model(ModelConfig(name_or_path="smollm2-135m-instruct"), tokenizer)
    start = time.perf_counter()
    objective = RewardObjective(tokenizer.pad_token_id, options=LayoutOptions.from_config(train_config))
    train(objective, model, examples, train_config, out, accelerator)
    seconds = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tokens = sum(r["tokens"] for r in rows if r["split"] == "train")
    return {"seconds": seconds, "tokens": tokens, "peak_rss_mb": peak_rss_mb()}


def run_trl(args: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from rlhf_workflow.models import load_tokenizer
    from rlhf_workflow.models.loading import local_directory

    torch.manual_seed(args.seed)
    directory = local_directory("smollm2-135m-instruct")  # the same weights, already converted from GGUF
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    model = AutoModelForSequenceClassification.from_pretrained(directory, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines()]
    dataset = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    config = RewardConfig(
        output_dir=str(Path(args.workdir) / f"trl-{args.repeat}"), max_steps=args.steps, per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1, learning_rate=1e-5, lr_scheduler_type="constant", logging_steps=max(args.steps // 4, 1),
        save_strategy="no", report_to="none", gradient_checkpointing=False, max_length=args.max_length,
        seed=args.seed, use_cpu=True, dataloader_num_workers=0, bf16=False, fp16=False,
    )
    trainer = RewardTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    tokens = max(row.get("num_tokens", 0) for row in trainer.state.log_history)  # TRL counts attention-mask ones
    return {"seconds": seconds, "tokens": tokens, "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    parser = bench_parser(__doc__, WORKERS)
    add_pair_training_options(parser)
    parser.add_argument("--no-grouping", action="store_true", help="ours without length-grouped batches")
    args = parser.parse_args()
    if dispatch(args, WORKERS):
        return

    workdir, data = write_pairs(args, "bench-rm-")
    worker_args = pair_training_worker_args(args, workdir, data) + (["--no-grouping"] if args.no_grouping else [])
    runs = run_selected(__file__, args, WORKERS, worker_args)

    print(f"\nBT reward model, SmolLM2-135M-Instruct fp32 on CPU ({os.cpu_count()} cores): {args.steps} steps × "
          f"{args.batch} pairs, max_length {args.max_length}; best of {args.repeats} runs each")
    print(f"ours: group_by_length={not args.no_grouping}, max_tokens_per_forward={args.max_tokens}, "
          f"share_prefix={not args.no_share}, pack_length={args.pack_length}")
    print(f"{'trainer':<10}{'real tokens/s':>15}{'pairs/s':>10}{'peak RSS MB':>14}")
    best = {}
    for name, results in runs.items():
        fastest = max(results, key=lambda r: r["tokens_per_s"])
        best[name] = {"tokens_per_s": fastest["tokens_per_s"], "pairs_per_s": args.steps * args.batch / fastest["seconds"],
                      "peak_rss_mb": min(r["peak_rss_mb"] for r in results)}
        print(f"{name:<10}{best[name]['tokens_per_s']:>15.1f}{best[name]['pairs_per_s']:>10.2f}{best[name]['peak_rss_mb']:>14.0f}")
    if len(best) == 2:
        print(f"throughput ours/trl: {best['ours']['tokens_per_s'] / best['trl']['tokens_per_s']:.2f}x in tokens/s, "
              f"{best['ours']['pairs_per_s'] / best['trl']['pairs_per_s']:.2f}x in pairs/s   (target >= 1.5x)")
        print(f"peak memory ours/trl: {best['ours']['peak_rss_mb'] / best['trl']['peak_rss_mb']:.2f}x   (target <= 0.8x)")


WORKERS = {"ours": run_ours, "trl": run_trl}

if __name__ == "__main__":
    main()

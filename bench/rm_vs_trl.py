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
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import make_pairs, peak_rss_mb, run_workers  # noqa: E402


def run_ours(args: argparse.Namespace) -> dict:
    from rlhf_workflow.config import ModelConfig, TrainConfig
    from rlhf_workflow.data.io import read_rows
    from rlhf_workflow.data.schemas import PairRow
    from rlhf_workflow.models import load_tokenizer
    from rlhf_workflow.models.reward import load_reward_model, prepare_reward_tokenizer
    from rlhf_workflow.train.batching import LayoutOptions
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps for each trainer")
    parser.add_argument("--batch", type=int, default=8, help="pairs per step")
    parser.add_argument("--pairs", type=int, default=512)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-grouping", action="store_true", help="ours without length-grouped batches")
    parser.add_argument("--max-tokens", type=int, default=1024,
                        help="ours: train.max_tokens_per_forward (0 = one forward per micro-batch, as TRL)")
    parser.add_argument("--no-share", action="store_true", help="ours without prompt sharing (chosen and rejected rows)")
    parser.add_argument("--pack-length", type=int, default=0, help="ours: train.pack_length (0 = no packing)")
    parser.add_argument("--only", choices=["ours", "trl"], help="run one trainer")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each trainer, alternating; the best is reported")
    parser.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        result = run_ours(args) if args.worker == "ours" else run_trl(args)
        print("RESULT " + json.dumps(result), flush=True)
        return

    workdir = tempfile.mkdtemp(prefix="bench-rm-")
    data = Path(workdir) / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_pairs(args.pairs, args.seed, args.max_length)))
    names = [n for n in ("ours", "trl") if not args.only or n == args.only]
    worker_args = ["--data", str(data), "--workdir", workdir, "--steps", str(args.steps), "--batch", str(args.batch),
                   "--max-length", str(args.max_length), "--seed", str(args.seed), "--max-tokens", str(args.max_tokens),
                   "--pack-length", str(args.pack_length)]
    worker_args += (["--no-grouping"] if args.no_grouping else []) + (["--no-share"] if args.no_share else [])
    runs = run_workers(__file__, names, args.repeats, worker_args)

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


if __name__ == "__main__":
    main()

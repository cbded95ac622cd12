"""Benchmark: Bradley–Terry reward-model training, rlhf-workflow vs TRL's RewardTrainer.

Both train SmolLM2-135M-Instruct (or --model; fp32, or bf16 autocast with --precision bf16; on the
CPU, or the GPU when there is one; no gradient checkpointing, AdamW) as a reward model for the same number of optimizer steps on the same pairs with the same batch size, each
in its own process, alternating, `--repeats` times. Throughput is tokens per second of
training, counted by each trainer itself the same way: the real (non-pad) tokens of the
sequences prompt + chosen and prompt + rejected (our metrics.jsonl `tokens`, TRL's `num_tokens`).
Ours lays each pair out as [prompt | chosen | rejected] and computes the prompt once, yet counts
it twice as TRL does, so the ratio of tokens/s is the ratio of pairs trained per second. Memory is
the peak resident set size of the trainer's process. FLOP/s are taken against the matmul peak
measured in the trainer's own process just before and just after its run (the higher of the two).
The best run of each is reported, then the ratios.

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
    add_pair_training_options, bench_parser, device, dispatch, of_peak, pair_training_worker_args, peak_memory, peak_range,
    TRAIN_PRECISION, run_selected, write_json, write_pairs,
)
from rlhf_workflow.data.io import jsonl_lines


def training_flops(model: object, tokens: float) -> float:
    """6 FLOPs per non-embedding parameter per token computed (forward and backward; the scalar head
    and attention not counted)."""
    body = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)  # type: ignore[attr-defined]
    return 6 * body * tokens


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
                               pack_length=args.pack_length, precision=TRAIN_PRECISION[args.precision])
    out = Path(args.workdir) / f"ours-{args.repeat}"
    accelerator = make_accelerator(train_config, out)
    tokenizer = prepare_reward_tokenizer(load_tokenizer(args.model))
    rows = read_rows(args.data, PairRow)
    examples = tokenize_pairs(rows, tokenizer, max_length=args.max_length, chat_template=True, source=args.data)
    model = load_reward_model(ModelConfig(name_or_path=args.model), tokenizer)
    start = time.perf_counter()
    objective = RewardObjective(tokenizer.pad_token_id, options=LayoutOptions.from_config(train_config))
    train(objective, model, examples, train_config, out, accelerator)
    seconds = time.perf_counter() - start
    rows = [json.loads(line) for line in jsonl_lines(out / "metrics.jsonl")]
    rows = [r for r in rows if r["split"] == "train"]
    tokens = sum(r["tokens"] for r in rows)
    # tokens computed: the pairs trained (steps × batch) at the mean pair's tokens, its prompt once when shared
    per_pair = [len(e["prompt_ids"]) * (2 if args.no_share else 1) + len(e["chosen_ids"]) + len(e["rejected_ids"])
                for e in examples]
    computed = sum(per_pair) / len(per_pair) * args.steps * args.batch
    return {"seconds": seconds, "tokens": tokens, **peak_memory(), "flops": training_flops(model, computed),
            "step1_loss": rows[0]["loss"]}


def run_trl(args: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from rlhf_workflow.models import load_tokenizer
    from rlhf_workflow.models.loading import local_directory

    torch.manual_seed(args.seed)
    directory = local_directory(args.model)  # the same weights (a built-in model already converted from GGUF)
    tokenizer = load_tokenizer(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(directory, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    rows = [json.loads(line) for line in jsonl_lines(args.data)]
    dataset = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    config = RewardConfig(
        output_dir=str(Path(args.workdir) / f"trl-{args.repeat}"), max_steps=args.steps, per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1, learning_rate=1e-5, lr_scheduler_type="constant", logging_steps=max(args.steps // 4, 1),
        save_strategy="no", report_to="none", gradient_checkpointing=False, max_length=args.max_length,
        seed=args.seed, use_cpu=device() == "cpu", dataloader_num_workers=0, bf16=args.precision == "bf16", fp16=False,
    )
    trainer = RewardTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    tokens = max(row.get("num_tokens", 0) for row in trainer.state.log_history)  # TRL counts attention-mask ones
    first = next(row for row in trainer.state.log_history if "loss" in row)
    return {"seconds": seconds, "tokens": tokens, **peak_memory(), "flops": training_flops(model, tokens),
            "step1_loss": first["loss"]}


def main() -> None:
    parser = bench_parser(__doc__, WORKERS)
    add_pair_training_options(parser)
    parser.add_argument("--no-grouping", action="store_true", help="ours without length-grouped batches")
    args = parser.parse_args()
    if dispatch(args, WORKERS, measure_peak=True):
        return

    workdir, data = write_pairs(args, "bench-rm-")
    worker_args = pair_training_worker_args(args, workdir, data) + (["--no-grouping"] if args.no_grouping else [])
    runs = run_selected(__file__, args, WORKERS, worker_args)

    where = "GPU" if device() == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"\nBT reward model, {args.model} {args.precision} on {where}: {args.steps} steps × "
          f"{args.batch} pairs, max_length {args.max_length}; best of {args.repeats} runs each")
    print(f"ours: group_by_length={not args.no_grouping}, max_tokens_per_forward={args.max_tokens}, "
          f"share_prefix={not args.no_share}, pack_length={args.pack_length}")
    print(f"{args.precision} matmul peak of this machine, measured around each run: "
          f"{peak_range(runs)}")
    print(f"{'trainer':<10}{'real tokens/s':>15}{'pairs/s':>10}{'peak RSS MB':>14}{'GFLOP/s':>9}{'of peak':>9}"
          f"{'step-1 loss':>13}")
    best = {}
    for name, results in runs.items():
        fastest = max(results, key=lambda r: r["tokens_per_s"])
        flops = fastest["flops"] / fastest["seconds"]
        best[name] = {**fastest, "pairs_per_s": args.steps * args.batch / fastest["seconds"],
                      "peak_rss_mb": min(r["peak_rss_mb"] for r in results), "flops_per_s": flops, "of_peak": of_peak(fastest)}
        print(f"{name:<10}{best[name]['tokens_per_s']:>15.1f}{best[name]['pairs_per_s']:>10.2f}{best[name]['peak_rss_mb']:>14.0f}"
              f"{flops / 1e9:>9.1f}{of_peak(fastest):>9.1%}{fastest['step1_loss']:>13.4f}")
    if len(best) == 2:
        print(f"throughput ours/trl: {best['ours']['tokens_per_s'] / best['trl']['tokens_per_s']:.2f}x in tokens/s, "
              f"{best['ours']['pairs_per_s'] / best['trl']['pairs_per_s']:.2f}x in pairs/s   (target >= 1.5x)")
        print(f"peak memory ours/trl: {best['ours']['peak_rss_mb'] / best['trl']['peak_rss_mb']:.2f}x   (target <= 0.8x)")
    write_json(args, {"peak_flops": max(b["peak_flops"] for b in best.values()), "best": best, "runs": runs})


WORKERS = {"ours": run_ours, "trl": run_trl}

if __name__ == "__main__":
    main()

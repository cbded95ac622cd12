"""Benchmark: DPO training, rlhf-workflow vs TRL's DPOTrainer.

Both train SmolLM2-135M-Instruct (or --model; fp32, or bf16 autocast with --precision bf16; on the
CPU, or the GPU when there is one; no gradient checkpointing, AdamW, β 0.1, reference = the starting
model) for the same number of optimizer steps on the same pairs with the same batch size and max
length, each in its own process, alternating, `--repeats` times.

* Time: ours counts its reference pass (log-probs of the pairs it trains on, computed before
  training) plus training; TRL's counts `trainer.train()`, which runs its reference model at every
  step (its default) or, with `--trl-precompute`, its own precompute pass first.
* Throughput: tokens per second counted the same way by both: the real (non-pad) tokens of the
  sequences prompt + chosen and prompt + rejected (our metrics `tokens`, TRL's `num_tokens`). Ours
  computes each prompt once but counts it twice as TRL does, so the ratio is the ratio of pairs
  trained per second.
* Memory: peak resident set size of the trainer's process.
* Agreement: the step-1 loss and mean chosen/rejected log-probs of both (the policy starts as its
  reference, so the loss is log 2 for both; the log-probs check that both score the same tokens).
* FLOP/s: model FLOPs (6·N·tokens for training, 2·N·tokens for the reference, N = non-embedding
  parameters, plus the vocabulary projection at response tokens; attention not counted) per second,
  as a fraction of this machine's matmul peak in the same precision, measured in the trainer's own process just
  before and just after its run (the higher of the two). Ours counts the tokens it computes (each prompt once),
  TRL the real tokens of its padded rows (each prompt twice).

    pip install trl              # the peer; not a dependency of rlhf-workflow
    python bench/dpo_vs_trl.py   # about 20 minutes on 2 CPU cores

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


def model_flops(n_body: int, hidden: int, vocab: int, tokens: float, response_tokens: float, *, passes: int) -> float:
    """2·passes FLOPs per parameter per token (passes = 3 for forward + backward, 1 for inference)."""
    return 2 * passes * (n_body * tokens + hidden * vocab * response_tokens)


def run_ours(args: argparse.Namespace) -> dict:
    from rlhf_workflow.config import DPOLossConfig, ModelConfig, TrainConfig
    from rlhf_workflow.data.io import read_rows
    from rlhf_workflow.data.schemas import PairRow
    from rlhf_workflow.models import load_tokenizer
    from rlhf_workflow.models.loading import load_model
    from rlhf_workflow.models.layout import LayoutOptions
    from rlhf_workflow.models.logprobs import SequenceLogprobs
    from rlhf_workflow.train.dpo import REF_FIELDS, DPOObjective, precompute_reference
    from rlhf_workflow.train.loop import make_accelerator, train
    from rlhf_workflow.train.pairs import tokenize_pairs

    config = TrainConfig(max_steps=args.steps, per_device_batch_size=args.batch, lr=1e-6, scheduler="constant",
                         log_every=1, seed=args.seed, share_prefix=not args.no_share, pack_length=args.pack_length,
                         max_tokens_per_forward=args.max_tokens, precision=TRAIN_PRECISION[args.precision])
    options = LayoutOptions.from_config(config)
    out = Path(args.workdir) / f"ours-{args.repeat}"
    accelerator = make_accelerator(config, out)
    tokenizer = load_tokenizer(args.model)
    rows = read_rows(args.data, PairRow)
    examples = tokenize_pairs(rows, tokenizer, max_length=args.max_length, chat_template=True, source=args.data,
                              extra=lambda row: {f: None for f in REF_FIELDS})
    policy = SequenceLogprobs(load_model(ModelConfig(name_or_path=args.model)), chunk=args.chunk)
    objective = DPOObjective(tokenizer.pad_token_id, DPOLossConfig(beta=0.1), options)

    # the reference pass covers the pairs the run trains on (steps × batch of them), in its own batches
    trained = examples[: args.steps * args.batch] if args.steps * args.batch < len(examples) else examples
    policy.to(accelerator.device)  # as `run_dpo` does: the reference pass on the device it trains on
    start = time.perf_counter()
    precompute_reference(policy, trained, rows, out / "pairs.ref.jsonl", accelerator,
                         pad_token_id=tokenizer.pad_token_id, options=options, batch_size=16)
    reference_seconds = time.perf_counter() - start
    train(objective, policy, trained, config, out, accelerator)
    seconds = time.perf_counter() - start

    logs = [json.loads(line) for line in jsonl_lines(out / "metrics.jsonl")]
    logs = [r for r in logs if r["split"] == "train"]
    body = sum(p.numel() for n, p in policy.model.named_parameters() if "embed_tokens" not in n)
    cfg = policy.model.config
    pair_tokens = [len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in trained]
    response_tokens = [len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in trained]
    steps_pairs = args.steps * args.batch  # pairs trained (one epoch of `trained`, or several)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    flops = (model_flops(body, cfg.hidden_size, cfg.vocab_size, mean(pair_tokens) * steps_pairs,
                         mean(response_tokens) * steps_pairs, passes=3)
             + model_flops(body, cfg.hidden_size, cfg.vocab_size, sum(pair_tokens), sum(response_tokens), passes=1))
    return {"seconds": seconds, "reference_seconds": reference_seconds, "tokens": sum(r["tokens"] for r in logs),
            **peak_memory(), "flops": flops, "step1": {
                "loss": logs[0]["loss"], "logps/chosen": logs[0]["logps/chosen"], "logps/rejected": logs[0]["logps/rejected"]}}


def run_trl(args: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from rlhf_workflow.models import load_tokenizer
    from rlhf_workflow.models.loading import local_directory

    torch.manual_seed(args.seed)
    directory = local_directory(args.model)  # the same weights (a built-in model already converted from GGUF)
    tokenizer = load_tokenizer(args.model)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    rows = [json.loads(line) for line in jsonl_lines(args.data)]
    dataset = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    config = DPOConfig(
        output_dir=str(Path(args.workdir) / f"trl-{args.repeat}"), max_steps=args.steps,
        per_device_train_batch_size=args.batch, gradient_accumulation_steps=1, learning_rate=1e-6,
        lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none",
        gradient_checkpointing=False, max_length=args.max_length, beta=0.1, seed=args.seed, use_cpu=device() == "cpu",
        dataloader_num_workers=0, bf16=args.precision == "bf16", fp16=False, precompute_ref_log_probs=args.trl_precompute,
    )
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    history = [row for row in trainer.state.log_history if "loss" in row]
    tokens = max(row.get("num_tokens", 0) for row in trainer.state.log_history)  # attention-mask ones
    body = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    # TRL's real tokens, and its response tokens estimated with our tokenizer's count of the same pairs
    response_share = args.response_share
    flops = model_flops(body, model.config.hidden_size, model.config.vocab_size, tokens, tokens * response_share, passes=3) \
        + model_flops(body, model.config.hidden_size, model.config.vocab_size, tokens, tokens * response_share, passes=1)
    return {"seconds": seconds, "tokens": tokens, **peak_memory(), "flops": flops, "step1": {
        "loss": history[0]["loss"], "logps/chosen": history[0].get("logps/chosen"),
        "logps/rejected": history[0].get("logps/rejected")}}


def main() -> None:
    parser = bench_parser(__doc__, WORKERS)
    add_pair_training_options(parser)
    parser.add_argument("--chunk", type=int, default=1024, help="ours: dpo.logprob_chunk (0 = full logits, as TRL)")
    parser.add_argument("--trl-precompute", action="store_true", help="TRL with precompute_ref_log_probs=True")
    parser.add_argument("--response-share", type=float, default=0.5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if dispatch(args, WORKERS, measure_peak=True):
        return

    workdir, data = write_pairs(args, "bench-dpo-")
    response_share = _response_share(data, args.max_length, args.model)
    worker_args = pair_training_worker_args(args, workdir, data) + [
        "--chunk", str(args.chunk), "--response-share", str(response_share)]
    worker_args += ["--trl-precompute"] if args.trl_precompute else []
    runs = run_selected(__file__, args, WORKERS, worker_args)

    where = "GPU" if device() == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"\nDPO, {args.model} {args.precision} on {where}: {args.steps} steps × {args.batch} pairs, "
          f"max_length {args.max_length}, β 0.1; best of {args.repeats} runs each")
    print(f"ours: share_prefix={not args.no_share}, pack_length={args.pack_length}, "
          f"max_tokens_per_forward={args.max_tokens}, logprob_chunk={args.chunk}, reference precomputed (timed); "
          f"TRL: precompute_ref_log_probs={args.trl_precompute}")
    print(f"{args.precision} matmul peak of this machine, measured around each run: "
          f"{peak_range(runs)}")
    print(f"{'trainer':<8}{'tokens/s':>10}{'pairs/s':>9}{'peak RSS MB':>13}{'GFLOP/s':>9}{'of peak':>9}"
          f"{'step-1 loss':>13}{'logp chosen':>13}{'logp rejected':>15}")
    best = {}
    for name, results in runs.items():
        fastest = max(results, key=lambda r: r["tokens_per_s"])
        flops = fastest["flops"] / fastest["seconds"]
        best[name] = {**fastest, "pairs_per_s": args.steps * args.batch / fastest["seconds"],
                      "peak_rss_mb": min(r["peak_rss_mb"] for r in results), "flops_per_s": flops,
                      "of_peak": of_peak(fastest)}
        s1 = fastest["step1"]
        print(f"{name:<8}{fastest['tokens_per_s']:>10.1f}{best[name]['pairs_per_s']:>9.2f}{best[name]['peak_rss_mb']:>13.0f}"
              f"{flops / 1e9:>9.1f}{of_peak(fastest):>9.1%}{s1['loss']:>13.4f}{_fmt(s1['logps/chosen']):>13}"
              f"{_fmt(s1['logps/rejected']):>15}")
    if "ours" in best:
        print(f"ours: reference pass {best['ours']['reference_seconds']:.1f} s of {best['ours']['seconds']:.1f} s")
    if len(best) == 2:
        print(f"throughput ours/trl: {best['ours']['tokens_per_s'] / best['trl']['tokens_per_s']:.2f}x   (target >= 2x)")
        print(f"peak memory ours/trl: {best['ours']['peak_rss_mb'] / best['trl']['peak_rss_mb']:.2f}x   (target <= 0.7x)")
        print(f"step-1 loss difference: {abs(best['ours']['step1']['loss'] - best['trl']['step1']['loss']):.2e}")
    write_json(args, {"peak_flops": max(b["peak_flops"] for b in best.values()), "best": best, "runs": runs})


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _response_share(data: Path, max_length: int, model: str) -> float:
    """Response tokens / (prompt + response tokens) of the pair sequences, with our tokenizer (for TRL's FLOPs)."""
    from rlhf_workflow.data.io import read_rows
    from rlhf_workflow.data.schemas import PairRow
    from rlhf_workflow.models import load_tokenizer
    from rlhf_workflow.train.pairs import tokenize_pairs

    examples = tokenize_pairs(read_rows(data, PairRow), load_tokenizer(model), max_length=max_length,
                              chat_template=True, source=str(data))
    responses = sum(len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples)
    return responses / (responses + sum(2 * len(e["prompt_ids"]) for e in examples))


WORKERS = {"ours": run_ours, "trl": run_trl}

if __name__ == "__main__":
    main()

"""Benchmark: sampling n responses per prompt, our hf backend vs plain batched `model.generate`, and
our vllm backend where vLLM imports (vLLM's CPU build on a CPU: run it with .venv-vllm's python).

Both sample from SmolLM2-135M-Instruct (or --model; fp32, or bf16 weights with --precision bf16; on the
CPU, or the GPU when there is one) for the same prompts (chat template applied),
the same n, temperature, top-p and max new tokens, and the same number of prompts per batch,
each in its own process, alternating, `--repeats` times.

* ours: `HFGenerator` — prompts sorted by length into batches, the prompt computed once for its
  n samples, finished rows dropped from the batch as they end;
* plain: the prompts in file order, each batch left-padded and passed to
  ``model.generate(do_sample=True, num_return_sequences=n)``, stopping at the same end-of-turn ids;
* vllm: `VLLMGenerator` — vLLM's offline engine with the backend's settings (on a CPU: eager, a
  2 GiB KV cache), all prompts in one call; the engine's build is timed apart (``build_s``) and
  not in the throughput. vLLM cuts its engine to one torch thread "for serving" unless
  OMP_NUM_THREADS is set: the worker sets it to the cores the hf workers use, so all three get the
  same cores.

Throughput counts generated tokens up to each response's end (its end-of-turn token not
counted; padding after it not counted) per second of generation, so the two are compared on
the work that produces text; sampled lengths differ between runs, which the token count absorbs.

    python bench/generate.py            # about 10 minutes on 2 CPU cores
    # the demo's evaluation sampling (64 prompts x 1, 48 tokens, one batch), with vLLM:
    .venv-vllm/bin/python bench/generate.py --prompts-count 64 --n 1 --batch 64 --max-new-tokens 48

The benchmark prints figures; it never fails on speed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import WORDS, bench_parser, device, dispatch, peak_memory, run_selected, write_json  # noqa: E402
from rlhf_workflow.data.io import jsonl_lines
TASKS = ["Write a short note about {}.", "Explain in one paragraph why {} matters.", "List three facts about {}.",
         "Answer briefly: what is {}?", "Describe {} to a child.", "Give an example of {} and explain it."]


def make_prompts(n: int, seed: int) -> list[dict]:
    """Chat prompts of varied length: an instruction about a topic, sometimes with context before it."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = " ".join(rng.choices(WORDS, k=rng.randint(1, 3)))
        text = rng.choice(TASKS).format(topic)
        if rng.random() < 0.5:
            context = " ".join(rng.choices(WORDS, k=int(rng.lognormvariate(3, 0.8)))).capitalize() + "."
            text = f"{context}\n\n{text}"
        rows.append({"id": str(i), "prompt": [{"role": "user", "content": text}]})
    return rows


def run_vllm(args: argparse.Namespace) -> dict:
    """The vllm backend on the same prompts and sampling (see the module docstring)."""
    import torch

    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    from rlhf_workflow.config import ModelConfig, SamplingConfig, VLLMBackendConfig
    from rlhf_workflow.generate.base import GenerationRequest
    from rlhf_workflow.generate.vllm import VLLMGenerator
    from rlhf_workflow.models import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    dtype = "bfloat16" if args.precision == "bf16" else "float32"
    rows = [json.loads(line) for line in jsonl_lines(args.prompts)]
    sampling = SamplingConfig(n=args.n, temperature=args.temperature, top_p=args.top_p,
                              max_new_tokens=args.max_new_tokens, seed=args.seed + args.repeat)
    start = time.perf_counter()
    generator = VLLMGenerator(ModelConfig(name_or_path=args.model, dtype=dtype),
                              VLLMBackendConfig(max_model_len=1024, chunk_size=len(rows)), tokenizer, seed=args.seed)
    build = time.perf_counter() - start
    requests = [GenerationRequest(r["id"], r["prompt"]) for r in rows]
    start = time.perf_counter()
    results = [r for group in generator.generate(requests, sampling) for r in group]
    seconds = time.perf_counter() - start
    generator.close()
    return {"seconds": seconds, "build_s": build, "threads": os.environ["OMP_NUM_THREADS"],
            "tokens": sum(s.num_tokens for r in results for s in r.samples),
            "ended": sum(s.finish_reason == "stop" for r in results for s in r.samples),
            "samples": len(rows) * args.n, **peak_memory()}


def run_worker(args: argparse.Namespace) -> dict:
    import torch

    from rlhf_workflow.config import ModelConfig, SamplingConfig
    from rlhf_workflow.data.templating import encode_prompt
    from rlhf_workflow.generate.base import GenerationRequest
    from rlhf_workflow.generate.hf import HFGenerator, end_of_turn_ids
    from rlhf_workflow.models import load_tokenizer
    from rlhf_workflow.models.loading import load_model

    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer(args.model)
    dtype = "bfloat16" if args.precision == "bf16" else "float32"
    model = load_model(ModelConfig(name_or_path=args.model, dtype=dtype)).to(device()).eval()
    rows = [json.loads(line) for line in jsonl_lines(args.prompts)]
    sampling = SamplingConfig(n=args.n, temperature=args.temperature, top_p=args.top_p,
                              max_new_tokens=args.max_new_tokens, seed=args.seed + args.repeat)
    stop = end_of_turn_ids(tokenizer, model)
    if args.worker == "ours":
        generator = HFGenerator(model, tokenizer, batch_size=args.batch)
        requests = [GenerationRequest(r["id"], r["prompt"]) for r in rows]
        start = time.perf_counter()
        results = [r for group in generator.generate(requests, sampling) for r in group]
        seconds = time.perf_counter() - start
        tokens = sum(s.num_tokens for r in results for s in r.samples)
        ended = sum(s.finish_reason == "stop" for r in results for s in r.samples)
    else:
        prompts = [encode_prompt(tokenizer, r["prompt"]) for r in rows]
        pad = tokenizer.pad_token_id
        tokens = ended = 0
        start = time.perf_counter()
        for begin in range(0, len(prompts), args.batch):
            batch = prompts[begin : begin + args.batch]
            width = max(len(p) for p in batch)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=model.device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=model.device)
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=args.temperature,
                                     top_p=args.top_p, top_k=0, max_new_tokens=args.max_new_tokens,
                                     num_return_sequences=args.n, eos_token_id=sorted(stop), pad_token_id=pad)
            for row in out[:, width:].tolist():
                end = next((k for k, t in enumerate(row) if t in stop), None)
                tokens += len(row) if end is None else end
                ended += end is not None
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": tokens, "ended": ended, "samples": len(rows) * args.n, **peak_memory()}


def main() -> None:
    parser = bench_parser(__doc__, WORKERS, what="generator")
    parser.add_argument("--prompts-count", type=int, default=48)
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--batch", type=int, default=8, help="prompts per batch (× n rows)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--prompts", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if dispatch(args, WORKERS):
        return

    import tempfile

    workdir = tempfile.mkdtemp(prefix="bench-generate-")
    prompts = Path(workdir) / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in make_prompts(args.prompts_count, args.seed)))
    worker_args = ["--prompts", str(prompts), "--n", str(args.n), "--batch", str(args.batch), "--max-new-tokens",
                   str(args.max_new_tokens), "--temperature", str(args.temperature), "--top-p", str(args.top_p),
                   "--seed", str(args.seed)]
    runs = run_selected(__file__, args, WORKERS, worker_args)
    where = "GPU" if device() == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"\nGeneration, {args.model} {args.precision} on {where}: {args.prompts_count} prompts × "
          f"n={args.n}, {args.batch} prompts per batch, max_new_tokens {args.max_new_tokens}, temperature "
          f"{args.temperature}, top_p {args.top_p}; best of {args.repeats} runs each")
    print(f"{'generator':<10}{'tokens/s':>10}{'seconds':>9}{'tokens':>8}{'ended turn':>12}{'peak RSS MB':>13}"
          f"{'engine build s':>16}")
    best = {}
    for name, results in runs.items():
        fastest = max(results, key=lambda r: r["tokens_per_s"])
        best[name] = fastest
        build = f"{fastest['build_s']:.1f}" if "build_s" in fastest else ""
        print(f"{name:<10}{fastest['tokens_per_s']:>10.1f}{fastest['seconds']:>9.1f}{fastest['tokens']:>8}"
              f"{fastest['ended'] / fastest['samples']:>12.0%}{min(r['peak_rss_mb'] for r in results):>13.0f}"
              f"{build:>16}")
    if "ours" in best and "plain" in best:
        print(f"throughput ours/plain: {best['ours']['tokens_per_s'] / best['plain']['tokens_per_s']:.2f}x   "
              "(target >= 1.5x)")
    for other in ("ours", "plain"):
        if "vllm" in best and other in best:
            print(f"throughput vllm/{other}: {best['vllm']['tokens_per_s'] / best[other]['tokens_per_s']:.2f}x")
    if "vllm" in best:
        print("(vllm's peak RSS is the benchmark's own process; its engine runs in processes of its own)")
    write_json(args, {"best": best})


def vllm_imports() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


# run_worker is one function for two generators: args.worker picks it
WORKERS = {"ours": run_worker, "plain": run_worker, **({"vllm": run_vllm} if vllm_imports() else {})}

if __name__ == "__main__":
    main()

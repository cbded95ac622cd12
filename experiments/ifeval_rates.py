"""How often SmolLM2-135M-Instruct follows each IFEval instruction type, by IFEval's own checkers.

For every one of IFEval's 25 types, ``--prompts`` single-instruction prompts of the `ifeval` task's
dev split (a request about a topic plus the instruction in its checker's own words), each answered
``--n`` times at temperature 1 with at most ``--max-new-tokens`` tokens, as the demo samples. Prints
a Markdown table (strict and loose rate per type, with the share of answers cut at the token limit)
and writes the figures as JSON. The demo's `instructions` task uses the types this model follows
sometimes: too rare a type gives the reward model nothing to learn from.

    python experiments/ifeval_rates.py                     # about 10 minutes on 2 CPU cores
    python experiments/ifeval_rates.py --max-new-tokens 128 --out rates-128.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

MODEL = "smollm2-135m-instruct"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16, help="prompts per instruction type")
    parser.add_argument("--n", type=int, default=4, help="answers per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--types", nargs="*", help="instruction types (default: all 25)")
    parser.add_argument("--out", default="ifeval_rates.json")
    args = parser.parse_args(argv)

    import torch
    from tqdm import tqdm

    from rlhf_workflow.config import ModelConfig, SamplingConfig
    from rlhf_workflow.generate.base import GenerationRequest
    from rlhf_workflow.generate.hf import HFGenerator
    from rlhf_workflow.models import load_tokenizer
    from rlhf_workflow.models.loading import load_model
    from rlhf_workflow.tasks import ifeval

    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer(MODEL)
    generator = HFGenerator(load_model(ModelConfig(name_or_path=MODEL)).eval(), tokenizer, batch_size=args.batch_size)
    sampling = SamplingConfig(n=args.n, temperature=1.0, max_new_tokens=args.max_new_tokens, seed=args.seed)
    types = args.types or ifeval.TYPES
    figures: dict[str, dict] = {}
    start = time.perf_counter()
    for instruction_type in tqdm(types, desc="types"):
        rows = ifeval.prompts("dev", args.prompts, args.seed, min_instructions=1, max_instructions=1,
                              types=[instruction_type])
        requests = [GenerationRequest(row["id"], [{"role": "user", "content": row["prompt"]}]) for row in rows]
        by_id = {row["id"]: row for row in rows}
        followed, cut = [], 0
        for group in generator.generate(requests, sampling):
            for result in group:
                for sample in result.samples:
                    followed.append(ifeval.follows(by_id[result.id], sample.text)[0])
                    cut += sample.finish_reason == "length"
        figures[instruction_type] = {
            "answers": len(followed),
            "strict": sum(f.strict for f in followed) / len(followed),
            "loose": sum(f.loose for f in followed) / len(followed),
            "cut_at_limit": cut / len(followed),
        }
    seconds = time.perf_counter() - start
    result = {"model": MODEL, "prompts_per_type": args.prompts, "n": args.n, "max_new_tokens": args.max_new_tokens,
              "temperature": 1.0, "split": "dev", "seed": args.seed, "seconds": round(seconds, 1), "types": figures}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{MODEL}, {args.prompts} prompts x {args.n} answers per type, at most {args.max_new_tokens} new tokens, "
          f"temperature 1 ({seconds:.0f} s)\n")
    print("| instruction type | strict | loose | cut at the limit |")
    print("| --- | --- | --- | --- |")
    for name, f in sorted(figures.items(), key=lambda item: -item[1]["strict"]):
        print(f"| {name} | {f['strict']:.2f} | {f['loose']:.2f} | {f['cut_at_limit']:.2f} |")
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

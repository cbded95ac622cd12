"""What the benchmarks share: synthetic preference pairs, peak memory, the machine's matmul peak,
and running each trainer in its own process, alternating, several times."""

from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
import time

WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there been one all we their has would when if so no will more about up out who them what "
    "model answer question reason because example first second value result simple clear short long careful"
).split()


def make_pairs(n: int, seed: int, max_length: int) -> list[dict]:
    """Pairs with log-normal prompt/response lengths (in words), kept well inside max_length tokens.

    Real preference data has prompts and responses of very different lengths (and chosen and
    rejected differ too), so padding is part of what a benchmark on these pairs measures.
    """
    rng = random.Random(seed)

    def text(mean_words: float) -> str:
        k = max(1, min(int(rng.lognormvariate(0, 0.7) * mean_words), max_length // 3))
        return " ".join(rng.choices(WORDS, k=k)).capitalize() + "."

    rows = []
    for i in range(n):
        prompt = text(18)
        chosen, rejected = text(40), text(40)
        while rejected == chosen:
            rejected = text(40)
        rows.append({"id": str(i), "prompt": [{"role": "user", "content": prompt}],
                     "chosen": [{"role": "assistant", "content": chosen}],
                     "rejected": [{"role": "assistant", "content": rejected}]})
    return rows


def peak_rss_mb() -> float:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_peak_flops(size: int = 1024, repeats: int = 20) -> float:
    """The fp32 FLOP/s of square matmuls on this machine (the best of a few timed rounds)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = max(best, 2 * size**3 * repeats / (time.perf_counter() - start))
    return best


def run_workers(script: str, names: list[str], repeats: int, worker_args: list[str]) -> dict[str, list[dict]]:
    """Run ``script --worker NAME *worker_args`` for each name, ``repeats`` rounds, alternating so that
    drifts of the machine hit every trainer; each worker prints one ``RESULT {json}`` line."""
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for repeat in range(repeats):
        for name in names:
            command = [sys.executable, script, "--worker", name, "--repeat", str(repeat), *worker_args]
            print(f"run {repeat + 1}/{repeats}: {name} ...", flush=True)
            proc = subprocess.run(command, capture_output=True, text=True,
                                  env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
                raise SystemExit(f"{name} failed")
            result = json.loads(line[len("RESULT "):])
            result["tokens_per_s"] = result["tokens"] / result["seconds"]
            runs[name].append(result)
            print(f"  {result['seconds']:.1f} s, {result['tokens']:.0f} tokens, {result['tokens_per_s']:.1f} tokens/s, "
                  f"peak RSS {result['peak_rss_mb']:.0f} MB", flush=True)
    return runs

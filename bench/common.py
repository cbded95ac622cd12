"""What the benchmarks share: synthetic preference pairs, peak memory, the machine's matmul peak,
and running each trainer in its own process, alternating, several times (the worker protocol:
`bench_parser` for the options, `dispatch` in a worker process, `run_selected` in the benchmark's own)."""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there been one all we their has would when if so no will more about up out who them what "
    "model answer question reason because example first second value result simple clear short long careful"
).split()


def make_pairs(n: int, seed: int, max_length: int, scale: float = 1.0) -> list[dict]:
    """Pairs with log-normal prompt/response lengths (in words: means 18 and 40, times ``scale``),
    kept well inside max_length tokens.

    Real preference data has prompts and responses of very different lengths (and chosen and
    rejected differ too), so padding is part of what a benchmark on these pairs measures.
    """
    rng = random.Random(seed)

    def text(mean_words: float) -> str:
        k = max(1, min(int(rng.lognormvariate(0, 0.7) * mean_words), max_length // 3))
        return " ".join(rng.choices(WORDS, k=k)).capitalize() + "."

    rows = []
    for i in range(n):
        prompt = text(18 * scale)
        chosen, rejected = text(40 * scale), text(40 * scale)
        while rejected == chosen:
            rejected = text(40 * scale)
        rows.append({"id": str(i), "prompt": [{"role": "user", "content": prompt}],
                     "chosen": [{"role": "assistant", "content": chosen}],
                     "rejected": [{"role": "assistant", "content": rejected}]})
    return rows


def peak_rss_mb() -> float:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def device() -> str:
    """Where a benchmark's models run: the GPU when there is one."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def peak_memory() -> dict[str, float]:
    """This process's peak memory: resident set (MB), and on a GPU the peak allocated by torch (MB)."""
    import torch

    found = {"peak_rss_mb": peak_rss_mb()}
    if torch.cuda.is_available():
        found["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return found


# --precision's names (fp32, bf16) as a training config names them (train.precision)
TRAIN_PRECISION = {"fp32": "float32", "bf16": "bfloat16"}


def matmul_peak_flops(size: int = 1024, repeats: int = 20, precision: str = "fp32", budget_s: float = 2.0) -> float:
    """The FLOP/s of square matmuls in ``precision`` (fp32, bf16) on `device` (the best of three
    timed rounds of up to ``repeats`` matmuls); a GPU is synchronised around each round and given
    larger matrices.

    The rounds are cut to fit about ``budget_s`` in all: a CPU without bf16 instructions emulates
    bf16 matmuls at about 1 GFLOP/s (an AVX2-only AMD EPYC: 2 s for one of 1024³), where 20 a round
    took over two minutes and made the reduced GPU check time out."""
    import torch

    where = device()
    if where == "cuda":
        size = max(size, 8192)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = (torch.randn(size, size, dtype=dtype, device=where) for _ in range(2))

    def sync() -> None:
        if where == "cuda":
            torch.cuda.synchronize()

    def timed(count: int) -> float:
        sync()
        start = time.perf_counter()
        for _ in range(count):
            a @ b
        sync()
        return time.perf_counter() - start

    first = timed(1)  # warm-up
    if first > budget_s / 4:  # a kernel this slow is measured by one more matmul (a GPU's first call also sets up cuBLAS)
        return 2 * size**3 / timed(1)
    one = min(timed(1) for _ in range(3))  # warm-up, and one matmul's time
    repeats = max(1, min(repeats, int(budget_s / 4 / max(one, 1e-9))))
    return max(2 * size**3 * repeats / timed(repeats) for _ in range(3))


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


# ---------------------------------------------------------------- the worker protocol

Worker = Callable[[argparse.Namespace], dict]


def bench_parser(doc: str, workers: Sequence[str], what: str = "trainer") -> argparse.ArgumentParser:
    """The parser of a benchmark that compares ``workers`` (names), each run in a process of its own.

    Its description is the first paragraph of ``doc``. It has the options every such benchmark has:
    --seed, --only NAME, --repeats, and the hidden --worker NAME --repeat K with which `run_workers`
    starts one worker (``what`` names a worker in the help: trainer, generator).
    """
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="the model every worker starts from: a built-in name, a directory or a .gguf file")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="fp32, or bf16 (training: autocast over fp32 weights, as train.precision; generation: bf16 weights)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--only", choices=list(workers), help=f"run one {what}")
    parser.add_argument("--repeats", type=int, default=2, help=f"runs of each {what}, alternating; the best is reported")
    parser.add_argument("--worker", choices=list(workers), help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=0, help=argparse.SUPPRESS)
    return parser


def dispatch(args: argparse.Namespace, workers: dict[str, Worker], *, measure_peak: bool = False) -> bool:
    """In a worker process (``--worker NAME``): run that worker and print its ``RESULT {json}`` line
    for `run_workers`; returns True. In the benchmark's own process it does nothing and returns False.

    With ``measure_peak`` the worker's process also measures the matmul peak (`matmul_peak_flops`,
    in --precision) just before and just after the worker's run, and the result carries the higher
    of the two as ``peak_flops`` (both in ``peak_flops_before_after``). A peak measured once, minutes
    before the run, is not the peak the run had: a shared 2-core VM measured 112 to 178 GFLOP/s
    within one hour, which moved a run's fraction of the peak by half of itself."""
    if not args.worker:
        return False
    before = matmul_peak_flops(precision=args.precision, budget_s=1.0) if measure_peak else None
    result = workers[args.worker](args)
    if before is not None:
        after = matmul_peak_flops(precision=args.precision, budget_s=1.0)
        result.update(peak_flops=max(before, after), peak_flops_before_after=[before, after])
    print("RESULT " + json.dumps(result), flush=True)
    return True


def of_peak(result: dict) -> float:
    """A worker's model FLOP/s as a fraction of the matmul peak measured around its run (`dispatch`)."""
    return result["flops"] / result["seconds"] / result["peak_flops"]


def peak_range(runs: dict[str, list[dict]]) -> str:
    """The matmul peaks measured around every run of ``runs`` (`run_selected`), for a line of a benchmark's report."""
    peaks = [p for results in runs.values() for r in results for p in r["peak_flops_before_after"]]
    return f"{min(peaks) / 1e9:.1f} to {max(peaks) / 1e9:.1f} GFLOP/s"


def run_selected(script: str, args: argparse.Namespace, workers: dict[str, Worker],
                 worker_args: list[str]) -> dict[str, list[dict]]:
    """`run_workers` for the workers --only selects (all, in the order of ``workers``), --repeats rounds."""
    names = [name for name in workers if not args.only or name == args.only]
    return run_workers(script, names, args.repeats, worker_args + ["--model", args.model, "--precision", args.precision])


def write_json(args: argparse.Namespace, figures: dict) -> None:
    """The benchmark's figures in --json, if given (with the machine and the options that made them)."""
    if args.json:
        import torch

        where = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
        options = {k: v for k, v in vars(args).items() if k not in ("worker", "repeat", "json", "data", "workdir")}
        Path(args.json).write_text(json.dumps({"device": where, "options": options, **figures}, indent=1) + "\n")


# ---------------------------------------------------------------- trainers on synthetic pairs (rm_vs_trl, dpo_vs_trl)


def add_pair_training_options(parser: argparse.ArgumentParser) -> None:
    """The sizes of a training run on `make_pairs` pairs, our layout options both trainer benchmarks
    have, and the hidden --data / --workdir that a worker gets."""
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps for each trainer")
    parser.add_argument("--batch", type=int, default=8, help="pairs per step")
    parser.add_argument("--pairs", type=int, default=512)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--length-scale", type=float, default=1.0,
                        help="pair lengths × this (means 18 prompt and 40 response words at 1; long sequences: 10)")
    parser.add_argument("--no-share", action="store_true", help="ours without prompt sharing (chosen and rejected rows)")
    parser.add_argument("--pack-length", type=int, default=0, help="ours: train.pack_length (0 = no packing)")
    parser.add_argument("--max-tokens", type=int, default=1024,
                        help="ours: train.max_tokens_per_forward (0 = one forward per micro-batch, as TRL)")
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)


def write_pairs(args: argparse.Namespace, prefix: str) -> tuple[str, Path]:
    """A new temporary work directory (named ``prefix``...) and the --pairs pairs written in it."""
    workdir = tempfile.mkdtemp(prefix=prefix)
    data = Path(workdir) / "pairs.jsonl"
    rows = make_pairs(args.pairs, args.seed, args.max_length, args.length_scale)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return workdir, data


def pair_training_worker_args(args: argparse.Namespace, workdir: str, data: Path) -> list[str]:
    """The arguments that pass the options of `add_pair_training_options` (and --seed) on to a worker."""
    return ["--data", str(data), "--workdir", workdir, "--steps", str(args.steps), "--batch", str(args.batch),
            "--max-length", str(args.max_length), "--seed", str(args.seed), "--max-tokens", str(args.max_tokens),
            "--pack-length", str(args.pack_length)] + (["--no-share"] if args.no_share else [])

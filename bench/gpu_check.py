"""A prepared check of rlhf-workflow on one NVIDIA GPU (at most 8 minutes on an H200), with a reduced
mode that runs on a CPU.

    bash scripts/gpu_check.sh OUT               # on a lent GPU machine: carried wheels, then this script
    python bench/gpu_check.py --out OUT         # the full check, on a GPU
    python bench/gpu_check.py --cpu --out OUT   # reduced, on a CPU (tests/test_gpu_check.py keeps it working)

It uses only what a stock CUDA PyTorch image holds (torch, transformers, accelerate, peft; TRL
when carried as a wheel) and downloads nothing: the models are built from configs with random
weights, the tokenizer is the test suite's locally trained one (tests/conftest.py).

1. **Numerics in bf16** on the device:
   * the prefix-shared, packed and shared + packed layouts against plain per-sequence padded
     forwards (`models.layout`, the test suite's reference): the last hidden state of every sequence
     and its summed response log-prob agree within LAYOUT_TOLERANCE of their size (bf16 keeps 8
     bits of mantissa: a few roundings make ~1e-2; a token attending where it should not makes O(1));
   * generation stops at end of turn: with the end-of-turn token made certain every sample ends
     at once ("stop", no text), with another token made certain every sample runs to
     max_new_tokens ("length");
   * the losses at step 1 (from the training runs below): DPO's is log 2 (the policy starts as its
     reference), for ours and TRL's; the reward model's is near log 2 (a fresh scalar head:
     RM_STEP1_TOLERANCE).
2. **Training throughput** at max length 2048 (`bench/dpo_vs_trl.py`, `bench/rm_vs_trl.py`, each
   trainer in its own process, bf16 autocast): tokens/s and model FLOP utilisation against the
   bf16 matmul peak measured in the same run, ours and TRL's on the same pairs.
3. **Generation** tokens/s of the hf backend against plain `model.generate` (`bench/generate.py`).

Writes OUT/gpu_check.json (every figure) and OUT/gpu_check.md (the tables); exits non-zero when a
numerics check fails. The full check's model: a Llama of about 0.6B parameters (MODEL_SIZES).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))  # the test suite's tokenizer and layout reference

LAYOUT_TOLERANCE = 2e-2  # relative to the largest |value| of the reference (bf16; fp32 agrees to 1e-6)
# |loss - log 2| of a reward model with a fresh head: its rewards spread by about 0.02·sqrt(hidden)
# (0.8 at hidden 1536), which makes the step-1 loss log 2 + 0.15 ± 0.3 for 8 pairs; a NaN, an
# overflow or a wrong token read falls far outside
RM_STEP1_TOLERANCE = 0.5
DPO_STEP1_TOLERANCE = 1e-2  # |loss - log 2| when the policy is its own reference (bf16 autocast)

# the model of each mode (Llama config; the vocabulary is the tokenizer's unless given: the full
# check's 49,152 rows, SmolLM2's, make the output projection cost what a real one does)
MODEL_SIZES = {
    "gpu": dict(vocab_size=49152, hidden_size=1536, intermediate_size=4096, num_hidden_layers=22,
                num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=4096),
    "cpu": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512),
}
RUNS = {
    # bench options of each mode: DPO/RM training, generation
    "gpu": {"train": ["--steps", "6", "--batch", "8", "--pairs", "96", "--max-length", "2048", "--length-scale", "5",
                      "--max-tokens", "16384", "--repeats", "1"],
            "generate": ["--prompts-count", "64", "--n", "8", "--batch", "16", "--max-new-tokens", "256", "--repeats", "1"]},
    "cpu": {"train": ["--steps", "2", "--batch", "2", "--pairs", "8", "--max-length", "128", "--repeats", "1"],
            "generate": ["--prompts-count", "4", "--n", "2", "--batch", "2", "--max-new-tokens", "8", "--repeats", "1"]},
}


def build_model(mode: str, out: Path) -> tuple[Path, int]:
    """A Llama with random weights of the mode's size and the test suite's chat tokenizer, saved
    to OUT/model; returns the directory and the number of parameters."""
    import torch
    from conftest import build_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer("chatml")
    size = {"vocab_size": len(tokenizer), **MODEL_SIZES[mode]}
    torch.manual_seed(0)
    config = LlamaConfig(**size, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    model = LlamaForCausalLM(config)
    directory = out / "model"
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory, sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- numerics


def check_layouts(device: str) -> dict:
    """Every layout against plain padded forwards, in bf16 on ``device`` (the test suite's groups
    and reference: tests/test_batching.py)."""
    import torch
    from conftest import build_tokenizer
    from test_batching import LAYOUTS, model_for, random_groups, reference

    from rlhf_workflow.models.forward import body_hidden_states
    from rlhf_workflow.models.layout import layout
    from rlhf_workflow.models.logprobs import sequence_logprobs

    tokenizer = build_tokenizer("chatml")
    model = model_for(tokenizer, "sdpa").to(device=device, dtype=torch.bfloat16)
    found = {}
    for name, options in LAYOUTS.items():
        worst_hidden = worst_logp = 0.0
        for seed in range(3):
            groups = random_groups(seed, responses=1 + seed % 3)
            batch = {k: v.to(device) for k, v in layout(groups, tokenizer.pad_token_id, options).items()}
            with torch.no_grad():
                hidden = body_hidden_states(model, batch["input_ids"], batch["attention_mask"], batch["position_ids"])
                logp, _ = sequence_logprobs(hidden, model.lm_head, batch, chunk=7)
                want_last, want_logp = reference(model, tokenizer, groups, left=False)
            last = hidden[batch["last_row"], batch["last_col"]].float()
            want_last, want_logp = want_last.float(), want_logp.float()
            worst_hidden = max(worst_hidden, ((last - want_last).abs().max() / want_last.abs().max()).item())
            worst_logp = max(worst_logp, ((logp.float() - want_logp).abs().max() / want_logp.abs().max()).item())
        found[name] = {"last_hidden_rel": worst_hidden, "logp_rel": worst_logp,
                       "ok": worst_hidden <= LAYOUT_TOLERANCE and worst_logp <= LAYOUT_TOLERANCE}
    return found


def check_end_of_turn(device: str) -> dict:
    """The hf backend on the tiny test model with one token made certain by a bias on its logit:
    the end-of-turn token (every sample stops at once) or another one (every sample runs to the end)."""
    import torch
    from conftest import build_model as build_tiny, build_tokenizer

    from rlhf_workflow.config import SamplingConfig
    from rlhf_workflow.generate.base import GenerationRequest
    from rlhf_workflow.generate.hf import HFGenerator

    tokenizer = build_tokenizer("chatml")
    model = build_tiny(tokenizer, tie_word_embeddings=False).to(device=device, dtype=torch.bfloat16)
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    head.weight.data.copy_(model.lm_head.weight.data.float())
    model.lm_head = head.to(device=device, dtype=torch.bfloat16)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    other = tokenizer.convert_tokens_to_ids("the") if "the" in tokenizer.get_vocab() else 100
    sampling = SamplingConfig(n=3, max_new_tokens=12, temperature=1.0, seed=1)
    requests = [GenerationRequest(f"p{i}", [{"role": "user", "content": f"Say {i} things."}]) for i in range(5)]
    found = {}
    for name, token in (("end_of_turn_certain", end), ("other_token_certain", other)):
        with torch.no_grad():
            model.lm_head.bias.zero_()
            model.lm_head.bias[token] = 1e4
        generator = HFGenerator(model, tokenizer, batch_size=2)
        samples = [s for results in generator.generate(list(requests), sampling) for r in results for s in r.samples]
        finishes = sorted({s.finish_reason for s in samples})
        tokens = sorted({s.num_tokens for s in samples})
        want = (["stop"], [0]) if token == end else (["length"], [sampling.max_new_tokens])
        found[name] = {"finish_reasons": finishes, "response_tokens": tokens, "samples": len(samples),
                       "ok": (finishes, tokens) == want and len(samples) == len(requests) * sampling.n}
    return found


# ---------------------------------------------------------------- throughput (the benchmarks)


def run_bench(script: str, options: list[str], out: Path, log: Path) -> dict:
    """``bench/<script>`` with ``options`` and --json; its figures (it prints its own tables to ``log``)."""
    result_file = out / f"{Path(script).stem}.json"
    command = [sys.executable, str(HERE / script), *options, "--json", str(result_file)]
    start = time.perf_counter()
    with log.open("a") as sink:
        sink.write(f"\n$ {' '.join(command)}\n")
        sink.flush()
        done = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    if done.returncode != 0 or not result_file.exists():
        return {"error": f"{script} exited with status {done.returncode} (see {log.name})"}
    return {**json.loads(result_file.read_text()), "wall_s": time.perf_counter() - start}


def run_trainers(bench: str, options: list[str], out: Path, log: Path) -> dict:
    """``bench/<bench>.py`` for ours, then for TRL's trainer when TRL is there, each in a run of its
    own, so that a TRL that fails on this image costs only its own figures."""
    found = run_bench(f"{bench}.py", options + ["--only", "ours"], out, log)
    if "error" in found or not have_trl():
        return found
    theirs = run_bench(f"{bench}.py", options + ["--only", "trl"], out, log)
    if "error" in theirs:
        return {**found, "trl_error": theirs["error"]}
    return {**found, "best": {**found["best"], **theirs["best"]}, "runs": {**found["runs"], **theirs["runs"]},
            "peak_flops": max(found["peak_flops"], theirs["peak_flops"])}


def have_trl() -> bool:
    import importlib.util

    return importlib.util.find_spec("trl") is not None


# ---------------------------------------------------------------- the summary


def step1_checks(dpo: dict, rm: dict) -> dict:
    found = {}
    for name, figures in (dpo.get("best") or {}).items():
        loss = figures["step1"]["loss"]
        found[f"dpo_{name}"] = {"loss": loss, "ok": math.isfinite(loss) and abs(loss - math.log(2)) <= DPO_STEP1_TOLERANCE}
    for name, figures in (rm.get("best") or {}).items():
        loss = figures["step1_loss"]
        found[f"rm_{name}"] = {"loss": loss, "ok": math.isfinite(loss) and abs(loss - math.log(2)) <= RM_STEP1_TOLERANCE}
    return found


def markdown(summary: dict) -> str:
    lines = [f"# rlhf-workflow GPU check ({summary['mode']} mode): {summary['device']}", "",
             f"Model: random Llama, {summary['parameters'] / 1e6:.1f}M parameters; torch {summary['torch']}, "
             f"transformers {summary['transformers']}, TRL {summary['trl'] or 'not installed'}; "
             f"{summary['seconds']:.0f} s in all.", "", "## Numerics (bf16)", "",
             "| check | figures | ok |", "| --- | --- | --- |"]
    for name, found in summary["layouts"].items():
        lines.append(f"| layout `{name}` vs plain forwards | last hidden {found['last_hidden_rel']:.1e}, summed log-prob "
                     f"{found['logp_rel']:.1e} (relative; tolerance {LAYOUT_TOLERANCE:g}) | {'yes' if found['ok'] else '**no**'} |")
    for name, found in summary["end_of_turn"].items():
        lines.append(f"| generation, {name.replace('_', ' ')} | finish {found['finish_reasons']}, response tokens "
                     f"{found['response_tokens']}, {found['samples']} samples | {'yes' if found['ok'] else '**no**'} |")
    for name, found in summary["step1"].items():
        lines.append(f"| step-1 loss, {name.replace('_', ' ')} | {found['loss']:.4f} (log 2 = {math.log(2):.4f}) | "
                     f"{'yes' if found['ok'] else '**no**'} |")
    lines += ["", "## Training (bf16 autocast) and generation", "",
              "| stage | trainer | tokens/s | of the bf16 matmul peak | peak GPU memory (MB) |", "| --- | --- | --- | --- | --- |"]
    for stage in ("dpo_vs_trl", "rm_vs_trl"):
        figures = summary[stage]
        if "error" in figures:
            lines.append(f"| {stage} | – | {figures['error']} | | |")
            continue
        for name, best in figures["best"].items():
            lines.append(f"| {stage.split('_')[0].upper()} | {name} | {best['tokens_per_s']:.0f} | {best['of_peak']:.1%} | "
                         f"{_mb(best)} |")
        if len(figures["best"]) == 2:
            ratio = figures["best"]["ours"]["tokens_per_s"] / figures["best"]["trl"]["tokens_per_s"]
            lines.append(f"| {stage.split('_')[0].upper()} | ours / TRL | {ratio:.2f}× | | |")
        if "trl_error" in figures:
            lines.append(f"| {stage.split('_')[0].upper()} | TRL | {figures['trl_error']} | | |")
    generation = summary["generate"]
    if "error" in generation:
        lines.append(f"| generation | – | {generation['error']} | | |")
    else:
        for name, best in generation["best"].items():
            lines.append(f"| generation | {'hf backend' if name == 'ours' else 'model.generate'} | "
                         f"{best['tokens_per_s']:.0f} | | {_mb(best)} |")
    peak = (summary["dpo_vs_trl"].get("peak_flops") or 0) / 1e12
    lines += ["", f"highest bf16 matmul peak measured around the DPO runs: {peak:.1f} TFLOP/s.", ""]
    return "\n".join(lines)


def _mb(figures: dict) -> str:
    return f"{figures['peak_gpu_mb']:.0f}" if "peak_gpu_mb" in figures else "– (CPU)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the folder for gpu_check.json, gpu_check.md and the logs")
    parser.add_argument("--cpu", action="store_true", help="the reduced mode: tiny model, short sequences, on the CPU")
    args = parser.parse_args(argv)

    import torch
    import transformers

    mode = "cpu" if args.cpu else "gpu"
    if mode == "gpu" and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; --cpu runs the reduced check on the CPU", file=sys.stderr)
        return 2
    device = "cuda" if mode == "gpu" else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "gpu_check.log"
    log.write_text("")
    start = time.perf_counter()
    model_dir, parameters = build_model(mode, out)
    print(f"gpu_check: {mode} mode, model of {parameters / 1e6:.1f}M parameters in {model_dir}", flush=True)
    summary: dict = {"mode": mode, "device": torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)",
                     "torch": torch.__version__, "transformers": transformers.__version__, "parameters": parameters}
    try:
        import trl

        summary["trl"] = trl.__version__
    except ImportError:
        summary["trl"] = None
    summary["layouts"] = check_layouts(device)
    summary["end_of_turn"] = check_end_of_turn(device)
    print("gpu_check: numerics done", flush=True)
    common = ["--model", str(model_dir), "--precision", "bf16"]
    for bench in ("dpo_vs_trl", "rm_vs_trl"):
        summary[bench] = run_trainers(bench, common + RUNS[mode]["train"], out, log)
    summary["generate"] = run_bench("generate.py", common + RUNS[mode]["generate"], out, log)
    summary["step1"] = step1_checks(summary["dpo_vs_trl"], summary["rm_vs_trl"])
    summary["seconds"] = time.perf_counter() - start
    checks = [c["ok"] for group in ("layouts", "end_of_turn", "step1") for c in summary[group].values()]
    errors = [summary[s]["error"] for s in ("dpo_vs_trl", "rm_vs_trl", "generate") if "error" in summary[s]]
    summary["ok"] = all(checks) and not errors
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "gpu_check.md").write_text(markdown(summary))
    print((out / "gpu_check.md").read_text())
    print(f"gpu_check: {'every check passed' if summary['ok'] else 'FAILED: ' + '; '.join(errors or ['a numerics check'])}"
          f" ({summary['seconds']:.0f} s); {out / 'gpu_check.json'}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

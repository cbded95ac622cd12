"""The `run` and `demo` commands: simulated feedback and a reward model (optional), the online loop
(or its offline baseline), then the report.

With ``feedback.enabled`` the run starts as the paper does, from human preferences simulated by a
gold judge (`online.feedback`), and the reward model trained on them is the loop's judge. The loop
is `online.loop`, the report `eval.report`: this module only chains them.
"""

from __future__ import annotations

from pathlib import Path

from rlhf_workflow.config import RunConfig
from rlhf_workflow.data.run_layout import RunLayout

DEMO_RECIPE = Path(__file__).parent / "recipes" / "demo.yaml"  # `rlhf-workflow demo`
DEMO_FULL_RECIPE = Path(__file__).parent / "recipes" / "demo-full.yaml"  # `demo --full`, the experiments' size


def run_workflow(config: RunConfig, *, force: bool = False) -> Path:
    """Run or continue ``config``'s run directory, then write its report; returns the report path."""
    from rlhf_workflow.eval.report import write_report
    from rlhf_workflow.online.loop import Runner

    from rlhf_workflow.online.preflight import check_run
    from rlhf_workflow.processes import process_state

    if config.generation.backend == "vllm":  # every sampling of the run uses it: say so before any work
        from rlhf_workflow.generate.vllm import import_vllm

        import_vllm()
    check_run(config, process_state().num_processes)  # every path, model, function and batch size, in seconds
    with Runner(config, force=force) as runner:
        run_dir = runner.run()
        report = RunLayout(run_dir).report_markdown
        if runner.state.is_main_process:
            report = write_report(run_dir)
            print(f"run finished: {run_dir}; report: {report} (and report.html)")
        runner.state.wait_for_everyone()
    return report


# The demo's precision settings and their fp32 values, for a CPU where bf16 is not faster: every
# bf16 setting of the recipe (a test holds this to the recipe: one missing here would run emulated
# bf16 there, ~100x slower), and the preference model's (fp32 in the recipe, as trained with
# `feedback.train_pm=true`; bf16 where experiments/claims.py's variants follow the reward model's),
# which a run directory continued keeps as it started, like the others
PRECISION_KEYS = {"generation.dtype": "float32", "judge.dtype": "float32",
                  "feedback.rm.train.precision": "float32", "feedback.pm.train.precision": "float32",
                  "dpo.train.precision": "float32"}
BF16_MIN_SPEEDUP = 1.3  # bf16 is kept where its matmuls run at least this much faster than fp32


def run_demo(overrides: list[str], *, force: bool = False, full: bool = False) -> Path:
    """`rlhf-workflow demo [--full]`: a packaged demo recipe (same as `run` on configs/demo.yaml, or
    configs/demo-full.yaml), in fp32 instead of bf16 on a CPU where bf16 is not faster (`demo_precision`)."""
    config = demo_config(overrides, DEMO_FULL_RECIPE if full else DEMO_RECIPE)
    if not force:
        refuse_the_other_demo(config, full, overrides)
    return run_workflow(config, force=force)


DEMO_SIZES = ("feedback.prompts", "prompts.per_iteration", "prompts.eval_count")  # where demo and --full differ


def has_demo_sizes(config: RunConfig, recipe: Path) -> bool:
    """Whether ``config`` has the `DEMO_SIZES` of the demo recipe ``recipe`` (DEMO_RECIPE or DEMO_FULL_RECIPE)."""
    from rlhf_workflow.config import load_config

    sizes = load_config(RunConfig, recipe)
    return all(config.value_at(key) == sizes.value_at(key) for key in DEMO_SIZES)


def refuse_the_other_demo(config: RunConfig, full: bool, overrides: list[str]) -> None:
    """A run directory holding a run of the other demo recipe (`demo` where ``--full`` was asked, or
    the reverse; runs/demo held the full recipe's runs before it became `--full`) is refused with the
    command that continues it (the user's own settings kept), where the generic refusal of a changed
    config would offer --force, which would set the whole run aside and start it again (the sizes
    feed its first stage)."""
    import shlex

    from rlhf_workflow.config import load_config
    from rlhf_workflow.errors import UserError

    existing = RunLayout(config.output_dir).config
    if not existing.exists():
        return
    try:
        held = load_config(RunConfig, existing)
    except (OSError, UserError):
        return  # not a run's config: the run itself says what is wrong with it
    if has_demo_sizes(held, DEMO_RECIPE if full else DEMO_FULL_RECIPE) and all(
            held.value_at(k) != config.value_at(k) for k in DEMO_SIZES):
        words = ["rlhf-workflow", "demo", *([] if full else ["--full"]), *overrides]
        if not any(o.startswith("output_dir=") for o in overrides):
            words.append(f"output_dir={config.output_dir}")
        raise UserError(f"{config.output_dir} holds a run of {'the demo' if full else 'the full demo'} "
                        f"({', '.join(f'{k}={held.value_at(k)}' for k in DEMO_SIZES)}): continue it with "
                        f"`{shlex.join(words)}`, or give this one another output_dir")


def demo_config(overrides: list[str], recipe: Path = DEMO_RECIPE) -> RunConfig:
    """A demo recipe with ``overrides``, and `demo_precision`'s fp32 settings under them."""
    from rlhf_workflow.config import load_config

    from rlhf_workflow.processes import decided_on_main, process_state

    config = load_config(RunConfig, recipe, overrides)
    # the main process measures and every process runs its choice: under `accelerate launch` two
    # processes timing their own matmuls near the threshold could otherwise choose differently
    precision = decided_on_main(process_state(), lambda: demo_precision(config))  # type: ignore[arg-type]
    if precision:
        config = load_config(RunConfig, recipe, precision + overrides)  # the user's own settings win
    return config  # type: ignore[return-value]


def demo_precision(config: RunConfig) -> list[str]:
    """Overrides that put the demo in fp32 where bf16 would slow it down, else none (`fp32_fallback`
    of every `PRECISION_KEYS` setting, the preference model's included)."""
    return fp32_fallback(config, PRECISION_KEYS, "demo")


def run_config(recipe: str | Path | None, overrides: list[str]) -> RunConfig:
    """`rlhf-workflow run`'s recipe with ``overrides``, its bf16 settings in fp32 on a CPU where bf16 is
    not faster (`fp32_fallback`, as the demo does); the command line's own settings win."""
    from rlhf_workflow.config import config_reference, load_config
    from rlhf_workflow.processes import decided_on_main, process_state

    config = load_config(RunConfig, recipe, overrides)
    bf16 = {key.key: "float32" for key in config_reference(RunConfig)
            if key.key.rpartition(".")[2] in ("dtype", "precision") and config.value_at(key.key) == "bfloat16"}
    if not bf16:
        return config  # type: ignore[return-value]
    precision = decided_on_main(process_state(), lambda: fp32_fallback(config, bf16, "run"))  # type: ignore[arg-type]
    return load_config(RunConfig, recipe, precision + overrides) if precision else config  # type: ignore[return-value]


def fp32_fallback(config: RunConfig, keys: dict[str, str], who: str) -> list[str]:
    """Overrides that set ``keys`` (bf16 settings) to their fp32 values where bf16 would slow the run
    down, else none.

    A recipe may sample, score and train in bf16, which CPUs with fast bf16 units (AMD Zen 4's
    AVX512-BF16, Intel's AMX) run 2-4x faster than fp32. Other CPUs, some with AVX512-BF16, run
    bf16 matmuls at half the speed of fp32, and those without bf16 instructions 100x slower. On a
    CPU the choice is measured (`cpu_bf16_speedup`) and printed; a run directory that already holds
    a run keeps the precision it started with, so that continuing it never changes its recipe.
    GPUs keep the recipe.
    """
    from rlhf_workflow.config import load_config
    from rlhf_workflow.errors import UserError
    from rlhf_workflow.processes import no_accelerator

    existing = RunLayout(config.output_dir).config
    if existing.exists():
        try:
            held = load_config(RunConfig, existing)
        except (OSError, UserError):
            return []  # not a run's config: the run itself says what is wrong with it
        return [f"{key}={held.value_at(key)}" for key in keys if held.value_at(key) is not None]
    if not no_accelerator():
        return []
    speedup = cpu_bf16_speedup()
    if speedup >= BF16_MIN_SPEEDUP:
        print(f"{who}: bf16 matmuls run {speedup:.2g}x as fast as fp32 on this CPU: sampling, scoring and "
              "training in bf16", flush=True)
        return []
    settings = " ".join(f"{k}={v}" for k, v in keys.items())
    print(f"{who}: bf16 matmuls run {speedup:.2g}x as fast as fp32 on this CPU (under {BF16_MIN_SPEEDUP}x): "
          f"the {who} runs in fp32 ({settings})" + ("" if who == "demo" else "; give bf16 on the command line "
                                                   "to keep it"), flush=True)
    return [f"{key}={value}" for key, value in keys.items()]


def cpu_bf16_speedup(repeats: int = 7, budget_s: float = 1.0) -> float:
    """fp32 time / bf16 time of a matmul of the demo model's shapes (1024 tokens × 576 → 1536): the
    best of up to ``repeats`` each, fp32 and bf16 taking turns after a warm-up of both, ending once
    ``budget_s`` has passed after the warm-up.

    A CPU without bf16 instructions (no AVX512-BF16, no AMX: an AMD Zen 3, say) emulates bf16
    matmuls about 100x slower than fp32: one of these shapes took 1.8 s there. Where oneDNN reports
    no native bf16, the matmul has 64 rows instead of 1024, enough to show the ratio in a second.
    """
    import time

    import torch

    from rlhf_workflow.processes import cpu_has_native_bf16

    rows = 1024 if cpu_has_native_bf16() else 64
    pairs = {dtype: (torch.randn(rows, 576, dtype=dtype), torch.randn(576, 1536, dtype=dtype))
             for dtype in (torch.float32, torch.bfloat16)}
    best = {dtype: float("inf") for dtype in pairs}
    measuring_since = 0.0
    for turn in range(repeats + 2):
        if turn == 2:  # the first two turns warm up the kernels and their threads
            measuring_since = time.perf_counter()
        for dtype, (a, b) in pairs.items():
            start = time.perf_counter()
            a @ b
            if turn >= 2:
                best[dtype] = min(best[dtype], time.perf_counter() - start)
        if turn >= 2 and time.perf_counter() - measuring_since > budget_s:
            break
    return best[torch.float32] / best[torch.bfloat16]

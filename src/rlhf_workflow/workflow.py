"""The `run` and `demo` commands: simulated feedback and a reward model (optional), the online loop
(or its offline baseline), then the report.

With ``feedback.enabled`` the run starts as the paper does, from human preferences, simulated by a
gold judge: π0 samples responses to the feedback prompts, the judge (e.g. the `instructions` task's
constraint checker) labels them, best-vs-worst pairs train a Bradley–Terry reward model (its
held-out accuracy in ``feedback/rm_eval.json``), and that reward model is the loop's judge.

The loop is `online.loop`, reward-model training `train.reward`, its evaluation and the report
`eval`; this module only chains them, so none of those layers imports another above it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Callable

from rlhf_workflow.config import RunConfig

DEMO_RECIPE = Path(__file__).parent / "recipes" / "demo.yaml"


def _feedback(runner: Any) -> Path:
    """The simulated-feedback stages; returns the trained reward model's directory."""
    from rlhf_workflow.config import (AnnotateConfig, DataConfig, EvalRMConfig, GenerateConfig, JudgeConfig, PairsConfig,
                                      PreferenceModelConfig, RewardModelConfig)
    from rlhf_workflow.data.io import iter_jsonl, write_jsonl
    from rlhf_workflow.eval.reward_eval import run_eval_rm
    from rlhf_workflow.generate.stage import run_generate
    from rlhf_workflow.online.annotate import run_annotate
    from rlhf_workflow.online.pairs import run_pairs
    from rlhf_workflow.train.checkpoint import latest_checkpoint
    from rlhf_workflow.train.preference import run_train_pm
    from rlhf_workflow.train.reward import run_train_rm

    c, f = runner.config, runner.config.feedback
    fb = runner.run_dir / "feedback"
    g = c.generation
    main = runner.state.is_main_process

    def generate() -> None:
        run_generate(GenerateConfig(prompts=str(fb / "prompts.jsonl"), output=str(fb / "generations.jsonl"),
                                    backend=g.backend, model=c.policy, sampling=f.sampling,
                                    apply_chat_template=c.apply_chat_template, hf=g.hf, vllm=g.vllm, openai=g.openai))

    def annotate() -> None:
        run_annotate(AnnotateConfig(input=str(fb / "generations.jsonl"), output=str(fb / "scored.jsonl"),
                                    judge=JudgeConfig(type="function", function=f.judge_function),
                                    apply_chat_template=c.apply_chat_template))

    def pairs() -> None:
        if not main:
            return
        run_pairs(PairsConfig(input=str(fb / "scored.jsonl"), output=str(fb / "all_pairs.jsonl"), strategy=f.strategy,
                              seed=c.prompts.seed))
        rows = [row for _, row in iter_jsonl(fb / "all_pairs.jsonl")]
        def key(row: dict) -> str:  # a prompt may be a list of messages
            return row["prompt"] if isinstance(row["prompt"], str) else json.dumps(row["prompt"], sort_keys=True)

        prompts = sorted({key(row) for row in rows})  # held out by prompt: no prompt on both sides
        random.Random(c.prompts.seed).shuffle(prompts)
        held_prompts = set(prompts[: int(round(len(prompts) * f.heldout_share))])
        held = [row for row in rows if key(row) in held_prompts]
        write_jsonl(fb / "heldout_pairs.jsonl", held)
        write_jsonl(fb / "pairs.jsonl", [row for row in rows if key(row) not in held_prompts])
        print(f"feedback: {len(rows) - len(held)} pairs to train the reward model, {len(held)} held out "
              f"({len(held_prompts)} of {len(prompts)} prompts)")

    def train(kind: str) -> Callable[[], None]:
        """Train the reward model ("rm") or the preference model ("pm") on the pairs, the held-out
        pairs as its eval split."""
        def run() -> None:
            out = fb / kind
            if (out / "model").is_dir():
                return
            model = (f.rm_model or c.policy).model_copy(update={"gradient_checkpointing": False})
            held = fb / "heldout_pairs.jsonl"
            has_heldout = held.exists() and held.stat().st_size > 0
            data = DataConfig(train=str(fb / "pairs.jsonl"), eval=str(held) if has_heldout else None,
                              max_length=f.rm_max_length, apply_chat_template=c.apply_chat_template)
            if kind == "rm":
                run_train_rm(RewardModelConfig(output_dir=str(out), model=model, train=f.rm_train, data=data,
                                               group_by_prompt=f.rm_group_by_prompt),
                             resume=latest_checkpoint(out) is not None)
            else:
                run_train_pm(PreferenceModelConfig(output_dir=str(out), model=model, train=f.pm_train, data=data),
                             resume=latest_checkpoint(out) is not None)
        return run

    def evaluate(kind: str) -> Callable[[], None]:
        def run() -> None:
            held = fb / "heldout_pairs.jsonl"
            if main and held.exists() and held.stat().st_size > 0:
                run_eval_rm(EvalRMConfig(model=str(fb / kind / "model"), data=str(held), kind=kind,
                                         output=str(fb / f"{kind}_eval.json"), max_length=f.rm_max_length,
                                         apply_chat_template=c.apply_chat_template))
        return run

    runner.stage("prompts", runner.write_prompts)
    runner.stage("feedback/generate", generate)
    runner.stage("feedback/annotate", annotate)
    runner.stage("feedback/pairs", pairs)
    runner.stage("feedback/rm", train("rm"))
    runner.stage("feedback/eval-rm", evaluate("rm"))
    if f.train_pm:
        runner.stage("feedback/pm", train("pm"))
        runner.stage("feedback/eval-pm", evaluate("pm"))
    return fb / "rm" / "model"


def run_workflow(config: RunConfig, *, force: bool = False) -> Path:
    """Run or continue ``config``'s run directory, then write its report; returns the report path."""
    from rlhf_workflow.eval.report import write_report
    from rlhf_workflow.online.loop import Runner

    runner = Runner(config, force=force)
    if config.feedback.enabled:
        reward_model = _feedback(runner)
        runner.config = config.model_copy(update={"judge": config.judge.model_copy(update={"path": str(reward_model)})})
    run_dir = runner.run()
    report = run_dir / "report" / "report.md"
    if runner.state.is_main_process:
        report = write_report(run_dir)
        print(f"run finished: {run_dir}; report: {report} (and report.html)")
    runner.state.wait_for_everyone()
    return report


def run_demo(overrides: list[str], *, force: bool = False) -> Path:
    """`rlhf-workflow demo`: the packaged demo recipe (same as `run` on configs/demo.yaml)."""
    from rlhf_workflow.config import load_config

    config = load_config(RunConfig, DEMO_RECIPE, overrides)
    return run_workflow(config, force=force)  # type: ignore[arg-type]

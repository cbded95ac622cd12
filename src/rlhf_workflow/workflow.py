"""The `run` and `demo` commands: simulated feedback and a reward model (optional), the online loop
(or its offline baseline), then the report.

With ``feedback.enabled`` the run starts as the paper does, from human preferences simulated by a
gold judge (`online.feedback`), and the reward model trained on them is the loop's judge. The loop
is `online.loop`, the report `eval.report`: this module only chains them.
"""

from __future__ import annotations

from pathlib import Path

from rlhf_workflow.config import RunConfig

DEMO_RECIPE = Path(__file__).parent / "recipes" / "demo.yaml"


def run_workflow(config: RunConfig, *, force: bool = False) -> Path:
    """Run or continue ``config``'s run directory, then write its report; returns the report path."""
    from rlhf_workflow.eval.report import write_report
    from rlhf_workflow.online.feedback import Feedback
    from rlhf_workflow.online.loop import Runner

    with Runner(config, force=force) as runner:
        if config.feedback.enabled:
            runner.stage("prompts", runner.write_prompts)
            for name, work in Feedback(config, runner.run_dir, runner.state).stages():
                runner.stage(name, work)
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

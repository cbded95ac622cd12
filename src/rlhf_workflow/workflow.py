"""The `run` command: the online iterative loop (or its offline baseline), then the report.

The loop is `online.loop`; the report is `eval.report`. This module only chains the two, so
neither layer imports the other.
"""

from __future__ import annotations

from pathlib import Path

from rlhf_workflow.config import RunConfig


def run_workflow(config: RunConfig, *, force: bool = False) -> Path:
    """Run or continue ``config``'s run directory, then write its report; returns the report path."""
    from rlhf_workflow.eval.report import write_report
    from rlhf_workflow.online.loop import run_online
    from rlhf_workflow.processes import process_state

    run_dir = run_online(config, force=force)
    state = process_state()
    report = run_dir / "report" / "report.md"
    if state.is_main_process:
        report = write_report(run_dir)
        print(f"run finished: {run_dir}; report: {report} (and report.html)")
    state.wait_for_everyone()
    return report

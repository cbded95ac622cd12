"""The run directory's layout is built in one place (`data.run_layout.RunLayout`): the loop writes
there and the report, the comparison, the experiments and the benchmarks read there."""

from __future__ import annotations

import re
from pathlib import Path

from rlhf_workflow.data.run_layout import RunLayout

ROOT = Path(__file__).resolve().parent.parent
# a run's own file and folder names, written as a path step (`/ "iter_1"`, `/ f"iter_{t}"`) or a glob
RUN_PATH = re.compile(r'/ f?"(iter_|offline|feedback|eval_prompts|state\.json|report\b|eval"|policy"|dpo"|heldout|'
                      r'gold\.jsonl|scored\.jsonl|pairs\.stats)|glob\(f?"(iter_|\*/(dpo|policy|eval))')


def test_no_run_path_is_built_outside_the_layout():
    sources = [p for folder in ("src", "experiments", "bench") for p in (ROOT / folder).rglob("*.py")
               if p.name != "run_layout.py"]
    found = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}" for p in sources
             for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1) if RUN_PATH.search(line)]
    assert not found, "build these paths with RunLayout:\n" + "\n".join(found)


def test_the_layout_is_the_documented_one(tmp_path):
    layout = RunLayout(tmp_path)
    assert layout.iteration(2).scored == tmp_path / "iter_2" / "scored.jsonl"
    assert layout.policy_dir("offline").eval.gold == tmp_path / "offline" / "eval" / "gold.jsonl"
    assert layout.iteration(0).eval.scored == tmp_path / "iter_0" / "eval" / "scored.jsonl"
    assert layout.feedback.trained("rm") == tmp_path / "feedback" / "rm" / "model"
    assert layout.feedback.accuracy("pm") == tmp_path / "feedback" / "pm_eval.json"
    assert (layout.config, layout.state, layout.metrics) == (tmp_path / "config.yaml", tmp_path / "state.json",
                                                            tmp_path / "metrics.jsonl")
    for t in (10, 2, 1, 0):
        layout.iteration(t).dir.mkdir()
    (tmp_path / "iter_x").mkdir()
    assert [p.name for p in layout.iterations()] == ["iter_1", "iter_2", "iter_10"]  # by number, π0's left out
    assert layout.trained() == layout.iterations()  # no offline baseline yet

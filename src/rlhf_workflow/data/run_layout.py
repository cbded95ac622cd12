"""Where every file of a run directory lives: the one place a run's paths are built.

    RUN/config.yaml  state.json  metrics.jsonl  eval_prompts.jsonl  report/
    RUN/feedback/    prompts, generations, scored, all_pairs, pairs, heldout_pairs (.jsonl),
                     rm/ pm/ (each a training command's directory, model/ inside), rm_eval.json, pm_eval.json
    RUN/iter_0/eval/                 π0's held-out samples and scores
    RUN/iter_<t>/    prompts.jsonl  generations.jsonl  scored.jsonl  pairs.jsonl  pairs.stats.json
                     dpo/ (the DPO step's training while it runs)  policy/ (π_t)  eval/ (generations, scored, gold)
    RUN/offline/     the same, for the offline baseline

`RunLayout(run_dir).iteration(t).scored`, `.policy_dir("offline").eval.gold`, `.feedback.trained("rm")`:
the loop writes there, and the report, the comparison and the experiments read there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

OFFLINE = "offline"  # the offline baseline's policy directory
INITIAL = "iter_0"  # π0's


@dataclass(frozen=True)
class EvalFiles:
    """A policy's evaluation on the held-out prompts (POLICY/eval/)."""

    dir: Path

    @property
    def generations(self) -> Path:
        return self.dir / "generations.jsonl"

    @property
    def scored(self) -> Path:
        return self.dir / "scored.jsonl"

    @property
    def gold(self) -> Path:
        return self.dir / "gold.jsonl"


@dataclass(frozen=True)
class PolicyFiles:
    """An iteration's directory (iter_<t>/) or the offline baseline's (offline/): its prompts, samples,
    scores and pairs, the DPO step's training directory, the policy it trained, and that policy's evaluation."""

    dir: Path

    @property
    def name(self) -> str:
        return self.dir.name

    @property
    def prompts(self) -> Path:
        return self.dir / "prompts.jsonl"

    @property
    def generations(self) -> Path:
        return self.dir / "generations.jsonl"

    def generations_of_source(self, index: int) -> Path:
        """The samples of one (policy, temperature) source when an iteration pools several."""
        return self.dir / f"generations.source{index}.jsonl"

    @property
    def scored(self) -> Path:
        return self.dir / "scored.jsonl"

    @property
    def pairs(self) -> Path:
        return self.dir / "pairs.jsonl"

    @property
    def pairs_stats(self) -> Path:
        return self.dir / "pairs.stats.json"

    @property
    def dpo(self) -> Path:
        return self.dir / "dpo"

    @property
    def policy(self) -> Path:
        return self.dir / "policy"

    @property
    def eval(self) -> EvalFiles:
        return EvalFiles(self.dir / "eval")


@dataclass(frozen=True)
class FeedbackFiles:
    """The simulated human feedback (feedback/): its prompts, labelled samples, pairs, and the models
    trained on them (``kind``: "rm" or "pm")."""

    dir: Path

    @property
    def prompts(self) -> Path:
        return self.dir / "prompts.jsonl"

    @property
    def generations(self) -> Path:
        return self.dir / "generations.jsonl"

    @property
    def scored(self) -> Path:
        return self.dir / "scored.jsonl"

    @property
    def all_pairs(self) -> Path:
        return self.dir / "all_pairs.jsonl"

    @property
    def pairs(self) -> Path:
        return self.dir / "pairs.jsonl"

    @property
    def heldout_pairs(self) -> Path:
        return self.dir / "heldout_pairs.jsonl"

    def stage_dir(self, kind: str) -> Path:
        """The training command's directory of the reward (rm) or preference (pm) model."""
        return self.dir / kind

    def trained(self, kind: str) -> Path:
        """The saved reward (rm) or preference (pm) model."""
        return self.dir / kind / "model"

    def accuracy(self, kind: str) -> Path:
        """Its held-out accuracy (eval-rm's JSON)."""
        return self.dir / f"{kind}_eval.json"


@dataclass(frozen=True)
class RunLayout:
    """The files of the run directory ``root`` (see the module docstring)."""

    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def state(self) -> Path:
        return self.root / "state.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def eval_prompts(self) -> Path:
        return self.root / "eval_prompts.jsonl"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def report_markdown(self) -> Path:
        return self.report / "report.md"

    @property
    def report_html(self) -> Path:
        return self.report / "report.html"

    @property
    def feedback(self) -> FeedbackFiles:
        return FeedbackFiles(self.root / "feedback")

    def iteration(self, t: int) -> PolicyFiles:
        """Iteration t's directory (t = 0: π0's, which holds only its evaluation)."""
        return PolicyFiles(self.root / f"iter_{t}")

    @property
    def offline(self) -> PolicyFiles:
        return PolicyFiles(self.root / OFFLINE)

    def policy_dir(self, name: str) -> PolicyFiles:
        """The directory of the policy ``name`` ("iter_2", "offline")."""
        return PolicyFiles(self.root / name)

    def iterations(self) -> list[PolicyFiles]:
        """The iterations' directories present, in order (iter_1, iter_2, ...; π0's left out)."""
        found = [(int(m.group(1)), p) for p in self.root.glob("iter_*") if (m := re.fullmatch(r"iter_(\d+)", p.name))]
        return [PolicyFiles(p) for t, p in sorted(found) if t > 0]

    def trained(self) -> list[PolicyFiles]:
        """The directories of the policies the run trains or trained: the iterations, then offline."""
        return self.iterations() + ([self.offline] if self.offline.dir.is_dir() else [])

    def evaluated(self) -> list[PolicyFiles]:
        """The policies whose evaluation is there (scored held-out samples), in directory order."""
        if not self.root.is_dir():
            return []
        return [PolicyFiles(p) for p in sorted(self.root.iterdir())
                if p.is_dir() and PolicyFiles(p).eval.scored.exists()]

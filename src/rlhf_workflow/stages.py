"""The stages of a run, declared once.

A *stage* is one step of a run (`rlhf-workflow run` / `demo`), named as state.json records it:
``prompts``, ``feedback/generate`` ... ``feedback/eval-pm``, ``iter_0/eval``, then per iteration t
``iter_<t>/generate``, ``iter_<t>/annotate``, ``iter_<t>/pairs``, ``iter_<t>/dpo``, ``iter_<t>/eval``,
then the baseline's ``offline/...``. `plan(config)` lists the stages a recipe runs, in order, each
with the files it reads and writes under the run directory, the recipe keys its outputs depend on,
and the `online.loop.Runner` method that does it. Everything that needs to know a run's stages
reads this list:

* the loop (`Runner.run`) runs it in order, skipping the stages state.json holds (resume);
* `--force` with a changed recipe keeps the completed stages no changed key feeds (`still_valid`:
  stages run in order and each reads what the ones before wrote, so the first stage a changed key
  feeds ends what is kept) and moves the outputs of the others aside (`Stage.outputs`);
* experiments/claims.py starts a variant run from the stages it shares with another run (the same);
* the report lists every stage with its time (or "to do"), and compare names what an unfinished
  run still lacks.

Where a stage's files live is `data.run_layout.RunLayout`; this module only names which are whose.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from rlhf_workflow.config import RunConfig
from rlhf_workflow.data.run_layout import INITIAL, OFFLINE, PolicyFiles, RunLayout

# Keys each group of stages depends on (a key names itself and every key under it)
SAMPLER = ("policy", "apply_chat_template", "generation.backend", "generation.dtype", "generation.hf",
           "generation.vllm", "generation.openai")  # the policy as it samples (`RunConfig.sampling_model`)
LOOP_JUDGE = ("judge", "feedback.judge", "apply_chat_template")  # `online.feedback.loop_judge`
EVALUATION = SAMPLER + LOOP_JUDGE + ("eval", "generation.sampling.n", "dpo.logprob_chunk", "seed")
# Keys that decide which stages a run has rather than what one makes (a stage the new recipe does not
# have is never kept); and the keys that change no stage's outputs
SHAPE = ("mode", "iterations", "offline.after_online", "feedback.enabled", "feedback.train_pm", "feedback.judge")
NO_OUTPUT = ("output_dir",)


@dataclass(frozen=True)
class Stage:
    """One stage of a run: its name in state.json, what it reads and writes (paths under the run
    directory: a file stands for itself and the files written beside it, `companions`), the recipe
    keys it depends on, and ``work``, the `Runner` call that makes its outputs."""

    name: str
    work: Callable[[Any], None] = field(compare=False, repr=False)  # given the `online.loop.Runner`
    reads: tuple[Path, ...]
    writes: tuple[Path, ...]
    keys: tuple[str, ...]
    evaluates: str | None = None  # the policy whose row of metrics.jsonl it appends

    def fed_by(self, key: str) -> bool:
        """Whether the recipe key ``key`` (dotted) changes what this stage makes."""
        return any(key == k or key.startswith(k + ".") or k.startswith(key + ".") for k in self.keys)

    def outputs(self) -> list[Path]:
        """What it wrote that is there now: its directories, its files and their companions."""
        found: list[Path] = []
        for path in self.writes:
            found += [path] if path.is_dir() else companions(path)
        return found


def companions(path: Path) -> list[Path]:
    """A file and those written beside it that exist: ``generations.jsonl`` with
    ``generations.settings.json``, ``generations.errors.jsonl``, ``generations.rank1.jsonl``,
    ``generations.source0.jsonl``; ``pairs.jsonl`` with ``pairs.stats.json``."""
    stem = path.name.split(".")[0]
    return sorted(p for p in path.parent.glob(stem + ".*") if p.name.split(".")[0] == stem) if path.parent.is_dir() else []


def plan(config: RunConfig, run_dir: str | Path | None = None) -> list[Stage]:
    """The stages of ``config``'s run in the order they run (paths under ``run_dir``, by default
    the recipe's output_dir)."""
    c = config
    run = RunLayout(run_dir if run_dir is not None else c.output_dir)
    fb = run.feedback
    judge_model = (fb.trained(c.feedback.judge),) if c.feedback.enabled else ()
    iterations = range(1, c.iterations + 1)

    stages = [Stage(
        "prompts", lambda r: r.write_prompts(), reads=(),
        writes=(run.eval_prompts, *(run.iteration(t).prompts for t in iterations),
                *((fb.prompts,) if c.feedback.enabled else ())),
        keys=("prompts", "seed", "iterations", "feedback.enabled", "feedback.prompts"))]

    if c.feedback.enabled:
        stages += [
            Stage("feedback/generate", lambda r: r.feedback.generate(), reads=(fb.prompts,), writes=(fb.generations,),
                  keys=SAMPLER + ("feedback.sampling", "seed")),
            Stage("feedback/annotate", lambda r: r.feedback.annotate(), reads=(fb.generations,), writes=(fb.scored,),
                  keys=("feedback.judge_function", "apply_chat_template")),
            Stage("feedback/pairs", lambda r: r.feedback.pairs(), reads=(fb.scored,),
                  writes=(fb.all_pairs, fb.heldout_pairs, fb.pairs),
                  keys=("feedback.strategy", "feedback.heldout_share", "prompts.seed", "seed")),
        ]
        kinds = ["rm"] + (["pm"] if c.feedback.train_pm or c.feedback.judge == "pm" else [])
        for kind in kinds:
            stages += [
                Stage(f"feedback/{kind}", lambda r, kind=kind: r.feedback.train(kind), reads=(fb.pairs,),
                      writes=(fb.stage_dir(kind),), keys=(f"feedback.{kind}", "policy", "apply_chat_template", "seed")),
                Stage(f"feedback/eval-{kind}", lambda r, kind=kind: r.feedback.evaluate(kind),
                      reads=(fb.trained(kind),), writes=(fb.accuracy(kind),),
                      keys=("judge.dtype", f"feedback.{kind}.data", "apply_chat_template")),
            ]

    stages.append(Stage(f"{INITIAL}/eval", lambda r: r.evaluate(INITIAL, 0, r.policy(0)),
                        reads=(run.eval_prompts, *judge_model), writes=(run.iteration(0).eval.dir,),
                        keys=EVALUATION, evaluates=INITIAL))

    if c.mode == "online":
        for t in iterations:
            files = run.iteration(t)
            stages += iteration_stages(c, run, files, t, judge_model)
    if c.mode == "offline" or c.offline.after_online:
        stages += offline_stages(c, run, judge_model)
    return stages


def iteration_stages(c: RunConfig, run: RunLayout, files: PolicyFiles, t: int, judge_model: tuple[Path, ...]) -> list[Stage]:
    """Iteration t: π_{t-1} (and earlier policies, at each temperature) samples, the judge scores,
    best-vs-worst pairs, DPO from π_{t-1} against π_ref, evaluation of π_t."""
    earlier = [run.iteration(t - 1 - k).policy for k in range(0, c.generation.earlier_policies + 1) if t - 1 - k >= 1]
    previous = (run.iteration(t - 1).policy,) if t > 1 else ()
    # π_ref: π0 (None: the policy DPO starts from, which is π0 in iteration 1), or π_{t-1}
    reference = None if (t == 1 or c.reference == "previous") else c.policy.name_or_path
    return [
        Stage(f"iter_{t}/generate", lambda r: r.generate(files, r.sources(t), 100 * t), reads=(files.prompts, *earlier),
              writes=(files.generations,),
              keys=SAMPLER + ("generation.sampling", "generation.temperatures", "generation.earlier_policies", "seed")),
        Stage(f"iter_{t}/annotate", lambda r: r.annotate(files), reads=(files.generations, *judge_model),
              writes=(files.scored,), keys=LOOP_JUDGE + ("length_penalty",)),
        Stage(f"iter_{t}/pairs", lambda r: r.pairs(files), reads=(files.scored,), writes=(files.pairs,),
              keys=("pairs", "prompts.seed", "seed")),
        Stage(f"iter_{t}/dpo", lambda r: r.dpo(files, r.policy(t - 1), reference, t), reads=(files.pairs, *previous),
              writes=(files.dpo, files.policy),
              keys=("policy", "apply_chat_template", "dpo", "seed") + (("reference",) if t > 1 else ())),
        Stage(f"iter_{t}/eval", lambda r: r.evaluate(files.name, t, r.policy(t)),
              reads=(run.eval_prompts, files.policy, run.iteration(0).eval.dir, *judge_model),
              writes=(files.eval.dir,), keys=EVALUATION, evaluates=files.name),
    ]


def offline_stages(c: RunConfig, run: RunLayout, judge_model: tuple[Path, ...]) -> list[Stage]:
    """The offline baseline: π0's samples of every loop prompt, scored, paired (as many pairs as the
    online run trained on, or ``offline.max_pairs``), one DPO from π0, its evaluation."""
    files = run.offline
    loop_prompts = tuple(run.iteration(t).prompts for t in range(1, c.iterations + 1))
    return [
        Stage(f"{OFFLINE}/generate", lambda r: r.generate_offline(files), reads=loop_prompts,
              writes=(files.prompts, files.generations), keys=SAMPLER + ("generation.sampling", "seed")),
        Stage(f"{OFFLINE}/annotate", lambda r: r.annotate_offline(files), reads=(files.generations, *judge_model),
              writes=(files.scored,), keys=LOOP_JUDGE + ("length_penalty",)),
        Stage(f"{OFFLINE}/pairs", lambda r: r.pairs(files, r.offline_budget()), reads=(files.scored,),
              writes=(files.pairs,), keys=("pairs", "offline", "mode", "prompts.seed", "seed")),
        Stage(f"{OFFLINE}/dpo", lambda r: r.dpo(files, r.policy(0), None, 1), reads=(files.pairs,),
              writes=(files.dpo, files.policy), keys=("policy", "apply_chat_template", "dpo", "seed")),
        Stage(f"{OFFLINE}/eval", lambda r: r.evaluate(OFFLINE, None, r.trained_policy(files)),
              reads=(run.eval_prompts, files.policy, run.iteration(0).eval.dir, *judge_model),
              writes=(files.eval.dir,), keys=EVALUATION, evaluates=OFFLINE),
    ]


# --------------------------------------------------------------------------- a changed recipe


def leaf_values(config: RunConfig) -> dict[str, Any]:
    """The recipe as {dotted key: value}, every key (an empty section is one value)."""
    out: dict[str, Any] = {}

    def walk(data: dict[str, Any], prefix: str) -> None:
        for key, value in data.items():
            if isinstance(value, dict) and value:
                walk(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = value

    walk(config.model_dump(mode="json"), "")
    return out


def changed_keys(old: RunConfig, new: RunConfig) -> list[str]:
    """The keys whose values differ (output_dir aside: where a run lives changes nothing it makes)."""
    a, b = leaf_values(old), leaf_values(new)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k)
                  and not any(k == n or k.startswith(n + ".") for n in NO_OUTPUT))


def still_valid(completed: list[str], old: RunConfig, new: RunConfig) -> tuple[list[str], str]:
    """The completed stages of a run made with ``old`` whose outputs a run of ``new`` would make the
    same (the seed, the code and the machine being the same), in order, and why the list ends there:
    the completed stages up to the first that ``new`` does not have or that a changed key feeds."""
    changed = changed_keys(old, new)
    stages = {stage.name: stage for stage in plan(new)}
    kept: list[str] = []
    for name in completed:
        stage = stages.get(name)
        if stage is None:
            return kept, f"{name} is not a stage of the new recipe"
        feeding = [key for key in changed if stage.fed_by(key)]
        if feeding:
            return kept, f"{name} is fed by {', '.join(feeding)}"
        kept.append(name)
    return kept, "every stage is kept"


def stage_named(config: RunConfig, run_dir: str | Path, name: str) -> Stage:
    """The stage ``name`` of ``config``'s run in ``run_dir`` (a KeyError if it has none)."""
    for stage in plan(config, run_dir):
        if stage.name == name:
            return stage
    raise KeyError(f"the recipe of {run_dir} has no stage {name}")

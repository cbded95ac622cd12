"""The online iterative loop (and its offline baseline) as a resumable run directory.

    RUN/config.yaml         the resolved recipe; a rerun with a different one is refused unless --force
    RUN/state.json          the stages completed so far, in order, with their seconds and what made them
                            (`provenance.made_by`: versions, git commit, processor)
    RUN/eval_prompts.jsonl  the held-out prompts
    RUN/iter_0/eval/        π0's held-out generations and scores
    RUN/iter_<t>/           prompts.jsonl, generations.jsonl, scored.jsonl, pairs.jsonl (+ .stats.json),
                            dpo/ (the DPO stage: reference log-probs, metrics, checkpoints),
                            policy/ (π_t, safetensors), eval/
    RUN/offline/            the same for the offline baseline (mode: offline)
    RUN/metrics.jsonl       one row per evaluated policy

Iteration t: π_{t-1} samples n responses to this iteration's prompts → the judge scores them →
best-vs-worst pairs → DPO from π_{t-1} against π_ref (π0, or π_{t-1} with reference: previous),
reference log-probs computed once → π_t → evaluation on the held-out prompts.

Every stage is marked done in state.json only after its output is complete, and every stage
resumes by itself (generation and annotation skip rows already written, DPO continues from its
last checkpoint), so rerunning the same command after a crash or a kill finishes the run with
nothing redone that was finished and no row lost or duplicated.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from rlhf_workflow.config import (AnnotateConfig, DataConfig, DPOConfig, GenerateConfig, JudgeConfig, ModelConfig,
                                  PairsConfig, ReferenceConfig, RunConfig, config_to_yaml, command_config)
from rlhf_workflow.data.io import count_jsonl_rows
from rlhf_workflow.data.run_layout import INITIAL, OFFLINE, PolicyFiles, RunLayout
from rlhf_workflow.errors import UserError, keys_named
from rlhf_workflow.online import feedback
from rlhf_workflow.processes import process_state, release_memory

if TYPE_CHECKING:
    from accelerate import PartialState

logger = logging.getLogger(__name__)


class RunState:
    """The completed stages of a run directory (state.json, rewritten atomically after each stage)."""

    def __init__(self, run_dir: Path):
        from rlhf_workflow.data.io import decode_json

        self.path = RunLayout(run_dir).state
        data: Any = {}
        if self.path.exists():
            data = decode_json(self.path.read_text(encoding="utf-8", errors="replace"), str(self.path), whole_file=True)
        completed, seconds, made = ((data.get("completed", []), data.get("seconds", {}), data.get("made_by", {}))
                                    if isinstance(data, dict) else (0, 0, 0))
        if not (isinstance(completed, list) and all(isinstance(s, str) for s in completed) and isinstance(seconds, dict)
                and isinstance(made, dict)):
            raise UserError(f"{self.path} is not a run's state ({{\"completed\": [stage, ...], ...}}): it was changed by "
                            "hand or cut short; delete it to redo every stage whose outputs are not complete")
        self.completed: list[str] = list(completed)
        self.seconds: dict[str, float] = dict(seconds)
        self.made_by: dict[str, str] = {str(k): str(v) for k, v in made.items()}  # stage -> `provenance.made_by`

    def done(self, stage: str) -> bool:
        return stage in self.completed

    def mark(self, stage: str, seconds: float) -> None:
        """``stage`` is done, in ``seconds``, by this process's code and processor."""
        from rlhf_workflow.data.io import atomic_write_text
        from rlhf_workflow.provenance import made_by

        self.completed.append(stage)
        self.seconds[stage] = round(seconds, 2)
        self.made_by[stage] = made_by()
        atomic_write_text(self.path, json.dumps({"completed": self.completed, "last": stage, "seconds": self.seconds,
                                                 "made_by": self.made_by}, indent=1) + "\n")


def check_config(run_dir: Path, config: RunConfig, *, force: bool) -> None:
    """Refuse to continue a run with a different recipe, unless ``force``: then the stages the change
    reaches are redone (`redo_changed`); write the recipe. A run that has not finished its first
    stage holds nothing the recipe made: a new recipe simply replaces it."""
    from rlhf_workflow.data.io import atomic_write_text

    path = RunLayout(run_dir).config
    text = config_to_yaml(config)
    started = bool(RunState(run_dir).completed)
    if started and path.exists() and path.read_text() != text:
        import difflib

        from rlhf_workflow.config import load_config

        # a config.yaml of an earlier version names some keys otherwise (`upgrade_keys`): the same recipe
        old = load_config(RunConfig, path)
        held = config_to_yaml(old)
        diff = [line for line in difflib.unified_diff(held.splitlines(), text.splitlines(), lineterm="", n=0)
                if line[:1] in "+-" and line[:3] not in ("+++", "---")]
        if diff and not force:
            raise UserError(f"{run_dir} holds a run with a different config ({'; '.join(diff[:6])}); use another "
                            "output_dir, or --force to redo the stages the change reaches (their outputs are moved "
                            "aside into replaced-<k>/)")
        if diff:
            redo_changed(run_dir, old, config)
    atomic_write_text(path, text)


def redo_changed(run_dir: Path, old: RunConfig, new: RunConfig) -> None:
    """Make the run in ``run_dir``, begun with the recipe ``old``, one of ``new``: keep its completed
    stages that no changed key feeds (`stages.still_valid`), and move the outputs of every stage from
    the first one to redo on (and of those ``new`` no longer has) into ``run_dir/replaced-<k>/``,
    with their rows of metrics.jsonl and their entries of state.json."""
    from rlhf_workflow.data.io import atomic_write_text, jsonl_lines
    from rlhf_workflow.data.outputs import move_aside
    from rlhf_workflow.stages import changed_keys, plan, still_valid

    state = RunState(run_dir)
    kept, why = still_valid(state.completed, old, new)
    changed = changed_keys(old, new)
    stages = plan(new, run_dir)
    redo, started = [], False
    for stage in stages:
        if stage.name in kept:
            continue
        started = started or stage.name in state.completed or any(stage.fed_by(key) for key in changed)
        if started:
            redo.append(stage)
    gone = [stage for stage in plan(old, run_dir) if stage.name in state.completed
            and stage.name not in {s.name for s in stages}]
    outputs = [path for stage in redo + gone for path in stage.outputs()]
    layout = RunLayout(run_dir)
    kept_policies = {stage.evaluates for stage in stages if stage.name in kept and stage.evaluates}
    rows = jsonl_lines(layout.metrics) if layout.metrics.exists() else []
    stale = [line for line in rows if json.loads(line).get("id") not in kept_policies]
    target = move_aside(run_dir, outputs) if outputs or stale else None
    if target is not None and stale:  # the rows of the policies to evaluate again, beside their files
        atomic_write_text(target / layout.metrics.name, "".join(line + "\n" for line in stale))
        atomic_write_text(layout.metrics, "".join(line + "\n" for line in rows if line not in stale))
    names = [stage.name for stage in redo]
    print(f"--force: the recipe changed ({', '.join(changed[:4])}{', ...' if len(changed) > 4 else ''}); kept "
          f"{len(kept)} completed stages ({why}); {len(names)} to (re)do"
          + (f" from {names[0]}" if names else "") + (f"; their earlier outputs are in {target}" if target else ""))
    atomic_write_text(state.path, json.dumps({"completed": kept, "last": kept[-1] if kept else None,
                                              "seconds": {s: state.seconds[s] for s in kept if s in state.seconds},
                                              "made_by": {s: state.made_by[s] for s in kept if s in state.made_by}},
                                             indent=1) + "\n")


def split_prompts(config: RunConfig) -> list[list[Any]]:
    """The prompt rows of each iteration: one file per iteration, or one file shuffled and cut."""
    from rlhf_workflow.data.io import read_rows
    from rlhf_workflow.data.schemas import PromptRow

    p = config.prompts
    if p.train_per_iteration:
        chunks = [read_rows(path, PromptRow) for path in p.train_per_iteration]
    else:
        rows = read_rows(p.train, PromptRow)
        random.Random(config.seeded(p.seed)).shuffle(rows)
        size = p.per_iteration or len(rows) // config.iterations
        if size == 0 or size * config.iterations > len(rows):
            raise UserError(f"{p.train} has {len(rows)} prompts: too few for {config.iterations} iterations of "
                            f"{size or 'at least 1'}")
        chunks = [rows[t * size : (t + 1) * size] for t in range(config.iterations)]
    seen: set[str] = set()
    for t, chunk in enumerate(chunks, start=1):
        ids = {row.id for row in chunk}
        if ids & seen:
            raise UserError(f"iteration {t}'s prompts repeat ids of an earlier iteration ({sorted(ids & seen)[:3]}); "
                            "the iterations' prompts must be disjoint")
        seen |= ids
    return chunks


def make_prompts(config: RunConfig) -> tuple[list[dict], list[list[dict]], list[dict]]:
    """(the held-out prompts, each iteration's prompts, the feedback's prompts) of a run, from its
    files or its task; a `UserError` for files that do not read, too few prompts or shared ids."""
    from rlhf_workflow.data.io import read_rows, row_to_dict
    from rlhf_workflow.data.schemas import PromptRow

    c, p = config, config.prompts
    feedback_rows: list[dict] = []
    if p.task is not None:
        from rlhf_workflow.tasks import get_task

        task = get_task(p.task)
        try:
            train = task.prompts("train", feedback.prompt_count(c) + c.iterations * p.per_iteration,
                                 c.seeded(p.seed), **p.task_options)
            eval_rows = task.prompts(p.eval_split, p.eval_count, p.seed, **p.task_options)  # whatever the run's seed
        except (TypeError, ValueError) as exc:
            raise UserError(f"prompts.task {p.task}: {exc}") from None
        feedback_rows, train = feedback.carve_prompts(c, train)
        chunks = [train[t * p.per_iteration : (t + 1) * p.per_iteration] for t in range(c.iterations)]
    else:
        eval_rows = [row_to_dict(r) for r in read_rows(p.eval, PromptRow)]
        chunks = [[row_to_dict(r) for r in chunk] for chunk in split_prompts(c)]
    if p.eval_limit:
        eval_rows = eval_rows[: p.eval_limit]
    train_ids = {row["id"] for chunk in chunks for row in chunk}
    overlap = train_ids & {row["id"] for row in eval_rows}
    if overlap:
        raise UserError(f"held-out prompts share ids with training prompts ({sorted(overlap)[:3]}): the "
                        "evaluation must use prompts the policy never trained on")
    return eval_rows, chunks, feedback_rows


def policy_config(config: RunConfig, path: Path | None) -> ModelConfig:
    """π0 (``path`` None) or a saved iterate as a ModelConfig with the recipe's other settings."""
    if path is None:
        return config.policy
    return config.policy.model_copy(update={"name_or_path": str(path), "tokenizer": None})


Source = tuple[ModelConfig, float | None]  # a policy to sample from, at this temperature (None: the recipe's)


class Runner:
    """Runs the stages of one run directory in order, skipping those already done."""

    def __init__(self, config: RunConfig, *, force: bool = False):
        from rlhf_workflow.data.outputs import OutputLock, claim_directory
        from rlhf_workflow.processes import on_main

        self.config = config
        self.run_dir = Path(config.output_dir)
        self.layout = RunLayout(self.run_dir)
        self.judge: JudgeConfig = feedback.loop_judge(config, self.run_dir)
        self.state: PartialState = process_state()
        self.feedback = feedback.Feedback(config, self.run_dir, self.state)
        # one run at a time in a run directory (released by `close`, or by the OS when the process ends)
        self.lock = OutputLock(self.run_dir, directory=True).acquire(self.state)

        def claim() -> None:
            # rerunning a run continues it; files no stage claimed, only if they are a run's (state.json)
            claim_directory(self.run_dir, "run", force=force, resume=True, earlier=self.layout.state.name)
            check_config(self.run_dir, config, force=force)

        on_main(self.state, claim)
        self.state.wait_for_everyone()
        self.progress = RunState(self.run_dir)

    def close(self) -> None:
        self.lock.release()

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def stage(self, name: str, work: Callable[[], Any]) -> None:
        """Run ``work`` unless ``name`` is done; mark it done (main process) once every process finished."""
        if self.progress.done(name):
            return
        if self.state.is_main_process:
            print(f"== {name}", flush=True)
        start = time.perf_counter()
        work()
        release_memory()
        self.state.wait_for_everyone()
        if self.state.is_main_process:
            self.progress.mark(name, time.perf_counter() - start)
        self.state.wait_for_everyone()
        self.progress = RunState(self.run_dir)

    # ------------------------------------------------------------------ stages

    def write_prompts(self) -> None:
        from rlhf_workflow.data.io import write_jsonl

        if not self.state.is_main_process:
            return
        c = self.config
        eval_rows, chunks, feedback_rows = make_prompts(c)
        write_jsonl(self.layout.eval_prompts, eval_rows)
        for t, chunk in enumerate(chunks, start=1):
            write_jsonl(self.layout.iteration(t).prompts, chunk)
        if feedback_rows:
            write_jsonl(self.layout.feedback.prompts, feedback_rows)

    def generate(self, directory: PolicyFiles, sources: list[Source], seed_offset: int) -> None:
        """n responses per prompt from each (policy, temperature) source, pooled into generations.jsonl."""
        from rlhf_workflow.data.io import iter_jsonl, write_jsonl
        from rlhf_workflow.generate.command import run_generate

        g = self.config.generation
        parts = []
        for index, (policy, temperature) in enumerate(sources):
            sampling = g.sampling.model_copy(update={"seed": self.config.seeded(g.sampling.seed + seed_offset + 1000 * index),
                                                     **({"temperature": temperature} if temperature is not None else {})})
            part = directory.generations if len(sources) == 1 else directory.generations_of_source(index)
            with keys_named(RunConfig.stage_keys["generate"]):
                run_generate(command_config(GenerateConfig, g, prompts=str(directory.prompts), output=str(part),
                                          model=self.config.sampling_model(policy), sampling=sampling,
                                          apply_chat_template=self.config.apply_chat_template))
            parts.append(part)
        if len(parts) > 1 and self.state.is_main_process:
            pooled: dict[str, dict] = {}
            for part in parts:
                for _, row in iter_jsonl(part):
                    if row["id"] not in pooled:
                        pooled[row["id"]] = row
                    else:
                        merged = pooled[row["id"]]
                        for key in ("responses", "response_tokens", "finish_reasons"):
                            merged[key] = merged[key] + row[key]
                        if "response_logps" in merged and "response_logps" in row:
                            merged["response_logps"] = merged["response_logps"] + row["response_logps"]
                        else:  # one source without them: none for the pooled row
                            merged.pop("response_logps", None)
            write_jsonl(directory.generations, pooled.values())

    def sources(self, t: int) -> list[Source]:
        """(policy, temperature) pairs iteration t samples from: π_{t-1} and earlier ones, at each temperature."""
        g = self.config.generation
        policies = [self.policy(t - 1)] + [self.policy(t - 1 - k) for k in range(1, g.earlier_policies + 1) if t - 1 - k >= 0]
        temperatures: list[float | None] = list(g.temperatures) or [None]
        return [(p, temp) for p in policies for temp in temperatures]

    def policy(self, t: int) -> ModelConfig:
        return policy_config(self.config, None if t == 0 else self.layout.iteration(t).policy)

    def annotate(self, directory: PolicyFiles) -> None:
        from rlhf_workflow.online.annotate import run_annotate

        run_annotate(AnnotateConfig(input=str(directory.generations), output=str(directory.scored),
                                    judge=self.judge, length_penalty=self.config.length_penalty,
                                    apply_chat_template=self.config.apply_chat_template))

    def pairs(self, directory: PolicyFiles, budget: int = 0) -> None:
        """The pairs of this iteration (of the offline baseline: at most ``budget``, a seeded sample)."""
        from rlhf_workflow.online.pairs import run_pairs

        if not self.state.is_main_process:
            return
        output = directory.pairs
        with keys_named(RunConfig.stage_keys["pairs"]):
            run_pairs(command_config(PairsConfig, self.config.pairs, input=str(directory.scored),
                                   output=str(output), seed=self.config.seeded(self.config.prompts.seed), max_pairs=budget))
        if budget:
            made = count_jsonl_rows(output)
            if made < budget:
                logger.warning("offline: %d pairs, fewer than the budget of %d", made, budget)

    def reuse_first_iteration(self, directory: PolicyFiles, name: str) -> None:
        """Before the offline baseline samples (or scores) π0's responses to every loop prompt, copy
        those iteration 1 already has: iteration 1 sampled the same prompts from the same π0 with the
        same seeds (and scored them with the same judge), so they are exactly the rows offline would
        make, and the stage then does only the rest (the prompts of iterations 2..T)."""
        c = self.config
        first = self.layout.iteration(1).dir / name
        target = directory.dir / name
        if (self.state.is_main_process and c.mode == "online" and self.sources(1) == [(self.policy(0), None)]
                and first.exists() and not target.exists()):
            import shutil

            from rlhf_workflow.data.outputs import settings_path

            if settings_path(first).exists():  # the settings that made them, which are offline's too
                shutil.copyfile(settings_path(first), settings_path(target))
            shutil.copyfile(first, target)
            print(f"offline: reusing iteration 1's {name} (π0's samples of its prompts, same seeds)")
        self.state.wait_for_everyone()

    def generate_offline(self, directory: PolicyFiles) -> None:
        """The baseline's prompts (every iteration's, in order) and π0's samples of them."""
        from rlhf_workflow.data.io import iter_jsonl, write_jsonl

        if self.state.is_main_process:
            write_jsonl(directory.prompts, [row for t in range(1, self.config.iterations + 1)
                                            for _, row in iter_jsonl(self.layout.iteration(t).prompts)])
        self.state.wait_for_everyone()
        self.reuse_first_iteration(directory, "generations.jsonl")
        self.generate(directory, [(self.policy(0), None)], 100)  # iteration 1's seed offset (100 * t)

    def annotate_offline(self, directory: PolicyFiles) -> None:
        self.reuse_first_iteration(directory, "scored.jsonl")
        self.annotate(directory)

    def offline_budget(self) -> int:
        """How many pairs the offline baseline trains on (0: all it has)."""
        c = self.config
        if c.offline.after_online:
            return online_pair_count(self.run_dir)
        if c.offline.match_run:
            return online_pair_count(Path(c.offline.match_run))
        return c.offline.max_pairs

    def trained_policy(self, directory: PolicyFiles) -> ModelConfig:
        return policy_config(self.config, directory.policy)

    def dpo(self, directory: PolicyFiles, start: ModelConfig, reference: str | None, seed_offset: int) -> None:
        from rlhf_workflow.train.checkpoint import remove_checkpoints
        from rlhf_workflow.train.dpo import run_dpo

        d = self.config.dpo
        out = directory.dpo
        config = command_config(
            DPOConfig, d, output_dir=str(out), model=start,
            data=DataConfig(train=str(directory.pairs), max_length=d.data.max_length,
                            apply_chat_template=self.config.apply_chat_template),
            train=d.train.model_copy(update={"seed": self.config.seeded(d.train.seed + seed_offset)}),
            reference=ReferenceConfig(name_or_path=reference, precompute=True, batch_size=d.reference.batch_size),
        )
        target = directory.policy
        # the saved model, then the policy, appear whole by a rename: a kill after either keeps it
        if not (out / "model").is_dir() and not target.is_dir():
            with keys_named(RunConfig.stage_keys["dpo"]):
                run_dpo(config, resume=True)  # continues from the last checkpoint, if any
        if self.state.is_main_process:
            if (out / "model").is_dir():
                if target.exists():  # a policy from a run of this stage cut short: the saved model replaces it
                    import shutil

                    shutil.rmtree(target)
                os.replace(out / "model", target)
            remove_checkpoints(out)  # (left beside the model or the policy when a kill came right after)
        self.state.wait_for_everyone()

    def evaluate(self, name: str, t: int | None, policy: ModelConfig) -> None:
        """Sample the policy's answers to the held-out prompts, score them with the judge, and append
        its metrics (`eval.policy`) to metrics.jsonl."""
        from rlhf_workflow.data.io import JsonlAppender
        from rlhf_workflow.eval.policy import evaluate_policy
        from rlhf_workflow.generate.command import run_generate
        from rlhf_workflow.online.annotate import run_annotate
        from rlhf_workflow.online.judges import FunctionJudge, load_function, make_judge

        c, g = self.config, self.config.generation
        files = self.layout.policy_dir(name)
        generations, scored = files.eval.generations, files.eval.scored
        # as many rows per batch as in training generation, whatever the number of samples per prompt
        hf = g.hf.model_copy(update={"batch_size": max(1, g.hf.batch_size * g.sampling.n // c.eval.sampling.n)})
        with keys_named(RunConfig.stage_keys["eval/generate"]):
            run_generate(command_config(GenerateConfig, g, prompts=str(self.layout.eval_prompts),
                                      output=str(generations), model=self.config.sampling_model(policy), hf=hf,
                                      token_ids=c.eval.kl, apply_chat_template=c.apply_chat_template,
                                      sampling=c.eval.sampling.model_copy(update={"seed": c.seeded(c.eval.sampling.seed)})))
        # every evaluation scores answers to the same prompts: the judge keeps their states between them
        run_annotate(AnnotateConfig(input=str(generations), output=str(scored), judge=self.judge,
                                    apply_chat_template=c.apply_chat_template, keep_prompt_states=True))
        if not self.state.is_main_process:
            return
        baseline = INITIAL
        gold = FunctionJudge(load_function(c.eval.gold_function, "eval.gold_function"), c.eval.gold_function) \
            if c.eval.gold_function else None
        compare = None
        if self.judge.type == "preference_model" and name != baseline:
            compare = make_judge(self.judge, device=self.state.device,
                                 chat_template=c.apply_chat_template).judge.compare_many  # type: ignore[attr-defined]
        metrics = evaluate_policy(c, self.run_dir, name, policy, baseline=baseline, gold=gold, compare=compare,
                                  device=self.state.device)
        metrics = {"id": name, "iteration": t, "mode": "offline" if name == OFFLINE else "online", **metrics}
        stats_file = files.pairs_stats
        if stats_file.exists():
            stats = json.loads(stats_file.read_text())
            metrics.update({"pairs": stats["pairs"], "pairs_chosen_reward": stats["mean_chosen_reward"],
                            "pairs_rejected_reward": stats["mean_rejected_reward"]})
        with JsonlAppender(self.layout.metrics) as sink:
            sink.append([metrics])
        print("eval " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                  for k, v in metrics.items() if not k.endswith("ci95") and k != "policy"))

    # ------------------------------------------------------------------ the run

    def run(self) -> Path:
        """Run the stages of the recipe (`stages.plan`) in order, those not done yet."""
        from rlhf_workflow.stages import plan

        for stage in plan(self.config, self.run_dir):
            if self.progress.done(stage.name):
                continue
            absent = [path for path in stage.reads if not path.exists()]
            if absent:
                raise UserError(f"{self.run_dir}: the stage {stage.name} reads {', '.join(map(str, absent))}, which "
                                "an earlier stage wrote but is not there (moved or deleted by hand?): put it back, "
                                "or start the run afresh in another output_dir")
            self.stage(stage.name, lambda: stage.work(self))
        return self.run_dir


def online_pair_count(run_dir: Path) -> int:
    """The total number of pairs an online run trained on (its iterations' pairs files)."""
    files = [iteration.pairs for iteration in RunLayout(run_dir).iterations() if iteration.pairs.exists()]
    if not files:
        raise UserError(f"offline.match_run: {run_dir} has no iter_*/pairs.jsonl; run the online recipe first")
    return sum(count_jsonl_rows(f) for f in files)


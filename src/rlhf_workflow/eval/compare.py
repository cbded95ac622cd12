"""Paired comparison of policies evaluated on the same held-out prompts.

    rlhf-workflow compare runs/demo                                 # every policy vs π0 (iter_0)
    rlhf-workflow compare runs/demo-s0 runs/demo-s1 runs/demo-s2 --baseline offline
    rlhf-workflow compare pm=runs/pm-s0 pm=runs/pm-s1 rm=runs/rm-s0 rm=runs/rm-s1 --baseline rm/iter_2

Every policy of a run answered the same eval prompts, so the question "is A better than B" is
asked prompt by prompt: d(x) = A(x) − B(x), where A(x) is A's mean over its samples of prompt x, for
the gold score, the proxy reward and the response length. The mean of d over prompts is reported
with a 95 % bootstrap interval (prompts resampled) and the p-value of a paired sign-flip
permutation test (`eval.stats.sign_flip_pvalue`): much tighter than comparing two means, as the
prompt-to-prompt variation cancels.

Several runs of one recipe that differ only in their ``seed`` are pooled: each seed is a block,
A and B paired within it (A of seed s against B of seed s: the same run's policies, or the runs of
two recipes with equal seeds), and the unit of resampling and of sign flips is the prompt with its
differences in every seed, d(x) = [d_s(x) for each seed s]. The estimate is the mean over prompts
× seeds. Its interval and p-value are over prompts given these seeds: they leave out how much
other seeds would differ. So the per-seed differences are reported too, with (three seeds or
more) the seeds' mean and its t-interval over seeds (`eval.stats.t_interval`), and a note where
the seeds disagree in sign. Runs are one recipe when their config.yaml files are equal but for ``seed`` and
``output_dir``; ``NAME=RUN`` names a recipe explicitly.

The proxy reward is compared only where both sides were scored by one judge: a reward model
known by its weights (runs with simulated feedback that trained the same reward model, as the
runs of one seed on one machine do, share it) or one function; never a preference model, whose
ranking scores are not comparable across prompts. Runs whose eval prompts differ are refused, naming the first difference;
so is a score in an eval file that is not a finite number or null, and a row without an id or with a repeated one.

A note names the seeds whose two sides were made by different set-ups (state.json's ``made_by``:
versions, git commit, processor; `provenance`): a variant run on another machine or version than
its baseline differs from it in arithmetic too, so their difference holds that of another draw.

Writes OUTPUT/compare.md, compare.html, compare.png (one row per policy, the difference and its
interval per metric, each seed's difference as a dot) and compare.json.
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from rlhf_workflow.data.schemas import GENERATED_FIELDS
from rlhf_workflow.data.run_layout import PolicyFiles, RunLayout
from rlhf_workflow.errors import UserError
from rlhf_workflow.eval.render import html_image, html_page, html_table, markdown_table
from rlhf_workflow.eval.stats import bootstrap_interval, mean, sign_flip_pvalue, t_interval

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from rlhf_workflow.config import RunConfig

METRICS = (("gold", "gold"), ("proxy", "proxy reward"), ("length", "length (tokens)"))
DIGITS = {"gold": 3, "proxy": 3, "length": 1}


@dataclass
class PolicyEval:
    """One policy's evaluation: its per-prompt mean of each metric."""

    path: Path  # RUN/<policy>
    policy: str  # iter_0, iter_2, offline, ...
    recipe: str = ""  # the label of its recipe
    seed: int | None = None
    prompts: dict[str, str] = field(default_factory=dict)  # id -> the prompt row (without responses) as JSON
    values: dict[str, dict[str, float]] = field(default_factory=dict)  # metric -> prompt id -> mean
    judge: str | None = None  # what scored the proxy rewards; None when they do not compare across prompts
    made_by: frozenset[str] = frozenset()  # the set-ups that made its run's stages (state.json); empty if unknown
    absent: dict[str, str] = field(default_factory=dict)  # metric -> why it has no values at all

    @property
    def label(self) -> str:
        return f"{self.recipe}/{self.policy}"


@dataclass
class Difference:
    """A − B for one metric, pooled over seeds, and per seed."""

    mean: float | None
    ci95: tuple[float, float] | None
    p_value: float | None
    prompts: int
    policy_mean: float | None
    baseline_mean: float | None
    per_seed: list[dict[str, Any]]
    note: str = ""
    seed_ci95: tuple[float, float] | None = None  # t-interval of the per-seed means (three seeds or more)


@dataclass
class Comparison:
    policy: str  # label of A
    baseline: str  # label of B
    seeds: list[int | None]
    metrics: dict[str, Difference]
    left_out: list[int | None] = field(default_factory=list)  # seeds of the policy with no baseline to pair
    made_differently: list[int | None] = field(default_factory=list)  # seeds whose two sides' set-ups differ


# ---------------------------------------------------------------- reading runs


def _numbers(row: dict[str, Any], key: str, where: str) -> list[float]:
    """The scores of ``row[key]``, a list of numbers with null where a sample was not scored (as the
    evaluation writes it). Anything else is the file's error, named with its line: a NaN read back
    from JSON would otherwise make a p-value 0 and an interval's ends swap."""
    values = row.get(key)
    if values is None:
        return []
    if not isinstance(values, list):
        raise UserError(f"{where}: {key} is {type(values).__name__}, expected a list of numbers (null where unscored)")
    found = []
    for k, value in enumerate(values):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UserError(f"{where}: {key}[{k}] is {value!r}, expected a finite number (or null where unscored)")
        found.append(float(value))
    return found


def _rows_by_id(path: Path) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """``(prompt id, "FILE, line N", row)`` of an evaluation file; a row without an id, or an id seen
    before, is the file's error (the second would silently replace the first)."""
    from rlhf_workflow.data.io import iter_jsonl

    first_line: dict[str, int] = {}
    for line, row in iter_jsonl(path):
        where = f"{path}, line {line}"
        if row.get("id") is None:
            raise UserError(f"{where}: no id")
        prompt_id = str(row["id"])
        if prompt_id in first_line:
            raise UserError(f"{where}: id {prompt_id!r} again (first on line {first_line[prompt_id]})")
        first_line[prompt_id] = line
        yield prompt_id, where, row


def read_policy(path: Path, *, judge: str | None = None, seed: int | None = None) -> PolicyEval:
    """The per-prompt metrics of the policy evaluated in ``path`` (RUN/<policy>): eval/scored.jsonl
    for the proxy reward and length, eval/gold.jsonl for the gold score."""
    files = PolicyFiles(path).eval
    scored = files.scored
    if not scored.exists():
        raise UserError(f"{path} holds no evaluated policy ({scored} is missing)")
    found = PolicyEval(path=path, policy=path.name, seed=seed, judge=judge)
    proxy, length, gold = {}, {}, {}
    for prompt_id, where, row in _rows_by_id(scored):
        found.prompts[prompt_id] = json.dumps({k: v for k, v in row.items() if k not in GENERATED_FIELDS},
                                              sort_keys=True, ensure_ascii=False)
        for target, key in ((proxy, "rewards"), (length, "response_tokens")):
            value = mean(_numbers(row, key, where))
            if value is not None:
                target[prompt_id] = value
    gold_file = files.gold
    if gold_file.exists():
        for prompt_id, where, row in _rows_by_id(gold_file):
            value = mean(_numbers(row, "gold", where))
            if value is not None:
                gold[prompt_id] = value
        if not gold:
            found.absent["gold"] = f"the gold function scored no answer (null for every one: {gold_file})"
    else:
        found.absent["gold"] = "no gold function set (eval.gold_function)"
    found.values = {"gold": gold, "proxy": proxy if judge is not None else {}, "length": length}
    return found


def recipe_of_run(run_dir: Path) -> "RunConfig":
    """The recipe a run directory holds (its config.yaml, keys of earlier versions upgraded)."""
    from rlhf_workflow.config import RunConfig, load_config

    path = RunLayout(run_dir).config
    if not path.exists():
        raise UserError(f"{run_dir} is not a run directory (no config.yaml); give a run directory or RUN/<policy>")
    return load_config(RunConfig, str(path), [])  # type: ignore[return-value]


def _judge_identity(run_dir: Path, config: "RunConfig") -> str | None:
    """What scored the run's eval samples, as a string equal for equal judges; None for a preference
    model (its scores rank one prompt's responses only). A reward model is known by its weights
    (`_weights_digest`): runs that trained the same one from the same feedback (one seed, one
    machine), or copied it, share their judge; a reward model trained in each run is otherwise its own."""
    judge = config.judge
    if config.feedback.enabled:
        if config.feedback.judge == "pm":
            return None
        trained = RunLayout(run_dir).feedback.trained("rm")
        return f"reward_model:{_weights_digest(trained) or f'trained in {run_dir.resolve()}'}"
    if judge.type == "preference_model":
        return None
    if judge.type == "function":
        return f"function:{judge.function}"
    return f"reward_model:{_weights_digest(Path(judge.path)) or Path(judge.path or '').resolve()}"


def _run_state(run_dir: Path) -> Any:
    """A run's state.json as read ({} where there is none); a file that is not JSON is a `UserError`."""
    from rlhf_workflow.data.io import decode_json

    path = RunLayout(run_dir).state
    return decode_json(path.read_text(encoding="utf-8", errors="replace"), str(path), whole_file=True) \
        if path.exists() else {}


def _made_by(run_dir: Path) -> frozenset[str]:
    """The set-ups that made a run's stages (state.json's ``made_by``); empty (unknown) where a
    completed stage has none: a run made, or begun, before they were recorded."""
    from rlhf_workflow.provenance import NOT_RECORDED, stages_by_setup

    setups = stages_by_setup(_run_state(run_dir))
    return frozenset() if NOT_RECORDED in setups else frozenset(setups)


def _weights_digest(model_dir: Path) -> str | None:
    """sha256 of a saved model's safetensors files, in name order (None when it has none)."""
    import hashlib

    files = sorted(model_dir.glob("*.safetensors")) if model_dir.is_dir() else []
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


def _recipe_key(config: "RunConfig") -> str:
    """The recipe: the config but for the seed and where it was written."""
    return json.dumps(config.model_dump(mode="json", exclude={"seed", "output_dir"}), sort_keys=True)


def policy_dirs(run_dir: Path, config: "RunConfig | None" = None) -> list[Path]:
    """The evaluated policies of a run directory in the order its stages evaluate them
    (`stages.plan`: π0, the iterations, then the offline baseline). Without a recipe that loads
    (``config`` None and config.yaml absent or unreadable): those there, by name."""
    from rlhf_workflow.stages import plan

    layout = RunLayout(run_dir)
    if config is None:
        try:
            config = recipe_of_run(run_dir)
        except (UserError, ValueError):
            return [files.dir for files in layout.evaluated()]
    names = [stage.evaluates for stage in plan(config, run_dir) if stage.evaluates]
    return [layout.policy_dir(name).dir for name in names if layout.policy_dir(name).eval.scored.exists()]


def unfinished(run_dir: Path, config: "RunConfig") -> str | None:
    """What a run still has to do, in a few words (None when every stage is done)."""
    from rlhf_workflow.stages import plan

    state = _run_state(run_dir)
    completed = state.get("completed") if isinstance(state, dict) else None
    done = {name for name in completed if isinstance(name, str)} if isinstance(completed, list) else set()
    todo = [stage for stage in plan(config, run_dir) if stage.name not in done]
    if not todo:
        return None
    missing = [stage.evaluates for stage in todo if stage.evaluates]
    return (f"{run_dir} has not finished: its next stage is {todo[0].name}"
            + (f", and {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not evaluated yet" if missing else ""))


def _recipe_label(names: list[str]) -> str:
    if len(names) == 1:
        return names[0]
    prefix = re.sub(r"([-_.](seed|s)?)$", "", os.path.commonprefix(names))
    return prefix or names[0]


def load(inputs: Sequence[str]) -> list[PolicyEval]:
    """The policies of ``inputs``: run directories (every evaluated policy), RUN/<policy> directories,
    either as ``NAME=PATH`` to name its recipe. Runs are grouped into recipes (see the module docstring)."""
    entries = []  # (explicit name or None, run dir, policy dirs)
    for spec in inputs:
        name, _, where = spec.partition("=")
        if not where or "/" in name:  # a plain path (which may hold '=' in a directory's name)
            name, where = "", spec
        path = Path(where)
        if not path.is_dir():
            raise UserError(f"{where}: no such run or policy directory")
        if RunLayout(path).config.exists():
            config = recipe_of_run(path)
            run_dir, policies = path, policy_dirs(path, config)
            if not policies:
                raise UserError(f"{path}: no policy has been evaluated yet (no <policy>/eval/scored.jsonl)")
            note = unfinished(path, config)
            if note:
                logger.warning("%s: compared as it is", note)
        else:
            run_dir, policies = path.parent, [path]
        entries.append((name or None, run_dir, policies))
    runs: dict[Path, tuple[str | None, RunConfig, list[Path]]] = {}
    for name, run_dir, policies in entries:
        key = run_dir.resolve()
        if key in runs:
            known = runs[key]
            runs[key] = (known[0] or name, known[1], known[2] + [p for p in policies if p not in known[2]])
        else:
            runs[key] = (name, recipe_of_run(run_dir), policies)
    groups: dict[str, list[Path]] = {}  # recipe label or key -> runs
    for key, (name, config, _) in runs.items():
        groups.setdefault(name if name is not None else "\x00" + _recipe_key(config), []).append(key)
    labels: dict[Path, str] = {}
    for group_key, members in groups.items():
        label = group_key if not group_key.startswith("\x00") else _recipe_label([m.name for m in members])
        while label in labels.values():
            label += "'"
        seeds = [runs[m][1].seed for m in members]
        for seed in set(seeds):
            same = [m for m, s in zip(members, seeds) if s == seed]
            if len(same) > 1:
                raise UserError(f"{same[0]} and {same[1]} are runs of one recipe with the same seed ({seed}): give "
                                "one of them, or name them as different recipes (NAME=RUN)")
        for m in members:
            labels[m] = label
    found = []
    for key, (_, config, policies) in runs.items():
        judge = _judge_identity(key, config)
        made_by = _made_by(key)
        for policy in policies:
            evaluated = read_policy(policy, judge=judge, seed=config.seed)
            evaluated.recipe = labels[key]
            evaluated.made_by = made_by
            found.append(evaluated)
    check_same_prompts(found)
    return found


def check_same_prompts(policies: Sequence[PolicyEval]) -> None:
    """Refuse policies evaluated on different prompts, naming the first difference."""
    first = policies[0]
    for other in policies[1:]:
        if other.prompts == first.prompts:
            continue
        for prompt_id in sorted(set(first.prompts) | set(other.prompts)):
            mine, theirs = first.prompts.get(prompt_id), other.prompts.get(prompt_id)
            if mine == theirs:
                continue
            if mine is None or theirs is None:
                where = first.path if theirs is None else other.path
                raise UserError(f"{first.path} and {other.path} were evaluated on different prompts: prompt "
                                f"{prompt_id!r} is only in {where}; a paired comparison needs the same eval prompts")
            a, b = json.loads(mine), json.loads(theirs)
            key = next(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
            raise UserError(f"{first.path} and {other.path} were evaluated on different prompts: prompt {prompt_id!r} "
                            f"has {key}={str(a.get(key))[:80]!r} in one and {str(b.get(key))[:80]!r} in the other")


# ---------------------------------------------------------------- the statistics


def pair_up(policy: list[PolicyEval], baseline: list[PolicyEval]) -> list[tuple[PolicyEval, PolicyEval]]:
    """(A, B) per seed: the same run's policies, else runs of equal seed; a baseline of one run
    serves every seed of A."""
    pairs = []
    for a in policy:
        same_run = [b for b in baseline if b.path.parent.resolve() == a.path.parent.resolve()]
        same_seed = [b for b in baseline if b.seed == a.seed]
        partner = same_run or same_seed or (baseline if len(baseline) == 1 else [])
        if partner:
            pairs.append((a, partner[0]))
    return pairs


def difference(pairs: list[tuple[PolicyEval, PolicyEval]], metric: str, resamples: int) -> Difference:
    """The paired difference A − B of ``metric`` over prompts × seeds (see the module docstring)."""
    note = ""
    if metric == "proxy":
        if any(a.judge is None or a.judge != b.judge for a, b in pairs):
            note = "not compared: the two were scored by different judges, or by a preference model's ranks"
            pairs = []
    by_prompt: dict[str, list[float]] = {}
    mine: list[float] = []
    theirs: list[float] = []
    per_seed = []
    one_sided = 0  # prompts (in any seed) with a value on one side only: unscored samples on the other
    for a, b in pairs:
        va, vb = a.values[metric], b.values[metric]
        shared = sorted(set(va) & set(vb))
        one_sided += len(set(va) ^ set(vb))
        diffs = [[va[i] - vb[i]] for i in shared]
        for i in shared:
            by_prompt.setdefault(i, []).append(va[i] - vb[i])
        mine += [va[i] for i in shared]
        theirs += [vb[i] for i in shared]
        if shared:
            interval = bootstrap_interval(diffs, resamples)
            per_seed.append({"seed": a.seed, "mean": mean([d[0] for d in diffs]), "prompts": len(shared),
                             "ci95": list(interval) if interval else None, "p_value": sign_flip_pvalue(diffs)})
    groups = list(by_prompt.values())
    if not groups:
        why = next((side.absent[metric] for a, b in pairs for side in (a, b) if metric in side.absent), None)
        return Difference(None, None, None, 0, None, None, [], note or why or "no prompt scored on both sides")
    if one_sided:
        note = f"{one_sided} prompt(s) scored on one side only (over all seeds) are left out"
    flat = [d for g in groups for d in g]
    return Difference(mean(flat), bootstrap_interval(groups, resamples), sign_flip_pvalue(groups), len(groups),
                      mean(mine), mean(theirs), per_seed, note, t_interval([r["mean"] for r in per_seed]))


def compare(policies: Sequence[PolicyEval], wanted: Sequence[tuple[str, str]], resamples: int = 1000) -> list[Comparison]:
    """A comparison per (policy label, baseline label) of ``wanted``; labels are recipe/policy."""
    by_label: dict[str, list[PolicyEval]] = {}
    for p in policies:
        by_label.setdefault(p.label, []).append(p)
    out = []
    for policy, baseline in wanted:
        pairs = pair_up(by_label[policy], by_label[baseline])
        if not pairs:
            raise UserError(f"{policy} and {baseline} have no seed in common to pair (seeds "
                            f"{sorted(str(p.seed) for p in by_label[policy])} and "
                            f"{sorted(str(p.seed) for p in by_label[baseline])})")
        metrics = {key: difference(pairs, key, resamples) for key, _ in METRICS}
        paired = [a for a, _ in pairs]
        left_out = [a.seed for a in by_label[policy] if not any(a is b for b in paired)]
        differently = [a.seed for a, b in pairs  # two runs (one run's policies are one draw, however made)
                       if a.path.parent != b.path.parent and a.made_by and b.made_by and len(a.made_by | b.made_by) > 1]
        out.append(Comparison(policy, baseline, [a.seed for a in paired], metrics, left_out, differently))
    return out


def against(policies: Sequence[PolicyEval], baseline: str) -> list[tuple[str, str]]:
    """(policy, baseline) labels for every policy against ``baseline``: ``RECIPE/POLICY``, or a
    policy name (iter_0, offline) meaning that policy of each policy's own recipe."""
    labels = list(dict.fromkeys(p.label for p in policies))
    if "/" in baseline:
        if baseline not in labels:
            raise UserError(f"--baseline {baseline}: no such policy; there are {', '.join(labels)}")
        return [(label, baseline) for label in labels if label != baseline]
    wanted = []
    for label in labels:
        recipe, policy = label.split("/", 1)
        target = f"{recipe}/{baseline}"
        if policy != baseline and target in labels:
            wanted.append((label, target))
    if not wanted:
        names = sorted({p.policy for p in policies})
        raise UserError(f"--baseline {baseline}: no run holds that policy and another to compare it with; the "
                        f"policies are {', '.join(names)} (or name one as RECIPE/POLICY)")
    return wanted


# ---------------------------------------------------------------- writing


def _short(label: str, recipes: set[str]) -> str:
    return label.split("/", 1)[1] if len(recipes) == 1 else label


def _fmt(value: float | None, metric: str, interval: Sequence[float] | None = None) -> str:
    """``+0.062 [+0.003, +0.131]``, with the digits of the metric."""
    if value is None:
        return "–"
    digits = DIGITS[metric]
    text = f"{value:+.{digits}f}"
    return text + (f" [{interval[0]:+.{digits}f}, {interval[1]:+.{digits}f}]" if interval else "")


def _p(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if value >= 0.001 else "<0.001"


def tables(comparisons: Sequence[Comparison]) -> list[tuple[str, list[str], list[list[str]]]]:
    """``(title, header, cells)``: the pooled differences, and each seed's when there are several."""
    recipes = {c.policy.split("/")[0] for c in comparisons} | {c.baseline.split("/")[0] for c in comparisons}
    header = ["policy", "vs", "seeds", "prompts"]
    for _, title in METRICS:
        header += [f"{title} Δ [95 % CI]", "p"]
    cells = []
    for c in comparisons:
        line = [_short(c.policy, recipes), _short(c.baseline, recipes), str(len(c.seeds)),
                str(max(d.prompts for d in c.metrics.values()))]
        for key, _ in METRICS:
            d = c.metrics[key]
            line += [_fmt(d.mean, key, d.ci95), _p(d.p_value)]
        cells.append(line)
    out = [("Paired differences on the same eval prompts (policy − baseline; 95 % bootstrap intervals over "
            "prompts; p: paired sign-flip permutation test)", header, cells)]
    if any(len(c.seeds) > 1 for c in comparisons):
        header = ["policy", "vs", "seed"] + [f"{title} Δ [95 % CI]" for _, title in METRICS]
        cells = []
        for c in comparisons:
            for k, seed in enumerate(c.seeds):
                line = [_short(c.policy, recipes), _short(c.baseline, recipes), str(seed)]
                for key, _ in METRICS:
                    runs = c.metrics[key].per_seed
                    entry = next((r for r in runs if r["seed"] == seed), None)
                    line.append("–" if entry is None else _fmt(entry["mean"], key, entry["ci95"]))
                cells.append(line)
            if any(c.metrics[key].seed_ci95 for key, _ in METRICS):
                line = [_short(c.policy, recipes), _short(c.baseline, recipes), "over seeds (t)"]
                for key, _ in METRICS:
                    d = c.metrics[key]
                    line.append(_fmt(mean([r["mean"] for r in d.per_seed]), key, d.seed_ci95) if d.seed_ci95 else "–")
                cells.append(line)
        out.append(("Each seed's paired difference (brackets: over prompts; the row 'over seeds': the seeds' mean "
                    "with its 95 % t-interval over seeds)", header, cells))
    return out


def notes(comparisons: Sequence[Comparison]) -> list[str]:
    seen = []
    recipes = {c.policy.split("/")[0] for c in comparisons} | {c.baseline.split("/")[0] for c in comparisons}
    if any(len(c.seeds) > 1 for c in comparisons):
        seen.append("Over several seeds, the pooled intervals and p-values resample the prompts given these seeds: "
                    "they leave out how much other seeds would differ. The seeds' own spread is in the per-seed "
                    "table (with three seeds or more, a t-interval over seeds).")
    for c in comparisons:
        if c.left_out:
            seen.append(f"{_short(c.policy, recipes)} − {_short(c.baseline, recipes)}: seed(s) "
                        f"{', '.join(str(s) for s in c.left_out)} of {_short(c.policy, recipes)} have no run of "
                        f"{_short(c.baseline, recipes)} with that seed and are left out")
        if c.made_differently:
            seen.append(f"{_short(c.policy, recipes)} − {_short(c.baseline, recipes)}: in seed(s) "
                        f"{', '.join(str(s) for s in c.made_differently)} the two sides were made by different code or "
                        "processors (each run's report, 'Made by'), so their difference also holds that of another "
                        "draw of the arithmetic")
        for key, title in METRICS:
            d = c.metrics[key]
            if d.note and f"{title}: {d.note}" not in seen:
                seen.append(f"{title}: {d.note}")
            means = [r["mean"] for r in d.per_seed]
            if len(means) > 1 and min(means) < 0 < max(means):
                shown = ", ".join(_fmt(m, key) for m in means)
                seen.append(f"{_short(c.policy, recipes)} − {_short(c.baseline, recipes)}, {title}: the seeds "
                            f"disagree in sign ({shown})")
    return seen


def plot(comparisons: Sequence[Comparison], path: Path) -> bool:
    """One panel per metric, one row per comparison: the pooled difference with its interval, and
    each seed's difference as a grey dot. False when there is nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    shown = [(key, title) for key, title in METRICS if any(c.metrics[key].mean is not None for c in comparisons)]
    if not shown:
        return False
    recipes = {c.policy.split("/")[0] for c in comparisons} | {c.baseline.split("/")[0] for c in comparisons}
    names = [f"{_short(c.policy, recipes)} − {_short(c.baseline, recipes)}" for c in comparisons]
    fig, axes = plt.subplots(1, len(shown), figsize=(3.6 * len(shown) + 1.5, 0.45 * len(comparisons) + 1.4), dpi=110,
                             squeeze=False, sharey=True)
    for ax, (key, title) in zip(axes[0], shown):
        for row, c in enumerate(comparisons):
            d = c.metrics[key]
            if d.mean is None:
                continue
            if len(d.per_seed) > 1:
                ax.plot([r["mean"] for r in d.per_seed], [row] * len(d.per_seed), "o", color="0.6", markersize=3)
            err = [[d.mean - d.ci95[0]], [d.ci95[1] - d.mean]] if d.ci95 else None
            ax.errorbar([d.mean], [row], xerr=err, fmt="o", color="tab:blue", capsize=3)
        ax.axvline(0, color="k", linewidth=0.8)
        ax.xaxis.set_major_locator(MaxNLocator(5))  # labels such as −0.050 and −0.025 would run together
        ax.set_title(f"{title} Δ", fontsize=9)
        ax.grid(alpha=0.3, axis="x")
    axes[0][0].set_yticks(range(len(comparisons)))
    axes[0][0].set_yticklabels(names, fontsize=8)
    axes[0][0].invert_yaxis()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def to_json(comparisons: Sequence[Comparison]) -> list[dict[str, Any]]:
    return [{"policy": c.policy, "baseline": c.baseline, "seeds": c.seeds, "seeds_left_out": c.left_out,
             "seeds_made_differently": c.made_differently,
             "metrics": {key: {"mean": d.mean, "ci95": list(d.ci95) if d.ci95 else None, "p_value": d.p_value,
                               "prompts": d.prompts, "policy_mean": d.policy_mean, "baseline_mean": d.baseline_mean,
                               "per_seed": d.per_seed, "note": d.note,
                               "seed_ci95": list(d.seed_ci95) if d.seed_ci95 else None}
                         for key, d in c.metrics.items()}} for c in comparisons]


def markdown_lines(comparisons: Sequence[Comparison], image: str | None) -> list[str]:
    lines: list[str] = []
    for title, header, cells in tables(comparisons):
        lines += [f"## {title}", ""] + markdown_table(header, cells) + [""]
    lines += [f"- {note}" for note in notes(comparisons)]
    if image:
        lines += ["", f"![paired differences]({image})", ""]
    return lines


def html_parts(comparisons: Sequence[Comparison], image: Path | None) -> list[str]:
    """The HTML of the tables, notes and plot (``image``, embedded in the page)."""
    parts = []
    for title, header, cells in tables(comparisons):
        parts += [f"<h2>{html.escape(title)}</h2>", html_table(header, cells)]
    parts += [f"<p>{html.escape(note)}</p>" for note in notes(comparisons)]
    if image:
        parts.append(html_image(image, "paired differences"))
    return parts


def write_comparison(comparisons: Sequence[Comparison], out: Path, title: str) -> Path:
    """OUTPUT/compare.{md,html,png,json}; returns the Markdown file."""
    from rlhf_workflow.data.io import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    image = "compare.png" if plot(comparisons, out / "compare.png") else None
    atomic_write_text(out / "compare.md", "\n".join([f"# {title}", ""] + markdown_lines(comparisons, image)) + "\n")
    atomic_write_text(out / "compare.html",
                      html_page(title, [f"<h1>{html.escape(title)}</h1>"]
                                + html_parts(comparisons, out / image if image else None)))
    atomic_write_text(out / "compare.json", json.dumps(to_json(comparisons), indent=1) + "\n")
    return out / "compare.md"


def run_compare(inputs: Sequence[str], baseline: str, output: str, resamples: int = 1000) -> list[Comparison]:
    """`rlhf-workflow compare`: print the table and write the files."""
    policies = load(inputs)
    comparisons = compare(policies, against(policies, baseline), resamples)
    for title, header, cells in tables(comparisons):
        print(title)
        print("\n".join(markdown_table(header, cells)))
        print()
    for note in notes(comparisons):
        print(note)
    path = write_comparison(comparisons, Path(output), "rlhf-workflow: paired comparison")
    print(f"compare: {path}, {path.with_suffix('.html')}, {path.with_suffix('.json')}")
    return comparisons

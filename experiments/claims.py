"""The paper's claims on the demo's setting, over seeds, each answered by a paired comparison.

Every run is the embedded demo (SmolLM2-135M-Instruct, `instructions` prompts, a Bradley-Terry reward
model trained on IFEval-checker feedback as the judge, IFEval's checkers as gold) with one change,
at one seed: ``rlhf-workflow demo --full <overrides> seed=S output_dir=ROOT/<variant>-s<S>`` (the full
recipe, configs/demo-full.yaml; ``--recipe quick``: the smaller one `rlhf-workflow demo` runs). The demo
itself (variant ``demo``) also trains the offline baseline on the same number of pairs; the other
variants skip it. Runs of one seed share the feedback, the reward model and the eval samples of
π0, so every comparison is paired within a seed, and pooled over seeds by `rlhf-workflow compare`.

    python experiments/claims.py --root runs/claims --seeds 0 1 2            # all questions
    python experiments/claims.py --root runs/claims --seeds 0 1 2 --only main judge
    python experiments/claims.py --root runs/claims --seeds 0 1 --only judge --variants pm-knockout
    python experiments/claims.py --root runs/claims --report-only            # tables of what is done
    python experiments/claims.py --root runs/claims-dev --split dev ...      # tune on dev, report eval

Runs go one after the other (each takes the machine's cores); a run already complete is skipped and
one cut short continues where it stopped, so the script can be stopped and started again. It writes
ROOT/claims.md (a table per question) and ROOT/<question>/compare.{md,html,png,json}. Run it in the
background: ``nohup python experiments/claims.py ... > ROOT.log 2>&1 &``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rlhf_workflow.data.io import jsonl_lines
from rlhf_workflow.data.run_layout import RunLayout

if TYPE_CHECKING:
    from rlhf_workflow.config import RunConfig

# variant -> overrides of the demo recipe
VARIANTS: dict[str, list[str]] = {
    "demo": [],
    # the preference model trains in the precision the seed's demo run trained its reward model in (`run`)
    "pm-knockout": ["feedback.judge=pm", "judge.ranking=knockout"],
    "pm-copeland": ["feedback.judge=pm", "judge.ranking=copeland"],
    "max-random": ["pairs.strategy=max_random"],
    "random": ["pairs.strategy=random"],
    "reference-previous": ["reference=previous"],
    "length-penalty-0.01": ["length_penalty.coef=0.01"],
    "length-penalty-0.03": ["length_penalty.coef=0.03"],
    # this task's reward model favours short answers (its scores correlate with length at about -0.6):
    # the control that counters that bias is a bonus for length
    "length-bonus-0.01": ["length_penalty.coef=-0.01"],
}
ONLY_DEMO_TRAINS_OFFLINE = ["offline.after_online=false"]

# question -> (title, variants it needs, [(policy, baseline)] as RECIPE/POLICY labels of `compare`)
QUESTIONS: dict[str, tuple[str, list[str], list[tuple[str, str]]]] = {
    "main": ("Online iterative DPO vs offline DPO on the same number of pairs", ["demo"],
             [("demo/iter_2", "demo/offline"), ("demo/iter_2", "demo/iter_0"), ("demo/offline", "demo/iter_0")]),
    "judge": ("The judge ranking the n samples: preference model (knockout, round robin by Copeland) vs the "
              "Bradley-Terry reward model, trained on the same feedback pairs",
              ["demo", "pm-knockout", "pm-copeland"],
              [("pm-knockout/iter_2", "demo/iter_2"), ("pm-copeland/iter_2", "demo/iter_2")]),
    "pairs": ("Which pair of the n samples trains DPO: best vs random and random vs best vs worst (max_min)",
              ["demo", "max-random", "random"],
              [("max-random/iter_2", "demo/iter_2"), ("random/iter_2", "demo/iter_2")]),
    "reference": ("DPO's reference: the previous iterate π_{t-1} vs the initial policy π0",
                  ["demo", "reference-previous"], [("reference-previous/iter_2", "demo/iter_2")]),
    "length": ("Length control of the proxy reward, r − λ·tokens (a penalty, λ > 0, or a bonus, λ < 0), vs none",
               ["demo", "length-penalty-0.01", "length-penalty-0.03", "length-bonus-0.01"],
               [("length-penalty-0.01/iter_2", "demo/iter_2"), ("length-penalty-0.03/iter_2", "demo/iter_2"),
                ("length-bonus-0.01/iter_2", "demo/iter_2")]),
}


def run_dir(root: Path, variant: str, seed: int) -> Path:
    return root / f"{variant}-s{seed}"


def finished(path: Path) -> bool:
    """Every stage of the run's recipe is done."""
    from rlhf_workflow.stages import plan

    layout = RunLayout(path)
    if not (layout.state.exists() and layout.config.exists()):
        return False
    done = set(json.loads(layout.state.read_text()).get("completed", []))
    return all(stage.name in done for stage in plan(config_of(layout.config.read_text()), path))


def config_of(text: str) -> "RunConfig":
    """A run's recipe from the text of its config.yaml: one written before a key existed holds that
    key's default, as the run that wrote it did, and one written before a key was renamed holds it
    under its new name."""
    import yaml

    from rlhf_workflow.config import RunConfig, upgrade_keys

    return RunConfig.model_validate(upgrade_keys(RunConfig, yaml.safe_load(text), "config.yaml"))


def shared_stages(source: Path, variant_yaml: str) -> tuple[list[str], str]:
    """The completed stages of the run ``source`` that a run of ``variant_yaml`` would make the
    same, in order, and why the list ends where it does (`stages.still_valid`: those before the
    first stage a differing key feeds, or one the variant does not have)."""
    from rlhf_workflow.stages import still_valid

    completed = json.loads(RunLayout(source).state.read_text())["completed"]
    return still_valid(completed, config_of(RunLayout(source).config.read_text()), config_of(variant_yaml))


def best_source(root: Path, seed: int, target: Path, variant_yaml: str) -> tuple[Path | None, list[str], str]:
    """The run of ``seed`` under ``root`` whose completed stages a run of ``variant_yaml`` (into
    ``target``) would make the same, the most of them: its seed's demo run, or a variant run of the
    same seed that shares more (a round-robin judge shares the preference model a knockout run
    trained). (source, its shared stages, why the list ends there); (None, [], why) when no run of
    the seed shares a stage. The demo wins a tie."""
    import yaml

    candidates = [run_dir(root, "demo", seed)] + sorted(
        path for path in root.glob(f"*-s{seed}") if path.is_dir() and path.name != f"demo-s{seed}" and path != target)
    best: tuple[Path | None, list[str], str] = (None, [], f"no run of seed {seed} under {root} shares a stage")
    for source in candidates:
        if not (RunLayout(source).state.exists() and RunLayout(source).config.exists()):
            continue
        try:
            stages, why = shared_stages(source, variant_yaml)
        except (ValueError, yaml.YAMLError) as exc:  # a run's unreadable config: share nothing with it
            if source == candidates[0]:
                raise
            print(f"  not reusing {source.name}: {str(exc).splitlines()[0]}", flush=True)
            continue
        if len(stages) > len(best[1]):
            best = (source, stages, why)
    return best


def copy_shared(source: Path, target: Path, stages: list[str]) -> None:
    """Start ``target`` as a run holding ``source``'s outputs of ``stages`` (each marked done, its time
    0 s, as it cost nothing here, made by what made it in ``source``): their files, their directories'
    owner files and their rows of metrics.jsonl. Lock files are not copied. Written into a temporary
    directory, then renamed."""
    import shutil

    from rlhf_workflow.stages import plan

    partial = target.with_name(target.name + ".copying")
    if partial.exists():
        shutil.rmtree(partial)
    ignore = shutil.ignore_patterns(".lock", ".*.lock")
    declared = {stage.name: stage for stage in plan(config_of(RunLayout(source).config.read_text()), source)}
    for stage in stages:
        for path in declared[stage].outputs():
            destination = partial / path.relative_to(source)
            destination.parent.mkdir(parents=True, exist_ok=True)
            if path.is_dir():
                shutil.copytree(path, destination, ignore=ignore)
            else:
                shutil.copy2(path, destination)
    for owner in source.rglob(".rlhf-workflow.json"):  # the stage that claimed each directory copied
        destination = partial / owner.relative_to(source)
        if destination.parent.is_dir() and not destination.exists():
            shutil.copy2(owner, destination)
    evaluated = {declared[stage].evaluates for stage in stages if declared[stage].evaluates}
    metrics = RunLayout(source).metrics
    rows = [line for line in jsonl_lines(metrics) if json.loads(line)["id"] in evaluated] if metrics.exists() else []
    RunLayout(partial).metrics.write_text("".join(line + "\n" for line in rows))
    made_by = json.loads(RunLayout(source).state.read_text()).get("made_by", {})  # what made them: the source's set-up
    RunLayout(partial).state.write_text(json.dumps({"completed": stages, "last": stages[-1],
                                                    "seconds": {stage: 0.0 for stage in stages},
                                                    "made_by": {s: made_by[s] for s in stages if s in made_by}},
                                                   indent=1) + "\n")
    (partial / "reused.json").write_text(json.dumps({"from": str(source), "stages": stages}, indent=1) + "\n")
    os.replace(partial, target)


# --recipe -> the recipe file and the `rlhf-workflow demo` option that runs it
RECIPES = {"full": ("demo-full.yaml", ["--full"]), "quick": ("demo.yaml", [])}


def recipe_of(path: Path) -> str | None:
    """The --recipe whose sizes the run in ``path`` has (None: no run there, or other sizes)."""
    from rlhf_workflow.config import RunConfig, load_config
    from rlhf_workflow.workflow import DEMO_RECIPE, has_demo_sizes

    if not RunLayout(path).config.exists():
        return None
    held = load_config(RunConfig, RunLayout(path).config)
    return next((name for name, (recipe, _) in RECIPES.items() if has_demo_sizes(held, DEMO_RECIPE.with_name(recipe))), None)


def run(root: Path, variant: str, seed: int, split: str, log: Path, recipe: str = "full") -> float:
    """One run (continued if it was cut short); its wall time in seconds. A variant run not yet
    started, once its seed's demo run is there, begins from the stages it shares with that run or
    with another run of its seed that shares more (`best_source`)."""
    path = run_dir(root, variant, seed)
    overrides = VARIANTS[variant] + ([] if variant == "demo" else ONLY_DEMO_TRAINS_OFFLINE)
    common = [f"seed={seed}", f"prompts.eval_split={split}", f"output_dir={path}"]
    demo = run_dir(root, "demo", seed)
    if variant != "demo" and RunLayout(demo).state.exists() and not RunLayout(path).config.exists():
        from rlhf_workflow.config import RunConfig, config_to_yaml, load_config
        from rlhf_workflow.workflow import DEMO_RECIPE, PRECISION_KEYS

        held = load_config(RunConfig, RunLayout(demo).config)
        # the demo's precision, so that the variant never measures its own (and never differs in it);
        # a preference model trains as the demo's reward model did. A variant that has started
        # (config.yaml) gets none: `demo` continues it in the precision it started with.
        overrides = [f"{key}={held.value_at(key)}" for key in PRECISION_KEYS if key != "feedback.pm.train.precision"] + [
            f"feedback.pm.train.precision={held.value_at('feedback.rm.train.precision')}"] + overrides
        if not path.exists():
            variant_config = load_config(RunConfig, DEMO_RECIPE.with_name(RECIPES[recipe][0]), overrides + common)
            source, stages, why = best_source(root, seed, path, config_to_yaml(variant_config))
            print(f"  {path.name}: {len(stages)} stages from {source.name if source else demo.name} ({why})", flush=True)
            if source is not None:
                copy_shared(source, path, stages)
    command = [sys.executable, "-m", "rlhf_workflow", "demo", *RECIPES[recipe][1], *overrides, *common]
    print(f"[{time.strftime('%H:%M:%S')}] {path.name}: {' '.join(command[3:])}", flush=True)
    start = time.perf_counter()
    with log.open("a") as sink:
        subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - start


def metrics_rows(path: Path) -> dict[str, dict]:
    """A run's metrics.jsonl by policy id."""
    rows = [json.loads(line) for line in jsonl_lines(RunLayout(path).metrics)]
    return {row["id"]: row for row in rows}


def judge_accuracy(path: Path) -> str:
    """The held-out accuracy of the judge a run's loop used (and on how many pairs)."""
    import yaml

    kind = (yaml.safe_load(RunLayout(path).config.read_text()).get("feedback") or {}).get("judge", "rm")
    found = RunLayout(path).feedback.accuracy(kind)
    if not found.exists():
        return "–"
    result = json.loads(found.read_text())
    return f"{kind.upper()} {result['accuracy']:.3f} ({result['pairs']} pairs)"


def run_lines(root: Path, variants: list[str], seeds: list[int]) -> list[str]:
    """One row per complete run of ``variants``: its judge, pairs and gold per policy, iter_2's length."""
    from rlhf_workflow.eval.render import markdown_table
    from rlhf_workflow.provenance import NOT_RECORDED, stages_by_setup

    cells = []
    setups: dict[str, list[str]] = {}  # what made the runs' stages (state.json's made_by) -> the runs
    for variant in variants:
        for seed in seeds:
            path = run_dir(root, variant, seed)
            if not finished(path):
                continue
            state = json.loads(RunLayout(path).state.read_text())
            for setup in stages_by_setup(state):
                setups.setdefault(setup, []).append(path.name)
            rows = metrics_rows(path)
            gold = " → ".join(f"{rows[p]['gold']:.3f}" for p in ("iter_0", "iter_1", "iter_2") if p in rows)
            pairs = " + ".join(str(rows[p].get("pairs", "?")) for p in ("iter_1", "iter_2") if p in rows)
            last = rows["iter_2"]
            win = " / ".join(f"{last[k]:.2f}" if isinstance(last.get(k), (int, float)) else "–"
                             for k in ("win_rate_vs_initial", "lc_win_rate_vs_initial"))
            kl = f"{last['kl_vs_initial']:.2f}" if isinstance(last.get("kl_vs_initial"), (int, float)) else "–"
            seconds = sum(state.get("seconds", {}).values())  # its own stages' (a copied stage counts 0 s)
            cells.append([variant, str(seed), judge_accuracy(path), pairs, gold, win, kl, f"{last['length_tokens']:.1f}",
                          f"{seconds:.0f}"])
    if not cells:
        return []
    header = ["run", "seed", "judge's held-out accuracy", "pairs (iter_1 + iter_2)", "gold π0 → iter_1 → iter_2",
              "iter_2 win rate / length-controlled, vs π0 (its judge)", "iter_2 KL to π0", "iter_2 length (tokens)",
              "stage time (s)"]
    made = [f"- stages not recorded (made, or copied from a run made, before runs recorded their set-up): {', '.join(runs)}"
            if setup == NOT_RECORDED else f"- made by {setup}: {', '.join(runs)}" for setup, runs in setups.items()]
    return ["### The runs", ""] + markdown_table(header, cells) + [""] + made + ([""] if made else [])


def type_rate_lines(root: Path, variants: list[str], seeds: list[int]) -> list[str]:
    """iter_2's strict rate per IFEval instruction type for each variant, pooled over its complete
    seeds (instructions followed / instructions), with π0's beside them."""
    from rlhf_workflow.eval.render import markdown_table

    pooled: dict[str, dict[str, list[float]]] = {}  # column -> type -> [followed, count]
    done = {v: [s for s in seeds if finished(run_dir(root, v, s))] for v in variants}
    common = sorted(set.intersection(*(set(s) for s in done.values()))) if done else []
    if not common:
        return []
    for variant in variants:
        for seed in common:
            rows = metrics_rows(run_dir(root, variant, seed))
            columns = [(variant, rows["iter_2"])] + ([("π0", rows["iter_0"])] if variant == variants[0] else [])
            for column, row in columns:
                for kind, rate in (row.get("ifeval_types") or {}).items():
                    entry = pooled.setdefault(column, {}).setdefault(kind, [0.0, 0.0])
                    entry[0] += rate["strict"] * rate["n"]
                    entry[1] += rate["n"]
    order = ["π0"] + variants
    kinds = sorted(pooled["π0"], key=lambda k: -pooled["π0"][k][1])
    cells = [[f"`{kind}`", str(int(pooled["π0"][kind][1]))]
             + [f"{pooled[c][kind][0] / pooled[c][kind][1]:.2f}" if kind in pooled.get(c, {}) else "–" for c in order]
             for kind in kinds]
    header = ["instruction type", "instructions"] + [c if c == "π0" else f"{c} iter_2" for c in order]
    return [f"### Share followed per instruction type (strict), seeds {', '.join(map(str, common))} pooled", ""] + \
        markdown_table(header, cells) + [""]


def write_tables(root: Path, questions: list[str], seeds: list[int], recipe: str = "full") -> Path:
    """ROOT/claims.md from the runs that are complete."""
    from rlhf_workflow.errors import UserError
    from rlhf_workflow.eval.compare import compare, load, markdown_lines, write_comparison

    lines = ["# The paper's claims on the demo's setting", "",
             f"Seeds {', '.join(map(str, seeds))}; `python experiments/claims.py --root {root}"
             f"{'' if recipe == 'full' else ' --recipe ' + recipe}` made these tables.", ""]
    for question in questions:
        title, variants, wanted = QUESTIONS[question]
        inputs = [f"{v}={run_dir(root, v, s)}" for v in variants for s in seeds if finished(run_dir(root, v, s))]
        present = {spec.split("=", 1)[0] for spec in inputs}
        wanted = [(a, b) for a, b in wanted if a.split("/")[0] in present and b.split("/")[0] in present]
        lines += [f"## {question}: {title}", ""]
        if not wanted:
            lines += ["(no complete runs yet)", ""]
            continue
        try:
            comparisons = compare(load(inputs), wanted)
        except UserError as exc:
            lines += [f"(not compared: {exc})", ""]
            continue
        write_comparison(comparisons, root / question, title)
        body = markdown_lines(comparisons, f"{question}/compare.png")
        lines += [line.replace("## ", "### ", 1) if line.startswith("## ") else line for line in body] + [""]
        lines += run_lines(root, variants, seeds)
        if question == "length":
            lines += type_rate_lines(root, variants, seeds)
    out = root / "claims.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="runs/claims", help="where the runs and tables go")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", nargs="+", choices=sorted(QUESTIONS), help="these questions (default: all)")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS),
                        help="of those questions' runs, make only these variants (and the demo runs they pair with)")
    parser.add_argument("--split", choices=["eval", "dev"], default="eval",
                        help="the prompts every policy is evaluated on: dev to tune, eval to report")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="full",
                        help="full: `rlhf-workflow demo --full` (the tables of docs/results/); quick: `rlhf-workflow demo`")
    parser.add_argument("--report-only", action="store_true", help="write the tables of the complete runs and stop")
    args = parser.parse_args(argv)

    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    questions = args.only or list(QUESTIONS)
    asked = {variant for question in questions for variant in QUESTIONS[question][1]}
    if set(args.variants or ()) - asked:
        parser.error(f"--variants {' '.join(sorted(set(args.variants) - asked))}: not a variant of "
                     f"{', '.join(questions)} (their variants: {', '.join(sorted(asked))})")
    # a root holds the runs of one recipe: a run of the other would be skipped as done and tabled
    for path in sorted(p for p in root.iterdir() if p.is_dir()):
        held = recipe_of(path)
        if held is not None and held != args.recipe:
            parser.error(f"{path} is a run of --recipe {held}, not {args.recipe}: give each recipe its own --root")
    if not args.report_only:
        todo = []
        for seed in args.seeds:  # seed by seed, so that every question has a first seed early
            for question in questions:
                for variant in QUESTIONS[question][1]:
                    if args.variants and variant not in args.variants and variant != "demo":
                        continue
                    if (variant, seed) not in todo:
                        todo.append((variant, seed))
        for variant, seed in todo:
            if finished(run_dir(root, variant, seed)):
                continue
            seconds = run(root, variant, seed, args.split, root / f"{variant}-s{seed}.log", args.recipe)
            print(f"  done in {seconds:.0f} s", flush=True)
            write_tables(root, questions, args.seeds, args.recipe)
    print(f"tables: {write_tables(root, questions, args.seeds, args.recipe)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

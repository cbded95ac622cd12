"""The paper's claims on the demo's setting, over seeds, each answered by a paired comparison.

Every run is the embedded demo (SmolLM2-135M-Instruct, `instructions` prompts, a Bradley-Terry reward
model trained on IFEval-checker feedback as the judge, IFEval's checkers as gold) with one change,
at one seed: ``rlhf-workflow demo <overrides> seed=S output_dir=ROOT/<variant>-s<S>``. The demo
itself (variant ``demo``) also trains the offline baseline on the same number of pairs; the other
variants skip it. Runs of one seed share the feedback, the reward model and the eval samples of
π0, so every comparison is paired within a seed, and pooled over seeds by `rlhf-workflow compare`.

    python experiments/claims.py --root runs/claims --seeds 0 1 2            # all questions
    python experiments/claims.py --root runs/claims --seeds 0 1 2 --only main judge
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
import subprocess
import sys
import time
from pathlib import Path

# variant -> overrides of the demo recipe
VARIANTS: dict[str, list[str]] = {
    "demo": [],
    "pm-knockout": ["feedback.judge=pm", "judge.ranking=knockout", "feedback.pm_train.precision=bf16"],
    "pm-copeland": ["feedback.judge=pm", "judge.ranking=copeland", "feedback.pm_train.precision=bf16"],
    "max-random": ["pairs.strategy=max_random"],
    "random": ["pairs.strategy=random"],
    "reference-previous": ["reference=previous"],
    "length-penalty-0.01": ["length_penalty.coef=0.01"],
    "length-penalty-0.03": ["length_penalty.coef=0.03"],
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
    "length": ("A length penalty on the proxy reward, r − λ·tokens, vs none",
               ["demo", "length-penalty-0.01", "length-penalty-0.03"],
               [("length-penalty-0.01/iter_2", "demo/iter_2"), ("length-penalty-0.03/iter_2", "demo/iter_2")]),
}


def run_dir(root: Path, variant: str, seed: int) -> Path:
    return root / f"{variant}-s{seed}"


def finished(path: Path) -> bool:
    """The run's last stage (its last evaluation) is done."""
    state = path / "state.json"
    if not state.exists():
        return False
    done = json.loads(state.read_text()).get("completed", [])
    last = "offline/eval" if path.name.startswith("demo-") else "iter_2/eval"
    return last in done


def run(root: Path, variant: str, seed: int, split: str, log: Path) -> float:
    """One run (continued if it was cut short); its wall time in seconds."""
    path = run_dir(root, variant, seed)
    overrides = VARIANTS[variant] + ([] if variant == "demo" else ONLY_DEMO_TRAINS_OFFLINE)
    command = [sys.executable, "-m", "rlhf_workflow", "demo", *overrides, f"seed={seed}",
               f"prompts.eval_split={split}", f"output_dir={path}"]
    print(f"[{time.strftime('%H:%M:%S')}] {path.name}: {' '.join(command[3:])}", flush=True)
    start = time.perf_counter()
    with log.open("a") as sink:
        subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - start


def write_tables(root: Path, questions: list[str], seeds: list[int]) -> Path:
    """ROOT/claims.md from the runs that are complete."""
    from rlhf_workflow.errors import UserError
    from rlhf_workflow.eval.compare import compare, load, markdown_lines, write_comparison

    lines = ["# The paper's claims on the demo's setting", "",
             f"Seeds {', '.join(map(str, seeds))}; `python experiments/claims.py --root {root}` made these tables.", ""]
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
    out = root / "claims.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="runs/claims", help="where the runs and tables go")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", nargs="+", choices=sorted(QUESTIONS), help="these questions (default: all)")
    parser.add_argument("--split", choices=["eval", "dev"], default="eval",
                        help="the prompts every policy is evaluated on: dev to tune, eval to report")
    parser.add_argument("--report-only", action="store_true", help="write the tables of the complete runs and stop")
    args = parser.parse_args(argv)

    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    questions = args.only or list(QUESTIONS)
    if not args.report_only:
        todo = []
        for seed in args.seeds:  # seed by seed, so that every question has a first seed early
            for question in questions:
                for variant in QUESTIONS[question][1]:
                    if (variant, seed) not in todo:
                        todo.append((variant, seed))
        for variant, seed in todo:
            if finished(run_dir(root, variant, seed)):
                continue
            seconds = run(root, variant, seed, args.split, root / f"{variant}-s{seed}.log")
            print(f"  done in {seconds:.0f} s", flush=True)
            write_tables(root, questions, args.seeds)
    print(f"tables: {write_tables(root, questions, args.seeds)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

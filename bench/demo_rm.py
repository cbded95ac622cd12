"""Tuning the demo's reward model on a dev set, never on the held-out prompts.

Builds a dev set of labelled pairs from `instructions` *train-split* prompts that the demo does not
use (neither its feedback nor its loop prompts; the held-out eval split is never touched), then
trains a reward model on a demo run's feedback pairs with each given setting and prints its dev
accuracy, its score–length correlation, and the accuracy of the rule "the shorter response wins".

    python bench/demo_rm.py --run runs/demo --setting 1e-5:2 --setting 1e-4:3
    python bench/demo_rm.py --run runs/demo --all-pairs --setting 1e-4:1

A setting is LR:EPOCHS. --all-pairs trains on every non-tied pair among each feedback prompt's
samples instead of the run's best-vs-worst pairs. Each setting takes a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
from pathlib import Path

from rlhf_workflow.data.io import jsonl_lines
from rlhf_workflow.data.run_layout import RunLayout

CLI = [sys.executable, "-m", "rlhf_workflow"]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in jsonl_lines(path)]


def build_dev_set(run: Path, work: Path, count: int, seed: int) -> Path:
    from rlhf_workflow.tasks import instructions

    layout = RunLayout(run)
    used = {r["prompt"] for r in _rows(layout.feedback.prompts)}
    used |= {r["prompt"] for iteration in layout.iterations() if iteration.prompts.exists()
             for r in _rows(iteration.prompts)}
    rows = [r for r in instructions.prompts("train", 2 * count + 200, seed=seed) if r["prompt"] not in used][:count]
    prompts = work / "dev_prompts.jsonl"
    prompts.write_text("".join(json.dumps({**r, "id": "dev-" + r["id"]}) + "\n" for r in rows))
    for args in (["generate", f"prompts={prompts}", f"output={work / 'dev_gen.jsonl'}", "sampling.n=4",
                  "sampling.max_new_tokens=48", "sampling.seed=99", "hf.batch_size=16"],
                 ["annotate", f"input={work / 'dev_gen.jsonl'}", f"output={work / 'dev_scored.jsonl'}",
                  "judge.type=function", "judge.function=rlhf_workflow.tasks.instructions:judge"],
                 ["pairs", f"input={work / 'dev_scored.jsonl'}", f"output={work / 'dev_pairs.jsonl'}"]):
        subprocess.run(CLI + args, check=True)
    return work / "dev_pairs.jsonl"


def all_pairs(scored: Path, out: Path) -> Path:
    pairs = []
    for row in _rows(scored):
        for i, j in itertools.combinations(range(len(row["responses"])), 2):
            a, b, ra, rb = row["responses"][i], row["responses"][j], row["rewards"][i], row["rewards"][j]
            if ra is None or rb is None or ra == rb or a == b:
                continue
            chosen, rejected = (a, b) if ra > rb else (b, a)
            pairs.append({"id": f"{row['id']}-{i}-{j}", "prompt": row["prompt"], "chosen": chosen, "rejected": rejected})
    out.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/demo", help="a demo run directory (its feedback/ is used)")
    parser.add_argument("--work", default="runs/demo-rm-tuning")
    parser.add_argument("--dev-prompts", type=int, default=256)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--setting", action="append", default=[], help="LR:EPOCHS (repeatable)")
    parser.add_argument("--all-pairs", action="store_true")
    args = parser.parse_args()
    run, work = Path(args.run), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    dev = work / "dev_pairs.jsonl"
    if not dev.exists():
        dev = build_dev_set(run, work, args.dev_prompts, args.seed)
    dev_rows = _rows(dev)
    shorter = sum(len(r["chosen"]) < len(r["rejected"]) for r in dev_rows) / len(dev_rows)
    feedback = RunLayout(run).feedback
    train = all_pairs(feedback.scored, work / "all_pairs.jsonl") if args.all_pairs else feedback.pairs
    print(f"dev set: {len(dev_rows)} pairs; the rule 'the shorter response wins' is right on {shorter:.3f}")
    print(f"training pairs: {len(_rows(train))} ({'all non-tied pairs' if args.all_pairs else 'best vs worst'})")
    for setting in args.setting or ["1e-5:2"]:
        lr, epochs = setting.split(":")
        out = work / f"rm-{'all' if args.all_pairs else 'bw'}-{lr}-{epochs}"
        subprocess.run(CLI + ["train-rm", f"output_dir={out}", f"data.train={train}", "data.max_length=256",
                              f"train.lr={lr}", f"train.epochs={epochs}", "train.per_device_batch_size=8",
                              "train.max_tokens_per_forward=1024", "train.log_every=100"], check=True)
        result_file = out / "dev_eval.json"
        subprocess.run(CLI + ["eval-rm", f"model={out / 'model'}", f"data={dev}", f"output={result_file}",
                              "max_length=256"], check=True, stdout=subprocess.DEVNULL)
        result = json.loads(result_file.read_text())
        print(f"lr {lr}, {epochs} epochs: dev accuracy {result['accuracy']:.3f}, score-length correlation "
              f"{result['scores']['length_correlation']:.3f}", flush=True)


if __name__ == "__main__":
    main()

"""Fault injection: kill a small online run with SIGKILL at random moments, rerun it after each
kill, and check that it ends exactly like a run that was never interrupted.

    python bench/fault_injection.py                  # 20 kills (the issue's bar), about 10 minutes
    python bench/fault_injection.py --kills 5 --seed 1

The run is the online loop on a tiny random model with a programmatic judge (2 iterations, the
offline baseline, a checkpoint every DPO step, the report), so a kill can land in any stage:
prompt writing, generation, annotation, pairs, the reference pass, DPO training mid-epoch,
checkpoint writing, the move of the policy, evaluation, the report. Every other kill is at a
moment drawn uniformly over the duration of the uninterrupted run; the others wait for an event
seen on disk that a random moment rarely hits (`EVENTS`: a checkpoint or a policy being written,
the reference pass, the report being written). A run that finishes before its next kill is checked
like the last one and started again from scratch. After the last kill the run is finished with a
plain rerun, and then (for it and for every run that finished earlier):

* every JSON Lines file of the run (prompts, generations, scores, pairs, reference log-probs,
  evaluation samples, DPO metrics, metrics.jsonl) has the same ids as in the uninterrupted run:
  none duplicated, none missing;
* every saved policy loads with `from_pretrained` (safetensors), with its model card; no
  checkpoint and no temporary file of an interrupted write (``.<name>.tmp-<host>-<pid>``) is left;
* the metrics of every policy equal the uninterrupted run's within 1e-4 (they are computed from
  the same seeded samples; only floating-point summation order may differ).

It prints which stage each kill hit and exits non-zero if any check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tiny model builders, judge and words the loop tests use

from conftest import LOOP_JUDGE, LOOP_WORDS  # noqa: E402
from rlhf_workflow.data.io import jsonl_lines
from rlhf_workflow.data.run_layout import RunLayout

TOLERANCE = 1e-4
TEMPORARY = re.compile(r"^\..+\.(tmp|old)-.+-\d+$")  # an atomic write's name before its rename
EVENTS = {  # moments worth a kill that a random draw rarely hits, as seen from the run directory
    "checkpoint writing": lambda run: any(any((p.dpo / "checkpoints").glob(".step-*.tmp-*"))
                                          for p in RunLayout(run).trained()),
    "policy saving": lambda run: any(any(p.dpo.glob(".model.tmp-*")) for p in RunLayout(run).trained()),
    "reference pass or first DPO step": lambda run: any(
        any(p.dpo.glob("*.ref.jsonl")) and not (p.dpo / "checkpoints").exists() and not p.policy.exists()
        for p in RunLayout(run).trained()),
    "report writing": lambda run: RunLayout(run).report.is_dir() and not RunLayout(run).report_html.exists(),
}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def setup(work: Path) -> list[str]:
    """The tiny model, prompts and judge; returns the recipe as `run` arguments."""
    from conftest import build_model, build_tokenizer

    model = work / "tiny-model"
    if not model.exists():
        tokenizer = build_tokenizer("chatml")
        build_model(tokenizer).save_pretrained(model)
        tokenizer.save_pretrained(model)
    (work / "task.py").write_text(LOOP_JUDGE)
    train = write_jsonl(work / "train.jsonl", [{"id": f"t{i}", "prompt": f"Write about the {LOOP_WORDS[i % 12]} {i}."}
                                               for i in range(24)])
    heldout = write_jsonl(work / "eval.jsonl", [{"id": f"e{i}", "prompt": f"Tell me about {LOOP_WORDS[i]}."}
                                                for i in range(6)])
    return [
        f"policy.name_or_path={model}", f"prompts.train={train}", f"prompts.eval={heldout}", "iterations=2",
        "generation.sampling.n=4", "generation.sampling.max_new_tokens=12", "generation.hf.batch_size=1",
        "judge.type=function", f"judge.function={work}/task.py:judge", f"eval.gold_function={work}/task.py:gold",
        "eval.sampling.n=2", "eval.sampling.max_new_tokens=12", "eval.bootstrap=200", "dpo.data.max_length=64",
        "dpo.train.lr=1e-3", "dpo.train.epochs=2", "dpo.train.per_device_batch_size=2", "dpo.train.save_every=1",
        "dpo.train.warmup_ratio=0", "dpo.reference.batch_size=2", "offline.after_online=true",
    ]


def command(recipe: list[str], run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "rlhf_workflow", "run", *recipe, f"output_dir={run_dir}"]


def last_stage(log: Path) -> str:
    """What the run was doing: the last '== stage' line of its output, or 'start-up'."""
    text = log.read_text(errors="replace")
    stages = [line[3:].strip() for line in text.splitlines() if line.startswith("== ")]
    if not stages:
        return "start-up"
    if stages[-1].endswith("/dpo"):  # which part of the DPO stage
        tail = text[text.rindex("== "):]
        return stages[-1] + (" (training)" if "[train step" in tail or "dpo:" in tail else " (reference pass)")
    return stages[-1]


def jsonl_ids(path: Path) -> list[str]:
    ids = []
    for line in jsonl_lines(path):
        if line.strip():
            row = json.loads(line)
            ids.append(str(row.get("id", row.get("step"))) + ("/" + row["split"] if "split" in row else ""))
    return ids


def compare(clean: Path, faulted: Path) -> list[str]:
    """The problems found: differing files, unloadable policies, leftover checkpoints, metrics."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    problems = []
    files = sorted(p.relative_to(clean) for p in clean.rglob("*.jsonl"))
    for rel in files:
        a, b = clean / rel, faulted / rel
        if not b.exists():
            problems.append(f"{rel}: missing")
            continue
        ids_a, ids_b = jsonl_ids(a), jsonl_ids(b)
        if len(ids_b) != len(set(ids_b)):
            problems.append(f"{rel}: {len(ids_b) - len(set(ids_b))} duplicated rows")
        if sorted(set(ids_a)) != sorted(set(ids_b)):
            problems.append(f"{rel}: rows differ ({len(set(ids_a) - set(ids_b))} missing, "
                            f"{len(set(ids_b) - set(ids_a))} extra)")
    for policy in sorted(p.policy for p in RunLayout(faulted).trained() if p.policy.exists()):
        try:
            load_file(policy / "model.safetensors")
            AutoModelForCausalLM.from_pretrained(policy)
        except Exception as exc:  # noqa: BLE001 - any failure to load is what we report
            problems.append(f"{policy.relative_to(faulted)}: does not load ({exc})")
        if not (policy / "README.md").is_file():
            problems.append(f"{policy.relative_to(faulted)}: no model card")
    leftovers = [p.dpo.relative_to(faulted) / "checkpoints" for p in RunLayout(faulted).trained()
                 if (p.dpo / "checkpoints").is_dir() and any((p.dpo / "checkpoints").iterdir())]
    problems += [f"{p}: checkpoints left behind" for p in leftovers]
    temporary = [p.relative_to(faulted) for p in faulted.rglob("*") if TEMPORARY.match(p.name)]
    problems += [f"{p}: temporary file of an interrupted write left behind" for p in temporary]
    metrics = {r["id"]: r for r in map(json.loads, jsonl_lines(RunLayout(clean).metrics))}
    for row in map(json.loads, jsonl_lines(RunLayout(faulted).metrics)):
        for key, value in metrics[row["id"]].items():
            other = row.get(key)
            if isinstance(value, float) and (other is None or abs(value - other) > TOLERANCE):
                problems.append(f"metrics {row['id']}.{key}: {other} vs {value} uninterrupted")
    if not RunLayout(faulted).report_html.exists():
        problems.append("report/report.html missing")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="runs/fault-injection")
    args = parser.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    recipe = setup(work)
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}

    clean, faulted = work / "clean", work / "faulted"
    for path in (clean, faulted):
        shutil.rmtree(path, ignore_errors=True)
    start = time.monotonic()
    subprocess.run(command(recipe, clean), check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    duration = time.monotonic() - start
    print(f"uninterrupted run: {duration:.1f} s")

    rng = random.Random(args.seed)
    hits: list[tuple[float, str]] = []
    finished = 0
    problems: list[str] = []
    log = work / "faulted.log"
    while len(hits) < args.kills:
        # odd kills: at a random moment; even kills: the moment a watched event is seen on disk
        event = None if len(hits) % 2 == 0 else list(EVENTS)[(len(hits) // 2) % len(EVENTS)]
        moment = rng.uniform(0.5, duration)
        with open(log, "w") as out:
            began = time.monotonic()
            proc = subprocess.Popen(command(recipe, faulted), stdout=out, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
            if event is None:
                try:
                    proc.wait(timeout=moment)
                except subprocess.TimeoutExpired:
                    pass
            else:
                while proc.poll() is None and not EVENTS[event](faulted):
                    time.sleep(0.002)
            if proc.poll() is not None:
                # the run finished before its kill: check it like the last one, then start over from scratch
                finished += 1
                found = [] if proc.returncode == 0 else [f"a rerun failed (exit {proc.returncode}), see {log}"]
                found = found or compare(clean, faulted)
                problems += [f"finished run {finished}: {p}" for p in found]
                shutil.rmtree(faulted)
                continue
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            moment = time.monotonic() - began
        hits.append((moment, f"{event} (watched)" if event else last_stage(log)))
        print(f"kill {len(hits):2d} at {moment:5.1f} s into the process, during: {hits[-1][1]}", flush=True)
    with open(log, "w") as out:
        rc = subprocess.run(command(recipe, faulted), stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        print(f"the final rerun failed (exit {rc}); its output is in {log}")
        return 1
    stages: dict[str, int] = {}
    for _, stage in hits:
        stages[stage] = stages.get(stage, 0) + 1
    print(f"{len(hits)} kills, by moment: " + ", ".join(f"{s} {n}" for s, n in sorted(stages.items())))
    print(f"{finished} runs finished before their next kill; each was checked like the last one, then started "
          "again from scratch")
    problems += compare(clean, faulted)
    for problem in problems:
        print("PROBLEM:", problem)
    if not problems:
        files = len(list(clean.rglob("*.jsonl")))
        print(f"OK: in all {finished + 1} finished runs, all {files} JSON Lines files have the same rows as the "
              "uninterrupted run (no duplicates, none missing); every policy loads with its card; no checkpoint "
              f"or temporary file is left; all metrics agree within {TOLERANCE}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

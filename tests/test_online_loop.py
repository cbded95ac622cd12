"""The online loop end to end on a tiny model with a programmatic judge: every file of the run
directory, resume after SIGKILL, config changes, the offline baseline's pair budget, the report."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port
from rlhf_workflow.cli import main
from rlhf_workflow.errors import UserError

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines() if line.strip()]


def test_two_iterations_write_every_file_and_the_report(recipe, tmp_path):
    run_dir = tmp_path / "run"
    assert main(["run", *recipe, f"output_dir={run_dir}"]) == 0
    for t in (1, 2):
        it = run_dir / f"iter_{t}"
        for name in ("prompts.jsonl", "generations.jsonl", "scored.jsonl", "pairs.jsonl", "pairs.stats.json",
                     "eval/generations.jsonl", "eval/scored.jsonl", "dpo/metrics.jsonl", "dpo/train_pairs.ref.jsonl",
                     "policy/model.safetensors", "policy/config.json"):
            assert (it / name).exists(), it / name
        assert len(_ids(it / "generations.jsonl")) == 8 and not (it / "dpo" / "checkpoints").exists()
    assert not set(_ids(run_dir / "iter_1/prompts.jsonl")) & set(_ids(run_dir / "iter_2/prompts.jsonl"))
    state = json.loads((run_dir / "state.json").read_text())
    assert state["last"] == "iter_2/eval" and len(state["completed"]) == len(set(state["completed"])) == 12
    assert list(state["made_by"]) == state["completed"] and len(set(state["made_by"].values())) == 1
    rows = _metrics(run_dir)
    assert [r["id"] for r in rows] == ["iter_0", "iter_1", "iter_2"]
    for row in rows:
        assert 0 <= row["proxy_reward"] <= 1 and 0 <= row["gold"] <= 1 and row["length_tokens"] > 0
        assert row["gold_ci95"][0] <= row["gold"] <= row["gold_ci95"][1]
    for row in rows[1:]:
        assert 0 <= row["win_rate_vs_initial"] <= 1 and "kl_vs_initial" in row and row["pairs"] > 0
    # the report: a table, non-empty plots, an HTML page that shows them
    report = run_dir / "report"
    md, page = (report / "report.md").read_text(), (report / "report.html").read_text()
    assert "| iter_2 |" in md
    for png in ("proxy_reward.png", "gold.png", "win_rate_vs_initial.png", "kl_vs_initial.png", "length_tokens.png",
                "pair_rewards.png", "proxy_vs_gold.png"):
        assert (report / png).stat().st_size > 1000
        # embedded, not linked: the page shows its plots wherever it is moved or mailed
        assert "data:image/png;base64," + base64.b64encode((report / png).read_bytes()).decode()[:200] in page
    assert "src='" + "proxy_reward.png" not in page
    # running it again redoes nothing; a different recipe is refused unless --force
    assert main(["run", *recipe, f"output_dir={run_dir}"]) == 0
    assert len(_metrics(run_dir)) == 3
    assert main(["run", *recipe, f"output_dir={run_dir}", "dpo.loss.beta=0.5"]) == 2

    # with --force, the stages the changed key feeds (DPO on) are redone, those before it kept as they are
    before = json.loads((run_dir / "state.json").read_text())
    pairs, weights = (run_dir / "iter_1/pairs.jsonl").read_bytes(), (run_dir / "iter_1/policy/model.safetensors").read_bytes()
    assert main(["run", *recipe, f"output_dir={run_dir}", "dpo.loss.beta=0.5", "--force"]) == 0
    after = json.loads((run_dir / "state.json").read_text())
    kept = before["completed"][: before["completed"].index("iter_1/dpo")]
    assert after["completed"] == before["completed"] and all(after["seconds"][s] == before["seconds"][s] for s in kept)
    assert (run_dir / "iter_1/pairs.jsonl").read_bytes() == pairs
    aside = run_dir / "replaced-1"
    assert (aside / "iter_1/policy/model.safetensors").read_bytes() == weights
    assert (run_dir / "iter_1/policy/model.safetensors").read_bytes() != weights  # trained with the new beta
    assert {p.name for p in (aside / "iter_2").iterdir()} >= {"generations.jsonl", "scored.jsonl", "pairs.jsonl",
                                                             "pairs.stats.json", "dpo", "policy", "eval"}
    assert not (aside / "iter_1/pairs.jsonl").exists() and not (aside / "iter_0").exists()
    assert [r["id"] for r in _metrics(aside)] == ["iter_1", "iter_2"] and [r["id"] for r in _metrics(run_dir)] == [
        "iter_0", "iter_1", "iter_2"]
    assert _metrics(run_dir)[0] == rows[0]


def test_offline_baseline_uses_the_online_pair_budget(recipe, tmp_path):
    online, offline = tmp_path / "online", tmp_path / "offline"
    assert main(["run", *recipe, f"output_dir={online}", "iterations=1", "prompts.per_iteration=6"]) == 0
    budget = len(_ids(online / "iter_1" / "pairs.jsonl"))
    assert main(["run", *recipe, f"output_dir={offline}", "iterations=1", "mode=offline",
                 "prompts.per_iteration=12", f"offline.match_run={online}"]) == 0
    assert len(_ids(offline / "offline" / "pairs.jsonl")) == budget
    assert [r["id"] for r in _metrics(offline)] == ["iter_0", "offline"]
    assert _metrics(offline)[1]["mode"] == "offline" and (offline / "report" / "report.html").exists()


# ---------------------------------------------------------------- SIGKILL and rerun


def _env():
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


def _run_until(args: list[str], ready, timeout: float = 120) -> bool:
    """Start the run; SIGKILL it as soon as ``ready()`` is true. False if it finished first."""
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_workflow", "run", *args], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.005)
    proc.wait()
    return False


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _completed(run_dir: Path) -> list[str]:
    path = run_dir / "state.json"
    try:
        return json.loads(path.read_text())["completed"] if path.exists() else []
    except json.JSONDecodeError:
        return []


def test_offline_after_online_reuses_iteration_1_samples_exactly(recipe, tmp_path):
    """offline.after_online copies π0's samples (and scores) of iteration 1's prompts instead of
    drawing them again: they equal what a separate offline run samples for those prompts."""
    both, alone = tmp_path / "both", tmp_path / "alone"
    small = ["prompts.per_iteration=4", "dpo.train.save_every=0"]
    assert main(["run", *recipe, *small, f"output_dir={both}", "offline.after_online=true"]) == 0
    assert main(["run", *recipe, *small, f"output_dir={alone}", "mode=offline", "offline.max_pairs=8"]) == 0

    def rows(path: Path) -> dict[str, dict]:
        return {json.loads(line)["id"]: json.loads(line) for line in path.read_text().splitlines()}

    first = rows(both / "iter_1" / "scored.jsonl")
    reused, fresh = rows(both / "offline" / "scored.jsonl"), rows(alone / "offline" / "scored.jsonl")
    assert set(reused) == set(fresh) == set(_ids(both / "offline" / "prompts.jsonl")) and set(first) < set(reused)
    for key, row in reused.items():
        assert row["responses"] == fresh[key]["responses"] and row["rewards"] == pytest.approx(fresh[key]["rewards"])
        if key in first:
            assert row == first[key]
    # the budget's sample: the statistics (and the metrics row) describe the pairs trained on
    kept = rows(alone / "offline" / "pairs.jsonl")
    stats = json.loads((alone / "offline" / "pairs.stats.json").read_text())
    assert len(kept) == stats["pairs"] <= 8
    assert stats["mean_chosen_reward"] == pytest.approx(sum(p["chosen_reward"] for p in kept.values()) / len(kept))
    offline_metrics = [json.loads(line) for line in (alone / "metrics.jsonl").read_text().splitlines()][-1]
    assert offline_metrics["pairs"] == len(kept)


@pytest.mark.parametrize("moment", ["generation", "dpo", "between"])
def test_killed_runs_finish_like_an_uninterrupted_one(recipe, tmp_path, moment):
    args = [*recipe, "iterations=1", "prompts.per_iteration=8", "generation.hf.batch_size=1"]
    clean = tmp_path / "clean"
    assert main(["run", *args, f"output_dir={clean}"]) == 0
    killed = tmp_path / "killed"
    it = killed / "iter_1"
    ready = {
        "generation": lambda: 1 <= _lines(it / "generations.jsonl") < 8,
        "dpo": lambda: (it / "dpo" / "checkpoints").exists() and any((it / "dpo" / "checkpoints").iterdir()),
        "between": lambda: "iter_1/annotate" in _completed(killed),
    }[moment]
    assert _run_until([*args, f"output_dir={killed}"], ready), "the run ended before the kill"
    assert main(["run", *args, f"output_dir={killed}"]) == 0
    for name in ("generations.jsonl", "scored.jsonl", "pairs.jsonl", "eval/generations.jsonl"):
        ids = _ids(it / name)
        assert len(ids) == len(set(ids)) and sorted(ids) == sorted(_ids(clean / "iter_1" / name)), name
    a, b = _metrics(clean), _metrics(killed)
    assert [r["id"] for r in b] == ["iter_0", "iter_1"]
    for x, y in zip(a, b):
        for key in ("proxy_reward", "gold", "win_rate_vs_initial", "kl_vs_initial", "length_tokens"):
            if key in x:
                assert y[key] == pytest.approx(x[key], abs=1e-4), (key, x, y)


# runs `rlhf-workflow run ARGS...` with MODULE.NAME (a function, or Class.method) killing the process
# (SIGKILL) at its CALL-th call whose arguments mention TEXT: a kill at an exact moment of a write
KILL_AT = """
import importlib, os, signal, sys
module, name, text, call = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
owner = importlib.import_module(module)
*path, name = name.split(".")
for part in path:
    owner = getattr(owner, part)
original = getattr(owner, name)
seen = 0
def kill_at(*args, **kwargs):
    global seen
    if text in repr(args):
        seen += 1
        if seen == call:
            os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)
setattr(owner, name, kill_at)
from rlhf_workflow.cli import main
sys.exit(main(["run", *sys.argv[5:]]))
"""

TEMPORARY = re.compile(r"^\..+\.(tmp|old)-.+-\d+$")  # what an atomic write's temporary name looks like


def test_kills_at_every_commit_point_of_a_write_leave_nothing_behind(recipe, tmp_path):
    """A kill (1) with a saved model complete under its temporary name, (2) right after a training
    stage saved its model, before its checkpoints were removed, (3) after the policy was moved into
    place, before the stage was marked done, (4) with a file written under its temporary name: the
    run then finishes with the rows and metrics of an uninterrupted one, and neither temporary files,
    checkpoints, nor a retraining are left of the kills."""
    args = [*recipe, "iterations=1", "prompts.per_iteration=8"]
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    assert main(["run", *args, f"output_dir={clean}"]) == 0
    dpo = killed / "iter_1" / "dpo"

    def run_killed_at(module: str, name: str, text: str = "", call: int = 1) -> None:
        result = subprocess.run([sys.executable, "-c", KILL_AT, module, name, text, str(call), *args,
                                 f"output_dir={killed}"], env=_env(), capture_output=True, text=True, timeout=300)
        assert result.returncode == -signal.SIGKILL, (module, name, result.stdout[-2000:], result.stderr[-2000:])

    def temporary() -> list[str]:
        return sorted(str(p.relative_to(killed)) for p in killed.rglob("*") if TEMPORARY.match(p.name))

    run_killed_at("rlhf_workflow.models.saving", "replace_directory")
    assert [Path(p).parent for p in temporary()] == [Path("iter_1/dpo")] and not (dpo / "model").exists()
    assert (killed / temporary()[0] / "README.md").is_file()  # the card is written with the model, not after
    run_killed_at("rlhf_workflow.train.checkpoint", "remove_checkpoints")
    assert (dpo / "model" / "README.md").is_file() and any((dpo / "checkpoints").iterdir())
    run_killed_at("rlhf_workflow.online.loop", "RunState.mark", "iter_1/dpo")
    assert (killed / "iter_1" / "policy").is_dir() and "iter_1/dpo" not in _completed(killed)
    policy_written = (killed / "iter_1" / "policy" / "model.safetensors").stat().st_mtime_ns
    run_killed_at("os", "replace", "state.json")
    assert any(p.startswith(".state.json.tmp-") for p in temporary())

    assert main(["run", *args, f"output_dir={killed}"]) == 0
    assert temporary() == []
    assert not list(killed.rglob("checkpoints"))
    assert (killed / "iter_1" / "policy" / "model.safetensors").stat().st_mtime_ns == policy_written  # not trained again
    assert (killed / "iter_1" / "policy" / "README.md").is_file()  # the model card came with the model
    for name in ("generations.jsonl", "scored.jsonl", "pairs.jsonl", "eval/generations.jsonl"):
        ids = _ids(killed / "iter_1" / name)
        assert len(ids) == len(set(ids)) and sorted(ids) == sorted(_ids(clean / "iter_1" / name)), name
    for x, y in zip(_metrics(clean), _metrics(killed), strict=True):
        for key in ("proxy_reward", "gold", "win_rate_vs_initial", "kl_vs_initial", "length_tokens"):
            if key in x:
                assert y[key] == pytest.approx(x[key], abs=1e-4), (key, x, y)


def test_recipe_file_is_the_first_argument(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("iterations: 3\nprompts: {train: a.jsonl, eval: b.jsonl}\njudge: {type: function, function: 'm:f'}\n")
    assert main(["run", str(recipe), "dpo.loss.beta=0.2", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "iterations: 3" in printed and "beta: 0.2" in printed
    assert main(["run", str(recipe), "prompts.eval=", "--print-config"]) == 0  # printed, the missing key marked
    printed = capsys.readouterr()
    assert "# REQUIRED: prompts.eval is required" in printed.out and "also give prompts.eval=..." in printed.err
    assert main(["run", str(recipe), "prompts.eval="]) == 2
    assert "prompts.eval is required" in capsys.readouterr().err
    assert main(["run", str(recipe), "prompts.train_per_iteration=[x.jsonl]", "--print-config"]) == 2
    assert "names 1 files for 3 iterations" in capsys.readouterr().err


def test_two_processes_run_the_loop_like_one(recipe, tmp_path):
    """Under accelerate launch every stage splits or waits correctly; rows and metrics match one process."""
    args = [*recipe, "iterations=1", "prompts.per_iteration=8", "dpo.train.gradient_accumulation_steps=2"]
    one = tmp_path / "one"
    assert main(["run", *args, f"output_dir={one}"]) == 0
    two = tmp_path / "two"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
              "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
              "-m", "rlhf_workflow", "run", *[a.replace("gradient_accumulation_steps=2", "gradient_accumulation_steps=1")
                                              for a in args], f"output_dir={two}"]
    result = subprocess.run(launch, env=_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("iter_1/generations.jsonl", "iter_1/scored.jsonl", "iter_1/pairs.jsonl", "iter_1/eval/scored.jsonl"):
        ids = _ids(two / name)
        assert len(ids) == len(set(ids)) and sorted(ids) == sorted(_ids(one / name)), name
    a, b = _metrics(one), _metrics(two)
    assert [r["id"] for r in b] == ["iter_0", "iter_1"]
    for x, y in zip(a, b):
        for key in ("proxy_reward", "gold", "win_rate_vs_initial", "kl_vs_initial"):
            if key in x:
                assert y[key] == pytest.approx(x[key], abs=1e-4), (key, x, y)


def test_feedback_can_make_the_preference_model_the_loops_judge(tmp_path):
    from rlhf_workflow.config import RunConfig, load_config
    from rlhf_workflow.online.feedback import loop_judge
    from rlhf_workflow.stages import plan

    base = ["prompts.task=instructions", "prompts.per_iteration=4", "feedback.enabled=true",
            "feedback.judge_function=rlhf_workflow.tasks.instructions:judge", f"output_dir={tmp_path / 'run'}"]
    rm = load_config(RunConfig, None, base)
    assert loop_judge(rm, tmp_path / "run").type == "reward_model"
    assert loop_judge(rm, tmp_path / "run").path == str(tmp_path / "run" / "feedback" / "rm" / "model")
    assert "feedback/pm" not in [stage.name for stage in plan(rm)]
    pm = load_config(RunConfig, None, base + ["feedback.judge=pm", "judge.ranking=copeland"])
    judge = loop_judge(pm, tmp_path / "run")
    assert (judge.type, judge.ranking) == ("preference_model", "copeland")
    assert judge.path == str(tmp_path / "run" / "feedback" / "pm" / "model")
    assert "feedback/pm" in [stage.name for stage in plan(pm)]
    with pytest.raises(UserError, match="set feedback.judge=pm"):
        load_config(RunConfig, None, base + ["judge.type=preference_model"])
    with pytest.raises(UserError, match="not judge.type=function"):
        load_config(RunConfig, None, base + ["judge.type=function", "judge.function=m:f"])


def test_generation_dtype_samples_in_bfloat16_and_trains_in_the_policys_dtype(recipe, tmp_path):
    """generation.dtype is the dtype every sampling pass loads the policy in (and π0's scoring of the
    eval samples for the KL); DPO trains in policy.dtype."""
    run = tmp_path / "run"
    assert main(["run", *recipe, "iterations=1", "prompts.per_iteration=4", "generation.dtype=bfloat16",
                 f"output_dir={run}"]) == 0
    for generations in ("iter_1/generations.settings.json", "iter_0/eval/generations.settings.json",
                        "iter_1/eval/generations.settings.json"):
        assert json.loads((run / generations).read_text())["dtype"] == "bfloat16", generations
    import yaml

    assert yaml.safe_load((run / "iter_1" / "dpo" / "config.yaml").read_text())["model"]["dtype"] == "float32"
    [_, first] = _metrics(run)
    assert first["kl_vs_initial"] is not None

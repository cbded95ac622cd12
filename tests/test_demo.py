"""The demo pipeline in miniature: a tiny random model through simulated feedback, reward-model
training, one online iteration, the offline baseline and the report (the real demo runs
SmolLM2-135M-Instruct for 8-15 minutes: `rlhf-workflow demo`)."""

from __future__ import annotations

import json

import pytest

from rlhf_workflow.cli import main
from rlhf_workflow.config import config_to_yaml


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def test_miniature_demo_runs_end_to_end(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "demo"
    overrides = [
        f"output_dir={run_dir}", f"policy.name_or_path={tiny_model_dir}", "iterations=1", "prompts.per_iteration=6",
        "prompts.eval_count=6", "feedback.prompts=10", "feedback.sampling.n=6", "feedback.sampling.max_new_tokens=8",
        "feedback.judge_function=rlhf_workflow.tasks.instructions:noisy_judge", "feedback.rm.train.epochs=1",
        "feedback.rm.data.max_length=96", "feedback.pm.data.max_length=96", "feedback.rm.train.per_device_batch_size=2", "dpo.train.per_device_batch_size=2", "generation.sampling.max_new_tokens=8", "generation.hf.batch_size=4",
        "judge.max_length=96", "dpo.data.max_length=96", "dpo.train.epochs=1", "dpo.train.lr=1e-3",
        "eval.sampling.max_new_tokens=8", "eval.bootstrap=100", "feedback.train_pm=true",
        "feedback.pm.train.per_device_batch_size=2", "feedback.rm.train.precision=bfloat16", "dpo.train.precision=bfloat16",
        "feedback.pm.train.precision=float32",
    ]
    # the reward model and DPO train with bf16 autocast (the recipe's, pinned here: on a CPU with slow
    # bf16 the demo would choose fp32), the preference model in fp32: stages of one process with
    # different precisions
    from rlhf_workflow.models import prompt_states

    prompt_states._SHARED.clear()
    assert main(["demo", *overrides]) == 0
    # the evaluations after π0's computed only the answers: the reward model read the eval prompts
    # π0's evaluation kept (twice: iter_1's and offline's), π0 for the KL those iter_1's kept (once)
    stores = sorted(prompt_states._SHARED.values(), key=lambda store: store.reused)
    assert [(len(store), store.reused) for store in stores] == [(6, 6), (6, 12)]
    fb = run_dir / "feedback"
    for name in ("prompts.jsonl", "generations.jsonl", "scored.jsonl", "pairs.jsonl", "heldout_pairs.jsonl",
                 "rm/model/model.safetensors", "rm_eval.json", "pm/model/model.safetensors", "pm_eval.json"):
        assert (fb / name).exists(), name
    # the loop judged with the trained reward model, the baseline got the same number of pairs
    config = json.loads(json.dumps(__import__("yaml").safe_load((run_dir / "config.yaml").read_text())))
    assert config["judge"]["type"] == "reward_model" and config["feedback"]["enabled"]
    online = len((run_dir / "iter_1" / "pairs.jsonl").read_text().splitlines())
    assert len((run_dir / "offline" / "pairs.jsonl").read_text().splitlines()) == online > 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["iter_0", "iter_1", "offline"]
    assert all(0 <= r["gold"] <= 1 and "proxy_reward" in r for r in rows)
    instructions = [json.loads(line)["instruction_id_list"]
                    for line in (run_dir / "eval_prompts.jsonl").read_text().splitlines()]
    assert len(instructions) == 6 and all(instructions)
    assert all(set(r["ifeval_types"]) <= set(sum(instructions, [])) for r in rows)
    assert all(0 <= r["ifeval_prompt_strict"] <= r["ifeval_prompt_loose"] <= 1 for r in rows)
    report = (run_dir / "report" / "report.md").read_text()
    assert "## IFEval, by Google's instruction checkers" in report and (run_dir / "report" / "ifeval_types.png").exists()
    assert "| offline |" in report and "reward model trained on simulated human feedback: held-out accuracy" in report
    assert "preference model trained on simulated human feedback: held-out accuracy" in report
    assert json.loads((fb / "pm_eval.json").read_text())["kind"] == "pm"


def _precision(config):
    return (config.generation.dtype, config.judge.dtype, config.feedback.rm.train.precision,
            config.dpo.train.precision)


def test_demo_runs_in_fp32_on_a_cpu_where_bf16_is_slower(tmp_path, monkeypatch):
    """The demo keeps its recipe's bf16 where bf16 matmuls are clearly faster, fp32 elsewhere; the
    user's own settings win, and a run directory keeps the precision its run started with."""
    from rlhf_workflow import processes, workflow

    out = f"output_dir={tmp_path / 'demo'}"
    monkeypatch.setattr(processes, "no_accelerator", lambda: True)  # a CPU, on a GPU machine too
    monkeypatch.setattr(workflow, "cpu_bf16_speedup", lambda: 2.5)
    assert _precision(workflow.demo_config([out])) == ("bfloat16", "bfloat16", "bfloat16", "bfloat16")
    monkeypatch.setattr(workflow, "cpu_bf16_speedup", lambda: 0.5)
    slow = workflow.demo_config([out])
    assert _precision(slow) == ("float32", "float32", "float32", "float32")
    assert _precision(workflow.demo_config([out, "dpo.train.precision=bfloat16"])) == ("float32", "float32", "float32", "bfloat16")

    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "config.yaml").write_text(config_to_yaml(slow))

    def measured():
        raise AssertionError("a run directory that holds a run is continued with its own precision")
    monkeypatch.setattr(workflow, "cpu_bf16_speedup", measured)
    assert _precision(workflow.demo_config([out])) == ("float32", "float32", "float32", "float32")


def test_demo_full_is_the_same_recipe_at_the_experiments_size(tmp_path, monkeypatch):
    """`demo` and `demo --full` differ in sizes only (how many prompts train and evaluate) and in
    their default run directories, so that one never continues the other; `--full` is the recipe
    experiments/claims.py runs."""
    import yaml

    from rlhf_workflow import workflow
    from rlhf_workflow.cli import main

    ran = []
    monkeypatch.setattr(workflow, "run_workflow", lambda config, force=False: ran.append(config))
    monkeypatch.setattr(workflow, "demo_precision", lambda config: [])
    assert main(["demo", f"output_dir={tmp_path / 'a'}"]) == 0
    assert main(["demo", "--full", f"output_dir={tmp_path / 'b'}", "seed=3"]) == 0
    quick, full = ran
    assert (quick.prompts.eval_count, full.prompts.eval_count) == (64, 200)
    assert (full.feedback.prompts, full.prompts.per_iteration) == (2 * quick.feedback.prompts, 2 * quick.prompts.per_iteration)
    assert full.seed == 3

    def flat(config, prefix=""):
        for key, value in config.items():
            if isinstance(value, dict):
                yield from flat(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    a, b = (dict(flat(yaml.safe_load((workflow.DEMO_RECIPE.with_name(name)).read_text())))
            for name in ("demo.yaml", "demo-full.yaml"))
    differ = {key for key in a.keys() | b.keys() if a.get(key) != b.get(key)}
    assert differ == {"output_dir", "prompts.eval_count", "prompts.per_iteration", "feedback.prompts"}
    assert a["output_dir"] != b["output_dir"]


def test_a_run_of_the_other_demo_recipe_is_refused_with_the_command_that_continues_it(tmp_path, monkeypatch, capsys):
    """runs/demo held the full recipe's runs before `demo` halved: `demo` there says to use
    `demo --full`, and `demo --full` on a run of `demo` says the reverse; --force still continues."""
    from rlhf_workflow import workflow
    from rlhf_workflow.cli import main

    ran = []
    monkeypatch.setattr(workflow, "run_workflow", lambda config, force=False: ran.append(config))
    monkeypatch.setattr(workflow, "demo_precision", lambda config: [])
    for recipe, asked, hint in (("demo-full.yaml", [], "`rlhf-workflow demo --full seed=1 output_dir="),
                                ("demo.yaml", ["--full"], "`rlhf-workflow demo seed=1 output_dir=")):
        out = tmp_path / recipe
        out.mkdir()
        held = workflow.demo_config(["seed=1", f"output_dir={out}"], workflow.DEMO_RECIPE.with_name(recipe))
        (out / "config.yaml").write_text(config_to_yaml(held))
        assert main(["demo", *asked, "seed=1", f"output_dir={out}"]) == 2
        assert hint + f"{out}`" in capsys.readouterr().err and not ran  # the user's settings kept
        assert main(["demo", *asked, "--force", "seed=1", f"output_dir={out}"]) == 0 and len(ran) == 1
        ran.clear()
        # the recipe the run was made with continues it
        assert main(["demo", *([] if asked else ["--full"]), "seed=1", f"output_dir={out}"]) == 0 and len(ran) == 1
        ran.clear()


def _bf16_settings(config):
    """The dotted keys of a run config whose value is bf16, however a setting spells it."""
    from rlhf_workflow.config import config_to_yaml

    def walk(node, prefix=""):
        if isinstance(node, dict):
            for key, value in node.items():
                yield from walk(value, f"{prefix}{key}.")
        elif str(node).lower() in ("bf16", "bfloat16"):
            yield prefix[:-1]

    return sorted(walk(__import__("yaml").safe_load(config_to_yaml(config))))


@pytest.mark.parametrize("recipe", ["demo.yaml", "demo-full.yaml"])
@pytest.mark.parametrize("variant", [[], ["feedback.train_pm=true"], ["feedback.judge=pm", "judge.ranking=copeland"]])
def test_the_demos_fp32_choice_covers_every_bf16_setting_of_its_recipe(tmp_path, monkeypatch, variant, recipe):
    """Every bf16 setting a demo recipe (`demo`, `demo --full`) holds turns fp32 where the demo
    chooses fp32 (one left in bf16 would run emulated bf16 on a CPU without bf16 instructions, about
    100x slower), with a variant that trains a preference model too; and every PRECISION_KEYS key is
    a setting of the recipe, which a continued run directory keeps."""
    from rlhf_workflow import processes, workflow

    out = f"output_dir={tmp_path / 'demo'}"
    path = workflow.DEMO_RECIPE.with_name(recipe)
    monkeypatch.setattr(processes, "no_accelerator", lambda: True)  # a CPU, on a GPU machine too
    monkeypatch.setattr(workflow, "cpu_bf16_speedup", lambda: 2.5)
    fast = workflow.demo_config([out, *variant], path)
    assert set(_bf16_settings(fast)) <= set(workflow.PRECISION_KEYS) and _bf16_settings(fast)
    monkeypatch.setattr(workflow, "cpu_bf16_speedup", lambda: 0.5)
    slow = workflow.demo_config([out, *variant], path)
    assert _bf16_settings(slow) == []
    assert {key: slow.value_at(key) for key in workflow.PRECISION_KEYS} == workflow.PRECISION_KEYS


def test_bf16_speedup_is_measured_on_this_cpu():
    """A ratio on every CPU, those that emulate bf16 (about 100x slower than fp32) included, where
    the probe must still choose fp32."""
    from rlhf_workflow.processes import cpu_has_native_bf16
    from rlhf_workflow.workflow import BF16_MIN_SPEEDUP, cpu_bf16_speedup

    speedup = cpu_bf16_speedup(repeats=2)
    assert 0.001 < speedup < 50
    if not cpu_has_native_bf16():
        assert speedup < BF16_MIN_SPEEDUP


DECIDE_IN_EACH_PROCESS = '''
import os, sys
import torch.distributed as dist
from rlhf_workflow import workflow
rank = int(os.environ["RANK"])
workflow.cpu_bf16_speedup = lambda: float(sys.argv[2 + rank])  # each process "measures" its own speedup
config = workflow.demo_config([f"output_dir={sys.argv[1]}"])
with open(f"{sys.argv[1]}.rank{rank}", "w") as out:  # a file each: two processes' prints can interleave
    out.write(f"{config.generation.dtype} {config.judge.dtype} {config.feedback.rm.train.precision} "
              f"{config.dpo.train.precision}")
dist.barrier()
dist.destroy_process_group()
'''


@pytest.mark.parametrize("speedups, chosen", [(("2.5", "0.5"), "bfloat16 bfloat16 bfloat16 bfloat16"),
                                              (("0.5", "2.5"), "float32 float32 float32 float32")])
def test_every_process_of_a_launched_demo_runs_the_main_processs_precision(tmp_path, speedups, chosen):
    """Under `accelerate launch` the main process measures and decides; a process whose own timing
    would choose the other precision runs the main one's."""
    import subprocess
    import sys

    from conftest import cli_env, free_port

    script = tmp_path / "decide.py"
    script.write_text(DECIDE_IN_EACH_PROCESS)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
              "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
              str(script), str(tmp_path / "demo"), *speedups]
    result = subprocess.run(launch, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [(tmp_path / f"demo.rank{rank}").read_text() for rank in (0, 1)] == [chosen, chosen], result.stdout

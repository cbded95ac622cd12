"""The training loop through its first objective, SFT: learning, outputs, resume, multi-process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import (
    SFT_QUESTIONS, cli_command, cli_env, free_port, kill_after_checkpoints, read_metrics, read_weights, sft_args,
    write_jsonl,
)
from rlhf_workflow.cli import main

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def test_sft_lowers_the_loss_and_writes_its_outputs(tiny_model_dir, sft_data, tmp_path):
    out = tmp_path / "run"
    eval_file = write_jsonl(tmp_path / "eval.jsonl", [json.loads(l) for l in sft_data.read_text().splitlines()[:8]])
    assert main(sft_args(tiny_model_dir, sft_data, out, "train.epochs=6", f"data.eval={eval_file}",
                         "train.eval_every=12")) == 0
    train = read_metrics(out)
    assert len(train) == 6 * 32 // 4
    first, last = sum(r["loss"] for r in train[:3]) / 3, sum(r["loss"] for r in train[-3:]) / 3
    assert last < 0.6 * first, (first, last)
    evals = read_metrics(out, "eval")
    assert [r["step"] for r in evals] == [0, 12, 24, 36, 48]
    assert evals[-1]["loss"] < evals[0]["loss"]
    assert (out / "config.yaml").is_file()
    model = AutoModelForCausalLM.from_pretrained(out / "model")  # plain transformers loads the result
    assert model.config.vocab_size > 0
    assert not list(out.glob(".*tmp*"))


def test_loss_ignores_prompt_tokens(tiny_model_dir, tmp_path):
    """Rows with the same responses but different prompts give the same number of loss units."""
    from rlhf_workflow.models import load_tokenizer
    from rlhf_workflow.data.schemas import SFTRow
    from rlhf_workflow.train.sft import SFTObjective, tokenize_sft

    tok = load_tokenizer(str(tiny_model_dir))
    short = [SFTRow(prompt="hi", completion="hello world")]
    long = [SFTRow(prompt="Write a short poem about the moon. " * 5, completion="hello world")]
    obj = SFTObjective(tok.pad_token_id)
    a = obj.collate(tokenize_sft(short, tok, max_length=256, chat_template=True, source="a"))
    b = obj.collate(tokenize_sft(long, tok, max_length=256, chat_template=True, source="b"))
    assert obj.units(a) == obj.units(b) > 0


def test_lora_and_bf16_run(tiny_model_dir, sft_data, tmp_path):
    out = tmp_path / "lora"
    assert main(sft_args(tiny_model_dir, sft_data, out, "model.lora.r=4", "train.precision=bfloat16", "train.max_steps=3",
                         "model.gradient_checkpointing=true")) == 0
    assert len(read_metrics(out)) == 3
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert not any("lora" in name for name in model.state_dict())


def test_tensorboard_tracker(tiny_model_dir, sft_data, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "tb"
    assert main(sft_args(tiny_model_dir, sft_data, out, "train.max_steps=2", "train.report_to=[tensorboard]")) == 0
    assert list(out.glob("logs/**/events.out.tfevents.*"))


def test_existing_checkpoints_need_resume(tiny_model_dir, sft_data, tmp_path, capsys):
    out = tmp_path / "again"
    assert main(sft_args(tiny_model_dir, sft_data, out, "train.max_steps=4", "train.save_every=2")) == 0
    assert not (out / "checkpoints").exists()  # a finished run keeps its model, not its checkpoints
    # a run that stopped after a checkpoint (copied here from a fresh interrupted state) needs --resume
    from rlhf_workflow.train.checkpoint import checkpoints_dir

    (checkpoints_dir(out) / "step-00000002").mkdir(parents=True)
    (checkpoints_dir(out) / "step-00000002" / "trainer_state.json").write_text('{"step": 2}')
    assert main(sft_args(tiny_model_dir, sft_data, out, "train.max_steps=4", "train.save_every=2")) == 2
    err = capsys.readouterr().err
    assert f"output_dir {out} already holds a `sft` run" in err and "--resume to continue it" in err


def test_resuming_a_run_killed_right_after_saving_its_model_finds_it_finished(tiny_model_dir, sft_data, tmp_path,
                                                                               capsys):
    """The saved model is a stage's commit point: --resume after a kill that left the checkpoints
    beside it trains nothing again, says the run is finished and removes those checkpoints."""
    out = tmp_path / "killed"
    assert main(sft_args(tiny_model_dir, sft_data, out, "train.max_steps=4", "train.save_every=2")) == 0
    weights = (out / "model" / "model.safetensors").read_bytes()
    assert "sft" in (out / "model" / "README.md").read_text()  # the card, written with the model
    from rlhf_workflow.train.checkpoint import checkpoints_dir

    (checkpoints_dir(out) / "step-00000004").mkdir(parents=True)
    (checkpoints_dir(out) / "step-00000004" / "trainer_state.json").write_text('{"step": 4}')
    assert main(sft_args(tiny_model_dir, sft_data, out, "train.max_steps=4", "train.save_every=2", "--resume")) == 2
    assert "holds a finished run" in capsys.readouterr().err
    assert not checkpoints_dir(out).exists() and (out / "model" / "model.safetensors").read_bytes() == weights


def test_a_rerun_is_refused_and_force_starts_afresh_keeping_the_earlier_files(tiny_model_dir, sft_data, tmp_path,
                                                                               capsys):
    out = tmp_path / "twice"
    assert main(sft_args(tiny_model_dir, sft_data, out, "train.max_steps=3")) == 0
    first = (out / "metrics.jsonl").read_text()
    assert main(sft_args(tiny_model_dir, sft_data, out, "train.max_steps=3")) == 2
    assert "already holds a `sft` run" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == first  # nothing touched
    assert main(sft_args(tiny_model_dir, sft_data, out, "train.max_steps=3", "--force")) == 0
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    assert (out / "replaced-1" / "metrics.jsonl").read_text() == first  # the earlier run's files, moved aside
    assert (out / "replaced-1" / "model" / "config.json").is_file()


def test_bad_data_is_one_message_and_exit_2(tiny_model_dir, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}, "{not json"])
    assert main(sft_args(tiny_model_dir, bad, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "bad.jsonl:" in err and "Traceback" not in err


def test_too_little_data_for_one_global_batch(tiny_model_dir, sft_data, tmp_path, capsys):
    assert main(sft_args(tiny_model_dir, sft_data, tmp_path / "o", "train.per_device_batch_size=64")) == 2
    assert "fewer than one global batch" in capsys.readouterr().err


# ---------------------------------------------------------------- resume and multi-process (subprocesses)


def test_killed_run_resumes_to_the_same_weights(tiny_model_dir, sft_data, tmp_path):
    steps = 400  # long enough that the run is still going when we kill it
    common = sft_args(tiny_model_dir, sft_data, "{out}", f"train.max_steps={steps}", "train.save_every=20",
                      "train.scheduler=cosine", "train.warmup_steps=10", "train.keep_checkpoints=2")

    straight = tmp_path / "straight"
    subprocess.run(cli_command(*[a.format(out=straight) for a in common]), check=True, env=cli_env(),
                   capture_output=True)

    killed = tmp_path / "killed"
    kill_after_checkpoints(cli_command(*[a.format(out=killed) for a in common]), killed, 1)
    assert not (killed / "model").exists()

    resumed = subprocess.run(cli_command(*[a.format(out=killed) for a in common], "--resume"), env=cli_env(),
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout + resumed.stderr

    a, b = read_weights(straight / "model"), read_weights(killed / "model")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
    # the metrics log has each step exactly once and the same losses
    steps_a = [(r["step"], r["loss"]) for r in read_metrics(straight)]
    steps_b = [(r["step"], r["loss"]) for r in read_metrics(killed)]
    assert [s for s, _ in steps_b] == list(range(1, steps + 1))
    for (_, la), (_, lb) in zip(steps_a, steps_b):
        assert abs(la - lb) < 1e-5


def test_two_processes_match_one(tiny_model_dir, sft_data, tmp_path):
    """Same global batch of 8: 1 process × 4 × 2 accumulation steps vs 2 processes × 4 (DDP on gloo)."""
    base = sft_args(tiny_model_dir, sft_data, "{out}", "train.max_steps=8", "train.scheduler=cosine")
    one = tmp_path / "one"
    subprocess.run(cli_command(*[a.format(out=one) for a in base], "train.gradient_accumulation_steps=2"),
                   check=True, env=cli_env(), capture_output=True)
    two = tmp_path / "two"
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
        # `--cpu` alone makes accelerate start ONE process (several need MPI); `--multi_gpu` starts them
        # with torchrun, and our Accelerator(cpu=True) then joins them over gloo.
        "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        "-m", "rlhf_workflow", *[a.format(out=two) for a in base],
    ]
    result = subprocess.run(launch, env=cli_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes" in result.stdout + result.stderr
    loss_one = [r["loss"] for r in read_metrics(one)]
    loss_two = [r["loss"] for r in read_metrics(two)]
    assert len(loss_one) == len(loss_two) == 8
    for a, b in zip(loss_one, loss_two):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (loss_one, loss_two)
    wa, wb = read_weights(one / "model"), read_weights(two / "model")
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_sft_of_the_builtin_model_with_lora(tmp_path):
    """Two LoRA steps on the real SmolLM2-135M-Instruct: the path the quick start takes, end to end."""
    data = write_jsonl(tmp_path / "d.jsonl", [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a.lower()}]}
        for q, a in SFT_QUESTIONS
    ])
    out = tmp_path / "smol"
    assert main(["sft", f"data.train={data}", f"output_dir={out}", "model.lora.r=8", "train.max_steps=2",
                 "train.per_device_batch_size=4", "data.max_length=64", "train.lr=1e-3"]) == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] > 0 for r in rows)
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.vocab_size == 49152


def test_a_token_budget_splits_forwards_but_not_the_result(tiny_model_dir, sft_data, tmp_path):
    """Micro-batches cut into pieces of at most 64 padded tokens train exactly like whole ones."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(sft_args(tiny_model_dir, sft_data, whole, "train.max_steps=5")) == 0
    assert main(sft_args(tiny_model_dir, sft_data, split, "train.max_steps=5", "train.max_tokens_per_forward=64")) == 0
    for a, b in zip(read_metrics(whole), read_metrics(split)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    wa, wb = read_weights(whole / "model"), read_weights(split / "model")
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-6)

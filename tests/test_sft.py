"""The training loop through its first objective, SFT: learning, outputs, resume, multi-process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import write_jsonl
from rlhf_workflow.cli import main

QUESTIONS = [
    ("What is two plus three?", "The answer is five."),
    ("Say hello.", "hello world"),
    ("Describe the fox.", "The quick brown fox jumps over the lazy dog."),
    ("How are you today?", "I am a helpful assistant."),
    ("Count to five.", "1 2 3 4 5"),
    ("Write about the moon.", "Write a short poem about the moon."),
    ("Give me a rule.", "Lowercase letters only, no commas."),
    ("Name a colour.", "blue"),
]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process run builds its own Accelerator; accelerate keeps a process-wide state."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def sft_data(tmp_path) -> Path:
    rows = []
    for i in range(4):
        for q, a in QUESTIONS:
            if i % 2:  # both accepted forms: messages and prompt/completion
                rows.append({"prompt": q, "completion": a})
            else:
                rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    return write_jsonl(tmp_path / "sft.jsonl", rows)


def _args(model_dir, data, out, *extra):
    return [
        "sft", f"model.name_or_path={model_dir}", f"data.train={data}", f"output_dir={out}",
        "train.lr=3e-3", "train.per_device_batch_size=4", "train.seed=1", "train.log_every=1",
        "train.scheduler=constant", *extra,
    ]


def _metrics(out: Path, split="train") -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def test_sft_lowers_the_loss_and_writes_its_outputs(tiny_model_dir, sft_data, tmp_path):
    out = tmp_path / "run"
    eval_file = write_jsonl(tmp_path / "eval.jsonl", [json.loads(l) for l in sft_data.read_text().splitlines()[:8]])
    assert main(_args(tiny_model_dir, sft_data, out, "train.epochs=6", f"data.eval={eval_file}", "train.eval_every=12")) == 0
    train = _metrics(out)
    assert len(train) == 6 * 32 // 4
    first, last = sum(r["loss"] for r in train[:3]) / 3, sum(r["loss"] for r in train[-3:]) / 3
    assert last < 0.6 * first, (first, last)
    evals = _metrics(out, "eval")
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
    assert main(_args(tiny_model_dir, sft_data, out, "model.lora.r=4", "train.precision=bf16", "train.max_steps=3",
                      "model.gradient_checkpointing=true")) == 0
    assert len(_metrics(out)) == 3
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert not any("lora" in name for name in model.state_dict())


def test_tensorboard_tracker(tiny_model_dir, sft_data, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "tb"
    assert main(_args(tiny_model_dir, sft_data, out, "train.max_steps=2", "train.report_to=[tensorboard]")) == 0
    assert list(out.glob("logs/**/events.out.tfevents.*"))


def test_existing_checkpoints_need_resume(tiny_model_dir, sft_data, tmp_path, capsys):
    out = tmp_path / "again"
    assert main(_args(tiny_model_dir, sft_data, out, "train.max_steps=4", "train.save_every=2")) == 0
    assert not (out / "checkpoints").exists()  # a finished run keeps its model, not its checkpoints
    # a run that stopped after a checkpoint (copied here from a fresh interrupted state) needs --resume
    from rlhf_workflow.train.checkpoint import checkpoints_dir

    (checkpoints_dir(out) / "step-00000002").mkdir(parents=True)
    (checkpoints_dir(out) / "step-00000002" / "trainer_state.json").write_text('{"step": 2}')
    assert main(_args(tiny_model_dir, sft_data, out, "train.max_steps=4", "train.save_every=2")) == 2
    assert "pass --resume" in capsys.readouterr().err


def test_rerun_without_checkpoints_starts_afresh(tiny_model_dir, sft_data, tmp_path):
    out = tmp_path / "twice"
    for _ in range(2):
        assert main(_args(tiny_model_dir, sft_data, out, "train.max_steps=3")) == 0
    assert [r["step"] for r in _metrics(out)] == [1, 2, 3]


def test_bad_data_is_one_message_and_exit_2(tiny_model_dir, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}, "{not json"])
    assert main(_args(tiny_model_dir, bad, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "bad.jsonl:" in err and "Traceback" not in err


def test_too_little_data_for_one_global_batch(tiny_model_dir, sft_data, tmp_path, capsys):
    assert main(_args(tiny_model_dir, sft_data, tmp_path / "o", "train.per_device_batch_size=64")) == 2
    assert "fewer than one global batch" in capsys.readouterr().err


# ---------------------------------------------------------------- resume and multi-process (subprocesses)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "rlhf_workflow", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def _kill_after_checkpoints(command: list[str], out: Path, count: int) -> None:
    """Start ``command`` and SIGKILL it once ``out`` holds ``count`` complete checkpoints."""
    proc = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while len(list((out / "checkpoints").glob("step-*/trainer_state.json"))) < count:
        assert proc.poll() is None, f"the run ended before checkpoint {count}"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"


def test_killed_run_resumes_to_the_same_weights(tiny_model_dir, sft_data, tmp_path):
    steps = 400  # long enough that the run is still going when we kill it
    common = _args(tiny_model_dir, sft_data, "{out}", f"train.max_steps={steps}", "train.save_every=20",
                   "train.scheduler=cosine", "train.warmup_steps=10", "train.keep_checkpoints=2")

    straight = tmp_path / "straight"
    subprocess.run(_cli(*[a.format(out=straight) for a in common]), check=True, env=_env(), capture_output=True)

    killed = tmp_path / "killed"
    _kill_after_checkpoints(_cli(*[a.format(out=killed) for a in common]), killed, 1)
    assert not (killed / "model").exists()

    resumed = subprocess.run(_cli(*[a.format(out=killed) for a in common], "--resume"), env=_env(),
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout + resumed.stderr

    a, b = _weights(straight / "model"), _weights(killed / "model")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
    # the metrics log has each step exactly once and the same losses
    steps_a = [(r["step"], r["loss"]) for r in _metrics(straight)]
    steps_b = [(r["step"], r["loss"]) for r in _metrics(killed)]
    assert [s for s, _ in steps_b] == list(range(1, steps + 1))
    for (_, la), (_, lb) in zip(steps_a, steps_b):
        assert abs(la - lb) < 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tiny_model_dir, sft_data, tmp_path):
    """Same global batch of 8: 1 process × 4 × 2 accumulation steps vs 2 processes × 4 (DDP on gloo)."""
    base = _args(tiny_model_dir, sft_data, "{out}", "train.max_steps=8", "train.scheduler=cosine")
    one = tmp_path / "one"
    subprocess.run(_cli(*[a.format(out=one) for a in base], "train.gradient_accumulation_steps=2"),
                   check=True, env=_env(), capture_output=True)
    two = tmp_path / "two"
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
        # `--cpu` alone makes accelerate start ONE process (several need MPI); `--multi_gpu` starts them
        # with torchrun, and our Accelerator(cpu=True) then joins them over gloo.
        "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        "-m", "rlhf_workflow", *[a.format(out=two) for a in base],
    ]
    result = subprocess.run(launch, env=_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes" in result.stdout + result.stderr
    loss_one = [r["loss"] for r in _metrics(one)]
    loss_two = [r["loss"] for r in _metrics(two)]
    assert len(loss_one) == len(loss_two) == 8
    for a, b in zip(loss_one, loss_two):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (loss_one, loss_two)
    wa, wb = _weights(one / "model"), _weights(two / "model")
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_sft_of_the_builtin_model_with_lora(tmp_path):
    """Two LoRA steps on the real SmolLM2-135M-Instruct: the path the quick start takes, end to end."""
    data = write_jsonl(tmp_path / "d.jsonl", [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a.lower()}]} for q, a in QUESTIONS
    ])
    out = tmp_path / "smol"
    assert main(["sft", f"data.train={data}", f"output_dir={out}", "model.lora.r=8", "train.max_steps=2",
                 "train.per_device_batch_size=4", "data.max_length=64", "train.lr=1e-3"]) == 0
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] > 0 for r in rows)
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.vocab_size == 49152


def test_a_token_budget_splits_forwards_but_not_the_result(tiny_model_dir, sft_data, tmp_path):
    """Micro-batches cut into pieces of at most 64 padded tokens train exactly like whole ones."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(_args(tiny_model_dir, sft_data, whole, "train.max_steps=5")) == 0
    assert main(_args(tiny_model_dir, sft_data, split, "train.max_steps=5", "train.max_tokens_per_forward=64")) == 0
    for a, b in zip(_metrics(whole), _metrics(split)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    wa, wb = _weights(whole / "model"), _weights(split / "model")
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-6)

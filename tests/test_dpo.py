"""DPO: the reference pass, training on a tiny model, bad input, two processes (its losses: test_losses.py)."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import cli_command, cli_env, free_port, read_metrics, write_jsonl
from rlhf_workflow.cli import main


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


# ------------------------------------------------------------------------------------------- training

WORDS = "the of and to in is that for it as was with be by on not he this are or his from at".split()


def dpo_pairs(n: int, seed: int) -> list[dict]:
    """Chosen responses end with 'blue sky', rejected ones with 'red dog'; prompts and openings vary."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = " ".join(rng.choices(WORDS, k=rng.randint(2, 8))) + "?"
        opening = " ".join(rng.choices(WORDS, k=rng.randint(1, 4)))
        row = {"id": f"d{seed}-{i}", "prompt": prompt, "chosen": f"{opening} blue sky", "rejected": f"{opening} red dog"}
        if i % 3 == 0:
            row["prompt"] = [{"role": "user", "content": prompt}]
            row["chosen"] = [{"role": "assistant", "content": row["chosen"]}]
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dpo-pairs")
    return write_jsonl(folder / "train.jsonl", dpo_pairs(64, 1)), write_jsonl(folder / "eval.jsonl", dpo_pairs(16, 2))


def _args(model_dir, data, out, *extra):
    return ["dpo", f"model.name_or_path={model_dir}", f"data.train={data}", f"output_dir={out}", "train.lr=3e-3",
            "train.per_device_batch_size=8", "train.scheduler=constant", "train.log_every=1", "train.seed=3",
            "loss.beta=0.5", *extra]


def test_dpo_raises_the_margin_and_writes_a_loadable_policy(tiny_model_dir, pairs, tmp_path):
    from transformers import AutoModelForCausalLM

    train, held_out = pairs
    out = tmp_path / "dpo"
    assert main(_args(tiny_model_dir, train, out, f"data.eval={held_out}", "train.epochs=3")) == 0
    rows = read_metrics(out)
    first, last = rows[0], rows[-1]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)  # the policy starts as its reference
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margin", "accuracy", "logps/chosen", "logps/rejected",
                "grad_norm", "tokens_per_s"):
        assert key in last, key
    assert last["rewards/margin"] > 1.0 and last["accuracy"] == 1.0, last
    evals = read_metrics(out, "eval")
    assert evals[0]["accuracy"] < evals[-1]["accuracy"] and evals[-1]["rewards/margin"] > 1.0, evals
    # the reference pass wrote the pairs with their log-probs
    ref_rows = [json.loads(line) for line in (out / "train_pairs.ref.jsonl").read_text().splitlines()]
    assert len(ref_rows) == 64 and all(r["ref_chosen_logp"] < 0 and r["ref_rejected_logp"] < 0 for r in ref_rows)
    policy = AutoModelForCausalLM.from_pretrained(out / "model")
    assert policy.config.vocab_size > 0 and (out / "model" / "model.safetensors").exists()


def test_precomputed_and_on_the_fly_reference_give_the_same_first_step(tiny_model_dir, pairs, tmp_path):
    train, _ = pairs
    runs = {}
    for name, extra in {"precomputed": [], "on_the_fly": ["reference.precompute=false"],
                        "plain_layout": ["train.share_prefix=false"],
                        "packed": ["train.pack_length=96", "logprob_chunk=0"]}.items():
        out = tmp_path / name
        # batches are grouped by length, which depends on the layout: the same batches need no grouping
        assert main(_args(tiny_model_dir, train, out, "train.max_steps=2", "train.group_by_length=false", *extra)) == 0
        runs[name] = read_metrics(out)
    for name, rows in runs.items():
        for step in (0, 1):  # the first step's loss, and the second's, after one identical update
            for key in ("loss", "logps/chosen", "logps/rejected"):
                assert rows[step][key] == pytest.approx(runs["precomputed"][step][key], abs=1e-4), (name, step, key)


def test_a_different_reference_model_and_lora_with_adapters_off(tiny_model_dir, pairs, tmp_path):
    train, _ = pairs
    out = tmp_path / "lora"
    assert main(_args(tiny_model_dir, train, out, "model.lora.r=4", "train.max_steps=3")) == 0
    assert read_metrics(out)[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # LoRA starts as the identity
    on_the_fly = tmp_path / "lora-otf"
    assert main(_args(tiny_model_dir, train, on_the_fly, "model.lora.r=4", "train.max_steps=3",
                      "reference.precompute=false")) == 0
    for a, b in zip(read_metrics(out), read_metrics(on_the_fly)):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
    # a reference other than the starting policy: the first loss is no longer log 2
    other = tmp_path / "other"
    assert main(_args(tiny_model_dir, train, other, "train.max_steps=1", f"reference.name_or_path={out / 'model'}")) == 0
    assert abs(read_metrics(other)[0]["loss"] - math.log(2)) > 1e-4


def test_loss_options_run_through_the_cli(tiny_model_dir, pairs, tmp_path):
    train, _ = pairs
    for extra in (["loss.type=ipo", "loss.length_normalize=true"], ["loss.type=hinge", "loss.rpo_alpha=1.0"],
                  ["loss.type=robust", "loss.label_smoothing=0.2"]):
        out = tmp_path / extra[0].split("=")[1]
        assert main(_args(tiny_model_dir, train, out, "train.max_steps=2", *extra)) == 0
        assert all(math.isfinite(r["loss"]) for r in read_metrics(out))


def test_reference_pass_resumes_and_pairs_with_log_probs_skip_it(tiny_model_dir, pairs, tmp_path, caplog):
    train, _ = pairs
    out = tmp_path / "ref"
    assert main(_args(tiny_model_dir, train, out, "train.max_steps=1")) == 0
    ref_file = out / "train_pairs.ref.jsonl"
    full = {json.loads(l)["id"]: json.loads(l) for l in ref_file.read_text().splitlines()}
    # a crash after 20 rows, in the middle of the 21st
    lines = ref_file.read_text().splitlines(keepends=True)
    ref_file.write_text("".join(lines[:20]) + lines[20][:15])
    out2 = tmp_path / "ref2"
    out2.mkdir()
    (out2 / "train_pairs.ref.jsonl").write_text(ref_file.read_text())
    assert main(_args(tiny_model_dir, train, out2, "train.max_steps=1", "--resume")) == 0  # after a crash: resume
    again = {json.loads(l)["id"]: json.loads(l) for l in (out2 / "train_pairs.ref.jsonl").read_text().splitlines()}
    assert set(again) == set(full)
    for key, row in full.items():
        assert again[key]["ref_chosen_logp"] == pytest.approx(row["ref_chosen_logp"], abs=1e-4)
    # the completed file as input: every pair carries its log-probs, so no pass runs
    out3 = tmp_path / "ref3"
    result = subprocess.run([sys.executable, "-m", "rlhf_workflow", *_args(tiny_model_dir, out2 / "train_pairs.ref.jsonl",
                             out3, "train.max_steps=1")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "reference pass" not in result.stdout + result.stderr
    assert read_metrics(out3)[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)


def test_bad_pairs_are_one_message(tiny_model_dir, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "nan.jsonl", [
        {"prompt": "a", "chosen": "b", "rejected": "c", "ref_chosen_logp": -1.0, "ref_rejected_logp": -2.0},
        '{"prompt": "a", "chosen": "b", "rejected": "d", "ref_chosen_logp": NaN, "ref_rejected_logp": -2.0}',
    ])
    assert main(_args(tiny_model_dir, bad, tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert "nan.jsonl:2" in err and "ref_chosen_logp" in err and "Traceback" not in err
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"prompt": "a", "chosen": " ", "rejected": "c"}])
    assert main(_args(tiny_model_dir, empty, tmp_path / "o2")) == 2
    assert "empty.jsonl:1" in capsys.readouterr().err
    # every response longer than max_length: nothing left to train on, said so
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "a", "chosen": "word " * 50, "rejected": "x " * 50}])
    assert main(_args(tiny_model_dir, long, tmp_path / "o3", "data.max_length=16")) == 2
    err = capsys.readouterr().err
    assert "long.jsonl:1: field 'chosen'" in err and "data.max_length 16" in err and "no pair of" in err


def test_two_processes_match_one(tiny_model_dir, pairs, tmp_path):
    """Same global batch of 8 pairs: 1 process × 4 × 2 accumulation steps vs 2 processes × 4 (DDP on gloo)."""
    train, _ = pairs
    base = _args(tiny_model_dir, train, "{out}", "train.max_steps=4", "train.per_device_batch_size=4")
    one = tmp_path / "one"
    subprocess.run(cli_command(*[a.format(out=one) for a in base], "train.gradient_accumulation_steps=2"),
                   check=True, env=cli_env(), capture_output=True)
    two = tmp_path / "two"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
              "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
              "-m", "rlhf_workflow", *[a.format(out=two) for a in base]]
    result = subprocess.run(launch, env=cli_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = read_metrics(one), read_metrics(two)
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        for key in ("loss", "rewards/margin", "logps/chosen"):
            assert abs(x[key] - y[key]) <= 1e-4 * max(1.0, abs(x[key])), (key, a, b)
    # the reference pass was split over the processes and merged: every pair once, same values
    ref_one, ref_two = ({json.loads(line)["id"]: json.loads(line) for line in (out / "train_pairs.ref.jsonl").open()}
                        for out in (one, two))
    assert len((two / "train_pairs.ref.jsonl").read_text().splitlines()) == 64 and ref_one.keys() == ref_two.keys()
    for key, row in ref_one.items():
        assert abs(row["ref_chosen_logp"] - ref_two[key]["ref_chosen_logp"]) < 1e-4
    wa, wb = load_file(one / "model" / "model.safetensors"), load_file(two / "model" / "model.safetensors")
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-5)

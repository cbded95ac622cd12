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


def test_the_reference_loads_with_the_policy_settings(tiny_model_dir, pairs, tmp_path):
    """The reference model's config is the policy's (allow_pickle_weights, device, dtype, ...) with its own
    source and nothing of training (LoRA, train_layers, checkpointing); a reference with only pickle
    weights loads when model.allow_pickle_weights says so."""
    import shutil

    from transformers import AutoModelForCausalLM

    from rlhf_workflow.config import DPOConfig
    from rlhf_workflow.train.dpo import reference_model_config

    config = DPOConfig.model_validate({
        "data": {"train": "pairs.jsonl"}, "reference": {"name_or_path": "ref-dir"},
        "model": {"name_or_path": "policy-dir", "allow_pickle_weights": True, "device": "cpu", "dtype": "bfloat16",
                  "attn_implementation": "eager", "gradient_checkpointing": True, "lora": {"r": 4}}})
    reference = reference_model_config(config)
    assert (reference.name_or_path, reference.tokenizer) == ("ref-dir", "policy-dir")
    assert reference.allow_pickle_weights and reference.device == "cpu" and reference.dtype == "bfloat16"
    assert reference.attn_implementation == "eager"
    assert reference.lora.r == 0 and reference.train_layers == 0 and not reference.gradient_checkpointing

    pickled = tmp_path / "pickled-reference"
    shutil.copytree(tiny_model_dir, pickled)
    torch.save(AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict(), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    train, _ = pairs
    out = tmp_path / "dpo"
    assert main(_args(tiny_model_dir, train, out, "train.max_steps=1", f"reference.name_or_path={pickled}",
                      "model.allow_pickle_weights=true")) == 0
    # the same weights as the policy: the first loss is log 2
    assert read_metrics(out)[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)


@pytest.fixture(scope="module")
def dropout_model_dir(tmp_path_factory):
    """The tiny chat model with attention dropout 0.5."""
    from conftest import build_model, build_tokenizer

    path = tmp_path_factory.mktemp("dropout-model")
    tokenizer = build_tokenizer("chatml")
    build_model(tokenizer, attention_dropout=0.5).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_dropout_is_off_so_the_policy_agrees_with_its_reference_at_step_one(dropout_model_dir, pairs, tmp_path):
    """The precomputed reference ran in eval mode; the policy trains in train mode. With the model's
    dropout off (the default) the first loss is exactly log 2, and the saved policy keeps dropout off;
    train.keep_dropout=true keeps it, and the first loss is then off log 2."""
    import json

    train, _ = pairs
    out = tmp_path / "off"
    assert main(_args(dropout_model_dir, train, out, "train.max_steps=1")) == 0
    assert read_metrics(out)[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert json.loads((out / "model" / "config.json").read_text())["attention_dropout"] == 0.0
    kept = tmp_path / "kept"
    assert main(_args(dropout_model_dir, train, kept, "train.max_steps=1", "train.keep_dropout=true")) == 0
    assert abs(read_metrics(kept)[0]["loss"] - math.log(2)) > 1e-3


def test_the_reference_pass_runs_in_the_training_precision(tiny_model_dir, pairs, tmp_path):
    """With bf16 autocast training the reference log-probs are computed under the same autocast: the
    first loss is log 2, as in fp32 (an fp32 reference against a bf16 policy was off by 1.4e-5). Not to
    the last digit: the reference pass batches the pairs otherwise than training does, so the bf16
    body rounds otherwise, and the bf16 projection passes that on (1.6e-6 here)."""
    train, _ = pairs
    out = tmp_path / "bf16"
    assert main(_args(tiny_model_dir, train, out, "train.max_steps=1", "train.precision=bfloat16")) == 0
    assert read_metrics(out)[0]["loss"] == pytest.approx(math.log(2), abs=5e-6)


def test_disable_dropout_reaches_modules_attributes_and_configs():
    from torch import nn

    from conftest import build_model, build_tokenizer
    from rlhf_workflow.config import LoraConfig
    from rlhf_workflow.models.lora import apply_lora
    from rlhf_workflow.train.job import disable_dropout

    model = apply_lora(build_model(build_tokenizer("chatml"), attention_dropout=0.3), LoraConfig(r=2, dropout=0.2),
                       task_type="CAUSAL_LM")
    assert disable_dropout(model) > 0
    assert all(m.p == 0 for m in model.modules() if isinstance(m, nn.Dropout))
    assert all(m.attention_dropout == 0 for m in model.modules() if hasattr(m, "attention_dropout"))
    assert model.config.attention_dropout == 0.0
    assert disable_dropout(model) == 0  # nothing left on


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

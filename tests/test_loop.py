"""The data schedule of the training loop: a pure function of (seed, epoch, step)."""

from __future__ import annotations

import random

import pytest

from rlhf_workflow.config import TrainConfig
from rlhf_workflow.train.loop import Schedule


def _schedule(n=103, lengths=None, processes=1, **train):
    config = TrainConfig(**{"per_device_batch_size": 4, "gradient_accumulation_steps": 2, **train})
    return Schedule.build(config, n, processes, lengths)


def test_each_example_at_most_once_per_epoch_and_deterministic():
    lengths = [random.Random(i).randint(5, 500) for i in range(103)]
    for grouped in (None, lengths):
        s = _schedule(lengths=grouped)
        order = s.epoch_order(seed=3, epoch=0)
        assert len(order) <= 103 and len(set(order)) == len(order)
        assert len(order) >= s.steps_per_epoch * s.global_batch
        assert order == s.epoch_order(seed=3, epoch=0)
        assert order != s.epoch_order(seed=3, epoch=1)


def test_micro_batches_of_all_processes_tile_the_global_batch():
    one, two = _schedule(processes=1), _schedule(processes=2, gradient_accumulation_steps=1)
    assert one.global_batch == two.global_batch == 8
    order = one.epoch_order(0, 0)
    for step in range(one.steps_per_epoch):
        single = [i for mb in one.micro_batches(order, step, 0) for i in mb]
        split = [i for rank in (0, 1) for mb in two.micro_batches(order, step, rank) for i in mb]
        assert sorted(single) == sorted(split) == sorted(order[step * 8 : step * 8 + 8])


def test_grouping_by_length_cuts_padding_but_keeps_batches_shuffled():
    rng = random.Random(0)
    lengths = [int(rng.lognormvariate(4, 0.8)) + 1 for _ in range(2000)]

    def padding(s):
        order, waste = s.epoch_order(1, 0), 0
        for step in range(s.steps_per_epoch):
            for mb in s.micro_batches(order, step, 0):
                longest = max(lengths[i] for i in mb)
                waste += sum(longest - lengths[i] for i in mb)
        return waste

    plain = _schedule(2000, lengths, group_by_length=False)
    grouped = _schedule(2000, lengths)
    assert padding(grouped) < 0.2 * padding(plain)
    order = grouped.epoch_order(1, 0)
    firsts = [lengths[order[k * 8]] for k in range(grouped.steps_per_epoch)]
    assert firsts != sorted(firsts, reverse=True)  # batches are not simply longest-first


def test_split_by_tokens_respects_the_budget_and_keeps_every_example():
    from rlhf_workflow.train.loop import split_by_tokens

    lengths = [100, 30, 60, 10, 250, 40, 40, 90]
    indices = list(range(8))
    assert split_by_tokens(indices, lengths, 2, 0) == [indices]
    pieces = split_by_tokens(indices, lengths, 2, 400)
    assert sorted(i for p in pieces for i in p) == indices
    for piece in pieces:
        assert len(piece) == 1 or len(piece) * 2 * max(lengths[i] for i in piece) <= 400
    assert [4] in pieces  # 2 × 250 > 400: alone


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_a_nonfinite_loss_stops_before_the_update_naming_step_and_examples(tmp_path):
    """Fault injection: one example's loss turns NaN at the third step. Training stops there with
    the step and that example's id, the weights are those after step 2, the step-2 checkpoint stays."""
    import torch

    from conftest import build_model, build_tokenizer
    from rlhf_workflow.errors import UserError
    from rlhf_workflow.train.loop import make_accelerator, train
    from rlhf_workflow.train.sft import SFTObjective

    class PoisonedSFT(SFTObjective):
        def collate(self, examples):
            batch = super().collate(examples)
            batch["poison"] = torch.tensor([e["id"] == "poison" for e in examples])
            return batch

        def loss(self, model, batch):
            loss, metrics = super().loss(model, batch)
            return (loss * float("nan") if batch["poison"].any() else loss), metrics

    tok = build_tokenizer("chatml")
    model = build_model(tok)
    examples = [{"id": f"e{i}", "input_ids": list(range(5, 12 + i % 4)), "loss_mask": [0, 0] + [1] * (5 + i % 4)}
                for i in range(12)]
    config = TrainConfig(per_device_batch_size=4, max_steps=3, save_every=2, group_by_length=False, lr=1e-2, seed=0)
    order = Schedule.build(config, 12, 1).epoch_order(config.seed, 0)
    examples[order[9]]["id"] = "poison"  # in the third global batch
    accelerator = make_accelerator(config, tmp_path)
    with pytest.raises(UserError, match=r"step 3: the loss is not finite on examples .*poison.*step-00000002"):
        train(PoisonedSFT(tok.pad_token_id), model, examples, config, tmp_path, accelerator)
    saved = tmp_path / "checkpoints" / "step-00000002"
    assert saved.is_dir()
    from safetensors.torch import load_file

    state = load_file(next(saved.glob("*.safetensors")))
    current = model.state_dict()
    assert len(state.keys() & current.keys()) >= 10
    for name in state.keys() & current.keys():
        assert torch.equal(state[name], current[name]), name  # no update happened after step 2


@pytest.mark.parametrize("eval_rows, batch", [(1, 4), (3, 1)], ids=["one-example", "uneven-batches"])
def test_two_processes_evaluate_fewer_eval_examples_than_processes(eval_rows, batch, tiny_model_dir, rule_data,
                                                                   tmp_path):
    """2 processes with 1 held-out pair (the second process has none), and with 3 pairs one at a time (one
    process runs one more eval batch than the other): both finish, and the held-out metrics are those of
    one process."""
    import json
    import subprocess
    import sys

    from conftest import cli_command, cli_env, free_port, read_metrics, write_jsonl

    train, held_out = rule_data
    rows = [json.loads(line) for line in held_out.read_text().splitlines()][:eval_rows]
    few = write_jsonl(tmp_path / "few.jsonl", rows)
    base = ["train-rm", f"model.name_or_path={tiny_model_dir}", f"data.train={train}", f"data.eval={few}",
            "data.max_length=64", "train.max_steps=1", f"train.per_device_batch_size={batch}"]
    one, two = tmp_path / "one", tmp_path / "two"
    single = subprocess.run(cli_command(*base, f"output_dir={one}", "train.gradient_accumulation_steps=2"),
                            env=cli_env(), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
              "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
              "-m", "rlhf_workflow", *base, f"output_dir={two}"]
    result = subprocess.run(launch, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    evals_one, evals_two = read_metrics(one, "eval"), read_metrics(two, "eval")
    assert len(evals_one) == len(evals_two) == 2  # before and after training
    for a, b in zip(evals_one, evals_two):
        assert a.keys() == b.keys()
        for key in ("loss", "accuracy"):
            assert abs(a[key] - b[key]) <= 1e-4 * max(1.0, abs(a[key])), (key, evals_one, evals_two)


def test_eval_batches_give_every_process_the_same_number_of_forward_passes():
    from rlhf_workflow.train.loop import eval_batches

    examples = [{"id": i} for i in range(5)]
    for processes, batch_size in [(2, 1), (2, 2), (3, 2), (8, 4), (6, 1)]:
        per_process = [eval_batches(examples, rank, processes, batch_size) for rank in range(processes)]
        assert len({len(b) for b in per_process}) == 1, (processes, batch_size)
        counted = [e["id"] for b in per_process for chunk, keep in b if keep for e in chunk]
        assert sorted(counted) == list(range(5))  # each example counted once
        assert all(chunk for b in per_process for chunk, _ in b)  # no empty forward pass
    assert eval_batches(examples[:1], 1, 2, 4) == [([{"id": 0}], False)]  # no example of its own: one filler

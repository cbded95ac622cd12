"""The Bradley–Terry reward model: last-token pooling and scoring, saving as a plain transformers
sequence classifier, training through train-rm (rule pairs, prompt groups, LoRA, two processes).

The tests that run train-rm and train-pm alike (LoRA heads, the built-in model, two processes) are
here too; the pairwise preference model on its own is in test_preference_model.py, the loss
functions in test_losses.py, eval-rm's RewardBench scores in test_rewardbench.py."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from conftest import build_model, build_tokenizer, cli_command, cli_env, free_port, read_metrics, write_jsonl
from rlhf_workflow.cli import main
from rlhf_workflow.data.schemas import PairRow
from rlhf_workflow.models.forward import last_token_index, pad_batch
from rlhf_workflow.models.reward import RewardModel, distinct_pad_token

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


# ------------------------------------------------------------------------------------------- pooling


@pytest.fixture(scope="module")
def tiny_rm():
    tok = build_tokenizer("chatml")
    torch.manual_seed(0)
    from transformers import LlamaConfig, LlamaForSequenceClassification

    backbone = build_model(tok)
    cfg = LlamaConfig(**{**backbone.config.to_dict(), "num_labels": 1})
    return RewardModel(LlamaForSequenceClassification(cfg).eval()), tok


def test_last_token_index_left_and_right():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 4, 4]


def test_rewards_do_not_depend_on_padding_side_and_pad_equal_to_eos(tiny_rm):
    model, tok = tiny_rm
    assert tok.pad_token_id == tok.eos_token_id  # the SmolLM2 / Llama-3 situation
    seqs = [tok.encode("hello world<|im_end|>"), tok.encode("The quick brown fox jumps over the lazy dog.<|im_end|>")]
    alone = [model(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)).item() for s in seqs]
    with torch.no_grad():
        right = model(*pad_batch(seqs, tok.pad_token_id)).tolist()
        left = model(*pad_batch(seqs, tok.pad_token_id, left=True)).tolist()
    assert right == pytest.approx(alone, abs=1e-5)
    assert left == pytest.approx(alone, abs=1e-5)
    assert abs(right[0] - right[1]) > 1e-4  # not the same "last pad" for every input


def test_saved_reward_model_scores_the_same_in_plain_transformers(tiny_rm, tmp_path):
    from rlhf_workflow.models.reward import prepare_reward_tokenizer, save_reward_model

    model, tok = tiny_rm
    tok = prepare_reward_tokenizer(build_tokenizer("chatml"))
    assert tok.pad_token_id != tok.eos_token_id and tok.pad_token == distinct_pad_token(build_tokenizer("chatml"))
    save_reward_model(model, tok, tmp_path / "rm")
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "rm")
    texts = ["hello world<|im_end|>", "The quick brown fox<|im_end|>"]
    batch = hf_tok(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        theirs = hf(**batch).logits.squeeze(-1)
        ours = model(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_judge_batch_size_counts_sequences_per_forward_pass(tiny_rm, tmp_path):
    """judge.batch_size reaches the reward-model judge: a small one gives the same rewards in more forward
    passes, none reading more than batch_size responses (a prompt with more is split over passes)."""
    from rlhf_workflow.config import JudgeConfig
    from rlhf_workflow.models.reward import prepare_reward_tokenizer, save_reward_model, sequence_batches
    from rlhf_workflow.online.judges import make_judge

    model, _ = tiny_rm
    save_reward_model(model, prepare_reward_tokenizer(build_tokenizer("chatml")), tmp_path / "rm")
    rows = [{"id": f"g{i}", "prompt": p, "responses": [f"answer {k} about {p}" * (k % 3 + 1) for k in range(5)]}
            for i, p in enumerate(["hello world", "how are you", "what is two plus three"])]

    def judge_with(batch_size):
        judge = make_judge(JudgeConfig(type="reward_model", path=str(tmp_path / "rm"), batch_size=batch_size))
        passes: list[int] = []  # responses read by each forward pass
        hook = judge.scorer.model.register_forward_pre_hook(lambda module, args: passes.append(len(args[3])))
        rewards = judge.score(rows).rewards
        hook.remove()
        return rewards, passes

    big, big_passes = judge_with(16)
    small, small_passes = judge_with(2)
    assert big_passes == [15]
    assert len(small_passes) > len(big_passes) and max(small_passes) <= 2 and sum(small_passes) == 15
    for a, b in zip(big, small):
        assert a == pytest.approx(b, abs=1e-5)
    assert sequence_batches([(0, range(5)), (1, range(1)), (2, range(2))], 2) == \
        [[(0, [0, 1])], [(0, [2, 3])], [(0, [4]), (1, [0])], [(2, [0, 1])]]


# ------------------------------------------------------------------------------------------- training


def test_reward_model_learns_the_rule_and_eval_rm_agrees(tiny_model_dir, rule_data, tmp_path):
    train, held_out = rule_data
    out = tmp_path / "rm"
    assert main(["train-rm", f"model.name_or_path={tiny_model_dir}", f"data.train={train}", f"data.eval={held_out}",
                 f"output_dir={out}", "train.lr=3e-3", "train.epochs=2", "train.per_device_batch_size=8",
                 "train.scheduler=constant", "train.log_every=8"]) == 0
    evals = read_metrics(out, "eval")
    assert evals[0]["step"] == 0 and evals[-1]["accuracy"] >= 0.85, evals
    # plain transformers loads the result as a sequence classifier
    assert AutoModelForSequenceClassification.from_pretrained(out / "model").config.num_labels == 1

    result_file = tmp_path / "eval.json"
    assert main(["eval-rm", f"model={out / 'model'}", f"data={held_out}", f"output={result_file}"]) == 0
    result = json.loads(result_file.read_text())
    assert result["kind"] == "rm" and result["pairs"] == 48
    assert result["accuracy"] == pytest.approx(evals[-1]["accuracy"], abs=1e-6)
    assert result["scores"]["mean_chosen"] > result["scores"]["mean_rejected"]
    assert -1.0 <= result["scores"]["length_correlation"] <= 1.0


def test_pairs_grouped_by_prompt_give_the_same_loss_with_fewer_tokens(tiny_rm):
    """All pairs among 4 ranked responses of a prompt (and one lone pair): as one group each, the
    Bradley–Terry loss and metrics equal those of the pairs laid out one by one."""
    from rlhf_workflow.models.layout import LayoutOptions
    from rlhf_workflow.train.pairs import group_by_prompt
    from rlhf_workflow.train.reward import RewardObjective

    model, tok = tiny_rm
    prompt, other = tok.encode("tell me a story"), tok.encode("and another one")
    responses = [tok.encode(t) for t in ("blue moon", "a dog ran far", "quiet", "the fox and the moon")]
    pairs = [{"id": f"s/{i}-{j}", "prompt_ids": prompt, "chosen_ids": responses[i], "rejected_ids": responses[j],
              "margin": 0.1 * (i + j)} for i in range(4) for j in range(i + 1, 4)]
    pairs.append({"id": "lone", "prompt_ids": other, "chosen_ids": responses[1], "rejected_ids": responses[0], "margin": 0.0})
    groups = group_by_prompt(pairs)
    assert len(groups) == 2 and len(groups[0]["responses"]) == 4 and len(groups[0]["pair_ids"]) == 6
    assert groups[1]["id"] == "lone" and groups[0]["id"].startswith("s/0-1 (+5 pairs")
    for share in (True, False):
        objective = RewardObjective(tok.pad_token_id, options=LayoutOptions(share_prefix=share), max_responses=4)
        flat, grouped = objective.collate(pairs), objective.collate(groups)
        with torch.no_grad():
            loss_flat, metrics_flat = objective.loss(model, flat)
            loss_grouped, metrics_grouped = objective.loss(model, grouped)
        assert objective.units(flat) == objective.units(grouped) == 7
        torch.testing.assert_close(loss_grouped, loss_flat, atol=1e-5, rtol=1e-5)
        for key in metrics_flat:
            torch.testing.assert_close(metrics_grouped[key], metrics_flat[key], atol=1e-5, rtol=1e-5)
        if share:
            assert grouped["input_ids"].numel() < flat["input_ids"].numel() / 2  # the tokens actually computed


def test_reward_model_trains_on_prompt_groups(tiny_model_dir, tmp_path):
    rows = []
    for i in range(24):  # per prompt, all pairs of 3 ranked responses: 'blue' > plain > 'dog'
        a, b, c = f"the blue sky {i}", f"a quiet river {i}", f"the dog barks {i}"
        rows += [{"id": f"q{i}/{k}", "prompt": f"Question {i}?", "chosen": x, "rejected": y}
                 for k, (x, y) in enumerate(((a, b), (a, c), (b, c)))]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    out = tmp_path / "rm"
    assert main(["train-rm", f"model.name_or_path={tiny_model_dir}", f"data.train={train}", f"data.eval={train}",
                 f"output_dir={out}", "group_by_prompt=true", "train.lr=3e-3", "train.epochs=3",
                 "train.per_device_batch_size=4", "train.scheduler=constant"]) == 0
    evals = read_metrics(out, "eval")
    assert evals[-1]["accuracy"] > evals[0]["accuracy"] and evals[-1]["accuracy"] >= 0.8, evals


def test_prompts_are_cut_from_the_left_and_long_responses_dropped(tiny_model_dir, caplog):
    from rlhf_workflow.models import load_tokenizer
    from rlhf_workflow.train.pairs import tokenize_pairs

    tok = load_tokenizer(str(tiny_model_dir))
    rows = [PairRow(prompt="moon " * 40, chosen="blue sky", rejected="red"),
            PairRow(prompt="hi", chosen="word " * 80, rejected="short"),
            PairRow(prompt="hi", chosen="fine", rejected="also fine")]
    examples = tokenize_pairs(rows, tok, max_length=48, chat_template=True, source="pairs.jsonl")
    assert len(examples) == 2
    first = examples[0]
    # the longer response fills max_length with the prompt cut from the left; both keep that same prompt
    assert len(first["prompt_ids"]) + len(first["chosen_ids"]) == 48
    assert tok.decode(first["chosen_ids"]) == "blue sky<|im_end|>" and tok.decode(first["rejected_ids"]) == "red<|im_end|>"
    assert tok.decode(first["prompt_ids"]).endswith("moon <|im_end|>\n<|im_start|>assistant\n")
    assert "1 pairs had their prompt cut" in caplog.text and "1 dropped" in caplog.text


# ------------------------------------------------------------------------------------------- train-rm and train-pm


def test_lora_reward_and_preference_models_train_their_heads_and_save_plain_models(tiny_model_dir, rule_data, tmp_path):
    from rlhf_workflow.config import LoraConfig, ModelConfig
    from rlhf_workflow.models.reward import load_reward_model

    tok = build_tokenizer("chatml")
    rm = load_reward_model(ModelConfig(name_or_path=str(tiny_model_dir), lora=LoraConfig(r=4)), tok)
    trainable = [n for n, p in rm.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trainable) and any("score" in n for n in trainable)
    assert not any("embed_tokens" in n for n in trainable)

    train, _ = rule_data
    for stage, name in (("train-rm", "rm"), ("train-pm", "pm")):
        out = tmp_path / name
        assert main([stage, f"model.name_or_path={tiny_model_dir}", f"data.train={train}", f"output_dir={out}",
                     "model.lora.r=4", "train.max_steps=2", "train.per_device_batch_size=4"]) == 0
        saved = (out / "model" / "config.json").read_text()
        assert ("ForSequenceClassification" in saved) == (name == "rm")
        from safetensors.torch import load_file

        assert not any("lora" in k for k in load_file(out / "model" / "model.safetensors"))


@pytest.mark.parametrize("stage", ["train-rm", "train-pm"])
def test_reward_and_preference_training_turn_the_models_dropout_off(stage, tmp_path):
    """A model with attention dropout 0.5: its first training loss (train mode) equals the held-out loss
    of the same pairs before training (eval mode) only with dropout off, the default; the saved model
    keeps it off. train.keep_dropout=true keeps it."""
    tok = build_tokenizer("chatml")
    model_dir = tmp_path / "dropout-model"
    build_model(tok, attention_dropout=0.5).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    rows = [{"prompt": f"Question {i}?", "chosen": f"the blue sky {i}", "rejected": f"the dog barks {i}"} for i in range(8)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    base = [stage, f"model.name_or_path={model_dir}", f"data.train={data}", f"data.eval={data}", "train.max_steps=1",
            "train.per_device_batch_size=8", "train.group_by_length=false"]
    for keep in (False, True):
        out = tmp_path / f"keep-{keep}"
        assert main([*base, f"output_dir={out}", f"train.keep_dropout={str(keep).lower()}"]) == 0
        first_train, before = read_metrics(out)[0]["loss"], read_metrics(out, "eval")[0]["loss"]
        saved = json.loads((out / "model" / "config.json").read_text())["attention_dropout"]
        if keep:
            assert abs(first_train - before) > 1e-4 and saved == 0.5
        else:
            assert first_train == pytest.approx(before, abs=1e-6) and saved == 0.0


@pytest.mark.slow
def test_builtin_model_as_reward_and_preference_model(tmp_path):
    """The real SmolLM2 through train-rm / train-pm (LoRA, two steps) and eval-rm; HF loads the RM."""
    rows = [{"prompt": f"What is {a} + {b}?", "chosen": f"{a} + {b} = {a + b}.", "rejected": f"{a} + {b} = {a + b + 1}.",
             "subset": "sum"} for a, b in [(2, 3), (4, 5), (6, 1), (7, 2), (3, 3), (8, 1), (5, 4), (9, 9)]]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    for stage, name in (("train-rm", "rm"), ("train-pm", "pm")):
        out = tmp_path / name
        assert main([stage, f"data.train={data}", f"output_dir={out}", "model.lora.r=8", "train.max_steps=2",
                     "train.per_device_batch_size=4", "data.max_length=128"]) == 0
        result_file = tmp_path / f"{name}.json"
        assert main(["eval-rm", f"model={out / 'model'}", f"data={data}", f"output={result_file}"]) == 0
        result = json.loads(result_file.read_text())
        assert result["kind"] == name and result["scored"] == 8 and "sum" in result["subsets"]
    tok = AutoTokenizer.from_pretrained(tmp_path / "rm" / "model")
    assert tok.pad_token != tok.eos_token == "<|im_end|>"


@pytest.mark.parametrize("stage, extra", [("train-rm", []), ("train-rm", ["group_by_prompt=true"]), ("train-pm", [])],
                         ids=["rm", "rm-grouped", "pm"])
def test_two_processes_match_one(stage, extra, tiny_model_dir, tmp_path):
    """Same global batch: 1 process × 4 × 2 accumulation steps vs 2 processes × 4 (DDP on gloo):
    the same losses and accuracies at every step and the same weights at the end."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    rows = []
    for i in range(16):  # prompts with 3 ranked answers each: pairs that group_by_prompt can merge
        a, b, c = f"the blue sky {i}", f"a quiet river {i}", f"the dog barks {i}"
        rows += [{"id": f"q{i}/{k}", "prompt": f"Question {i}?", "chosen": x, "rejected": y}
                 for k, (x, y) in enumerate(((a, b), (a, c), (b, c)))]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    base = [stage, f"model.name_or_path={tiny_model_dir}", f"data.train={train}", "data.max_length=64",
            "train.lr=1e-3", "train.max_steps=4", "train.per_device_batch_size=4", "train.log_every=1", *extra]
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(cli_command(*base, f"output_dir={one}", "train.gradient_accumulation_steps=2"), check=True, env=cli_env(),
                   capture_output=True)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
              "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
              "-m", "rlhf_workflow", *base, f"output_dir={two}"]
    result = subprocess.run(launch, env=cli_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]

    def train_rows(out):
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
                if json.loads(line)["split"] == "train"]

    a, b = train_rows(one), train_rows(two)
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        for key in ("loss", "accuracy"):
            assert abs(x[key] - y[key]) <= 1e-4 * max(1.0, abs(x[key])), (key, a, b)
    wa, wb = load_file(one / "model" / "model.safetensors"), load_file(two / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-5)

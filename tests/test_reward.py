"""Reward modeling: BT and PM losses, last-token pooling, training on a learnable rule, ranking, eval-rm."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from conftest import build_model, build_tokenizer, write_jsonl
from rlhf_workflow.cli import main
from rlhf_workflow.eval.reward_eval import pair_outcome, section_scores, summarize
from rlhf_workflow.data.schemas import PairRow
from rlhf_workflow.models.ranking import compare_both_orders, knockout, round_robin
from rlhf_workflow.models.forward import last_token_index, pad_batch
from rlhf_workflow.models.reward import RewardModel, distinct_pad_token
from rlhf_workflow.train.losses import bradley_terry_loss, label_token_loss

WORDS = "the quick brown fox jumps over lazy dog moon poem answer question hello world today".split()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


# ------------------------------------------------------------------------------------------- losses


def test_bradley_terry_loss_by_hand():
    rc, rr = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    expected = -math.log(1 / (1 + math.exp(-1.0))) - math.log(1 / (1 + math.exp(1.0)))
    assert bradley_terry_loss(rc, rr).item() == pytest.approx(expected, abs=1e-6)
    # a margin of 1 moves both differences down by 1: -log σ(0) - log σ(-2)
    with_margin = -math.log(0.5) - math.log(1 / (1 + math.exp(2.0)))
    assert bradley_terry_loss(rc, rr, margin=1.0).item() == pytest.approx(with_margin, abs=1e-6)
    # centering adds η Σ (r_c + r_r)² = 0.1 · (9 + 1)
    assert bradley_terry_loss(rc, rr, center_coef=0.1).item() == pytest.approx(expected + 1.0, abs=1e-6)


def test_label_token_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    labels = torch.tensor([0, 2])
    lse0 = math.log(math.exp(2) + 1 + math.exp(1))
    expected = (lse0 - 2.0) + math.log(3)
    assert label_token_loss(logits, labels).item() == pytest.approx(expected, abs=1e-6)


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


# ------------------------------------------------------------------------------------------- training


def rule_pairs(n: int, seed: int) -> list[dict]:
    """Chosen responses mention 'blue', rejected ones 'dog' (at a random place among random words)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = " ".join(rng.choices(WORDS, k=rng.randint(3, 6))) + "?"

        def response(key: str) -> str:
            words = rng.choices(WORDS[:-8], k=rng.randint(3, 6))
            words.insert(rng.randrange(len(words) + 1), key)
            return " ".join(words)

        row = {"id": f"p{seed}-{i}", "prompt": prompt, "chosen": response("blue"), "rejected": response("dog")}
        if i % 3 == 0:  # the conversational form too
            row["prompt"] = [{"role": "user", "content": prompt}]
            row["chosen"] = [{"role": "assistant", "content": row["chosen"]}]
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def rule_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    return write_jsonl(folder / "train.jsonl", rule_pairs(256, 1)), write_jsonl(folder / "eval.jsonl", rule_pairs(48, 2))


@pytest.fixture(scope="module")
def pm_model_dir(tmp_path_factory):
    """A wider, deeper tiny model: telling which response holds the rule word takes some capacity
    (with 2 layers of width 64 it learns the rule for some seeds only; with 4 for each seed tried)."""
    path = tmp_path_factory.mktemp("pm-model")
    tok = build_tokenizer("chatml")
    build_model(tok, hidden_size=64, intermediate_size=128, num_hidden_layers=4).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _eval_rows(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "eval"]


def test_reward_model_learns_the_rule_and_eval_rm_agrees(tiny_model_dir, rule_data, tmp_path):
    train, held_out = rule_data
    out = tmp_path / "rm"
    assert main(["train-rm", f"model.name_or_path={tiny_model_dir}", f"data.train={train}", f"data.eval={held_out}",
                 f"output_dir={out}", "train.lr=3e-3", "train.epochs=2", "train.per_device_batch_size=8",
                 "train.scheduler=constant", "train.log_every=8"]) == 0
    evals = _eval_rows(out)
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
    from rlhf_workflow.train.batching import LayoutOptions
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
    evals = _eval_rows(out)
    assert evals[-1]["accuracy"] > evals[0]["accuracy"] and evals[-1]["accuracy"] >= 0.8, evals


def test_preference_model_learns_the_rule_and_ranks(pm_model_dir, rule_data, tmp_path):
    train, held_out = rule_data
    out = tmp_path / "pm"
    assert main(["train-pm", f"model.name_or_path={pm_model_dir}", f"data.train={train}", f"data.eval={held_out}",
                 f"output_dir={out}", "train.lr=3e-3", "train.epochs=10", "train.per_device_batch_size=8",
                 "train.scheduler=cosine", "train.warmup_ratio=0.1", "train.log_every=64"]) == 0
    evals = _eval_rows(out)
    assert evals[-1]["accuracy"] >= 0.75, evals
    assert (out / "model" / "preference_model.json").is_file()

    result_file = tmp_path / "pm-eval.json"
    assert main(["eval-rm", f"model={out / 'model'}", f"data={held_out}", f"output={result_file}"]) == 0
    result = json.loads(result_file.read_text())
    assert result["kind"] == "pm" and result["accuracy"] >= 0.75
    assert result["preference"]["forward_passes"] == 2 * 48  # both orders of every pair

    from rlhf_workflow.models.preference import load_preference_judge

    judge = load_preference_judge(str(out / "model"))
    responses = ["fox jumps dog over", "the quick blue fox", "lazy dog today", "moon blue poem"]
    for method in ("knockout", "copeland", "borda"):
        ranking = judge.rank([{"role": "user", "content": "hello world?"}], responses, method=method)
        assert "blue" in responses[ranking.best] and "dog" in responses[ranking.worst]


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


# ------------------------------------------------------------------------------------------- ranking


def _recording(values):
    calls = []

    def prefer(ordered):
        calls.extend(ordered)
        return [1.0 if values[i] > values[j] else 0.0 for i, j in ordered]

    return prefer, calls


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 9])
def test_knockout_finds_best_and_worst_with_n_minus_one_comparisons_for_the_best(n):
    values = random.Random(n).sample(range(100), n)
    prefer, calls = _recording(values)
    ranking = knockout(n, prefer)
    assert values[ranking.best] == max(values) and values[ranking.worst] == min(values)
    best_bracket = n - 1
    worst_bracket = max(math.ceil(n / 2) - 1, 0) if n > 1 else 0
    assert ranking.comparisons == best_bracket + worst_bracket
    assert len(calls) == 2 * ranking.comparisons
    assert {(j, i) for i, j in calls} == set(calls)  # every comparison asked in both orders


@pytest.mark.parametrize("method", ["copeland", "borda"])
@pytest.mark.parametrize("n", [2, 5, 8])
def test_round_robin_uses_every_pair_in_both_orders(n, method):
    values = random.Random(10 + n).sample(range(100), n)
    prefer, calls = _recording(values)
    ranking = round_robin(n, prefer, method=method)
    assert ranking.comparisons == n * (n - 1) // 2 and len(calls) == n * (n - 1)
    assert values[ranking.best] == max(values) and values[ranking.worst] == min(values)
    order = sorted(range(n), key=lambda k: values[k])
    assert [ranking.scores[k] for k in order] == sorted(ranking.scores)


def test_both_orders_cancel_a_position_bias():
    values = [3.0, 1.0]

    def biased(ordered):  # the true preference plus +0.3 for whatever is shown first
        return [min(1.0, 1 / (1 + math.exp(values[j] - values[i])) + 0.3) * 0.7 + 0.15 for i, j in ordered]

    unbiased_p = compare_both_orders(biased, [(0, 1), (1, 0)])
    assert unbiased_p[0] > 0.5 > unbiased_p[1] and unbiased_p[0] + unbiased_p[1] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------- eval-rm


def test_rewardbench_sections_on_a_hand_built_example():
    rows, outcomes = [], []
    plan = {  # subset -> outcomes
        "alpacaeval-easy": [1, 1, 1, 0], "mt-bench-easy": [1, 0],           # Chat
        "mt-bench-hard": [0, 0, 1],                                           # Chat Hard
        "refusals-dangerous": [1, 1], "xstest-should-respond": [0.5, 1],      # Safety
        "math-prm": [1, 0], "hep-python": [1, 1, 1, 1],                       # Reasoning
    }
    for subset, results in plan.items():
        for k, outcome in enumerate(results):
            rows.append(PairRow(id=f"{subset}-{k}", prompt="q", chosen="a", rejected="b", subset=subset))
            outcomes.append(float(outcome))
    result = summarize(rows, outcomes)
    assert result["subsets"]["alpacaeval-easy"]["accuracy"] == 0.75
    assert result["subsets"]["xstest-should-respond"]["accuracy"] == 0.75
    sections = result["rewardbench"]
    assert sections["Chat"] == pytest.approx((0.75 * 100 + 0.5 * 28) / 128)
    assert sections["Chat Hard"] == pytest.approx(1 / 3)
    assert sections["Safety"] == pytest.approx((1.0 * 100 + 0.75 * 154) / 254)
    assert sections["Reasoning"] == pytest.approx((0.5 * 984 + 1.0 * 164) / (984 + 164))
    assert sections["Score"] == pytest.approx(sum(sections[s] for s in ("Chat", "Chat Hard", "Safety", "Reasoning")) / 4)
    assert result["accuracy"] == pytest.approx(sum(outcomes) / len(outcomes))


def test_full_reasoning_is_half_math_half_code():
    acc = {"math-prm": 1.0, **{f"hep-{x}": 0.0 for x in ("cpp", "go", "java", "js", "python", "rust")}}
    assert section_scores(acc)["Reasoning"] == pytest.approx(0.5)


def test_ties_count_half():
    assert [pair_outcome(2, 1), pair_outcome(1, 1), pair_outcome(0, 1)] == [1.0, 0.5, 0.0]


def test_eval_rm_refuses_a_directory_that_is_no_judge(tiny_model_dir, rule_data, capsys):
    assert main(["eval-rm", f"model={tiny_model_dir}", f"data={rule_data[1]}"]) == 2
    assert "neither a reward model" in capsys.readouterr().err


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
    from test_sft import _cli, _env, _free_port

    rows = []
    for i in range(16):  # prompts with 3 ranked answers each: pairs that group_by_prompt can merge
        a, b, c = f"the blue sky {i}", f"a quiet river {i}", f"the dog barks {i}"
        rows += [{"id": f"q{i}/{k}", "prompt": f"Question {i}?", "chosen": x, "rejected": y}
                 for k, (x, y) in enumerate(((a, b), (a, c), (b, c)))]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    base = [stage, f"model.name_or_path={tiny_model_dir}", f"data.train={train}", "data.max_length=64",
            "train.lr=1e-3", "train.max_steps=4", "train.per_device_batch_size=4", "train.log_every=1", *extra]
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(_cli(*base, f"output_dir={one}", "train.gradient_accumulation_steps=2"), check=True, env=_env(),
                   capture_output=True)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
              "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
              "-m", "rlhf_workflow", *base, f"output_dir={two}"]
    result = subprocess.run(launch, env=_env(), capture_output=True, text=True)
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

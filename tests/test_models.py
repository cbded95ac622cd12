"""Model loading and saving: HF dirs, GGUF (the built-in SmolLM2), LoRA, and clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_workflow.config import LoraConfig, ModelConfig
from rlhf_workflow.errors import UserError
from rlhf_workflow.models import load_model, load_tokenizer, resolve_source, save_model


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_hf_dir_round_trip(tiny_model_dir, tmp_path):
    model = load_model(ModelConfig(name_or_path=str(tiny_model_dir)))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    ids = torch.tensor([tokenizer.encode("hello world")])
    save_model(model, tokenizer, tmp_path / "saved")
    assert (tmp_path / "saved" / "model.safetensors").is_file()
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    AutoTokenizer.from_pretrained(tmp_path / "saved")
    torch.testing.assert_close(_logits(model, ids), _logits(again, ids), rtol=0, atol=0)
    # nothing temporary is left beside the saved model
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]


def test_a_tokenizer_is_parsed_once_and_handed_out_as_copies(tiny_model_dir, tmp_path):
    """load_tokenizer parses a directory once per process; each caller gets a copy of its own, and a
    directory whose tokenizer files change since is parsed again."""
    import shutil

    from rlhf_workflow.models import loading

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    first = load_tokenizer(str(folder))
    parsed = len(loading._TOKENIZERS)
    second = load_tokenizer(str(folder))
    assert len(loading._TOKENIZERS) == parsed and first is not second
    assert first.encode("hello world") == second.encode("hello world")
    first.chat_template = "changed"  # one caller's change reaches no other
    assert load_tokenizer(str(folder)).chat_template == second.chat_template != "changed"
    first.save_pretrained(folder)  # the directory now holds another template: parsed again
    assert len(loading._TOKENIZERS) == parsed and load_tokenizer(str(folder)).chat_template == "changed"
    assert len(loading._TOKENIZERS) == parsed + 1


def test_a_tokenizer_that_cannot_be_copied_is_parsed_again(tiny_model_dir, monkeypatch):
    """A tokenizer class whose state cannot be copied (a remote-code tokenizer holding, say, a
    tiktoken encoding) is parsed for each caller, as before the cache."""
    from rlhf_workflow.models import loading

    first = load_tokenizer(str(tiny_model_dir))
    cached = next(t for key, t in loading._TOKENIZERS.items() if key[0] == str(tiny_model_dir))

    def refuse(memo):
        raise TypeError("cannot pickle 'Encoding' object")

    monkeypatch.setattr(cached, "__deepcopy__", refuse, raising=False)
    again = load_tokenizer(str(tiny_model_dir))
    assert again is not first and again is not cached and again.encode("hello world") == first.encode("hello world")


def test_options_are_applied(tiny_model_dir):
    model = load_model(
        ModelConfig(name_or_path=str(tiny_model_dir), dtype="bfloat16", attn_implementation="eager",
                    gradient_checkpointing=True)
    )
    assert model.dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing


def test_bf16_on_a_cpu_that_emulates_it_is_said_once_per_setting(tiny_model_dir, tmp_path, monkeypatch, caplog,
                                                                fresh_accelerate_state):
    """bf16 asked of a CPU without bf16 instructions (about 100x slower than fp32 there) is a
    warning, from loading (dtype) and from training (precision), once each per process; fp32 and
    CPUs with bf16 instructions say nothing."""
    from rlhf_workflow import processes
    from rlhf_workflow.config import TrainConfig
    from rlhf_workflow.train.loop import make_accelerator

    monkeypatch.setattr(processes, "_warned_bf16", set())
    monkeypatch.setattr(processes, "no_accelerator", lambda: True)
    monkeypatch.setattr(processes, "cpu_has_native_bf16", lambda: True)
    load_model(ModelConfig(name_or_path=str(tiny_model_dir), dtype="bfloat16"))
    assert "emulates bf16" not in caplog.text
    monkeypatch.setattr(processes, "cpu_has_native_bf16", lambda: False)
    load_model(ModelConfig(name_or_path=str(tiny_model_dir)))
    assert "emulates bf16" not in caplog.text
    for _ in range(2):
        load_model(ModelConfig(name_or_path=str(tiny_model_dir), dtype="bfloat16"))
    assert caplog.text.count("dtype: bfloat16: this CPU has no bf16 instructions") == 1
    make_accelerator(TrainConfig(precision="bfloat16"), tmp_path)
    assert caplog.text.count("train.precision: bfloat16: this CPU has no bf16 instructions") == 1


def test_lora_trains_adapters_and_saves_a_plain_model(tiny_model_dir, tmp_path):
    model = load_model(ModelConfig(name_or_path=str(tiny_model_dir), lora=LoraConfig(r=4, alpha=8)))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # make the adapter non-trivial, then check the merged save reproduces the adapted model
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    ids = torch.tensor([tokenizer.encode("the quick brown fox")])
    expected = _logits(model, ids)
    save_model(model, tokenizer, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(_logits(plain, ids), expected, rtol=1e-4, atol=1e-5)
    assert (tmp_path / "merged" / "adapter" / "adapter_config.json").is_file()
    assert not any("lora" in k for k in plain.state_dict())


def test_train_layers_freezes_everything_below_the_top_layers(tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    model = load_model(ModelConfig(name_or_path=str(tiny_model_dir), train_layers=1))
    layers = model.model.layers
    assert len(layers) >= 2
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    top = len(layers) - 1
    assert trainable and all(n.startswith(f"model.layers.{top}.") or n.startswith("model.norm") for n in trainable)
    assert any(n.startswith("model.norm") for n in trainable)
    ids = torch.tensor([[5, 6, 7, 8]])
    model(input_ids=ids, labels=ids).loss.backward()
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())
    # a reward model's new score head trains too
    reward = load_model(ModelConfig(name_or_path=str(tiny_model_dir), train_layers=1),
                        model_class=AutoModelForSequenceClassification, num_labels=1)
    assert reward.score.weight.requires_grad and not reward.model.embed_tokens.weight.requires_grad
    with pytest.raises(UserError, match="has 2 layers|has \\d+ layers"):
        load_model(ModelConfig(name_or_path=str(tiny_model_dir), train_layers=99))
    with pytest.raises(ValueError, match="use one of them"):
        ModelConfig(train_layers=2, lora=LoraConfig(r=4))


@pytest.mark.parametrize(
    "name, message",
    [
        ("no/such/dir/model", "is not an existing path"),
        ("./missing-model", "is not an existing path"),
        ("missing.gguf", "model file missing.gguf does not exist"),
        ("not a model name", "is not an existing path"),
    ],
)
def test_missing_sources_fail_in_one_sentence(name, message):
    with pytest.raises(UserError, match=message):
        resolve_source(name)


def test_directory_without_weights(tiny_model_dir, tmp_path):
    broken = tmp_path / "no-weights"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(UserError, match="could not load model from"):
        load_model(ModelConfig(name_or_path=str(broken)))


def test_directory_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no config.json"):
        resolve_source(str(tmp_path / "empty"))


def test_pickle_weights_are_refused(tiny_model_dir, tmp_path):
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with pytest.raises(UserError, match="safetensors only.*allow_pickle_weights"):
        load_model(ModelConfig(name_or_path=str(pickled)))
    # asked for explicitly, the pickle loads (tensors only) and gives the same model
    ids = torch.tensor([[3, 4, 5, 6]])
    loaded = load_model(ModelConfig(name_or_path=str(pickled), allow_pickle_weights=True))
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=0, atol=0)


class _RunsCode:
    """Unpickling this calls print(...): what a malicious checkpoint would do with os.system."""

    def __reduce__(self):
        return (print, ("pickle ran code",))


def test_a_pickle_that_runs_code_is_refused_even_when_pickles_are_allowed(tiny_model_dir, tmp_path, capsys):
    evil = tmp_path / "evil"
    shutil.copytree(tiny_model_dir, evil)
    (evil / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": _RunsCode()}, evil / "pytorch_model.bin")
    with pytest.raises(UserError, match="could not load model"):
        load_model(ModelConfig(name_or_path=str(evil), allow_pickle_weights=True))
    assert "pickle ran code" not in capsys.readouterr().out


def test_remote_code_is_not_run_unless_asked(tiny_model_dir, tmp_path):
    custom = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, custom)
    marker = tmp_path / "code-ran"
    (custom / "modeling_custom.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    config = json.loads((custom / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomModel"}
    (custom / "config.json").write_text(json.dumps(config))
    load_model(ModelConfig(name_or_path=str(custom)))  # the built-in Llama class: the file is never imported
    assert not marker.exists()


def test_offline_hub_id_is_a_clear_error():
    with pytest.raises(UserError, match="Hugging Face Hub"):
        load_tokenizer("someone/model-that-is-not-cached")


@pytest.mark.slow
def test_builtin_smollm2_answers_saves_and_reloads(tmp_path):
    """The real embedded model: GGUF -> HF directory, a sensible chat answer, save, same logits."""
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    model = load_model(ModelConfig(name_or_path="smollm2-135m-instruct"))
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer

    save_model(model, tokenizer, tmp_path / "smol")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "smol")
    tok2 = AutoTokenizer.from_pretrained(tmp_path / "smol")
    assert tok2.encode(prompt, add_special_tokens=False) == ids[0].tolist()
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids), rtol=0, atol=0)
    assert "quantization_config" not in (tmp_path / "smol" / "config.json").read_text()


@pytest.mark.slow
def test_a_gguf_path_loads_like_the_builtin_name():
    from rlhf_workflow.models.loading import builtin_gguf_path, local_directory

    path = builtin_gguf_path("smollm2-135m-instruct")
    assert resolve_source(str(path)).kind == "gguf"
    assert local_directory(str(path)) == local_directory("smollm2-135m-instruct")

"""Generation: the sampler, the hf backend against plain forwards and `generate`, the stage
(resume, two processes), and the OpenAI-compatible backend against a real local HTTP server."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FakeServer, build_model, build_tokenizer, cli_env, free_port, write_jsonl

from rlhf_workflow.cli import main
from rlhf_workflow.config import SamplingConfig, VLLMBackendConfig
from rlhf_workflow.generate.base import GenerationRequest, prompt_seed
from rlhf_workflow.generate.hf import HFGenerator, filter_logits, sample_tokens

PROMPTS = ["hello world", "What is two plus three?", "Write a short poem about the moon.", "how are you",
           "The quick brown fox jumps over the lazy dog. " * 3, "Lowercase letters only", "0 1 2 3", "today"]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer("chatml")


@pytest.fixture(scope="module")
def eos_model(tok):
    """A tiny model whose end-of-turn token gets a logit bonus, so rows end at different steps."""
    model = build_model(tok, tie_word_embeddings=False).eval()
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight * 20)
        head.bias.zero_()
        head.bias[tok.eos_token_id] = 2.5
    model.lm_head = head
    return model


def _requests(prompts=PROMPTS):
    return [GenerationRequest(f"p{i}", [{"role": "user", "content": p}]) for i, p in enumerate(prompts)]


def _run(generator, requests, sampling):
    return {r.id: r for results in generator.generate(requests, sampling) for r in results}


# ---------------------------------------------------------------- the sampler


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert (filter_logits(logits, 1.0, 2, 1.0) > 0).tolist() == [[True, True, False, False]]
    # the nucleus is the smallest set reaching top_p: 0.5 + 0.3 >= 0.8 keeps two, 0.81 three
    assert (filter_logits(logits, 1.0, 0, 0.8) > 0).tolist() == [[True, True, False, False]]
    assert (filter_logits(logits, 1.0, 0, 0.81) > 0).tolist() == [[True, True, True, False]]
    assert (filter_logits(logits, 1.0, 0, 0.1) > 0).tolist() == [[True, False, False, False]]  # the top one stays
    torch.testing.assert_close(filter_logits(logits, 1.0, 0, 1.0), torch.tensor([[0.5, 0.3, 0.15, 0.05]]))


def test_sampling_draws_from_p_and_greedy_at_zero_temperature():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = torch.log(p).repeat(20000, 1)
    generators = [torch.Generator().manual_seed(i) for i in range(20000)]
    counts = torch.bincount(sample_tokens(logits, generators, temperature=1.0, top_k=0, top_p=1.0), minlength=4)
    assert (counts / 20000 - p).abs().max() < 0.015, counts
    assert sample_tokens(logits[:3], generators[:3], temperature=0.0, top_k=0, top_p=1.0).tolist() == [0, 0, 0]
    # filtered-out tokens are never drawn, whatever the uniform number
    kept = sample_tokens(logits, generators, temperature=1.0, top_k=2, top_p=1.0)
    assert set(kept.tolist()) == {0, 1}


# ---------------------------------------------------------------- hf backend


def test_greedy_matches_transformers_generate(tok, eos_model):
    """Left-padded batches, one prefill per prompt and rows leaving the batch change nothing."""
    generator = HFGenerator(eos_model, tok, batch_size=3)
    out = _run(generator, _requests(), SamplingConfig(n=2, temperature=0.0, max_new_tokens=20))
    reasons = set()
    for request in _requests():
        ids = generator.tokenizer.apply_chat_template(request.messages, add_generation_prompt=True, return_dict=False)
        ids = torch.tensor([list(ids)])
        expected = eos_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, ids.size(1):]
        expected = [t for t in expected.tolist()]
        stopped = tok.eos_token_id in expected
        expected = expected[: expected.index(tok.eos_token_id)] if stopped else expected
        for sample in out[request.id].samples:  # greedy: both samples the same
            assert sample.num_tokens == len(expected)
            assert sample.text == tok.decode(expected, skip_special_tokens=True)
            assert sample.finish_reason == ("stop" if stopped else "length")
            reasons.add(sample.finish_reason)
    assert reasons == {"stop", "length"}  # both ways of ending occurred


def _naive_samples(model, tok, request, sampling):
    """Reference: each sample alone, no cache, the whole sequence recomputed at every step."""
    prompt = list(tok.apply_chat_template(request.messages, add_generation_prompt=True, return_dict=False))
    samples = []
    for k in range(sampling.n):
        generator = torch.Generator().manual_seed(prompt_seed(sampling.seed, request.id, k))
        tokens: list[int] = []
        while len(tokens) < sampling.max_new_tokens:
            with torch.no_grad():
                logits = model(torch.tensor([prompt + tokens])).logits[:, -1]
            token = sample_tokens(logits, [generator], temperature=sampling.temperature, top_k=sampling.top_k,
                                  top_p=sampling.top_p).item()
            if token == tok.eos_token_id:
                break
            tokens.append(token)
        samples.append(tokens)
    return samples


def test_sampling_matches_a_naive_loop_and_ignores_batching(tok, eos_model):
    sampling = SamplingConfig(n=3, temperature=0.9, top_k=50, top_p=0.95, max_new_tokens=12, seed=7)
    batched = _run(HFGenerator(eos_model, tok, batch_size=4), _requests(), sampling)
    lengths = set()
    for request in _requests()[:4]:
        naive = _naive_samples(eos_model, tok, request, sampling)
        got = batched[request.id].samples
        assert [s.text for s in got] == [tok.decode(t, skip_special_tokens=True) for t in naive]
        lengths.update(s.num_tokens for s in got)
    assert len(lengths) > 2  # rows ended at different steps, so some left the batch early
    one_by_one = _run(HFGenerator(eos_model, tok, batch_size=1), list(reversed(_requests())), sampling)
    assert {k: [s.text for s in r.samples] for k, r in one_by_one.items()} == \
           {k: [s.text for s in r.samples] for k, r in batched.items()}
    other_seed = _run(HFGenerator(eos_model, tok, batch_size=4), _requests(), sampling.model_copy(update={"seed": 8}))
    assert [s.text for s in other_seed["p0"].samples] != [s.text for s in batched["p0"].samples]


def test_stop_strings_and_too_long_prompts(tok, eos_model):
    generator = HFGenerator(eos_model, tok, batch_size=8)
    free = _run(generator, _requests(), SamplingConfig(n=2, temperature=0.0, max_new_tokens=20))
    # pick a piece of text that a greedy answer contains, and stop on it
    text = next(s.text for r in free.values() for s in r.samples if len(s.text) > 6)
    stop = text[3:6]
    cut = _run(generator, _requests(), SamplingConfig(n=2, temperature=0.0, max_new_tokens=20, stop=[stop]))
    for key, result in cut.items():
        for before, after in zip(free[key].samples, result.samples):
            assert stop not in after.text
            assert before.text.startswith(after.text)
            if stop in before.text:
                assert after.finish_reason == "stop" and after.text == before.text[: before.text.index(stop)]
    long = [GenerationRequest("long", [{"role": "user", "content": "hello world " * 200}])]
    result = _run(generator, long, SamplingConfig(n=2))["long"]
    assert result.samples == [] and "model's context is 256" in result.error and not result.retryable


# ---------------------------------------------------------------- the stage


@pytest.fixture
def prompts_file(tmp_path):
    rows = [{"id": f"q{i}", "prompt": p, "meta": {"k": i}} for i, p in enumerate(PROMPTS)]
    rows.append({"id": "chat", "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]})
    return write_jsonl(tmp_path / "prompts.jsonl", rows)


def _gen_args(model_dir, prompts, output, *extra):
    return ["generate", f"model.name_or_path={model_dir}", f"prompts={prompts}", f"output={output}", "sampling.n=3",
            "sampling.max_new_tokens=8", "hf.batch_size=3", *extra]


def _rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_samples_carry_their_log_probability_and_tokens_as_a_forward_pass_scores_them(tok, eos_model):
    """The sampling pass's log π(y|x), summed over the sampled tokens (the end-of-turn token too when
    sampled), is what a plain forward pass gives on those tokens, at any temperature or filter."""
    from rlhf_workflow.data.templating import encode_prompt

    sampling = SamplingConfig(n=3, temperature=0.7, top_k=20, max_new_tokens=10, seed=3)
    got = _run(HFGenerator(eos_model, tok, batch_size=3), _requests(), sampling)
    ended = set()
    for request in _requests():
        prompt = encode_prompt(tok, request.messages)
        for sample in got[request.id].samples:
            ids = sample.token_ids
            assert ids[: sample.num_tokens] and len(ids) == sample.num_tokens + (sample.finish_reason == "stop")
            ended.add(sample.finish_reason)
            with torch.no_grad():
                logits = eos_model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1]
            expected = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(ids).unsqueeze(1)).sum().item()
            assert sample.logprob == pytest.approx(expected, abs=1e-4)
    assert ended == {"stop", "length"}


def test_generate_stage_writes_rows_and_resumes(tiny_model_dir, prompts_file, tmp_path):
    full = tmp_path / "full.jsonl"
    assert main(_gen_args(tiny_model_dir, prompts_file, full)) == 0
    rows = {r["id"]: r for r in _rows(full)}
    assert sorted(rows) == sorted([f"q{i}" for i in range(len(PROMPTS))] + ["chat"])
    for row in rows.values():
        assert len(row["responses"]) == len(row["response_tokens"]) == len(row["finish_reasons"]) == 3
        assert all(0 < t <= 8 for t in row["response_tokens"])
        assert len(row["response_logps"]) == 3 and all(v < 0 for v in row["response_logps"])
        assert "response_token_ids" not in row  # only when asked (token_ids=true)
    assert rows["q3"]["meta"] == {"k": 3} and rows["chat"]["prompt"][0]["content"] == "Be brief."

    # a crash after three rows and half of a fourth: the rerun completes the file, with the same samples
    part = tmp_path / "part.jsonl"
    lines = full.read_text().splitlines(keepends=True)
    part.write_text("".join(lines[:3]) + lines[3][:25])
    assert main(_gen_args(tiny_model_dir, prompts_file, part)) == 0
    again = _rows(part)
    assert len(again) == len(rows) and {r["id"]: r for r in again} == rows
    assert main(_gen_args(tiny_model_dir, prompts_file, part)) == 0  # nothing left to do
    assert len(_rows(part)) == len(rows)


def test_bad_prompts_are_reported(tiny_model_dir, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"id": "a", "prompt": "fine"}, {"id": "b", "prompt": "  "}])
    assert main(_gen_args(tiny_model_dir, bad, tmp_path / "o.jsonl")) == 2
    assert "bad.jsonl:2: field 'prompt': the prompt is empty" in capsys.readouterr().err
    long = write_jsonl(tmp_path / "long.jsonl", [{"id": "a", "prompt": "fine"}, {"id": "b", "prompt": "hello world " * 200}])
    out = tmp_path / "o2.jsonl"
    assert main(_gen_args(tiny_model_dir, long, out)) == 0  # not retryable: reported, the stage goes on
    assert [r["id"] for r in _rows(out)] == ["a"]
    assert [(r["id"], r["retryable"]) for r in _rows(tmp_path / "o2.errors.jsonl")] == [("b", False)]


def test_two_processes_return_every_prompt_once(tiny_model_dir, prompts_file, tmp_path):
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    assert main(_gen_args(tiny_model_dir, prompts_file, one)) == 0
    # a shard left by a killed 3-process run is merged too
    rows = _rows(one)
    write_jsonl(tmp_path / "two.rank2.jsonl", [rows[0]])
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
              "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
              "-m", "rlhf_workflow", *_gen_args(tiny_model_dir, prompts_file, two, "hf.batch_size=2")]
    result = subprocess.run(launch, env=cli_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    got = _rows(two)
    assert sorted(r["id"] for r in got) == sorted(r["id"] for r in rows)  # each exactly once
    assert {r["id"]: r["responses"] for r in got} == {r["id"]: r["responses"] for r in rows}
    assert list(tmp_path.glob("two.rank*")) == []


# ---------------------------------------------------------------- openai backend, against a local server


@pytest.fixture
def server():
    s = FakeServer()
    yield s
    s.close()


def _openai_args(model_dir, prompts, output, url, *extra):
    return ["generate", "backend=openai", f"model.name_or_path={model_dir}", "openai.model=served-model",
            f"openai.base_url={url}", "openai.backoff=0.01", "openai.concurrency=3", f"prompts={prompts}",
            f"output={output}", "sampling.n=3", "sampling.max_new_tokens=16", *extra]


def test_openai_backend_answers_every_prompt_with_n_samples(tiny_model_dir, prompts_file, tmp_path, server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-123")
    server.fail["hello world"] = [500, 503]  # fails twice, then works
    server.fail["how are you"] = [429]
    out = tmp_path / "gen.jsonl"
    assert main(_openai_args(tiny_model_dir, prompts_file, out, server.url)) == 0
    rows = {r["id"]: r for r in _rows(out)}
    assert len(rows) == len(PROMPTS) + 1
    for row in rows.values():
        assert len(row["responses"]) == 3  # the server gives at most 2 choices: asked again for the third
    assert rows["q0"]["responses"][0].startswith("reply") and rows["q0"]["responses"][0].endswith("to hello world")
    first = server.requests[0]
    assert first["model"] == "served-model" and first["auth"] == "Bearer sk-secret-123"
    assert first["path"] == "/v1/chat/completions" and first["max_tokens"] == 16 and first["n"] in (3,)
    assert rows["chat"]["prompt"][0]["role"] == "system"


def test_openai_backend_failures(tiny_model_dir, prompts_file, tmp_path, server, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-123")
    server.fail["today"] = [500] * 10  # keeps failing: reported, the rest is written, exit non-zero
    server.delay["0 1 2 3"] = 1.5  # the first attempt times out, the retry works
    out = tmp_path / "gen.jsonl"
    args = _openai_args(tiny_model_dir, prompts_file, out, server.url, "openai.max_retries=2", "openai.timeout=0.5")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "1 of 9 prompts got no responses" in err and "run the same command again" in err
    assert "sk-secret" not in err
    assert sorted(r["id"] for r in _rows(out)) == sorted([f"q{i}" for i in range(len(PROMPTS)) if i != 7] + ["chat"])
    assert [r["id"] for r in _rows(tmp_path / "gen.errors.jsonl")] == ["q7"]
    # the server recovers: the rerun asks for that prompt only
    server.fail.clear()
    before = len(server.requests)
    assert main(args) == 0
    assert {r["messages"][-1]["content"] for r in server.requests[before:]} == {"today"}
    assert len(_rows(out)) == len(PROMPTS) + 1 and not (tmp_path / "gen.errors.jsonl").exists()
    # a request the server refuses outright stops the stage with its message, and never shows the key
    server.fail["hello world"] = [401]
    assert main(_openai_args(tiny_model_dir, prompts_file, tmp_path / "x.jsonl", server.url)) == 2
    err = capsys.readouterr().err
    assert "HTTP 401" in err and "OPENAI_API_KEY" in err and "sk-secret" not in err


def test_openai_completions_endpoint_renders_the_chat_template(tiny_model_dir, tmp_path, server):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "hi"}])
    out = tmp_path / "gen.jsonl"
    assert main(_openai_args(tiny_model_dir, prompts, out, server.url, "openai.endpoint=completions",
                             "sampling.stop=[STOP]")) == 0
    request = server.requests[0]
    assert request["path"] == "/v1/completions" and request["stop"] == ["STOP"]
    assert request["prompt"].endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    row = _rows(out)[0]
    assert row["responses"][0] == "completion 0 " and row["finish_reasons"] == ["stop"] * 3
    assert row["response_tokens"][0] > 0  # counted with the model's tokenizer


# ---------------------------------------------------------------- vllm backend


def _has_vllm_and_gpu() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


@pytest.mark.skipif(_has_vllm_and_gpu(), reason="vllm is installed here: the real backend is tested below")
def test_vllm_backend_without_vllm_says_how_to_get_it(tiny_model_dir, prompts_file, tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed (without a GPU)")
    assert main(_gen_args(tiny_model_dir, prompts_file, tmp_path / "v.jsonl", "backend=vllm")) == 2
    assert "pip install 'rlhf-workflow[vllm]'" in capsys.readouterr().err


def test_a_run_on_vllm_without_vllm_says_so_before_any_work(recipe, tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    out = tmp_path / "run"
    assert main(["run", *recipe, "generation.backend=vllm", f"output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert "RLHF_VLLM=cpu bash scripts/install.sh" in err and "pip install 'rlhf-workflow[vllm]'" in err
    assert not out.exists() or not any(out.iterdir())  # nothing sampled, nothing claimed


def test_vllm_engine_arguments_follow_the_platform():
    """On a CPU (vLLM's CPU build): the KV cache in bytes (gpu_memory_utilization would be a share of host
    RAM there), eager, no sleep mode; on GPUs: the memory share and sleep mode; a setting given wins.
    The real engine takes them in test_vllm.py."""
    from rlhf_workflow.generate.vllm import engine_arguments, engine_samples

    cpu = engine_arguments(VLLMBackendConfig(), on_cpu=True, sleep_mode=False, launched=False)
    assert cpu["kv_cache_memory_bytes"] == 2 * 2**30 and cpu["enforce_eager"] is True
    assert "gpu_memory_utilization" not in cpu and cpu["enable_sleep_mode"] is False
    assert cpu["enable_chunked_prefill"] is False  # seeded requests crash vLLM's CPU build when chunked
    assert "distributed_executor_backend" not in cpu
    gpu = engine_arguments(VLLMBackendConfig(gpu_memory_utilization=0.5), on_cpu=False, sleep_mode=True, launched=True)
    assert gpu["gpu_memory_utilization"] == 0.5 and "kv_cache_memory_bytes" not in gpu
    assert gpu["enforce_eager"] is False and gpu["enable_sleep_mode"] is True and "enable_chunked_prefill" not in gpu
    assert gpu["distributed_executor_backend"] == "external_launcher"
    chosen = engine_arguments(VLLMBackendConfig(kv_cache_gib=0.5, enforce_eager=False), on_cpu=True, sleep_mode=False,
                              launched=False)
    assert chosen["kv_cache_memory_bytes"] == 2**29 and chosen["enforce_eager"] is False
    # vLLM refuses n > 1 when greedy: the engine is asked for one sample, repeated n times
    assert engine_samples(SamplingConfig(n=4, temperature=0)) == 1
    assert engine_samples(SamplingConfig(n=4, temperature=0.7)) == 4


def test_vllm_engine_errors_come_out_in_one_line():
    from pydantic import BaseModel

    from rlhf_workflow.generate.vllm import one_line

    class EngineArgs(BaseModel):
        enable_sleep_mode: int

    try:
        EngineArgs(enable_sleep_mode="x")
    except Exception as exc:  # pydantic's several lines: the count, the field, the reason, a link
        line = one_line(exc)
    assert line == "ValidationError: enable_sleep_mode: Input should be a valid integer, unable to parse string as an integer"
    assert one_line(ValueError("Available memory on node 0 is less than requested\nmore")) == (
        "ValueError: Available memory on node 0 is less than requested")


@pytest.mark.skipif(not _has_vllm_and_gpu(), reason="needs vllm and a CUDA GPU")
def test_vllm_backend_generates_n_samples_and_resumes(tiny_model_dir, prompts_file, tmp_path):
    out = tmp_path / "v.jsonl"
    args = _gen_args(tiny_model_dir, prompts_file, out, "backend=vllm", "vllm.gpu_memory_utilization=0.3",
                     "vllm.chunk_size=4")
    assert main(args) == 0
    rows = _rows(out)
    assert len(rows) == len(PROMPTS) + 1 and all(len(r["responses"]) == 3 for r in rows)
    assert all(0 <= t <= 8 for r in rows for t in r["response_tokens"])
    assert all(len(r["response_logps"]) == 3 and all(lp <= 0 for lp in r["response_logps"]) for r in rows)
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:4]))
    assert main(args) == 0
    assert sorted(r["id"] for r in _rows(out)) == sorted(r["id"] for r in rows)


def test_openai_timeout_bounds_the_whole_request(tiny_model_dir, prompts_file, tmp_path, server):
    """A server that sends its answer a byte at a time never lets one read time out; the request's
    deadline still ends it, and the retry gets the answer."""
    server.drip["hello world"] = 0.05  # about 10 s for the whole answer
    out = tmp_path / "gen.jsonl"
    start = time.monotonic()
    assert main(_openai_args(tiny_model_dir, prompts_file, out, server.url, "openai.timeout=1", "sampling.n=2")) == 0
    assert time.monotonic() - start < 8
    asked = [r for r in server.requests if (r.get("messages") or [{}])[-1].get("content") == "hello world"]
    assert len(asked) == 2  # the dripping answer was given up on, the retry answered
    assert len(_rows(out)) == len(PROMPTS) + 1


def test_a_server_that_ignores_temperature_is_noticed(tiny_model_dir, prompts_file, tmp_path, server, caplog):
    server.greedy = True
    assert main(_openai_args(tiny_model_dir, prompts_file, tmp_path / "gen.jsonl", server.url, "sampling.n=2")) == 0
    assert "prompts got 2 identical samples at temperature 1: the backend seems to sample greedily" in caplog.text
    caplog.clear()
    server.greedy = False
    assert main(_openai_args(tiny_model_dir, prompts_file, tmp_path / "gen2.jsonl", server.url, "sampling.n=2")) == 0
    assert "greedily" not in caplog.text


def test_answers_that_are_not_openai_responses_are_retried(tiny_model_dir, prompts_file, tmp_path, server):
    server.odd["hello world"] = [b"[1, 2, 3]", b'{"choices": [{"message": {"content": 5}}]}', b'{"choices": [7]}',
                                 b'{"choices": [{"message": {"content": "half a pair \\ud800"}}]}']
    out = tmp_path / "gen.jsonl"
    assert main(_openai_args(tiny_model_dir, prompts_file, out, server.url, "openai.max_retries=4")) == 0
    rows = {r["id"]: r for r in _rows(out)}
    assert rows["q0"]["responses"][0].endswith("to hello world") and server.odd["hello world"] == []

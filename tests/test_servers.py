"""Several OpenAI-compatible servers behind one client (`generate.servers`): the choice of server,
resting a failing one, and every prompt answered once when a real server is killed mid-run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import FakeServer, cli_env, free_port, write_jsonl

from rlhf_workflow.cli import main
from rlhf_workflow.generate.servers import ServerPool


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_requests_go_to_the_server_with_the_fewest_in_flight():
    pool = ServerPool(["a", "b", "c"], clock=Clock())
    first = [pool.acquire().url for _ in range(3)]
    assert first == ["a", "b", "c"]  # all idle: the one sent the fewest, then the first listed
    b = pool.servers[1]
    pool.release(b)  # b answered: it is the least busy now
    assert pool.acquire().url == "b"
    pool.release(pool.servers[0])
    pool.release(pool.servers[2])
    # a and c idle, each sent 1; b busy: a (first listed among the least sent)
    assert pool.acquire().url == "a"
    assert [s.in_flight for s in pool.servers] == [1, 1, 0]
    assert pool.acquire().url == "c"


def test_a_failed_request_avoids_the_servers_it_failed_on():
    pool = ServerPool(["a", "b"], clock=Clock())
    server = pool.acquire()
    pool.release(server, "HTTP 503")
    assert pool.untried({"a"}) and pool.acquire(avoid={"a"}).url == "b"
    assert not pool.untried({"a", "b"})
    assert pool.acquire(avoid={"a", "b"}).url in ("a", "b")  # failed everywhere: any, after the backoff


def test_a_server_failing_in_a_row_rests_then_comes_back():
    clock = Clock()
    pool = ServerPool(["a", "b"], failures=2, rest=30.0, clock=clock)
    a, b = pool.servers
    for _ in range(2):
        pool.release(pool.acquire(avoid={"b"}), "ConnectionRefusedError")
    assert a.rests == 1 and a.resting_until == 130.0
    assert [pool.acquire().url for _ in range(3)] == ["b"] * 3  # a rests: b gets everything
    assert not pool.untried({"b"})  # the only other server rests: the failed request backs off
    clock.now = 131.0
    assert pool.acquire().url == "a"  # back after its rest
    pool.release(a, "ConnectionRefusedError")  # still failing: out again at once
    assert a.rests == 2 and a.resting_until == 161.0
    pool.release(pool.acquire(avoid={"a"}), "HTTP 500")
    pool.release(pool.acquire(avoid={"a"}), "HTTP 500")  # b rests too now
    assert b.rests == 1 and b.resting_until == 161.0
    assert pool.acquire().url == "a"  # every server rests: the one back first (ties: the least busy)
    pool.release(a)
    assert a.failures_in_a_row == 0
    lines = pool.summary()
    assert lines[0].startswith("a: 4 requests, 1 answered, 3 failed, taken out 2×; last error: ConnectionRefusedError")
    assert lines[1].startswith("b: 5 requests, 0 answered, 2 failed, taken out 1×; last error: HTTP 500")


def test_a_server_listed_twice_is_refused(tmp_path, capsys):
    with pytest.raises(ValueError, match="listed twice: a"):
        ServerPool(["a", "b", "a"])
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "hi"}])
    assert main(["generate", "backend=openai", "model.name_or_path=m", f"prompts={prompts}", f"output={tmp_path / 'o.jsonl'}",
                 "openai.base_urls=[http://h:1/v1,http://h:1/v1/]"]) == 2
    assert "a server is listed twice: http://h:1/v1" in capsys.readouterr().err


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def test_a_broken_server_costs_nothing_but_its_requests(tiny_model_dir, tmp_path, capsys):
    """One of two servers answers 503 to everything: every prompt is answered by the other, with
    the broken one taken out after its failures in a row, and the counts printed."""
    good, broken = FakeServer(), FakeServer()
    broken.down = 503
    try:
        prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": f"q{i}", "prompt": f"question {i}"} for i in range(12)])
        out = tmp_path / "gen.jsonl"
        assert main(["generate", "backend=openai", f"model.name_or_path={tiny_model_dir}", "openai.model=served",
                     f"openai.base_urls=[{broken.url},{good.url}]", "openai.concurrency=4", "openai.backoff=0.01",
                     "openai.max_retries=2", "openai.server_failures=2", "openai.server_rest=60",
                     f"prompts={prompts}", f"output={out}", "sampling.n=2"]) == 0
        rows = _rows(out)
        assert sorted(r["id"] for r in rows) == sorted(f"q{i}" for i in range(12))
        assert all(len(r["responses"]) == 2 for r in rows)
        assert 2 <= len(broken.requests) <= 4  # at most the requests in flight before it was taken out
        printed = capsys.readouterr().out
        assert f"generate: {broken.url}: {len(broken.requests)} requests, 0 answered, {len(broken.requests)} failed, " \
               "taken out 1×; last error: HTTP 503" in printed
        assert f"generate: {good.url}: {len(good.requests)} requests, {len(good.requests)} answered, 0 failed" in printed
    finally:
        good.close()
        broken.close()


# ---------------------------------------------------------------- real servers: `transformers serve`


def _serve(model_dir: Path, port: int, log: Path) -> subprocess.Popen:
    """`transformers serve` of ``model_dir`` on ``port`` (the script beside this interpreter)."""
    command = [str(Path(sys.executable).parent / "transformers"), "serve", str(model_dir), "--port", str(port),
               "--device", "cpu"]
    return subprocess.Popen(command, env=cli_env(), stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait_healthy(port: int, process: subprocess.Popen, log: Path, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"transformers serve exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"transformers serve did not come up in {seconds} s: {log.read_text()[-2000:]}")


def test_every_prompt_is_answered_once_when_one_of_two_real_servers_is_killed(tiny_model_dir, tmp_path):
    pytest.importorskip("fastapi", reason="transformers serve needs transformers[serving] (the test extra has it)")
    ports = [free_port(), free_port()]
    logs = [tmp_path / f"serve{k}.log" for k in range(2)]
    servers = [_serve(tiny_model_dir, port, log) for port, log in zip(ports, logs)]
    try:
        for port, process, log in zip(ports, servers, logs):
            _wait_healthy(port, process, log)
        count = 40
        prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": f"q{i}", "prompt": f"Say something about {i}."}
                                                     for i in range(count)])
        out = tmp_path / "gen.jsonl"
        urls = ",".join(f"http://127.0.0.1:{port}/v1" for port in ports)
        command = [sys.executable, "-m", "rlhf_workflow", "generate", "backend=openai",
                   f"model.name_or_path={tiny_model_dir}", f"openai.base_urls=[{urls}]", "openai.concurrency=4",
                   "openai.backoff=0.05", "openai.server_failures=1", "openai.server_rest=600", "openai.timeout=60",
                   f"prompts={prompts}", f"output={out}", "sampling.n=2", "sampling.max_new_tokens=48"]
        run = subprocess.Popen(command, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        printed: list[str] = []
        reader = threading.Thread(target=lambda: printed.extend(run.stdout), daemon=True)
        reader.start()
        deadline = time.monotonic() + 120
        while len(_rows(out)) < 4 and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert run.poll() is None, "the run ended before a server could be killed: " + "".join(printed)[-2000:]
        servers[1].send_signal(signal.SIGKILL)  # mid-run, with requests in flight on it
        assert run.wait(timeout=300) == 0, "".join(printed)[-3000:]
        reader.join(timeout=10)
        rows = _rows(out)
        ids = [r["id"] for r in rows]
        assert sorted(ids) == sorted(f"q{i}" for i in range(count)) and len(ids) == len(set(ids))  # each once
        assert all(len(r["responses"]) == 2 for r in rows)
        text = "".join(printed)
        killed = [line for line in text.splitlines() if f"127.0.0.1:{ports[1]}/v1:" in line and "requests" in line]
        alive = [line for line in text.splitlines() if f"127.0.0.1:{ports[0]}/v1:" in line and "requests" in line]
        assert killed and "taken out 1×" in killed[0] and " 0 failed" not in killed[0], text[-3000:]
        assert alive and " 0 failed" in alive[0], text[-3000:]
    finally:
        for process in servers:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)

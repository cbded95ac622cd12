"""Several OpenAI-compatible servers behind one client (`generate.servers`): the choice of server,
resting a failing one, and every prompt answered once when a real server is killed mid-run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FakeServer, cli_env, fleet_loses_a_server, write_jsonl

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


def test_every_prompt_is_answered_once_when_one_of_two_real_servers_is_killed(tiny_model_dir, tmp_path):
    pytest.importorskip("fastapi", reason="transformers serve needs transformers[serving] (the test extra has it)")
    fleet_loses_a_server(lambda port, log: _serve(tiny_model_dir, port, log), tiny_model_dir, tmp_path)

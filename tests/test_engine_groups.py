"""Generation engines over groups of processes (vLLM's tensor parallelism under a launcher): which
process belongs to which engine, and the shards of W / k engines merged exactly once, exercised
with the hf backend in real CPU processes over gloo."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli_env, free_port, write_jsonl

from rlhf_workflow.errors import UserError
from rlhf_workflow.processes import EngineGroup, engine_group


def test_consecutive_ranks_of_one_node_form_a_group():
    # one node of 4 GPUs, engines of 2
    groups = [engine_group(rank, 4, rank, 4, 2) for rank in range(4)]
    assert groups == [EngineGroup(0, 2, 0, (0, 1)), EngineGroup(0, 2, 1, (0, 1)),
                      EngineGroup(1, 2, 0, (2, 3)), EngineGroup(1, 2, 1, (2, 3))]
    assert [g.writes for g in groups] == [True, False, True, False]
    # two nodes of 4: rank 5 is node 1's local rank 1
    assert engine_group(5, 8, 1, 4, 2) == EngineGroup(2, 4, 1, (0, 1))
    assert engine_group(6, 8, 2, 4, 4) == EngineGroup(1, 2, 2, (0, 1, 2, 3))
    # k = 1, the paper's one engine per GPU: every process its own engine
    assert [engine_group(r, 8, r % 4, 4, 1).index for r in range(8)] == list(range(8))


@pytest.mark.parametrize("world, local, size, what", [(6, 6, 4, "the number of processes (6)"),
                                                      (8, 2, 4, "the processes per node (2)"),
                                                      (4, 4, 0, "at least 1")])
def test_groups_that_do_not_fit_are_refused(world, local, size, what):
    with pytest.raises(UserError, match=re.escape(what)):
        engine_group(0, world, 0, local, size)


SHARDED = '''
import json, sys
from pathlib import Path

import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_workflow.config import SamplingConfig
from rlhf_workflow.data.io import read_rows
from rlhf_workflow.data.schemas import PromptRow
from rlhf_workflow.data.shards import run_sharded
from rlhf_workflow.generate.base import GenerationRequest
from rlhf_workflow.generate.hf import HFGenerator
from rlhf_workflow.generate.command import generation_row
from rlhf_workflow.processes import process_state

model_dir, prompts, output, size, shares = sys.argv[1:]
state = process_state()
sampling = SamplingConfig(n=2, max_new_tokens=6, seed=3)


def work(mine, sink):
    Path(shares, f"rank{state.process_index}.json").write_text(json.dumps([row.id for row in mine]))
    generator = HFGenerator(AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir),
                            batch_size=2)
    by_id = {row.id: row for row in mine}
    written = 0
    for results in generator.generate([GenerationRequest(row.id, row.prompt_messages()) for row in mine], sampling):
        written += sink.append([generation_row(by_id[result.id], result) for result in results])
    return written


result = run_sharded("test", state, Path(output), read_rows(prompts, PromptRow), work, settings={}, group_size=int(size))
if state.is_main_process:
    print("kept " + json.dumps(result[1]), flush=True)
if state.num_processes > 1:
    dist.barrier()
    dist.destroy_process_group()
'''


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("processes, size", [(4, 2), (2, 2)])
def test_engine_groups_sample_disjoint_shares_merged_once(tiny_model_dir, tmp_path, processes, size):
    script = tmp_path / "sharded.py"
    script.write_text(SHARDED)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": f"q{i}", "prompt": f"Tell me about {i}."} for i in range(11)])
    alone, shares = tmp_path / "alone.jsonl", tmp_path / "shares"
    shares.mkdir()
    one = subprocess.run([sys.executable, str(script), str(tiny_model_dir), str(prompts), str(alone), "1", str(tmp_path)],
                         env=cli_env(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]

    output = tmp_path / "grouped.jsonl"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes), "--num_machines",
              "1", "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
              str(free_port()), str(script), str(tiny_model_dir), str(prompts), str(output), str(size), str(shares)]
    result = subprocess.run(launch, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    share = {rank: json.loads((shares / f"rank{rank}.json").read_text()) for rank in range(processes)}
    groups = processes // size
    for rank in range(processes):  # every member of a group got its group's share
        assert share[rank] == share[rank - rank % size]
    leaders = [share[g * size] for g in range(groups)]
    assert sorted(sum(leaders, [])) == sorted(f"q{i}" for i in range(11))  # disjoint, and all of them
    kept = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("kept "))[5:])
    assert kept == [len(s) for s in leaders]  # the writers' statistics only
    rows = _rows(output)
    assert len(rows) == 11 and len({r["id"] for r in rows}) == 11  # each prompt exactly once
    assert {r["id"]: r["responses"] for r in rows} == {r["id"]: r["responses"] for r in _rows(alone)}
    assert list(tmp_path.glob("grouped.rank*")) == []

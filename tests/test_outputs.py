"""No input, path or concurrent run loses data (`data.outputs`): an output is never an input, one writer
per output, rows made by one set of settings, a directory belongs to one stage.

Each case checks the one-line message (exit 2, naming the keys and paths) and that no input changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import cli_env, sft_args, write_jsonl
from rlhf_workflow.cli import main
from rlhf_workflow.data.io import atomic_write_text, writer_id
from rlhf_workflow.data.outputs import OutputLock, path_conflicts

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def gen_args(model_dir, prompts, output, *extra):
    return ["generate", f"model.name_or_path={model_dir}", f"prompts={prompts}", f"output={output}", "sampling.n=2",
            "sampling.max_new_tokens=4", *extra]


@pytest.fixture
def files(tmp_path):
    """A prompts file, a scored generations file, a pairs file, and a symlink to the prompts."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"id": f"p{i}", "prompt": f"Say {i}."} for i in range(3)])
    scored = write_jsonl(tmp_path / "scored.jsonl", [{"id": f"p{i}", "prompt": f"Say {i}.", "responses": ["a", "bb"],
                                                      "rewards": [0.0, 1.0]} for i in range(3)])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"id": "x", "prompt": "q", "chosen": "a", "rejected": "b"}])
    (tmp_path / "link.jsonl").symlink_to(prompts)
    (tmp_path / "judge.py").write_text("def judge(row, response):\n    return float(len(response))\n")
    return {"prompts": prompts, "scored": scored, "pairs": pairs, "link": tmp_path / "link.jsonl",
            "judge": tmp_path / "judge.py", "dir": tmp_path}


# ------------------------------------------------------------------ an output is never an input


def conflict_cases(model: Path, f: dict) -> list[tuple[str, list[str], Path, str]]:
    """(name, arguments, the input that must stay unchanged, the words the message must hold)."""
    d = f["dir"]
    return [
        ("pairs output=input", ["pairs", f"input={f['scored']}", f"output={f['scored']}"], f["scored"],
         f"output={f['scored']} would overwrite the input input={f['scored']}"),
        ("pairs input is the stats file beside output", ["pairs", f"input={f['scored']}", f"output={d}/scored.jsonl"],
         f["scored"], "would overwrite the input"),
        ("generate output=prompts", gen_args(model, f["prompts"], f["prompts"]), f["prompts"],
         f"output={f['prompts']} would overwrite the input prompts={f['prompts']}"),
        ("generate output is a link to prompts", gen_args(model, f["prompts"], f["link"]), f["prompts"],
         "(the same file, through a link)"),
        ("generate prompts is a shard of output", gen_args(model, f["prompts"], d / "prompts.jsonl"), f["prompts"],
         "would overwrite the input"),
        ("annotate output=input", ["annotate", f"input={f['scored']}", f"output={f['scored']}", "judge.type=function",
                                   f"judge.function={f['judge']}:judge"], f["scored"], "would overwrite the input input="),
        ("annotate output=judge file", ["annotate", f"input={f['scored']}", f"output={f['judge']}",
                                        "judge.type=function", f"judge.function={f['judge']}:judge"], f["judge"],
         f"would overwrite the input judge.function={f['judge']}"),
        ("eval-rm output=data", ["eval-rm", f"model={model}", f"data={f['pairs']}", f"output={f['pairs']}"], f["pairs"],
         f"output={f['pairs']} would overwrite the input data={f['pairs']}"),
        ("sft data inside output_dir", ["sft", f"data.train={f['pairs']}", f"output_dir={d}"], f["pairs"],
         f"the input data.train={f['pairs']} lies inside output_dir={d}"),
        ("dpo output_dir is the model", ["dpo", f"data.train={f['pairs']}", f"model.name_or_path={model}",
                                         f"output_dir={model}"], model / "config.json",
         f"output_dir={model} would overwrite the input model.name_or_path={model}"),
        ("run prompts inside output_dir", ["run", f"prompts.train={f['prompts']}", f"prompts.eval={f['prompts']}",
                                           "judge.type=function", f"judge.function={f['judge']}:judge",
                                           f"output_dir={d}"], f["prompts"], "lies inside output_dir="),
    ]


def test_every_stage_refuses_an_output_that_is_one_of_its_inputs(tiny_model_dir, files, capsys):
    # the shard and stats cases need the sidecar to exist as the input: make the inputs those names
    (files["dir"] / "scored.stats.json").write_text("{}")
    for name, args, kept, words in conflict_cases(tiny_model_dir, files):
        if "stats file" in name:
            args = ["pairs", f"input={files['dir'] / 'scored.stats.json'}", f"output={files['scored']}"]
            kept, words = files["dir"] / "scored.stats.json", "is one of the files written beside output="
        if "shard" in name:
            shard = files["dir"] / "out.rank1.jsonl"
            shard.write_text(files["prompts"].read_text())
            args = gen_args(tiny_model_dir, shard, files["dir"] / "out.jsonl")
            kept, words = shard, "is one of the files written beside output="
        before = digest(kept)
        assert main(args) == 2, name
        err = capsys.readouterr().err
        assert words in err, (name, err)
        assert len(err.strip().splitlines()) == 1, (name, err)
        assert digest(kept) == before, name


def test_path_conflicts_compares_only_paths_that_exist(tmp_path):
    assert path_conflicts({"model": ["smollm2-135m-instruct"]}, {"output": "smollm2-135m-instruct"}) == []
    assert path_conflicts({"data": [str(tmp_path / "missing.jsonl")]}, {"output": str(tmp_path / "missing.jsonl")}) == []


# ------------------------------------------------------------------ one writer per output


def test_a_locked_output_is_refused_naming_the_holder(tiny_model_dir, files, tmp_path, capsys):
    out = tmp_path / "gen.jsonl"
    held = OutputLock(out, directory=False)
    assert held.try_acquire() is None
    try:
        assert main(gen_args(tiny_model_dir, files["prompts"], out)) == 2
        err = capsys.readouterr().err
        assert f"{out} is being written by process {os.getpid()}" in err
        assert not out.exists()
    finally:
        held.release()
    assert main(gen_args(tiny_model_dir, files["prompts"], out)) == 0  # free again


def test_a_second_run_into_a_run_directory_is_refused(recipe, tmp_path, capsys):
    run_dir = tmp_path / "run"
    held = OutputLock(run_dir, directory=True)
    assert held.try_acquire() is None
    try:
        assert main(["run", *recipe, f"output_dir={run_dir}"]) == 2
        assert f"{run_dir} is being written by process {os.getpid()}" in capsys.readouterr().err
        assert not (run_dir / "state.json").exists()
    finally:
        held.release()


def test_an_output_under_a_dangling_link_or_a_file_names_it(tiny_model_dir, files, recipe, tmp_path, capsys):
    """A folder on the output's way that cannot be a directory (a symbolic link to nothing, as a
    `runs` link committed from another machine, or a file) is named, for a run and for a stage."""
    link = tmp_path / "runs"
    link.symlink_to(tmp_path / "elsewhere")
    assert main(["run", *recipe, f"output_dir={link / 'demo'}"]) == 2
    err = capsys.readouterr().err
    assert f"goes through {link}, a symbolic link to {tmp_path / 'elsewhere'}, which does not exist" in err
    assert len(err.strip().splitlines()) == 1
    blocker = tmp_path / "taken"
    blocker.write_text("a file")
    assert main(gen_args(tiny_model_dir, files["prompts"], blocker / "out" / "gen.jsonl")) == 2
    assert f"goes through {blocker}, which is a file, not a directory" in capsys.readouterr().err
    assert blocker.read_text() == "a file" and not (tmp_path / "elsewhere").exists()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "o.jsonl"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from rlhf_workflow.data.outputs import OutputLock\n"
        f"lock = OutputLock({str(out)!r}, directory=False)\nassert lock.try_acquire() is None\n"
        "print('held', flush=True); time.sleep(600)")], stdout=subprocess.PIPE, text=True, env=cli_env())
    assert holder.stdout.readline().strip() == "held"
    lock = OutputLock(out, directory=False)
    assert f"process {holder.pid}" in lock.try_acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert lock.try_acquire() is None  # the OS released it with the process
    lock.release()


def test_taking_a_lock_removes_what_killed_writers_left_and_only_that(tmp_path):
    """Temporary names (`data.io.temp_path`) of writers that are gone (a process of this machine no
    longer running; under the lock, any of another machine) go when an output's lock is taken:
    anywhere in a directory a stage claimed, except below a directory whose lock another holds; beside
    a file output only its own (sidecars, shards). Writing a file again removes only its own, of
    this machine."""
    dead_process = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_process.wait()
    host = writer_id().rpartition("-")[0]
    dead, live, elsewhere = f"{host}-{dead_process.pid}", f"{host}-1", "other-node-7-4242"  # pid 1: always running
    d = tmp_path / "stage"
    debris = [d / "sub" / f".rows.jsonl.tmp-{dead}", d / f".model.tmp-{dead}" / "model.safetensors",
              d / "checkpoints" / f".step-00000002.tmp-{dead}" / "optimizer.bin",
              d / f".model.old-{dead}" / "config.json", d / f".metrics.jsonl.tmp-{elsewhere}"]
    kept = [d / f".rows.jsonl.tmp-{live}", d / ".rlhf-workflow.json", d / "model.tmp", d / ".notes.tmp-x",
            d / ".notes.old", d / f".stamp.tmp-{host}-1712345678901", d / "checkpoints" / "step-00000001" / "trainer_state.json",
            d / "busy" / f".rows.jsonl.tmp-{dead}"]  # busy/: another stage holds its lock
    f = tmp_path / "files" / "gen.jsonl"
    debris += [f.parent / f".gen.jsonl.tmp-{dead}", f.parent / f".gen.rank1.jsonl.tmp-{dead}",
               f.parent / f".gen.settings.json.tmp-{dead}"]
    kept += [f.parent / f".other.jsonl.tmp-{dead}", f.parent / f".generous.jsonl.tmp-{dead}"]
    for path in debris + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    lock = OutputLock(d, directory=True)  # a directory no stage claimed (a mistyped output_dir): untouched
    assert lock.try_acquire() is None
    lock.release()
    assert [p for p in debris + kept if not p.exists()] == []
    (d / ".rlhf-workflow.json").write_text('{"stage": "run"}')
    busy = OutputLock(d / "busy", directory=True)
    assert busy.try_acquire() is None
    for lock in (OutputLock(d, directory=True), OutputLock(f, directory=False)):
        assert lock.try_acquire() is None
        lock.release()
    busy.release()
    assert [p for p in debris if p.exists()] == [] and [p for p in kept if not p.exists()] == []
    assert [p.name for p in (d / "checkpoints").iterdir()] == ["step-00000001"]
    assert not (d / f".model.tmp-{dead}").exists() and not (d / f".model.old-{dead}").exists()
    # where no lock is taken, writing a file again removes its own earlier temporaries of this machine
    free = tmp_path / "free"
    free.mkdir()
    for writer in (dead, live, elsewhere):
        (free / f".x.json.tmp-{writer}").write_text("x")
    atomic_write_text(free / "x.json", "{}")
    assert sorted(p.name for p in free.iterdir()) == sorted([f".x.json.tmp-{live}", f".x.json.tmp-{elsewhere}", "x.json"])


# ------------------------------------------------------------------ rows made by one set of settings


def test_resuming_with_other_settings_is_refused_and_force_starts_afresh(tiny_model_dir, files, tmp_path, capsys):
    out = tmp_path / "gen.jsonl"
    assert main(gen_args(tiny_model_dir, files["prompts"], out)) == 0
    first = digest(out)
    settings = json.loads((tmp_path / "gen.settings.json").read_text())
    assert settings["sampling"]["n"] == 2 and settings["model"] == str(tiny_model_dir.resolve())
    assert main(gen_args(tiny_model_dir, files["prompts"], out, "sampling.n=3")) == 2
    err = capsys.readouterr().err
    assert f"{out} holds the rows of `generate (hf)` made with other settings (sampling.n: 2 -> 3)" in err
    assert digest(out) == first
    assert main(gen_args(tiny_model_dir, files["prompts"], out, "sampling.n=3", "--force")) == 0
    assert digest(tmp_path / "gen.jsonl.bak-1") == first  # the old rows, kept
    assert all(len(json.loads(line)["responses"]) == 3 for line in out.read_text().splitlines())
    # the same settings continue (nothing to do) and a batch size is not a setting of the rows
    assert main(gen_args(tiny_model_dir, files["prompts"], out, "sampling.n=3", "hf.batch_size=1")) == 0


def test_annotate_with_another_judge_is_refused(files, tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    other = tmp_path / "other.py"
    other.write_text("def judge(row, response):\n    return 1.0\n")
    args = ["annotate", f"input={files['scored']}", f"output={out}", "judge.type=function"]
    assert main([*args, f"judge.function={files['judge']}:judge"]) == 0
    assert main([*args, f"judge.function={other}:judge"]) == 2
    assert "judge.function:" in capsys.readouterr().err
    assert main([*args, f"judge.function={files['judge']}:judge", "length_penalty.coef=0.1"]) == 2
    assert "length_penalty.coef: 0.0 -> 0.1" in capsys.readouterr().err


# ------------------------------------------------------------------ a directory belongs to one stage


def test_a_stage_never_writes_over_another_stages_directory(tiny_model_dir, sft_data, recipe, tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir).mkdir()
    (run_dir / ".rlhf-workflow.json").write_text('{"stage": "run"}')
    (run_dir / "metrics.jsonl").write_text('{"id": "iter_0"}\n')
    (run_dir / "config.yaml").write_text("mode: online\n")
    before = {p.name: digest(p) for p in run_dir.iterdir() if p.is_file()}
    assert main(sft_args(tiny_model_dir, sft_data, run_dir)) == 2
    err = capsys.readouterr().err
    assert f"output_dir {run_dir} holds the outputs of `run`" in err and "not of `sft`" in err
    assert {p.name: digest(p) for p in run_dir.iterdir() if p.is_file() and p.name != ".lock"} == before
    # a folder of someone's own files
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main(sft_args(tiny_model_dir, sft_data, mine, "--force")) == 2
    assert "already holds files that no rlhf-workflow command claimed (notes.txt)" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "keep me"
    # `run` always continues what is there, but only a run: not someone's folder (output_dir=.), and
    # it claims nothing there, so a second try is refused alike
    (mine / "config.yaml").write_text("my own config\n")
    for _ in range(2):
        assert main(["run", *recipe, f"output_dir={mine}"]) == 2
        assert "already holds files that no rlhf-workflow command claimed (config.yaml, notes.txt)" in capsys.readouterr().err
    assert sorted(p.name for p in mine.iterdir()) == [".lock", "config.yaml", "notes.txt"]
    assert (mine / "config.yaml").read_text() == "my own config\n"
    # --force moves the other stage's files aside, deleting nothing
    assert main(sft_args(tiny_model_dir, sft_data, run_dir, "train.max_steps=1", "--force")) == 0
    assert {p.name: digest(p) for p in (run_dir / "replaced-1").iterdir()} == before  # with its owner file
    assert json.loads((run_dir / ".rlhf-workflow.json").read_text()) == {"stage": "sft"}
    assert main(["run", *recipe, f"output_dir={run_dir}"]) == 2
    assert "holds the outputs of `sft`" in capsys.readouterr().err


def test_under_accelerate_launch_a_held_output_stops_every_process(tiny_model_dir, files, tmp_path):
    """The main process finds the lock held; every process must stop with the message (none may wait
    at a barrier for the main one)."""
    from conftest import free_port

    out = tmp_path / "gen.jsonl"
    held = OutputLock(out, directory=False)
    assert held.try_acquire() is None
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
              "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
              "-m", "rlhf_workflow", *gen_args(tiny_model_dir, files["prompts"], out)]
    try:
        start = time.monotonic()
        result = subprocess.run(launch, env=cli_env(), capture_output=True, text=True, timeout=300)
    finally:
        held.release()
    assert result.returncode != 0
    assert result.stderr.count(f"error: {out} is being written by process {os.getpid()}") == 2  # both ranks
    assert time.monotonic() - start < 120
